"""The embedded loopback orchestrator: a development stand-in for a QPI server,
not a production one. In memory, one driver, FIFO. It speaks the driver side of
protocol §1-6 and the job endpoints of QPI's client API that `qpi-client` uses."""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import pynng
from aiohttp import web

from driver import logs
from driver.settings import is_loopback
from executors.base import iso_utc
from frontends.qpi.nng import AsyncSocket, SocketClosed, bound_port, tls_server, url
from frontends.qpi.session import SOCKET_BUFFER
from frontends.qpi.tls import ServerIdentity, generate_identity
from frontends.qpi.wire import (
    WIRE_FORMATS,
    Envelope,
    EventType,
    FrameError,
    WireFormat,
    decode,
    encode,
)

log = logs.get("qpi.orchestrator")

FINAL = ("completed", "failed", "cancelled")
# GET /api/qpus/{name} before the driver has registered waits this long for it, so a
# script that starts the daemon and asks for its backend at once gets a usable record.
QPU_WAIT_S = 30.0


@dataclass(slots=True)
class JobRecord:
    id: str
    payload: dict[str, Any]
    status: str = "pending"  # pending -> queued -> running -> completed|failed|cancelled
    results: dict[str, Any] | None = None
    created: str = field(default_factory=iso_utc)
    updated: str = field(default_factory=iso_utc)
    dispatches: int = 0
    results_received: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "payload": self.payload,
            "results": self.results,
            "created": self.created,
            "updated": self.updated,
        }


class LocalOrchestrator:
    """Start with `await start()`; `url`, `token` and `ca_fingerprint` say how to connect."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8090,
        driver_name: str = "local",
        wire_format: WireFormat = "msgpack",
        token: str | None = None,
        acks: bool = False,
        heartbeat_interval_s: float | None = None,
        tls: bool = True,
        identity: ServerIdentity | None = None,
        nng_identity: ServerIdentity | None = None,
    ) -> None:
        """`identity` is the CA it publishes (and pins) and the certificate NNG serves;
        `nng_identity` serves another certificate on NNG (tests: an impostor)."""
        self.host, self.port = host, port
        self.driver_name = driver_name
        self.wire_format = wire_format
        self.token = token or secrets.token_urlsafe(24)
        self.acks = acks
        self.heartbeat_interval_s = heartbeat_interval_s
        if identity is None and tls:
            identity = generate_identity(host)
        self.identity = identity
        self._nng_identity = nng_identity
        self.jobs: dict[str, JobRecord] = {}
        self.events: list[Envelope] = []  # every event received from the driver, for tests
        self.last_heartbeat: dict[str, Any] | None = None
        self.capabilities: dict[str, Any] = {}
        self.executor_type = ""
        self.enabled = True
        self.connects = 0
        self._negotiated: WireFormat = "json"
        self._pending: deque[str] = deque()
        self._work = asyncio.Event()
        self._ids = itertools.count(1)
        self._push: AsyncSocket | None = None
        self._pull: AsyncSocket | None = None
        self._pipes = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._runner: web.AppRunner | None = None
        self.nng_in_port = self.nng_out_port = 0
        # Set once the driver has registered its capabilities and its pipes are up: only
        # then is the QPU listed, so qpi-client never sees num_qubits null.
        self._usable = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ca_fingerprint(self) -> str | None:
        return self.identity.ca_fingerprint if self.identity else None

    @property
    def nng_identity(self) -> ServerIdentity | None:
        """The certificate NNG serves: `identity`'s unless another was given."""
        return self._nng_identity or self.identity

    @property
    def online(self) -> bool:
        return self._pipes >= 2

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        if not is_loopback(self.host):
            log.warning(
                "the embedded orchestrator listens beyond this machine: its client API has "
                "no authentication, so anyone who can reach it can submit jobs and read "
                "every result; use it on loopback (127.0.0.1) unless the network is yours",
                host=self.host, port=self.port,
            )
        await self.start_nng()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.add_routes(
            [
                web.post("/api/op/drivers/connect", self._connect),
                web.post("/api/op/qpus/connect", self._connect_legacy),
                web.get("/api/pub/root-ca.pem", self._root_ca),
                web.post("/api/jobs", self._create_job),
                web.get("/api/jobs", self._list_jobs),
                web.get("/api/jobs/{id}", self._get_job),
                web.post("/api/jobs/{id}/cancel", self._cancel_job),
                web.get("/api/qpus", self._list_qpus),
                web.get("/api/qpus/{name}", self._get_qpu),
            ]
        )
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        if self.port == 0:
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def start_nng(self) -> None:
        """Listen on fresh ports (a restarted orchestrator gets new ones)."""
        served = self.nng_identity
        tls = served is not None
        kwargs: dict[str, Any] = {}
        if served is not None:
            kwargs["tls_config"] = tls_server(served.cert_pem, served.key_pem)
        # Socket buffers (see frontends.qpi.session): a dispatch left in the buffer when the
        # driver goes goes out on its next connection; results are read ahead only where
        # they are acked (one lost from the buffer in a restart is then resent).
        push = pynng.Push0(send_buffer_size=SOCKET_BUFFER, **kwargs)
        pull = pynng.Pull0(**kwargs)
        if self.acks:
            pull.recv_buffer_size = SOCKET_BUFFER
        self._push, self._pull = AsyncSocket(push), AsyncSocket(pull)
        self._pipes = 0
        for sock in (self._push, self._pull):
            sock.on_pipes(self._attached, self._detached)
        self.nng_in_port = bound_port(push.listen(url(self.host, 0, tls)))
        self.nng_out_port = bound_port(pull.listen(url(self.host, 0, tls)))
        self._tasks = [
            asyncio.create_task(self._receive(self._pull), name="orch-receive"),
            asyncio.create_task(self._dispatch(self._push), name="orch-dispatch"),
        ]

    async def stop_nng(self) -> None:
        for task in self._tasks:
            task.cancel()
        for sock in (self._push, self._pull):
            if sock is not None:
                sock.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks, self._pipes = [], 0

    async def stop(self) -> None:
        await self.stop_nng()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _attached(self, _pipe: pynng.Pipe) -> None:
        self._pipes += 1
        if self.online:
            log.info("driver online", name=self.driver_name)
            self._check_usable()

    def _detached(self, _pipe: pynng.Pipe) -> None:
        self._pipes = max(0, self._pipes - 1)
        log.info("driver offline", name=self.driver_name)

    # -- jobs -------------------------------------------------------------------------

    def submit(self, job: dict[str, Any], job_id: str | None = None) -> JobRecord:
        """Queue a job (under `job_id`, for tests that need a given one)."""
        job_id = job_id or f"job-{next(self._ids):06d}-{secrets.token_hex(3)}"
        record = JobRecord(id=job_id, payload=job)
        self.jobs[job_id] = record
        self._pending.append(job_id)
        self._work.set()
        return record

    async def result(self, job_id: str, timeout: float = 60.0) -> JobRecord:
        record = self.jobs[job_id]
        await asyncio.wait_for(record.done.wait(), timeout)
        return record

    async def send_event(self, type_: str, payload: dict[str, Any]) -> None:
        """Push any event to the driver (tests use it for cancel, state, garbage)."""
        assert self._push is not None
        env = Envelope(type_, payload, driver=self.driver_name)
        await self._push.send(encode(env, self._negotiated))

    async def send_raw(self, frame: bytes) -> None:
        assert self._push is not None
        await self._push.send(frame)

    async def _dispatch(self, push: AsyncSocket) -> None:
        while True:
            await self._work.wait()
            self._work.clear()
            while self._pending:
                job_id = self._pending.popleft()
                record = self.jobs.get(job_id)
                if record is None or record.status in FINAL:
                    continue
                env = Envelope(
                    EventType.JOB_DISPATCH,
                    {"job_id": job_id, "payload": record.payload},
                    driver=self.driver_name,
                )
                try:
                    await push.send(encode(env, self._negotiated))
                except (SocketClosed, asyncio.CancelledError):
                    # Stopped while waiting for a driver: the job goes out after a restart.
                    self._pending.appendleft(job_id)
                    raise
                record.dispatches += 1
                if record.status == "pending":
                    record.status = "queued"

    async def _receive(self, pull: AsyncSocket) -> None:
        while True:
            try:
                frame = await pull.recv()
            except SocketClosed:
                return
            try:
                env = decode(frame)
            except FrameError as exc:
                log.warning("malformed frame from driver", reason=str(exc))
                continue
            self.events.append(env)
            if len(self.events) > 100_000:
                del self.events[:50_000]
            await self._on_event(env)

    async def _on_event(self, env: Envelope) -> None:
        payload = env.payload
        if env.type == EventType.JOB_RESULT:
            record = self.jobs.get(str(payload.get("job_id")))
            if record is None:
                return
            record.results_received += 1
            if record.status not in FINAL:
                results = payload.get("results") or {}
                record.results = results
                if "error" in results:
                    cancelled = results.get("error_code") == "JOB_CANCELLED"
                    record.status = "cancelled" if cancelled else "failed"
                else:
                    record.status = "completed"
                record.updated = iso_utc()
                record.done.set()
            if self.acks:
                await self.send_event(EventType.RESULT_ACK, {"job_id": record.id})
        elif env.type == EventType.JOB_STATUS:
            record = self.jobs.get(str(payload.get("job_id")))
            if record is not None and record.status not in FINAL:
                record.status = str(payload.get("state") or record.status)
                record.updated = iso_utc()
        elif env.type == EventType.HEARTBEAT:
            self.last_heartbeat = {**payload, "received": iso_utc()}

    # -- HTTP: driver side --------------------------------------------------------------

    async def _connect(self, request: web.Request) -> web.Response:
        body = await _json(request)
        return self._connect_reply(body.get("token"), body)

    async def _connect_legacy(self, request: web.Request) -> web.Response:
        body = await _json(request)
        return self._connect_reply(body.get("access_token"), {
            "executor": body.get("executor_type"),
            "capabilities": body.get("device_config") or {},
            "wire_formats": ["json"],
        })

    def _connect_reply(self, token: Any, body: dict[str, Any]) -> web.Response:
        if not isinstance(token, str) or not secrets.compare_digest(token, self.token):
            return web.json_response({"status": "error", "message": "invalid token"}, status=401)
        if not self.enabled:
            return web.json_response({"status": "error", "message": "driver disabled"},
                                     status=403)
        offered = body.get("wire_formats") or ["json"]
        self._negotiated = self.wire_format if self.wire_format in offered else "json"
        if self._negotiated not in WIRE_FORMATS:
            self._negotiated = "json"
        self.capabilities = body.get("capabilities") or {}
        self.executor_type = str(body.get("executor") or "")
        self.connects += 1
        self._check_usable()
        # At-least-once: anything dispatched but unanswered goes out again.
        for record in self.jobs.values():
            if record.status in ("queued", "running") and record.id not in self._pending:
                self._pending.append(record.id)
        self._work.set()
        reply: dict[str, Any] = {
            "status": "success",
            "name": self.driver_name,
            "nng_host": self.host,
            "nng_in_port": self.nng_in_port,
            "nng_out_port": self.nng_out_port,
            "tls_hash": self.ca_fingerprint or "",
            # A session token of its own: a secret is never echoed back to its sender.
            "auth_token": secrets.token_urlsafe(24),
            "wire_format": self._negotiated,
            "acks": self.acks,
            # The extensions: it handles every event type a driver sends, takes them as
            # fast as they come, and records transient refusals as answers.
            "events": [EventType.JOB_RESULT, EventType.HEARTBEAT, EventType.JOB_STATUS],
            "event_rate_limit": 0,
            "accepts_refusals": True,
        }
        if self.heartbeat_interval_s:
            reply["heartbeat_interval_s"] = self.heartbeat_interval_s
        return web.json_response(reply)

    async def _root_ca(self, _request: web.Request) -> web.Response:
        if self.identity is None:
            return web.Response(status=404, text="this orchestrator runs without TLS")
        return web.Response(text=self.identity.ca_pem, content_type="application/x-pem-file")

    # -- HTTP: client API ---------------------------------------------------------------

    async def _create_job(self, request: web.Request) -> web.Response:
        body = await _json(request)
        if not body.get("circuits") and not (body.get("qasm") or body.get("circuit")):
            return web.json_response({"message": "a job needs 'circuits'"}, status=400)
        record = self.submit(body)
        return web.json_response(record.public(), status=200)

    async def _list_jobs(self, _request: web.Request) -> web.Response:
        return web.json_response([r.public() for r in self.jobs.values()])

    async def _get_job(self, request: web.Request) -> web.Response:
        record = self.jobs.get(request.match_info["id"])
        if record is None:
            return web.json_response({"message": "no such job"}, status=404)
        return web.json_response(record.public())

    async def _cancel_job(self, request: web.Request) -> web.Response:
        record = self.jobs.get(request.match_info["id"])
        if record is None:
            return web.json_response({"message": "no such job"}, status=404)
        if record.status == "pending":
            record.status = "cancelled"
            record.updated = iso_utc()
            record.done.set()
        elif record.status not in FINAL and self._push is not None:
            await self.send_event(EventType.JOB_CANCEL, {"job_id": record.id})
        return web.json_response(record.public())

    def _num_qubits(self) -> int | None:
        value = self.capabilities.get("max_qubits", self.capabilities.get("num_qubits"))
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        return None

    def _check_usable(self) -> None:
        # Once usable, the QPU stays listed (offline while the driver is away), with the
        # capabilities it last registered: still a record qpi-client can build a backend on.
        if self.online and self._num_qubits() is not None:
            self._usable.set()

    def qpu(self) -> dict[str, Any]:
        return {
            "name": self.driver_name,
            "status": "online" if self.online else "offline",
            "enabled": self.enabled,
            "executor_type": self.executor_type,
            "num_qubits": self._num_qubits(),
            "capabilities": self.capabilities,
            "last_heartbeat": self.last_heartbeat,
        }

    async def _list_qpus(self, _request: web.Request) -> web.Response:
        return web.json_response([self.qpu()] if self._usable.is_set() else [])

    async def _get_qpu(self, request: web.Request) -> web.Response:
        if request.match_info["name"] != self.driver_name:
            return web.json_response({"message": "no such QPU"}, status=404)
        try:
            await asyncio.wait_for(self._usable.wait(), QPU_WAIT_S)
        except TimeoutError:
            message = (f"QPU {self.driver_name!r} has not registered yet (its driver is still "
                       f"starting or cannot connect); retry in a moment")
            # The reason phrase is what requests' HTTPError shows, so it carries the message.
            return web.json_response({"message": message}, status=503, reason=message)
        return web.json_response(self.qpu())


async def _json(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(text="body is not JSON") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="body must be a JSON object")
    return body


