"""The daemon's life story: start the executor, register, dial, serve jobs,
drain and stop. `Driver.run()` reads in that order."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pynng

from driver import __version__, logs
from driver.jobs import JobSpec, Limits, read_spec
from driver.metrics import HealthServer, Metrics, try_nvml
from driver.nng import AsyncSocket, SocketClosed, tls_client, url
from driver.registration import (
    Backoff,
    BadToken,
    DriverDisabled,
    OrchestratorDown,
    ProtocolMismatch,
    Registrar,
    Session,
    sleep_or_exit,
)
from driver.sdnotify import Notifier
from driver.settings import EX_CONFIG, ConfigError, Settings
from driver.store import ResultStore
from driver.tls import FingerprintMismatch
from driver.wire import Envelope, EventType, FrameError, decode, encode, now_iso
from driver.worker import Worker, WorkerDied, WorkerGone, WorkerStartFailed, WorkItem
from executors.base import ErrorCode, JobError

_INBOUND = frozenset({EventType.JOB_DISPATCH, EventType.JOB_CANCEL, EventType.QPU_STATE,
                      EventType.RESULT_ACK})

RUNNING_STATUS_AFTER_S = 0.05  # JobStatus "running" only for jobs that last
HEARTBEAT_SPACING_S = 0.25
FAULT_RETRY_S = 5.0
PRUNE_EVERY_S = 600.0
DELIVERY_MARK_DELAY_S = 0.5  # at most four status-change heartbeats a second

EX_CANTCREAT = 73  # sysexits.h: the data directory cannot be written
EX_UNAVAILABLE = 69  # sysexits.h: the chosen executor cannot run here
EX_NOPERM = 77  # sysexits.h: the orchestrator failed the CA pin

log = logs.get("qpi.driver")


@dataclass(slots=True)
class QueuedJob:
    job_id: str
    spec: JobSpec
    received: float = field(default_factory=time.monotonic)
    cancelled: bool = False


class Link:
    """The two NNG sockets of one session; `detached` fires when either pipe drops."""

    def __init__(self, session: Session, settings: Settings) -> None:
        self.session = session
        self._settings = settings
        self.pull: AsyncSocket | None = None
        self.push: AsyncSocket | None = None
        self.detached = asyncio.Event()

    async def open(self) -> None:
        s = self.session
        tls = s.ca_pem is not None
        kwargs: dict[str, Any] = {}
        if tls:
            assert s.ca_pem is not None
            kwargs["tls_config"] = tls_client(s.nng_host, s.ca_pem)
        pull = pynng.Pull0(recv_max_size=self._settings.max_frame_bytes, **kwargs)
        push = pynng.Push0(**kwargs)
        self.pull, self.push = AsyncSocket(pull), AsyncSocket(push)
        for sock in (self.pull, self.push):
            sock.on_pipes(lambda _pipe: None, lambda _pipe: self.detached.set())
        try:
            # dial(block=True) fails fast on refusal or a TLS failure; it runs the
            # handshake, so keep it off the loop.
            await asyncio.to_thread(pull.dial, url(s.nng_host, s.nng_in_port, tls), block=True)
            await asyncio.to_thread(push.dial, url(s.nng_host, s.nng_out_port, tls), block=True)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for sock in (self.pull, self.push):
            if sock is not None:
                sock.close()
        self.detached.set()


class Driver:
    """One daemon: `run()` is startup, main_loop (register, dial, serve), shutdown."""

    def __init__(self, settings: Settings,
                 reload_settings: Callable[[], Settings] | None = None) -> None:
        self.settings = settings
        self._reload_settings = reload_settings
        self.should_exit = asyncio.Event()
        self.worker = Worker(settings.executor, settings.executor_options, __version__)
        self.store: ResultStore | None = None
        self.limits = Limits(1, 1, 1)
        self.capabilities: dict[str, Any] = {}
        self.disabled = False
        self.started = time.monotonic()
        self._queue: deque[QueuedJob] = deque()
        self._work = asyncio.Event()
        self._queued: dict[str, QueuedJob] = {}
        self._running: dict[str, QueuedJob] = {}
        self._outbox: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._delivered: list[str] = []  # handed to a pipe, not yet marked in the store
        self._mark_later: asyncio.TimerHandle | None = None
        self._transient: deque[Envelope] = deque(maxlen=256)
        self._flush = asyncio.Event()
        self._link: Link | None = None
        self._acks = False
        self._runner: asyncio.Task[None] | None = None
        self._signals = 0
        # Observability: metrics, health, heartbeats, systemd.
        self.metrics = Metrics()
        self.metrics.queue_depth.set_function(lambda: len(self._queue))
        self.metrics.pending.set_function(lambda: len(self._outbox))
        self.notifier = Notifier.from_environ(os.environ)
        self._health: HealthServer | None = None
        self._background: list[asyncio.Task[None]] = []
        self._beat_now = asyncio.Event()
        self._last_status = ""
        self._degraded: str | None = None
        self._batch_started = 0.0
        self._calibrated_at = 0.0
        self._calibration_due = asyncio.Event()
        self._sessions = 0
        self.counters = {"jobs_ok": 0, "jobs_failed": 0, "duplicates": 0,
                         "malformed_frames": 0, "worker_restarts": 0, "reconnects": 0}

    # -- life story -------------------------------------------------------------------

    async def run(self) -> int:
        code = await self.startup()
        if code:
            await self.shutdown()
            return code
        try:
            return await self.main_loop()
        finally:
            await self.shutdown()

    async def startup(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.handle_exit, sig)
        loop.add_signal_handler(signal.SIGHUP, self.handle_reload)
        s = self.settings
        self._background.append(asyncio.create_task(self.notifier.run_watchdog()))
        if s.metrics_addr:
            self._health = HealthServer(self.metrics, self.unready_reasons)
            try:
                await self._health.start(s.metrics_addr)
            except OSError as exc:
                log.error("cannot serve metrics", addr=s.metrics_addr, reason=exc.strerror)
                return EX_CONFIG
            log.info("metrics listening", addr=s.metrics_addr, port=self._health.port)
        self.notifier.status(f"starting executor {s.executor}")
        try:
            self.store = ResultStore(s.data_dir / "results.sqlite3", s.result_retention_s,
                                     s.result_max_rows)
        except (OSError, sqlite3.Error) as exc:
            log.error("cannot open the result store; set data_dir to a writable directory",
                      path=str(s.data_dir / "results.sqlite3"), reason=str(exc))
            return EX_CANTCREAT
        interrupted = self.store.recover_interrupted()
        if interrupted:
            log.warning("jobs interrupted by the last stop are answered as failed",
                        jobs=len(interrupted))
        try:
            await self.worker.start()
        except WorkerStartFailed as exc:
            log.error("executor unavailable", executor=s.executor, reason=exc.reason)
            return EX_UNAVAILABLE if exc.unavailable else 1
        caps = self.worker.capabilities
        self.capabilities = caps.to_wire()
        self._calibrated_at = time.time()
        self.metrics.executor_info.info({"executor": s.executor, "device": str(caps.device),
                                         "precision": str(caps.precision),
                                         "max_qubits": str(caps.max_qubits)})
        if caps.device != "cpu":
            nvml = try_nvml()
            if nvml is not None:
                self.metrics.add_collector(nvml)
        self.limits = Limits(
            max_qubits=min(s.max_qubits or caps.max_qubits, caps.max_qubits),
            max_shots=min(s.max_shots, caps.max_shots),
            max_circuits=s.max_circuits,
            max_circuit_bytes=s.max_circuit_bytes,
        )
        log.info("executor ready", executor=s.executor, pid=self.worker.pid,
                 max_qubits=self.limits.max_qubits, device=caps.device,
                 precision=caps.precision)
        self._runner = asyncio.create_task(self._run_jobs(), name="job-runner")
        self._background.append(asyncio.create_task(self._calibration_schedule()))
        self._background.append(asyncio.create_task(self._prune_store()))
        self.notifier.status("executor ready; registering with the orchestrator")
        return 0

    async def main_loop(self) -> int:
        registrar = Registrar(self.settings, self.capabilities)
        backoff = Backoff(cap=self.settings.backoff_max_s)
        while not self.should_exit.is_set():
            try:
                session = await registrar.connect()
                link = Link(session, self.settings)
                await link.open()
            except BadToken as exc:
                log.error("registration refused", reason=str(exc))
                return EX_CONFIG
            except FingerprintMismatch as exc:
                log.critical("root CA fingerprint mismatch", reason=str(exc))
                return EX_NOPERM
            except DriverDisabled as exc:
                log.warning("driver disabled", reason=str(exc), retry_in_s=exc.retry_after)
                self.notifier.status("disabled by the orchestrator; retrying slowly")
                self._keep_starting(exc.retry_after or 60.0)
                await sleep_or_exit(exc.retry_after or 60.0, self.should_exit)
                continue
            except (OrchestratorDown, ProtocolMismatch, pynng.NNGException) as exc:
                delay = backoff.next_delay()
                log.warning("orchestrator not reachable", reason=str(exc),
                            retry_in_s=round(delay, 2))
                self.notifier.status(f"orchestrator not reachable; retrying in {delay:.1f} s")
                self._keep_starting(delay)
                await sleep_or_exit(delay, self.should_exit)
                continue
            backoff.reset()
            await self._serve(link)
        return 0

    def _keep_starting(self, delay: float) -> None:
        """Before the first READY, a retrying start must not trip TimeoutStartSec=."""
        if self._sessions == 0:
            self.notifier.extend_timeout(delay + self.settings.connect_timeout_s + 30)

    async def shutdown(self) -> None:
        if self._health is not None:
            await self._health.stop()
        if self._runner is not None:
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)
        await self.worker.stop()
        if self._mark_later is not None:
            self._mark_later.cancel()
        if self.store is not None:
            self._mark_delivered()
        owed = len(self.store.undelivered(self._acks)) if self.store is not None else 0
        if self.store is not None:
            self.store.close()
        log.info("stopped", results_owed=owed, queued_not_run=len(self._queue))
        # The watchdog goes last: systemd still watches a unit while it stops.
        for task in self._background:
            task.cancel()
        self.notifier.close()

    def handle_exit(self, sig: int) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second signal: exiting at once", signal=signal.Signals(sig).name)
            self.worker.kill()
            os._exit(1)
        log.info("stop requested: draining", signal=signal.Signals(sig).name,
                 running=list(self._running))
        self.should_exit.set()
        self._work.set()
        self.notifier.stopping(f"draining: {len(self._running)} job(s) running")
        self._beat()  # the orchestrator hears "draining" before the pipes close

    def handle_reload(self) -> None:
        """SIGHUP: re-read the configuration for what can change live (logging), and
        refresh the executor's calibration. The rest needs a restart."""
        self.notifier.reloading("reloading")
        self._calibration_due.set()
        self._work.set()
        try:
            fresh = self._reload_settings() if self._reload_settings else self.settings
            logs.configure(fresh.log_format, fresh.log_level)
        except ConfigError as exc:
            log.error("reload failed; keeping the running configuration", reason=str(exc))
        else:
            log.info("reloaded", log_level=fresh.log_level)
        self.notifier.ready(self._describe())

    # -- one connected session --------------------------------------------------------

    async def _serve(self, link: Link) -> None:
        session = link.session
        self._link, self._acks = link, session.acks
        assert self.store is not None
        # Everything owed from before (this run or an earlier one) goes out first.
        for job_id, results in self.store.undelivered(session.acks):
            self._outbox.setdefault(job_id, results)
        log.info("connected", name=session.name, host=session.nng_host,
                 wire_format=session.wire_format, tls=session.ca_pem is not None,
                 results_owed=len(self._outbox))
        self._sessions += 1
        if self._sessions > 1:
            self.metrics.reconnects.inc()
            self.counters["reconnects"] += 1
        self.metrics.connected.set(1)
        interval = session.heartbeat_interval_s or self.settings.heartbeat_interval
        tasks = [
            asyncio.create_task(self._receive(link), name="receive"),
            asyncio.create_task(self._send(link), name="send"),
            asyncio.create_task(self._heartbeats(interval), name="heartbeat"),
        ]
        if self._sessions == 1:
            self.notifier.ready(self._describe())
        else:
            self.notifier.status(self._describe())
        self._flush.set()
        stop = asyncio.create_task(self.should_exit.wait())
        gone = asyncio.create_task(link.detached.wait())
        try:
            await asyncio.wait([stop, gone, *tasks], return_when=asyncio.FIRST_COMPLETED)
            if self.should_exit.is_set():
                await self._drain(link)
        finally:
            self._link = None
            self.metrics.connected.set(0)
            for task in (*tasks, stop, gone):
                task.cancel()
            link.close()
            await asyncio.gather(*tasks, return_exceptions=True)
        if not self.should_exit.is_set():
            log.warning("disconnected from orchestrator; registering again",
                        results_owed=len(self._outbox))
            self.notifier.status("disconnected; registering again")

    async def _drain(self, link: Link) -> None:
        """Let the running batch finish within the drain timeout and hand its results over."""
        deadline = time.monotonic() + self.settings.drain_timeout_s
        while self._running and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self._running:
            log.warning("drain timeout: stopping the running job", jobs=list(self._running))
            self.worker.kill()
            while self._running and time.monotonic() < deadline + 5:
                await asyncio.sleep(0.02)
        self._flush.set()
        deadline = time.monotonic() + 5
        while self._outbox and not link.detached.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def _receive(self, link: Link) -> None:
        assert link.pull is not None
        while not self.should_exit.is_set():
            try:
                frame = await link.pull.recv()
            except SocketClosed:
                return
            if not self.should_exit.is_set():
                self._on_frame(frame)

    async def _send(self, link: Link) -> None:
        assert link.push is not None and self.store is not None
        fmt = link.session.wire_format
        name = link.session.name
        while True:
            await self._flush.wait()
            self._flush.clear()
            try:
                while self._transient:
                    env = self._transient.popleft()
                    env.driver = name
                    await link.push.send(encode(env, fmt))
                for job_id in list(self._outbox):
                    results = self._outbox.get(job_id)
                    if results is None:
                        continue
                    env = Envelope(EventType.JOB_RESULT, {"job_id": job_id, "results": results},
                                   driver=name)
                    try:
                        frame = encode(env, fmt)
                    except (TypeError, ValueError, OverflowError) as exc:
                        # The store sanitises results, so this is a bug; never stall the outbox.
                        log.error("result cannot be encoded; dropped", job_id=job_id,
                                  reason=str(exc))
                        self._outbox.pop(job_id, None)
                        continue
                    await link.push.send(frame)
                    # With acks a result stays owed (on disk) until its ResultAck arrives.
                    self._outbox.pop(job_id, None)
                    if not self._acks:
                        self._delivered.append(job_id)
            except SocketClosed:
                return
            if self._delivered and self._mark_later is None:
                # The next result write takes the marks along; if none comes, write them soon.
                self._mark_later = asyncio.get_running_loop().call_later(
                    DELIVERY_MARK_DELAY_S, self._mark_delivered)

    # -- inbound events ---------------------------------------------------------------

    def _on_frame(self, frame: bytes) -> None:
        try:
            env = decode(frame)
        except FrameError as exc:
            self.metrics.malformed.inc()
            self.counters["malformed_frames"] += 1
            log.warning("malformed frame dropped", reason=str(exc), size=len(frame))
            if exc.job_id is not None:  # protocol §6: answer when a job_id can be read
                self._on_dispatch({"job_id": exc.job_id},
                                  JobError(ErrorCode.CIRCUIT_INVALID, f"job rejected: {exc}"))
            return
        known = env.type in _INBOUND
        self.metrics.frames.labels(env.type if known else "unknown").inc()
        try:
            if env.type == EventType.JOB_DISPATCH:
                self._on_dispatch(env.payload)
            elif env.type == EventType.JOB_CANCEL:
                self._on_cancel(env.payload)
            elif env.type == EventType.QPU_STATE:
                state = env.payload.get("state")
                self.disabled = state == "disabled"
                log.info("qpu state", state=str(state)[:40])
            elif env.type == EventType.RESULT_ACK:
                job_id = env.payload.get("job_id")
                if isinstance(job_id, str) and self.store is not None:
                    self.store.mark_acked(job_id)
            else:
                log.info("unknown event type dropped", type=env.type[:80], id=env.id[:80])
        except Exception:  # a bug in one handler must not stop the receive loop
            log.exception("event handler failed", type=env.type[:80])

    def _on_dispatch(self, payload: dict[str, Any], rejected: JobError | None = None) -> None:
        job_id = payload.get("job_id")
        if not isinstance(job_id, str) or not job_id or len(job_id) > 256 or not _utf8(job_id):
            log.warning("JobDispatch without a usable job_id dropped", job_id=repr(job_id)[:80])
            return
        if job_id in self._queued or job_id in self._running:
            self.counters["duplicates"] += 1
            log.info("duplicate dispatch absorbed", job_id=job_id)
            return
        assert self.store is not None
        known = self.store.state(job_id)
        if known is not None:
            _, results = known
            self.counters["duplicates"] += 1
            if results is not None:
                log.info("duplicate dispatch answered from the store", job_id=job_id)
                self._outbox[job_id] = results
                self._flush.set()
            return
        refusal = None
        if self.disabled:
            refusal = JobError(ErrorCode.QPU_DISABLED, "this QPU is disabled by the "
                               "orchestrator; the job was not run")
        elif len(self._queue) >= self.settings.max_queued_jobs:
            refusal = JobError(ErrorCode.QUOTA_EXCEEDED, f"the driver's queue is full "
                               f"({self.settings.max_queued_jobs} jobs); retry later",
                               queue_depth=len(self._queue))
        if refusal is not None and rejected is None:
            # Transient: not stored, so the same job_id dispatched again later can run.
            self._outbox[job_id] = refusal.to_result()
            self._count(self._outbox[job_id])
            self._flush.set()
            return
        try:
            if rejected is not None:
                raise rejected
            spec = read_spec(payload.get("payload"), self.limits)
        except JobError as exc:
            self._finish([(job_id, exc.to_result())])
            return
        item = QueuedJob(job_id, spec)
        self._queued[job_id] = item
        self._queue.append(item)
        self._work.set()

    def _on_cancel(self, payload: dict[str, Any]) -> None:
        job_id = payload.get("job_id")
        if not isinstance(job_id, str):
            return
        queued = self._queued.pop(job_id, None)
        if queued is not None:
            self._queue.remove(queued)
            self._finish([(job_id, JobError(ErrorCode.JOB_CANCELLED,
                                            "cancelled while queued").to_result())])
        elif job_id in self._running:
            self._running[job_id].cancelled = True
            log.info("cancelling the running job: stopping the executor", job_id=job_id)
            self.worker.kill()

    # -- running jobs -----------------------------------------------------------------

    def _next_batch(self) -> list[QueuedJob]:
        batch = [self._queue.popleft()]
        # Jobs that ask for their own timeout run alone, so the timeout is theirs.
        while (self._queue and len(batch) < self.settings.batch_max_jobs
               and batch[0].spec.timeout_s is None and self._queue[0].spec.timeout_s is None):
            batch.append(self._queue.popleft())
        for item in batch:
            self._queued.pop(item.job_id, None)
            self._running[item.job_id] = item
        return batch

    async def _run_jobs(self) -> None:
        assert self.store is not None
        while True:
            await self._work.wait()
            if not self._queue or self.should_exit.is_set():
                self._work.clear()
                if self.should_exit.is_set():
                    return
                if self._calibration_due.is_set():  # idle: a good moment to refresh
                    await self._refresh_calibration()
                continue
            batch = self._next_batch()
            self.store.mark_running(item.job_id for item in batch)
            self._batch_started = time.monotonic()
            for item in batch:
                self.metrics.queue_wait.observe(self._batch_started - item.received)
            self._status_changed()
            announce = asyncio.get_running_loop().call_later(
                RUNNING_STATUS_AFTER_S, self._announce_running, batch)
            try:
                outcomes = await self._execute(batch)
            except Exception as exc:  # a bug here must cost this batch, not the runner
                log.exception("running a batch failed", jobs=[i.job_id for i in batch])
                failed = JobError(ErrorCode.JOB_FAILED, f"the driver failed to run this job: "
                                  f"{type(exc).__name__}: {exc!s:.300}")
                outcomes = [failed.to_result()] * len(batch)
            announce.cancel()
            self.metrics.execution.observe(time.monotonic() - self._batch_started)
            self._finish([(item.job_id, res) for item, res in zip(batch, outcomes, strict=True)])
            for item, res in zip(batch, outcomes, strict=True):
                self._running.pop(item.job_id, None)
                self._count(res)
                log.info("job finished", job_id=item.job_id, ok="error" not in res,
                         error_code=res.get("error_code"),
                         seconds=round(time.monotonic() - item.received, 4))
            self._status_changed()
            if self._calibration_due.is_set():
                await self._refresh_calibration()

    async def _execute(self, batch: list[QueuedJob]) -> list[dict[str, Any]]:
        own = batch[0].spec.timeout_s
        timeout = min(own, self.settings.job_timeout_s) if own else self.settings.job_timeout_s
        items = [WorkItem(item.job_id, item.spec) for item in batch]
        try:
            try:
                return await asyncio.wait_for(self.worker.run(items, self.limits), timeout)
            except WorkerGone as exc:
                # It died while idle: nothing of this batch ran, so it may run now.
                log.warning("executor died while idle; restarting it", reason=exc.reason)
                await self._restart_worker()
                return await asyncio.wait_for(self.worker.run(items, self.limits), timeout)
        except TimeoutError:
            log.error("job timed out: restarting the executor", jobs=[i.job_id for i in batch],
                      timeout_s=timeout)
            failure = JobError(ErrorCode.JOB_TIMEOUT,
                               f"the job ran past its timeout of {timeout:g} s and was stopped")
            await self._restart_worker()
            return [failure.to_result()] * len(batch)
        except WorkerDied as exc:
            await self._restart_worker()
            outcomes = []
            for item in batch:
                if item.cancelled:
                    outcomes.append(JobError(ErrorCode.JOB_CANCELLED,
                                             "cancelled while running").to_result())
                else:
                    log.error("executor crashed", job_id=item.job_id, reason=exc.reason)
                    outcomes.append(JobError(
                        ErrorCode.EXECUTOR_CRASHED,
                        f"{exc.reason} while running this job"
                        + (f" (one of {len(batch)} run together)" if len(batch) > 1 else "")
                        + "; a fresh executor has started, resubmit to retry",
                    ).to_result())
            return outcomes

    async def _restart_worker(self) -> None:
        self._degraded = "executor restarting"
        self._status_changed()
        self.metrics.worker_restarts.inc()
        self.counters["worker_restarts"] += 1
        while not self.should_exit.is_set():
            try:
                await self.worker.restart()
                log.info("executor restarted", pid=self.worker.pid, restarts=self.worker.restarts)
                self._degraded = None
                self._status_changed()
                return
            except (WorkerStartFailed, WorkerDied) as exc:
                log.error("executor failed to restart; retrying", reason=str(exc))
                await sleep_or_exit(1.0, self.should_exit)

    # -- outbound ---------------------------------------------------------------------

    def _mark_delivered(self) -> None:
        assert self.store is not None
        self._mark_later = None
        if self._delivered:
            self.store.mark_delivered(self._delivered)
            self._delivered.clear()

    def _finish(self, results: list[tuple[str, dict[str, Any]]]) -> None:
        """Store first, then send: a result is never only in memory."""
        assert self.store is not None
        # Delivery marks ride along with the next write: after a crash, a result handed
        # over but not yet marked is sent once more, which the protocol allows.
        results = self.store.finish(results, delivered=self._delivered)
        self._delivered.clear()
        for job_id, res in results:
            self._outbox[job_id] = res
            if job_id not in self._running:  # answered without running: count it here
                self._count(res)
        self._flush.set()

    def _count(self, res: dict[str, Any]) -> None:
        executor = self.settings.executor
        if "error" in res:
            self.counters["jobs_failed"] += 1
            self.metrics.jobs.labels(str(res.get("error_code", "JOB_FAILED")), executor).inc()
            return
        self.counters["jobs_ok"] += 1
        self.metrics.jobs.labels("ok", executor).inc()
        experiments = res.get("circuit_results") or []
        self.metrics.circuits.labels(executor).inc(len(experiments))
        self.metrics.shots.labels(executor).inc(sum(int(e.get("shots", 0)) for e in experiments))

    # -- status, heartbeats, calibration ------------------------------------------------

    def status(self) -> str:
        if self.should_exit.is_set():
            return "draining"
        if self._degraded or self.worker.fault:
            return "degraded"
        return "busy" if self._running else "idle"

    def _describe(self) -> str:
        link = self._link
        where = f"connected to {link.session.nng_host}" if link else "not connected"
        return (f"{self.status()}, {where}, executor {self.settings.executor}, "
                f"{len(self._queue)} queued, {self.counters['jobs_ok']} ok / "
                f"{self.counters['jobs_failed']} failed")

    def _status_changed(self) -> None:
        """Heartbeat at once when the status changes, not just on the timer."""
        current = self.status()
        if current != self._last_status:
            self._last_status = current
            self._beat_now.set()
            self.notifier.status(self._describe())

    def unready_reasons(self) -> list[str]:
        reasons = []
        if self._link is None or self._link.detached.is_set():
            reasons.append("not connected to the orchestrator")
        if self.worker.process is None or not self.worker.process.is_alive():
            reasons.append("executor not running")
        if self._degraded:
            reasons.append(self._degraded)
        if self.worker.fault:
            reasons.append(f"device fault: {self.worker.fault}")
        if self.should_exit.is_set():
            reasons.append("draining")
        return reasons

    def heartbeat(self) -> dict[str, Any]:
        running = next(iter(self._running), None)
        calibration = dict(self.worker.calibration or {})
        calibration.setdefault("timestamp", _iso(self._calibrated_at))
        return {
            "status": self.status(),
            "executor": self.settings.executor,
            "queue_depth": len(self._queue),
            "running_job": None if running is None else {
                "job_id": running,
                "elapsed_s": round(time.monotonic() - self._batch_started, 3),
                "batch_size": len(self._running),
            },
            "counters": {**self.counters, "results_pending": len(self._outbox)},
            "uptime_s": round(time.monotonic() - self.started, 3),
            "version": __version__,
            "capabilities": self.capabilities,
            "calibration": calibration,
            "degraded_reason": self._degraded or self.worker.fault,
        }

    async def _heartbeats(self, interval: float) -> None:
        self._beat_now.set()  # one at once on connect
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
            self._beat()

    def _beat(self) -> None:
        if self._link is None:
            return
        self._last_status = self.status()
        self._transient.append(Envelope(EventType.HEARTBEAT, self.heartbeat()))
        self.metrics.heartbeats.inc()
        self._flush.set()

    async def _prune_store(self) -> None:
        assert self.store is not None
        while True:
            gone = self.store.prune()
            if gone:
                log.info("pruned delivered results past retention", rows=gone)
            await asyncio.sleep(PRUNE_EVERY_S)

    async def _calibration_schedule(self) -> None:
        while True:
            # A faulty device is asked again soon: that is when it gets reconnected.
            fault = self.worker.fault
            await asyncio.sleep(min(FAULT_RETRY_S, self.settings.calibration_interval_s)
                                if fault else self.settings.calibration_interval_s)
            self._calibration_due.set()
            self._work.set()

    async def _refresh_calibration(self) -> None:
        self._calibration_due.clear()
        try:
            await asyncio.wait_for(self.worker.refresh_calibration(), 60)
        except (TimeoutError, WorkerDied) as exc:
            log.warning("calibration refresh failed", reason=str(exc))
            await self._restart_worker()
            return
        self._calibrated_at = time.time()
        self._beat_now.set()
        self._status_changed()

    def _announce_running(self, batch: list[QueuedJob]) -> None:
        """JobStatus for jobs still running after a moment; short jobs only send results."""
        if self._link is None:
            return
        for item in batch:
            if item.job_id in self._running:
                self._transient.append(Envelope(EventType.JOB_STATUS,
                                                {"job_id": item.job_id, "state": "running"}))
        self._flush.set()


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch)) if epoch else now_iso()


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:  # lone surrogates: cannot be stored or answered
        return False
    return True
