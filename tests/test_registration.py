"""Registration against real HTTP servers on loopback: bad token, CA pin, legacy
route, disabled and down orchestrators."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from driver.settings import load_settings
from frontends.qpi.orchestrator import LocalOrchestrator
from frontends.qpi.registration import (
    Backoff,
    BadToken,
    DriverDisabled,
    OrchestratorDown,
    Registrar,
)
from frontends.qpi.tls import FingerprintMismatch, fingerprint_of_pem, generate_identity
from tests.conftest import daemon_env, start_daemon, wait_for

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Serve = Callable[[dict[tuple[str, str], Handler]], Awaitable[str]]


@pytest.fixture
async def http_app() -> AsyncIterator[Serve]:
    runners: list[web.AppRunner] = []

    async def serve(routes: dict[tuple[str, str], Handler]) -> str:
        app = web.Application()
        for (method, path), handler in routes.items():
            app.router.add_route(method, path, handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://127.0.0.1:{port}"

    yield serve
    for runner in runners:
        await runner.cleanup()


def registrar(url: str, fingerprint: str | None, token: str = "tok-123") -> Registrar:
    flags: dict[str, Any] = {"orchestrator_url": url, "access_token": token,
                             "ca_fingerprint": fingerprint}
    if fingerprint is None:
        flags["insecure_tcp"] = True
    return Registrar(load_settings(flags), lambda: {"max_qubits": 5})


async def test_wrong_token_exits_78_with_a_clear_message(tmp_path: Path) -> None:
    orch = LocalOrchestrator(port=0)
    await orch.start()
    try:
        d = start_daemon(tmp_path, daemon_env(tmp_path, orch, QPI_ACCESS_TOKEN="wrong-secret-xyz"))
        code = await asyncio.to_thread(d.proc.wait, 60)
        out = d.output()
        assert code == 78, out
        assert "rejected the access token (401)" in out
        assert "wrong-secret-xyz" not in out
        assert orch.connects == 0
    finally:
        await orch.stop()


async def test_fingerprint_mismatch_refuses_to_connect(tmp_path: Path) -> None:
    orch = LocalOrchestrator(port=0)
    await orch.start()
    other = generate_identity("127.0.0.1").ca_fingerprint
    try:
        d = start_daemon(tmp_path, daemon_env(tmp_path, orch, QPI_CA_FINGERPRINT=other))
        code = await asyncio.to_thread(d.proc.wait, 60)
        out = d.output()
        assert code == 77, out
        assert "may be intercepted" in out and "refusing to connect" in out
        assert orch.connects == 0  # the token never reached the unpinned server
    finally:
        await orch.stop()


async def test_fingerprint_accepts_colons_and_upper_case() -> None:
    orch = LocalOrchestrator(port=0)
    await orch.start()
    try:
        fp = orch.ca_fingerprint or ""
        pretty = ":".join(fp[i : i + 2] for i in range(0, 64, 2)).upper()
        session = await registrar(orch.url, pretty, orch.token).connect()
        assert session.ca_pem == (orch.identity.ca_pem if orch.identity else None)
        assert session.nng_in_port == orch.nng_in_port
    finally:
        await orch.stop()


async def test_standin_connect_reply_does_not_echo_the_access_token() -> None:
    orch = LocalOrchestrator(port=0)
    await orch.start()
    try:
        async with (aiohttp.ClientSession() as http,
                    http.post(f"{orch.url}/api/op/drivers/connect",
                              json={"token": orch.token}) as resp):
            assert resp.status == 200
            text = await resp.text()
        assert orch.token not in text
        assert json.loads(text)["auth_token"]
    finally:
        await orch.stop()


async def test_legacy_connect_route_on_404(http_app: Serve) -> None:
    seen: dict[str, object] = {}

    async def legacy(request: web.Request) -> web.Response:
        seen.update(await request.json())
        return web.json_response({"status": "success", "name": "old-qpu", "nng_host": "h",
                                  "nng_in_port": 1, "nng_out_port": 2})

    url = await http_app({("POST", "/api/op/qpus/connect"): legacy})
    session = await registrar(url, None).connect()
    assert session.name == "old-qpu" and session.wire_format == "json"
    assert seen["access_token"] == "tok-123" and "executor_type" in seen


async def test_disabled_and_down_are_classified(http_app: Serve) -> None:
    async def forbidden(_: web.Request) -> web.Response:
        return web.json_response({}, status=403)

    async def broken(_: web.Request) -> web.Response:
        return web.json_response({}, status=503)

    async def unauthorised(_: web.Request) -> web.Response:
        return web.json_response({}, status=401)

    for handler, error in ((forbidden, DriverDisabled), (broken, OrchestratorDown),
                           (unauthorised, BadToken)):
        url = await http_app({("POST", "/api/op/drivers/connect"): handler})
        with pytest.raises(error) as info:
            await registrar(url, None, token="s3cret-token").connect()
        assert "s3cret-token" not in str(info.value)
    with pytest.raises(OrchestratorDown):
        await registrar("http://127.0.0.1:9", None).connect()


async def test_tampered_ca_is_refused(http_app: Serve) -> None:
    real, fake = generate_identity("127.0.0.1"), generate_identity("127.0.0.1")

    async def root_ca(_: web.Request) -> web.Response:
        return web.Response(text=fake.ca_pem)

    url = await http_app({("GET", "/api/pub/root-ca.pem"): root_ca})
    with pytest.raises(FingerprintMismatch):
        await registrar(url, real.ca_fingerprint).connect()


def test_fingerprint_is_of_the_certificate_and_anything_else_is_refused() -> None:
    identity = generate_identity("127.0.0.1")
    der = ssl.PEM_cert_to_DER_cert(identity.ca_pem)  # the standard library's own reading
    assert fingerprint_of_pem(identity.ca_pem) == hashlib.sha256(der).hexdigest()
    # A PEM block that is not a certificate: a key, or a CERTIFICATE block of garbage.
    garbage = ("-----BEGIN CERTIFICATE-----\n" + base64.b64encode(b"not a cert" * 8).decode()
               + "\n-----END CERTIFICATE-----\n")
    for pem in (identity.key_pem, garbage, "", "<html>login page</html>"):
        with pytest.raises(FingerprintMismatch, match=r"not a PEM X\.509 certificate"):
            fingerprint_of_pem(pem)


def test_backoff_is_capped_and_jittered() -> None:
    backoff = Backoff(base=0.5, cap=4.0)
    delays = [backoff.next_delay() for _ in range(40)]
    assert all(0 <= d <= 4.0 for d in delays)
    assert len({round(d, 6) for d in delays}) > 30  # jittered, not a fixed ladder
    backoff.reset()
    assert backoff.next_delay() <= 0.5


async def test_daemon_waits_for_a_late_orchestrator(tmp_path: Path) -> None:
    orch = LocalOrchestrator(port=0)
    await orch.start()
    url, token, fp = orch.url, orch.token, orch.ca_fingerprint
    port = orch.port
    await orch.stop()
    d = start_daemon(tmp_path, daemon_env(tmp_path, None, QPI_ADDR=url, QPI_ACCESS_TOKEN=token,
                                          QPI_CA_FINGERPRINT=fp or ""))
    try:
        # It has tried, found nobody, and tried again (backoff capped at 1 s here).
        await wait_for(lambda: len(d.logged("orchestrator not reachable")) >= 2
                       or d.proc.poll() is not None,
                       timeout=30, what="the daemon to find no orchestrator, twice")
        assert d.proc.poll() is None, d.output()
        late = LocalOrchestrator(port=port, token=token)
        late.identity = orch.identity  # same CA, as a restarted orchestrator keeps it
        await late.start()
        try:
            await wait_for(lambda: late.online or d.proc.poll() is not None, timeout=30,
                           what="the daemon to connect late")
            assert late.online, d.output()
        finally:
            await late.stop()
    finally:
        assert d.stop() == 0, d.output()
    assert "orchestrator not reachable" in d.output()
