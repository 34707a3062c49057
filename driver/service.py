"""The daemon's life story: open the store, start the executor (checking the
orchestrator meanwhile), register, serve, drain, stop. `Driver.run()` reads in that
order; each concern is a part of its own (see docs/architecture.md)."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import pynng

from driver import __version__, logs
from driver.exits import (
    EX_CANTCREAT,
    EX_CONFIG,
    EX_DATAERR,
    EX_NOPERM,
    EX_SOFTWARE,
    EX_UNAVAILABLE,
)
from driver.intake import Acknowledge, Admit, Answer, Cancel, Decision, Intake, Resend
from driver.jobs import Limits
from driver.metrics import HealthServer, Metrics, try_nvml
from driver.outbox import Outbox
from driver.processes import ExecutorProcess, StartFailedError
from driver.registration import (
    Backoff,
    BadToken,
    DriverDisabled,
    OrchestratorDown,
    ProtocolMismatch,
    Registrar,
    sleep_or_exit,
)
from driver.runner import JobRunner
from driver.sdnotify import Notifier
from driver.session import OrchestratorSession
from driver.settings import ConfigError, Settings
from driver.status import NodeStatus, announcer
from driver.store import ResultStore
from driver.store_repair import describe_open_failure
from driver.tls import FingerprintMismatch
from driver.tls_diagnosis import diagnose
from driver.wire import EventType

FAULT_RETRY_S = 5.0
PRUNE_EVERY_S = 600.0
TASK_RESTARTS_PER_MINUTE = 5
HOLD_POLL_S = 0.02  # while reading is held off: how often to look for room again


log = logs.get("qpi.driver")


@dataclass(frozen=True, slots=True)
class Parts:
    """What the Driver builds once the store is open."""

    outbox: Outbox
    runner: JobRunner
    status: NodeStatus
    intake: Intake


class Driver:
    """Owns the parts and the exit flag; `run()` is startup, serve, shutdown."""

    def __init__(self, settings: Settings,
                 reload_settings: Callable[[], Settings] | None = None) -> None:
        self.settings = settings
        self._reload_settings = reload_settings
        self.should_exit = asyncio.Event()
        self.exit_code = 0
        self.metrics = Metrics()
        self.notifier = Notifier.from_environ(os.environ)
        self.executor = ExecutorProcess(settings.executor, settings.executor_options,
                                        __version__)
        self.store: ResultStore | None = None
        self.parts: Parts | None = None
        self._health: HealthServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._signals = 0
        self._sessions = 0

    # -- life story -------------------------------------------------------------------------

    async def run(self) -> int:
        code = await self.startup()
        try:
            if code == 0:
                code = await self.serve()
        finally:
            await self.shutdown()
        return code or self.exit_code

    async def startup(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.handle_exit, sig)
        loop.add_signal_handler(signal.SIGHUP, self.handle_reload)
        self._tasks.append(asyncio.create_task(self.notifier.run_watchdog()))
        code = await self._serve_health() or self._open_store()
        if code:
            return code
        assert self.store is not None
        self._assemble(self.store)
        self.notifier.status(f"starting executor {self.settings.executor}")
        code = await self._start_executor()
        if code:
            return code
        runner = self._p.runner
        for name, part in (("job-runner", runner.run), ("parser", runner.parser.serve),
                           ("store-retry", self._p.outbox.retry_store),
                           ("calibration", self._calibration_schedule),
                           ("prune", self._prune_store)):
            self._supervise(name, part)
        self.notifier.status("executor ready; registering with the orchestrator")
        return 0

    async def serve(self) -> int:
        """Register, dial, serve one connection; again after every disconnect."""
        registrar = Registrar(self.settings, self._p.status.capabilities)
        backoff = Backoff(cap=self.settings.backoff_max_s)
        while not self.should_exit.is_set():
            session: OrchestratorSession | None = None
            try:
                session = OrchestratorSession(await registrar.connect(),
                                              self.settings.max_frame_bytes)
                await session.open()
            except BadToken as exc:
                log.error("registration refused", reason=str(exc))
                return EX_CONFIG
            except FingerprintMismatch as exc:
                log.critical("root CA fingerprint mismatch", reason=str(exc))
                return EX_NOPERM
            except DriverDisabled as exc:
                log.warning("driver disabled", reason=str(exc), retry_in_s=exc.retry_after)
                self._p.status.problems["disabled"] = ("disabled by the orchestrator's "
                                                       "administrator (403)")
                self._p.status.changed()
                self.notifier.status("disabled by the orchestrator; retrying every "
                                     f"{exc.retry_after or 60.0:g} s")
                await self._retry_in(exc.retry_after or 60.0)
                continue
            except (OrchestratorDown, ProtocolMismatch, pynng.NNGException) as exc:
                delay = backoff.next_delay()
                await self._unreachable(exc, session, delay)
                await self._retry_in(delay)
                continue
            backoff.reset()
            self._p.status.problems.pop("tls", None)
            self._p.status.problems.pop("disabled", None)
            assert session is not None
            await self._serve_session(session)
        return 0

    async def shutdown(self) -> None:
        if self._health is not None:
            await self._health.stop()
        for task in self._tasks[1:]:
            task.cancel()
        await asyncio.gather(*self._tasks[1:], return_exceptions=True)
        owed = queued = 0
        if self.parts is not None:
            await self.parts.runner.stop()
            self.parts.outbox.close()
            owed, queued = self.parts.outbox.owed_on_disk(), self.parts.runner.waiting
        else:
            await self.executor.stop()
        if self.store is not None:
            self.store.close()
        log.info("stopped", results_owed=owed, queued_not_run=queued)
        # The watchdog goes last: systemd still watches a unit while it stops.
        self._tasks[0].cancel()
        self.notifier.close()

    # -- signals ------------------------------------------------------------------------------

    def handle_exit(self, sig: int) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second signal: exiting at once", signal=signal.Signals(sig).name)
            self.executor.kill()
            os._exit(1)
        running = self.parts.runner.running if self.parts is not None else []
        log.info("stop requested: draining", signal=signal.Signals(sig).name, running=running)
        self.stop()
        self.notifier.stopping(f"draining: {len(running)} job(s) running")

    def stop(self, code: int = 0) -> None:
        self.exit_code = self.exit_code or code
        self.should_exit.set()
        if self.parts is not None:
            self._p.runner.stop_taking_jobs()
            self._p.status.draining = True
            self._p.status.beat()  # the orchestrator hears "draining" before the pipes close

    def handle_reload(self) -> None:
        """SIGHUP: re-read the configuration for what can change live (logging), and
        refresh the executor's calibration. The rest needs a restart."""
        self.notifier.reloading("reloading")
        if self.parts is not None:
            self._p.runner.request_calibration()
        try:
            fresh = self._reload_settings() if self._reload_settings else self.settings
            logs.configure(fresh.log_format, fresh.log_level)
        except ConfigError as exc:
            log.error("reload failed; keeping the running configuration", reason=str(exc))
        else:
            log.info("reloaded", log_level=fresh.log_level)
        self.notifier.ready(self._p.status.describe() if self.parts is not None else "ready")

    # -- startup steps ----------------------------------------------------------------------

    async def _serve_health(self) -> int:
        addr = self.settings.metrics_addr
        if not addr:
            return 0
        self._health = HealthServer(self.metrics, self._unready)
        try:
            await self._health.start(addr)
        except OSError as exc:
            log.error("cannot serve metrics", addr=addr, reason=exc.strerror)
            return EX_CONFIG
        log.info("metrics listening", addr=addr, port=self._health.port)
        return 0

    def _unready(self) -> list[str]:
        return self.parts.status.unready_reasons() if self.parts is not None else ["starting"]

    def _open_store(self) -> int:
        path = self.settings.data_dir / "results.sqlite3"
        try:
            self.store = ResultStore(path, self.settings.result_retention_s,
                                     self.settings.result_max_rows)
            interrupted = self.store.recover_interrupted()
        except (OSError, sqlite3.Error) as exc:
            if self.store is not None:
                self.store.close()
                self.store = None
            damage = describe_open_failure(path, exc)
            if damage is not None:
                log.error(damage, path=str(path), reason=str(exc))
                return EX_DATAERR
            log.error("cannot open the result store; set data_dir to a writable directory",
                      path=str(path), reason=str(exc))
            return EX_CANTCREAT
        if interrupted:
            log.warning("jobs interrupted by the last stop are answered as failed",
                        jobs=len(interrupted))
        return 0

    def _assemble(self, store: ResultStore) -> None:
        """Build the parts around the store: outbox, runner, status, intake."""
        outbox = Outbox(store, self.metrics, self.settings.executor, self._changed)
        problems: dict[str, str] = {}
        runner = JobRunner(self.settings, self.executor, store, self.metrics, outbox.finish,
                           announcer(outbox), self._changed, problems,
                           may_run=lambda: not outbox.backlogged)
        outbox.on_room = runner.wake
        status = NodeStatus(self.settings.executor, self.metrics, runner, outbox, store,
                            self.notifier, problems)
        intake = Intake(self.metrics, store, self.settings.max_queued_jobs,
                        runner.__contains__, lambda: runner.waiting)
        self.metrics.queue_depth.set_function(lambda: runner.waiting)
        self.parts = Parts(outbox, runner, status, intake)

    @property
    def _p(self) -> Parts:
        assert self.parts is not None, "the parts are built at startup"
        return self.parts

    def _changed(self, beat: bool = False) -> None:
        self._p.status.changed(beat)

    async def _start_executor(self) -> int:
        """Start the executor; meanwhile check that the orchestrator answers and its CA
        matches the pin, so a wrong URL or fingerprint is reported without waiting."""
        s = self.settings
        check = asyncio.create_task(Registrar(s, dict).preflight())
        start = asyncio.create_task(self.executor.start())
        await asyncio.wait([check, start], return_when=asyncio.FIRST_COMPLETED)
        if check.done() and isinstance(check.exception(), FingerprintMismatch):
            log.critical("root CA fingerprint mismatch", reason=str(check.exception()))
            start.cancel()
            await asyncio.gather(start, return_exceptions=True)
            return EX_NOPERM
        try:
            await start
        except StartFailedError as exc:
            check.cancel()
            log.error("executor unavailable", executor=s.executor, reason=exc.reason)
            if exc.misconfigured:
                return EX_CONFIG
            return EX_UNAVAILABLE if exc.unavailable else 1
        try:
            await check
        except FingerprintMismatch as exc:
            log.critical("root CA fingerprint mismatch", reason=str(exc))
            return EX_NOPERM
        except (OrchestratorDown, ProtocolMismatch) as exc:
            log.warning("orchestrator not reachable yet; will keep trying", reason=str(exc))
        caps = self.executor.capabilities
        self._p.runner.calibrated_at = time.time()
        self.metrics.executor_info.info({"executor": s.executor, "device": str(caps.device),
                                         "precision": str(caps.precision),
                                         "max_qubits": str(caps.max_qubits)})
        if caps.device != "cpu" and (nvml := try_nvml()) is not None:
            self.metrics.add_collector(nvml)
        limits = Limits(max_qubits=min(s.max_qubits or caps.max_qubits, caps.max_qubits),
                        max_shots=min(s.max_shots, caps.max_shots),
                        max_circuits=s.max_circuits, max_circuit_bytes=s.max_circuit_bytes)
        self._p.intake.limits, self._p.intake.meas_levels = limits, tuple(caps.meas_levels)
        await self._p.runner.start(limits)
        log.info("executor ready", executor=s.executor, pid=self.executor.pid,
                 max_qubits=limits.max_qubits, device=caps.device, precision=caps.precision)
        return 0

    def _supervise(self, name: str, part: Callable[[], Coroutine[Any, Any, None]]) -> None:
        def give_up() -> None:
            self.notifier.status(f"stopping: {name} keeps failing")
            self.stop(EX_SOFTWARE)
        self._tasks.append(asyncio.create_task(supervised(name, part, give_up), name=name))

    # -- serving ------------------------------------------------------------------------------

    async def _retry_in(self, delay: float) -> None:
        if self._sessions == 0:  # before the first READY, retrying must not trip systemd
            self.notifier.extend_timeout(delay + self.settings.connect_timeout_s + 30)
        await sleep_or_exit(delay, self.should_exit)

    async def _unreachable(self, exc: Exception, session: OrchestratorSession | None,
                           delay: float) -> None:
        verdict = None
        if isinstance(exc, pynng.exceptions.CryptoError) and session is not None:
            verdict = await _diagnose_tls(session)
        if verdict is not None:
            check, message = verdict
            log.error("orchestrator certificate rejected", check=check, reason=message,
                      retry_in_s=round(delay, 2))
            self._p.status.problems["tls"] = f"orchestrator certificate rejected ({check})"
            self._p.status.changed()
        else:
            log.warning("orchestrator not reachable", reason=str(exc), retry_in_s=round(delay, 2))
        self.notifier.status(f"orchestrator not reachable; retrying in {delay:.1f} s")

    async def _serve_session(self, session: OrchestratorSession) -> None:
        reg = session.registration
        self._p.status.session = session
        self._p.outbox.connected(reg.acks, reg.events)
        self._p.intake.accepts_refusals = reg.accepts_refusals
        self._p.runner.hold(self._p.intake.disabled and not reg.accepts_refusals)
        rate = (reg.event_rate_limit if reg.event_rate_limit is not None
                else self.settings.event_rate_limit)
        log.info("connected", name=reg.name, host=reg.nng_host, wire_format=reg.wire_format,
                 tls=reg.ca_pem is not None, results_owed=self._p.outbox.owed,
                 events=sorted(reg.events), events_per_s=rate or None, acks=reg.acks,
                 refusals=reg.accepts_refusals)
        self._sessions += 1
        if self._sessions > 1:
            self.metrics.reconnects.inc()
        self.metrics.connected.set(1)
        tasks = [asyncio.create_task(self._receive(session), name="receive"),
                 asyncio.create_task(self._p.outbox.pump(session, rate), name="send")]
        if EventType.HEARTBEAT in reg.events:
            interval = reg.heartbeat_interval_s or self.settings.heartbeat_interval
            tasks.append(asyncio.create_task(self._p.status.heartbeats(interval),
                                             name="heartbeat"))
        (self.notifier.ready if self._sessions == 1 else self.notifier.status)(
            self._p.status.describe())
        stop = asyncio.create_task(self.should_exit.wait())
        gone = asyncio.create_task(session.detached.wait())
        try:
            await asyncio.wait([stop, gone, *tasks], return_when=asyncio.FIRST_COMPLETED)
            if self.should_exit.is_set():
                await self._p.runner.drain(self.settings.drain_timeout_s)
                await self._p.outbox.drained(session, 5.0)
        finally:
            self._p.status.session = None
            self.metrics.connected.set(0)
            for task in (*tasks, stop, gone):
                task.cancel()
            session.close()
            await asyncio.gather(*tasks, return_exceptions=True)
        if not self.should_exit.is_set():
            log.warning("disconnected from orchestrator; registering again",
                        results_owed=self._p.outbox.owed)
            self.notifier.status("disconnected; registering again")

    async def _receive(self, session: OrchestratorSession) -> None:
        refusals = session.registration.accepts_refusals
        async for frame in session.frames():
            if self.should_exit.is_set():
                return
            try:
                self._route(self._p.intake.decide(frame))
            except Exception:  # a bug in one handler must not stop the receive loop
                log.exception("event handler failed", size=len(frame))
            if not refusals:
                self._p.runner.hold(self._p.intake.disabled)
                await self._room_for_jobs(session)

    async def _room_for_jobs(self, session: OrchestratorSession) -> None:
        """Backpressure for an orchestrator that takes no refusals: while the queue or the
        store is full, read nothing (it keeps the jobs, pending, until the node reads)."""
        full = self._p.intake.full()
        if full is None:
            return
        log.info("holding off dispatches", reason=full.message)
        self.metrics.intake_held.set(1)
        try:
            while full is not None and not session.detached.is_set():
                await asyncio.sleep(HOLD_POLL_S)
                full = self._p.intake.full()
        finally:
            self.metrics.intake_held.set(0)
        log.info("reading dispatches again")

    def _route(self, decision: Decision) -> None:
        match decision:
            case Admit(job_id, spec):
                self._p.runner.admit(job_id, spec)
            case Answer(outcome, durable=True):
                self._p.outbox.finish([outcome])
            case Answer(outcome, durable=False):
                self._p.outbox.answer(outcome)
            case Resend(outcome):
                self._p.outbox.resend(outcome)
            case Cancel(job_id):
                self._p.runner.cancel(job_id)
            case Acknowledge(job_id):
                self._p.outbox.acked(job_id)

    # -- schedules ----------------------------------------------------------------------------

    async def _calibration_schedule(self) -> None:
        while True:
            # A faulty device is asked again soon: that is when it gets reconnected.
            period = self.settings.calibration_interval_s
            await asyncio.sleep(min(FAULT_RETRY_S, period) if self.executor.fault else period)
            self._p.runner.request_calibration()

    async def _prune_store(self) -> None:
        assert self.store is not None
        while True:
            gone = self.store.prune()
            if gone:
                log.info("pruned delivered results past retention", rows=gone)
            await asyncio.sleep(PRUNE_EVERY_S)


async def supervised(name: str, part: Callable[[], Coroutine[Any, Any, None]],
                     give_up: Callable[[], None], pause_s: float = 1.0) -> None:
    """Run a background part; if it dies, say so at once and restart it. One that keeps
    dying (more than TASK_RESTARTS_PER_MINUTE) calls `give_up`: never limp on half-alive."""
    failures: list[float] = []
    while True:
        try:
            await part()
            return
        except Exception:
            now = time.monotonic()
            failures = [t for t in failures if now - t < 60] + [now]
            if len(failures) > TASK_RESTARTS_PER_MINUTE:
                log.critical("a part of the daemon keeps failing; stopping", part=name)
                give_up()
                return
            log.exception("a part of the daemon failed; restarting it", part=name)
            await asyncio.sleep(pause_s)


async def _diagnose_tls(session: OrchestratorSession) -> tuple[str, str] | None:
    """Why the NNG endpoint's certificate was refused (issuer or host name), if known."""
    reg = session.registration
    if reg.ca_pem is None:
        return None
    verdict = await asyncio.to_thread(diagnose, reg.nng_host, reg.nng_in_port, reg.ca_pem)
    if verdict is None:
        return None
    return str(verdict.check), str(verdict.message)
