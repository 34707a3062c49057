"""The QPI front end: register with the orchestrator, dial its NNG pipes, read job
frames, send results and status; register again after every disconnect. Everything
orchestrator-agnostic (queue, runner, store, status) is the core's (driver/core.py)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pynng

from driver import logs
from driver.core import Core
from driver.exits import EX_CONFIG, EX_NOPERM
from driver.outcome import Outcome
from driver.store import QPI
from frontends.qpi.intake import Acknowledge, Admit, Answer, Cancel, Decision, Intake, Resend
from frontends.qpi.outbox import Outbox
from frontends.qpi.registration import (
    Backoff,
    BadToken,
    DriverDisabled,
    OrchestratorDown,
    ProtocolMismatch,
    Registrar,
    sleep_or_exit,
)
from frontends.qpi.session import OrchestratorSession
from frontends.qpi.tls import FingerprintMismatch
from frontends.qpi.tls_diagnosis import diagnose
from frontends.qpi.wire import Envelope, EventType

HOLD_POLL_S = 0.02  # while reading is held off: how often to look for room again
HEARTBEAT_SPACING_S = 0.25  # at most four status-change heartbeats a second
OUTBOX_DRAIN_S = 5.0  # at a stop, how long owed results may take to go out

log = logs.get("qpi.driver")


class QpiFrontend:
    """One QPI orchestrator (the public `sopherapps/qpi` server, or the embedded
    stand-in): its registration, session, wire and TLS."""

    name = QPI

    def __init__(self, core: Core) -> None:
        self._core = core
        self._settings = core.settings
        self._metrics = core.metrics
        self._status = core.status
        self._notifier = core.notifier
        self.outbox = Outbox(core.store, core.metrics, core.changed)
        self.outbox.on_room = core.wake
        self.intake = Intake(core)
        self.session: OrchestratorSession | None = None
        self._held = False  # disabled by an orchestrator that takes no refusals
        self._beat_now = asyncio.Event()
        self._sessions = 0

    # -- what the core asks -----------------------------------------------------------------

    async def preflight(self) -> int:
        """While the executor starts: check that the orchestrator answers and its CA
        matches the pin, so a wrong URL or fingerprint is reported without waiting."""
        try:
            await Registrar(self._settings, dict).preflight()
        except FingerprintMismatch as exc:
            log.critical("root CA fingerprint mismatch", reason=str(exc))
            return EX_NOPERM
        except (OrchestratorDown, ProtocolMismatch) as exc:
            log.warning("orchestrator not reachable yet; will keep trying", reason=str(exc))
        return 0

    def finished(self, outcomes: list[Outcome]) -> None:
        self.outbox.finish(outcomes)

    def started(self, job_ids: list[str]) -> None:
        """JobStatus "running" for jobs that are still running after a moment."""
        for job_id in job_ids:
            self.outbox.event(Envelope(EventType.JOB_STATUS,
                                       {"job_id": job_id, "state": "running"}))

    def changed(self) -> None:
        """Heartbeat at once when the status changes, not just on the timer."""
        self._beat_now.set()

    def may_run(self) -> bool:
        return not self._held and not self.outbox.backlogged

    def draining(self) -> None:
        self.beat()  # the orchestrator hears "draining" before the pipes close

    def unready(self) -> list[str]:
        if self.session is None or self.session.detached.is_set():
            return ["not connected to the orchestrator"]
        return []

    def describe(self) -> str:
        return f"connected to {self.session.host}" if self.session else "not connected"

    def background(self) -> dict[str, Callable[[], Coroutine[Any, Any, None]]]:
        return {"store-retry": self.outbox.retry_store}

    def close(self) -> int:
        self.outbox.close()
        return self.outbox.owed_on_disk()

    # -- serving ------------------------------------------------------------------------------

    async def serve(self) -> int:
        """Register, dial, serve one connection; again after every disconnect."""
        registrar = Registrar(self._settings, self._status.capabilities)
        backoff = Backoff(cap=self._settings.backoff_max_s)
        problems = self._status.problems
        while not self._core.should_exit.is_set():
            session: OrchestratorSession | None = None
            try:
                session = OrchestratorSession(await registrar.connect(),
                                              self._settings.max_frame_bytes)
                await session.open()
            except BadToken as exc:
                log.error("registration refused", reason=str(exc))
                return EX_CONFIG
            except FingerprintMismatch as exc:
                log.critical("root CA fingerprint mismatch", reason=str(exc))
                return EX_NOPERM
            except DriverDisabled as exc:
                log.warning("driver disabled", reason=str(exc), retry_in_s=exc.retry_after)
                problems["disabled"] = "disabled by the orchestrator's administrator (403)"
                self._core.changed()
                self._notifier.status("disabled by the orchestrator; retrying every "
                                      f"{exc.retry_after or 60.0:g} s")
                await self._retry_in(exc.retry_after or 60.0)
                continue
            except (OrchestratorDown, ProtocolMismatch, pynng.NNGException) as exc:
                delay = backoff.next_delay()
                await self._unreachable(exc, session, delay)
                await self._retry_in(delay)
                continue
            backoff.reset()
            problems.pop("tls", None)
            problems.pop("disabled", None)
            assert session is not None
            await self._serve_session(session)
        return 0

    async def _retry_in(self, delay: float) -> None:
        if self._sessions == 0:  # before the first READY, retrying must not trip systemd
            self._notifier.extend_timeout(delay + self._settings.connect_timeout_s + 30)
        await sleep_or_exit(delay, self._core.should_exit)

    async def _unreachable(self, exc: Exception, session: OrchestratorSession | None,
                           delay: float) -> None:
        verdict = None
        if isinstance(exc, pynng.exceptions.CryptoError) and session is not None:
            verdict = await _diagnose_tls(session)
        if verdict is not None:
            check, message = verdict
            log.error("orchestrator certificate rejected", check=check, reason=message,
                      retry_in_s=round(delay, 2))
            self._status.problems["tls"] = f"orchestrator certificate rejected ({check})"
            self._core.changed()
        else:
            log.warning("orchestrator not reachable", reason=str(exc), retry_in_s=round(delay, 2))
        self._notifier.status(f"orchestrator not reachable; retrying in {delay:.1f} s")

    async def _serve_session(self, session: OrchestratorSession) -> None:
        reg = session.registration
        self.session = session
        self.outbox.connected(reg.acks, reg.events)
        self.intake.accepts_refusals = reg.accepts_refusals
        self._hold(self.intake.disabled and not reg.accepts_refusals)
        rate = (reg.event_rate_limit if reg.event_rate_limit is not None
                else self._settings.event_rate_limit)
        log.info("connected", name=reg.name, host=reg.nng_host, wire_format=reg.wire_format,
                 tls=reg.ca_pem is not None, results_owed=self.outbox.owed,
                 events=sorted(reg.events), events_per_s=rate or None, acks=reg.acks,
                 refusals=reg.accepts_refusals)
        self._sessions += 1
        if self._sessions > 1:
            self._metrics.reconnects.inc()
        self._metrics.connected.set(1)
        self._metrics.frontend_up.labels(QPI).set(1)
        tasks = [asyncio.create_task(self._receive(session), name="receive"),
                 asyncio.create_task(self.outbox.pump(session, rate), name="send")]
        if EventType.HEARTBEAT in reg.events:
            interval = reg.heartbeat_interval_s or self._settings.heartbeat_interval
            tasks.append(asyncio.create_task(self._heartbeats(interval), name="heartbeat"))
        (self._notifier.ready if self._sessions == 1 else self._notifier.status)(
            self._status.describe())
        stop = asyncio.create_task(self._core.should_exit.wait())
        gone = asyncio.create_task(session.detached.wait())
        try:
            await asyncio.wait([stop, gone, *tasks], return_when=asyncio.FIRST_COMPLETED)
            if self._core.should_exit.is_set():
                drained = asyncio.create_task(self._core.drained.wait())
                await asyncio.wait([drained, gone], return_when=asyncio.FIRST_COMPLETED)
                drained.cancel()
                await self.outbox.drained(session, OUTBOX_DRAIN_S)
        finally:
            self.session = None
            self._metrics.connected.set(0)
            self._metrics.frontend_up.labels(QPI).set(0)
            for task in (*tasks, stop, gone):
                task.cancel()
            session.close()
            await asyncio.gather(*tasks, return_exceptions=True)
        if not self._core.should_exit.is_set():
            log.warning("disconnected from orchestrator; registering again",
                        results_owed=self.outbox.owed)
            self._notifier.status("disconnected; registering again")

    async def _receive(self, session: OrchestratorSession) -> None:
        refusals = session.registration.accepts_refusals
        async for frame in session.frames():
            if self._core.should_exit.is_set():
                return
            try:
                self._route(self.intake.decide(frame))
            except Exception:  # a bug in one handler must not stop the receive loop
                log.exception("event handler failed", size=len(frame))
            if not refusals:
                self._hold(self.intake.disabled)
                await self._room_for_jobs(session)

    def _hold(self, held: bool) -> None:
        """While held (disabled by an orchestrator that takes no refusals), its jobs wait
        in the queue: none is handed to the executor."""
        if self._held and not held:
            self._core.wake()
        self._held = held

    async def _room_for_jobs(self, session: OrchestratorSession) -> None:
        """Backpressure for an orchestrator that takes no refusals: while the queue or the
        store is full, read nothing (it keeps the jobs, pending, until the node reads)."""
        full = self.intake.full()
        if full is None:
            return
        log.info("holding off dispatches", reason=full.message)
        self._metrics.intake_held.set(1)
        try:
            while full is not None and not session.detached.is_set():
                await asyncio.sleep(HOLD_POLL_S)
                full = self.intake.full()
        finally:
            self._metrics.intake_held.set(0)
        log.info("reading dispatches again")

    def _route(self, decision: Decision) -> None:
        match decision:
            case Admit(job_id, spec):
                self._core.admit(QPI, job_id, spec)
            case Answer(outcome, durable=True):
                self._core.finish(QPI, [outcome])
            case Answer(outcome, durable=False):
                self._core.count(QPI, [outcome])
                self.outbox.answer(outcome)
            case Resend(outcome):
                self.outbox.resend(outcome)
            case Cancel(job_id):
                self._core.cancel(QPI, job_id)
            case Acknowledge(job_id):
                self.outbox.acked(job_id)

    # -- heartbeats ---------------------------------------------------------------------------

    def beat(self) -> None:
        if self.session is None or not self.outbox.takes(EventType.HEARTBEAT):
            return
        self.outbox.event(Envelope(EventType.HEARTBEAT, self._status.heartbeat(self.outbox.owed)))
        self._metrics.heartbeats.inc()

    async def _heartbeats(self, interval: float) -> None:
        """One at once on connect, then every `interval`, and soon after each change."""
        self._beat_now.set()
        last = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._beat_now.wait(), interval)
            # Back-to-back short jobs flip busy/idle every few ms: coalesce those beats.
            wait = last + HEARTBEAT_SPACING_S - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            last = time.monotonic()
            self._beat_now.clear()
            self.beat()


async def _diagnose_tls(session: OrchestratorSession) -> tuple[str, str] | None:
    """Why the NNG endpoint's certificate was refused (issuer or host name), if known."""
    reg = session.registration
    if reg.ca_pem is None:
        return None
    verdict = await asyncio.to_thread(diagnose, reg.nng_host, reg.nng_in_port, reg.ca_pem)
    if verdict is None:
        return None
    return str(verdict.check), str(verdict.message)
