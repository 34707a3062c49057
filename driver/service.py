"""The daemon's life story: open the store, start the executor (each front end
checking its orchestrator meanwhile), serve every front end, drain, stop. `Driver.run()`
reads in that order; each concern is a part of its own (see docs/architecture.md)."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from driver import __version__, logs
from driver.core import Core, Frontend, load_frontend
from driver.exits import EX_CANTCREAT, EX_CONFIG, EX_DATAERR, EX_SOFTWARE, EX_UNAVAILABLE
from driver.jobs import Limits
from driver.metrics import HealthServer, Metrics, try_nvml
from driver.processes import ExecutorProcess, StartFailedError
from driver.runner import JobRunner
from driver.sdnotify import Notifier
from driver.settings import ConfigError, Settings
from driver.status import NodeStatus
from driver.store import ResultStore
from driver.store_repair import describe_open_failure

FAULT_RETRY_S = 5.0
PRUNE_EVERY_S = 600.0
TASK_RESTARTS_PER_MINUTE = 5
FRONTEND_DRAIN_S = 15.0  # after the runner drained: how long front ends may take to finish


log = logs.get("qpi.driver")


@dataclass(frozen=True, slots=True)
class Parts:
    """What the Driver builds once the store is open."""

    core: Core
    runner: JobRunner
    status: NodeStatus
    frontends: list[Frontend]


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
                                        __version__, settings.executor_spin_s)
        self.store: ResultStore | None = None
        self.parts: Parts | None = None
        self._health: HealthServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._signals = 0

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
        code = self._assemble(self.store)
        if code:
            return code
        self.notifier.status(f"starting executor {self.settings.executor}")
        code = await self._start_executor()
        if code:
            return code
        runner = self._p.runner
        parts = {"job-runner": runner.run, "parser": runner.parser.serve,
                 "calibration": self._calibration_schedule, "prune": self._prune_store}
        for frontend in self._p.frontends:
            parts.update(frontend.background())
        for name, part in parts.items():
            self._supervise(name, part)
        self.notifier.status("executor ready; serving " + ", ".join(
            f.name for f in self._p.frontends))
        return 0

    async def serve(self) -> int:
        """Serve every front end until the node stops or one of them ends (its code is the
        node's); then drain the runner and let each front end hand over what is owed."""
        serving = {asyncio.create_task(f.serve(), name=f"frontend-{f.name}"): f
                   for f in self._p.frontends}
        stop = asyncio.create_task(self.should_exit.wait())
        done, _ = await asyncio.wait([stop, *serving], return_when=asyncio.FIRST_COMPLETED)
        code = 0
        for task in done:
            if task is not stop:
                code = code or _ended(task, serving[task].name)
        if not self.should_exit.is_set():
            self.stop(code)
        await self._p.runner.drain(self.settings.drain_timeout_s)
        self._p.core.drained.set()
        pending = [t for t in serving if not t.done()]
        if pending:
            _, late = await asyncio.wait(pending, timeout=FRONTEND_DRAIN_S)
            for task in late:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for task in pending:
                if not task.cancelled():
                    code = code or _ended(task, serving[task].name)
        stop.cancel()
        return code

    async def shutdown(self) -> None:
        if self._health is not None:
            await self._health.stop()
        for task in self._tasks[1:]:
            task.cancel()
        await asyncio.gather(*self._tasks[1:], return_exceptions=True)
        owed = queued = 0
        if self.parts is not None:
            await self.parts.runner.stop()
            owed = sum(frontend.close() for frontend in self.parts.frontends)
            queued = self.parts.runner.waiting
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
            for frontend in self._p.frontends:
                frontend.draining()  # each orchestrator hears it before the pipes close

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
            interrupted = self.store.recover_interrupted(resumes=self.settings.executor)
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

    def _assemble(self, store: ResultStore) -> int:
        """Build the parts around the store: the core (runner, status) and the front ends
        the settings name."""
        problems: dict[str, str] = {}
        runner = JobRunner(self.settings, self.executor, store, self.metrics,
                           lambda origin, outcomes: self._p.core.finish(origin, outcomes),
                           lambda origin, ids: self._p.core.started(origin, ids),
                           self._changed, problems,
                           may_run=lambda origin: self._p.core.may_run(origin))
        status = NodeStatus(self.settings.executor, self.metrics, runner, store,
                            self.notifier, problems)
        core = Core(self.settings, self.metrics, store, runner, status, self.notifier,
                    self.should_exit)
        frontends: list[Frontend] = []
        for name in self.settings.frontends:
            try:
                frontend = load_frontend(name)(core)
            except ValueError as exc:
                log.error("front end unavailable", frontend=name, reason=str(exc))
                return EX_CONFIG
            core.attach(frontend)
            frontends.append(frontend)
        status.frontend_reasons = lambda: [r for f in frontends for r in f.unready()]
        status.frontend_summary = lambda: "; ".join(f.describe() for f in frontends)
        self.metrics.queue_depth.set_function(lambda: runner.waiting)
        self.parts = Parts(core, runner, status, frontends)
        return 0

    @property
    def _p(self) -> Parts:
        assert self.parts is not None, "the parts are built at startup"
        return self.parts

    def _changed(self, beat: bool = False) -> None:
        self._p.core.changed(beat)

    async def _start_executor(self) -> int:
        """Start the executor; meanwhile each front end checks its orchestrator (QPI: it
        answers and its CA matches the pin), so a wrong URL or fingerprint is reported
        without waiting."""
        s = self.settings
        checks = [asyncio.create_task(f.preflight()) for f in self._p.frontends]
        start = asyncio.create_task(self.executor.start())
        pending: set[asyncio.Task[Any]] = {start, *checks}
        while not start.done():
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            failed = [c.result() for c in done if c is not start and c.result()]
            if failed:
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                return int(failed[0])
        try:
            await start
        except StartFailedError as exc:
            for task in checks:
                task.cancel()
            await asyncio.gather(*checks, return_exceptions=True)
            log.error("executor unavailable", executor=s.executor, reason=exc.reason)
            if exc.misconfigured:
                return EX_CONFIG
            return EX_UNAVAILABLE if exc.unavailable else 1
        for code in await asyncio.gather(*checks):
            if code:
                return int(code)
        caps = self.executor.capabilities
        self._p.runner.calibrated_at = time.time()
        self.metrics.executor_info.info({"executor": s.executor, "device": str(caps.device),
                                         "precision": str(caps.precision),
                                         "max_qubits": str(caps.max_qubits)})
        if caps.device != "cpu" and (nvml := try_nvml()) is not None:
            self.metrics.add_collector(nvml)
        limits = Limits(max_qubits=min(s.max_qubits or caps.max_qubits, caps.max_qubits),
                        max_shots=min(s.max_shots, caps.max_shots),
                        max_circuits=s.max_circuits, max_circuit_bytes=s.max_circuit_bytes,
                        job_timeout_s=s.job_timeout_s)
        self._p.core.limits, self._p.core.meas_levels = limits, tuple(caps.meas_levels)
        await self._p.runner.start(limits)
        assert self.store is not None
        self._p.runner.resume(self.store.resumable(s.executor))
        log.info("executor ready", executor=s.executor, pid=self.executor.pid,
                 max_qubits=limits.max_qubits, device=caps.device, precision=caps.precision)
        return 0

    def _supervise(self, name: str, part: Callable[[], Coroutine[Any, Any, None]]) -> None:
        def give_up() -> None:
            self.notifier.status(f"stopping: {name} keeps failing")
            self.stop(EX_SOFTWARE)
        self._tasks.append(asyncio.create_task(supervised(name, part, give_up), name=name))

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


def _ended(task: asyncio.Task[int], name: str) -> int:
    """The exit code a front end's `serve` ended with (a crash in one is EX_SOFTWARE)."""
    exc = task.exception()
    if exc is None:
        return task.result()
    log.critical("a front end failed; stopping", frontend=name, exc_info=exc)
    return EX_SOFTWARE
