"""An impostor certificate on the NNG endpoint (another CA; the right CA for another host
name): the diagnosis names the failed check the way NNG applies it, and the daemon says
so as an error, keeps retrying, and is unready with the reason."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pynng
import pytest

from frontends.qpi.nng import tls_client, tls_server, url
from frontends.qpi.orchestrator import LocalOrchestrator
from frontends.qpi.tls import CertificateAuthority, ServerIdentity, generate_identity
from frontends.qpi.tls_diagnosis import diagnose
from tests.conftest import daemon_env, start_daemon, wait_for

HOST = "127.0.0.1"
REJECTED = "orchestrator certificate rejected"


def identities() -> tuple[ServerIdentity, dict[str, ServerIdentity]]:
    """The genuine identity (its CA is the pinned one) and what each endpoint serves."""
    ca = CertificateAuthority.generate()
    genuine = ca.issue(["localhost", HOST])
    return genuine, {
        "untrusted issuer": generate_identity(HOST),  # a certificate for HOST, another CA
        "host name mismatch": ca.issue(["impostor.invalid"]),  # the pinned CA, another name
        "good": genuine,
    }


@pytest.fixture
def endpoint(request: pytest.FixtureRequest) -> Iterator[tuple[int, str, str]]:
    """An NNG TLS listener on loopback serving one of the identities: (port, CA, kind)."""
    genuine, served = identities()
    kind = str(request.param)
    served_by = served[kind]
    sock = pynng.Push0(tls_config=tls_server(served_by.cert_pem, served_by.key_pem))
    listener = sock.listen(url(HOST, 0, tls=True))
    port = int(str(listener.local_address).rpartition(":")[2])
    try:
        yield port, genuine.ca_pem, kind
    finally:
        sock.close()


def _nng_accepts(port: int, ca_pem: str) -> bool:
    """What NNG's own client (as the daemon configures it) makes of the endpoint."""
    with pynng.Pull0(tls_config=tls_client(HOST, ca_pem)) as pull:
        try:
            pull.dial(url(HOST, port, tls=True), block=True)
        except pynng.CryptoError:
            return False
        return True


@pytest.mark.parametrize("endpoint", ["untrusted issuer", "host name mismatch", "good"],
                         indirect=True)
def test_diagnosis_names_the_check_nng_fails(endpoint: tuple[int, str, str]) -> None:
    port, ca_pem, kind = endpoint
    verdict = diagnose(HOST, port, ca_pem)
    assert _nng_accepts(port, ca_pem) == (kind == "good")  # the same rules as NNG
    if kind == "good":
        assert verdict is None
        return
    assert verdict is not None and verdict.check == kind, verdict
    assert verdict.endpoint == f"{HOST}:{port}"
    text = verdict.message
    assert f"{HOST}:{port}" in text and "may be intercepted" in text
    assert "misconfigured" in text and "retrying" in text
    if kind == "untrusted issuer":
        assert "pinned root CA" in text and "QPI_CA_FINGERPRINT" in text
    else:
        assert "impostor.invalid" in text and "subjectAltName" in text
    assert len(verdict.fingerprint) == 64


def test_diagnosis_of_an_endpoint_that_is_not_there() -> None:
    with socket.socket() as free:
        free.bind((HOST, 0))
        port = free.getsockname()[1]
    assert diagnose(HOST, port, identities()[0].ca_pem, timeout=2) is None


# -- the daemon against an impostor (wired by the daemon's dial) -----------------------


def _events(output: str) -> list[dict[str, Any]]:
    events = []
    for line in output.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


def _readyz(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/readyz", timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.parametrize("check", ["untrusted issuer", "host name mismatch"])
async def test_daemon_reports_an_impostor_nng_certificate(tmp_path: Path, check: str) -> None:
    """Registration over HTTP passes (the pinned CA is served there), the NNG endpoint
    presents the impostor: the daemon logs `orchestrator certificate rejected` at level
    error with `check`, retries, and /readyz lists the reason; never a pipe."""
    genuine, served = identities()
    orch = LocalOrchestrator(port=0, identity=genuine, nng_identity=served[check])
    await orch.start()
    d = start_daemon(tmp_path, daemon_env(tmp_path, orch, QPI_METRICS_ADDR=f"{HOST}:0"))
    try:
        def rejected() -> list[dict[str, Any]]:
            return [e for e in _events(d.output()) if e.get("event") == REJECTED]

        await wait_for(lambda: len(rejected()) >= 2 or d.proc.poll() is not None,
                       timeout=90, what="two rejections (it keeps retrying)")
        assert d.proc.poll() is None, d.output()
        first = rejected()[0]
        assert first["level"] == "error", first
        assert first["check"] == check, first
        assert not orch.online and orch.connects >= 2
        ports = [e["port"] for e in _events(d.output()) if e.get("event") == "metrics listening"]
        assert ports, d.output()
        status, body = await asyncio.to_thread(_readyz, int(ports[0]))
        assert status == 503, body
        assert any(check in reason for reason in body.get("reasons", [])), body
    finally:
        code = d.stop()
        await orch.stop()
    assert code == 0, d.output()
