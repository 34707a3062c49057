"""Registration over HTTP (protocol §1-2): download and pin the root CA, connect
with the access token (legacy route on 404), classify failures for the retry policy."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from driver import __version__
from driver.settings import Settings
from frontends.qpi.tls import verify_pinned
from frontends.qpi.wire import WIRE_FORMATS, EventType, WireFormat


class RegistrationError(Exception):
    """Base of the failures below; `retry_after` None means do not retry."""

    retry_after: float | None = None


class BadToken(RegistrationError):
    """401: a configuration error. Retrying in a loop would not help."""


class DriverDisabled(RegistrationError):
    """403: an administrator disabled this driver; retry slowly."""


class OrchestratorDown(RegistrationError):
    """Connection refused, timeouts, 5xx: retry with backoff."""


class ProtocolMismatch(RegistrationError):
    """The orchestrator answered something this driver cannot use."""


@dataclass(frozen=True, slots=True)
class Registration:
    """The orchestrator's connect reply: where to dial and how to talk. What it does not
    announce, it is not sent: QPI's server announces none of the extensions, handles only
    JobResult from a driver, and drops (silently) events beyond its rate limit."""

    name: str
    nng_host: str
    nng_in_port: int
    nng_out_port: int
    ca_pem: str | None
    wire_format: WireFormat
    heartbeat_interval_s: float | None
    acks: bool
    # Event types it handles from a driver: JobResult always; Heartbeat where it announced
    # `heartbeat_interval_s` or listed it in `events`; JobStatus where listed.
    events: frozenset[str] = frozenset({EventType.JOB_RESULT})
    # Events per second it accepts from this driver (`event_rate_limit`; 0: no limit);
    # None when it does not say, and the driver's own setting applies.
    event_rate_limit: float | None = None
    # `accepts_refusals`: it takes a transient refusal (QPU_DISABLED, a full queue or
    # store) as an answer it can act on. Without it a result with `error` is final, so
    # the node holds off reading dispatches instead of refusing them.
    accepts_refusals: bool = False


class Registrar:
    def __init__(self, settings: Settings,
                 capabilities: Callable[[], dict[str, Any]]) -> None:
        """`capabilities` is read at each connect: the executor's as they are then."""
        assert settings.orchestrator_url is not None and settings.access_token is not None
        self._settings = settings
        self._base = settings.orchestrator_url
        self._token = settings.access_token
        self._capabilities = capabilities

    async def connect(self) -> Registration:
        """One attempt: CA first (so the token never goes to an unpinned peer), then connect."""
        timeout = aiohttp.ClientTimeout(total=self._settings.connect_timeout_s)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as http:
                ca_pem = None if self._settings.insecure_tcp else await self._root_ca(http)
                reply = await self._connect(http)
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise OrchestratorDown(
                f"orchestrator {self._base} unreachable: {exc.__class__.__name__}: {exc}"
            ) from None
        return self._registration(reply, ca_pem)

    async def preflight(self) -> None:
        """Reach the orchestrator and pin its CA, without registering: run while the
        executor warms up, so a wrong URL or fingerprint is reported at once."""
        if self._settings.insecure_tcp:
            return
        timeout = aiohttp.ClientTimeout(total=self._settings.connect_timeout_s)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as http:
                await self._root_ca(http)
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise OrchestratorDown(
                f"orchestrator {self._base} unreachable: {exc.__class__.__name__}: {exc}"
            ) from None

    async def _root_ca(self, http: aiohttp.ClientSession) -> str:
        url = f"{self._base}/api/pub/root-ca.pem"
        async with http.get(url) as resp:
            if resp.status >= 500:
                raise OrchestratorDown(f"GET {url} answered {resp.status}")
            if resp.status != 200:
                raise ProtocolMismatch(f"GET {url} answered {resp.status}; cannot pin the CA")
            pem = await resp.text()
        assert self._settings.ca_fingerprint is not None
        verify_pinned(pem, self._settings.ca_fingerprint, url)
        return pem

    async def _connect(self, http: aiohttp.ClientSession) -> dict[str, Any]:
        body = {
            "token": self._token.get_secret_value(),
            "host": socket.gethostname(),
            "version": __version__,
            "wire_formats": [self._settings.wire_format]
            + [f for f in WIRE_FORMATS if f != self._settings.wire_format],
            "executor": self._settings.executor,
            "capabilities": self._capabilities(),
        }
        status, reply = await self._post(http, "/api/op/drivers/connect", body)
        if status == 404:
            legacy = {
                "name": self._settings.driver_name,
                "access_token": self._token.get_secret_value(),
                "executor_type": self._settings.executor,
                "device_config": self._capabilities(),
            }
            status, reply = await self._post(http, "/api/op/qpus/connect", legacy)
        if status == 401:
            raise BadToken(
                f"orchestrator {self._base} rejected the access token (401); check "
                "QPI_ACCESS_TOKEN / access_token_file against the token the orchestrator issued"
            )
        if status == 403:
            err = DriverDisabled(
                f"orchestrator {self._base} says this driver is disabled (403); an "
                "administrator must enable it"
            )
            err.retry_after = self._settings.disabled_retry_s
            raise err
        if status >= 500 or status in (408, 429):
            raise OrchestratorDown(f"orchestrator {self._base} answered {status} to connect")
        if status != 200:
            raise ProtocolMismatch(f"orchestrator {self._base} answered {status} to connect")
        return reply

    async def _post(
        self, http: aiohttp.ClientSession, path: str, body: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        async with http.post(self._base + path, json=body) as resp:
            if resp.status != 200:
                return resp.status, {}
            try:
                data = await resp.json(content_type=None)
            except ValueError:
                raise ProtocolMismatch(
                    f"{path} answered 200 with a body that is not JSON"
                ) from None
            if not isinstance(data, dict):
                raise ProtocolMismatch(f"{path} answered 200 with a {type(data).__name__}")
            return 200, data

    def _registration(self, reply: dict[str, Any], ca_pem: str | None) -> Registration:
        try:
            fmt = reply.get("wire_format") or "json"
            if fmt not in WIRE_FORMATS:
                raise ProtocolMismatch(f"orchestrator chose unknown wire_format {fmt!r}")
            interval = reply.get("heartbeat_interval_s")
            events = {EventType.JOB_RESULT, *_strings(reply.get("events"))}
            if interval:
                events.add(EventType.HEARTBEAT)
            rate = reply.get("event_rate_limit")
            return Registration(
                name=str(reply.get("name") or self._settings.driver_name),
                nng_host=str(reply["nng_host"]),
                nng_in_port=int(reply["nng_in_port"]),
                nng_out_port=int(reply["nng_out_port"]),
                ca_pem=ca_pem,
                wire_format=fmt,
                heartbeat_interval_s=float(interval) if interval else None,
                acks=bool(reply.get("acks", False)),
                events=frozenset(events),
                event_rate_limit=None if rate is None else max(0.0, float(rate)),
                accepts_refusals=reply.get("accepts_refusals") is True,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolMismatch(f"connect reply lacks or garbles {exc}") from None


def _strings(value: Any) -> list[str]:
    if not isinstance(value, list):
        return []
    return [v for v in value if isinstance(v, str)]


class Backoff:
    """Capped exponential backoff with full jitter."""

    def __init__(self, base: float = 0.5, cap: float = 60.0) -> None:
        self.base, self.cap, self.attempt = base, cap, 0

    def next_delay(self) -> float:
        delay = random.uniform(0, min(self.cap, self.base * 2**self.attempt))
        self.attempt = min(self.attempt + 1, 32)
        return delay

    def reset(self) -> None:
        self.attempt = 0


async def sleep_or_exit(delay: float, should_exit: asyncio.Event) -> bool:
    """Sleep `delay` seconds; True when woken early by `should_exit`."""
    try:
        await asyncio.wait_for(should_exit.wait(), delay)
        return True
    except TimeoutError:
        return False
