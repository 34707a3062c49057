"""The job queue and runner: one ordered structure for every job in hand (waiting to be
parsed, parsed and ready, running), batching, the executor process, timeouts, cancel
and crash recovery. The rule that a job never runs twice lives here: a job is marked
running in the store before the executor sees it, and a crashed batch is answered,
never re-run."""

from __future__ import annotations

import asyncio
import enum
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from driver import logs
from driver.jobs import JobSpec, Limits
from driver.messages import Parsed, ParseJob, PreparedJob
from driver.metrics import Metrics
from driver.outcome import Outcome
from driver.processes import (
    CircuitParser,
    ExecutorProcess,
    ProcessDied,
    ProcessGone,
    StartFailedError,
)
from driver.settings import Settings
from driver.store import ResultStore, StoreUnavailable
from executors.base import ErrorCode, JobError

PARSE_AHEAD = 64  # jobs handed to the parser before the executor asks for them
RUNNING_STATUS_AFTER_S = 0.05  # JobStatus "running" only for jobs that last

log = logs.get("qpi.runner")


class State(enum.Enum):
    WAITING = "waiting"  # not yet handed to the parser
    PARSING = "parsing"
    READY = "ready"
    RUNNING = "running"


@dataclass(slots=True)
class Entry:
    job_id: str
    spec: JobSpec
    state: State = State.WAITING
    prepared: PreparedJob | None = None
    received: float = field(default_factory=time.monotonic)
    cancelled: bool = False


class JobRunner:
    """Takes admitted jobs, has them parsed ahead, runs them in order in batches, and
    hands every outcome to `finish` exactly once."""

    def __init__(self, settings: Settings, executor: ExecutorProcess, store: ResultStore,
                 metrics: Metrics, finish: Callable[[list[Outcome]], None],
                 announce: Callable[[list[str]], None], changed: Callable[[bool], None],
                 problems: dict[str, str]) -> None:
        self._settings = settings
        self.executor = executor
        self._store = store
        self._metrics = metrics
        self._finish = finish
        self._announce = announce
        self._changed = changed
        self._problems = problems
        self.limits = Limits(1, 1, 1)
        self.parser = CircuitParser(self._parsed)
        self._jobs: OrderedDict[str, Entry] = OrderedDict()
        self._wake = asyncio.Event()
        self._calibration_due = False
        self._stopping = False
        self.batch_started = 0.0
        self._seconds_per_job = 0.0  # moving average over batches: bounds a batch's cost
        self.calibrated_at = 0.0

    # -- what the other parts read ---------------------------------------------------------

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._jobs

    @property
    def waiting(self) -> int:
        """Jobs in hand that are not running (the queue depth)."""
        return sum(1 for e in self._jobs.values() if e.state is not State.RUNNING)

    @property
    def running(self) -> list[str]:
        return [e.job_id for e in self._jobs.values() if e.state is State.RUNNING]

    # -- admission, parsing, cancel --------------------------------------------------------

    async def start(self, limits: Limits) -> None:
        self.limits = limits
        await self.parser.start()

    def admit(self, job_id: str, spec: JobSpec) -> None:
        self._jobs[job_id] = Entry(job_id, spec)
        self._feed_parser()

    def _feed_parser(self) -> None:
        for entry in self._jobs.values():
            if self.parser.in_flight >= PARSE_AHEAD:
                return
            if entry.state is State.WAITING:
                entry.state = State.PARSING
                self.parser.submit(ParseJob(entry.job_id, entry.spec, self.limits))

    def _parsed(self, reply: Parsed) -> None:
        entry = self._jobs.get(reply.job_id)
        if entry is None:  # cancelled while it was being parsed
            return
        self._metrics.parse.observe(reply.seconds)
        if reply.prepared is None:
            # It leaves the queue here, as a job that starts does in _run_batch.
            self._metrics.queue_wait.observe(time.monotonic() - entry.received)
            del self._jobs[reply.job_id]
            assert reply.error is not None
            self._finish([Outcome.failed(reply.job_id, reply.error)])
        else:
            entry.state, entry.prepared = State.READY, reply.prepared
            self._wake.set()
        self._feed_parser()

    def cancel(self, job_id: str) -> None:
        entry = self._jobs.get(job_id)
        if entry is None:
            return
        if entry.state is not State.RUNNING:
            del self._jobs[job_id]
            self._finish([Outcome.failed(job_id, JobError(ErrorCode.JOB_CANCELLED,
                                                          "cancelled while queued"))])
            self._feed_parser()
            return
        entry.cancelled = True
        log.info("cancelling the running job: stopping the executor", job_id=job_id)
        self.executor.kill()

    def request_calibration(self) -> None:
        self._calibration_due = True
        self._wake.set()

    # -- the run loop ------------------------------------------------------------------------

    async def run(self) -> None:
        """Run ready jobs until stopped; a refresh of the calibration waits for a gap."""
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            batch = [] if self._stopping else self._next_batch()
            if batch:
                await self._run_batch(batch)
                self._wake.set()  # more may be ready
            elif self._calibration_due:
                await self._refresh_calibration()

    def stop_taking_jobs(self) -> None:
        self._stopping = True
        self._wake.set()

    def _next_batch(self) -> list[Entry]:
        ready = [e for e in self._jobs.values() if e.state is State.READY]
        if not ready:
            return []
        # Jobs that ask for their own timeout run alone, so the timeout is theirs. Others
        # run together up to batch_max_jobs and, by the time jobs took lately, about
        # batch_max_seconds of work: a crash costs at most that batch.
        if ready[0].spec.timeout_s is not None:
            return ready[:1]
        limit = self._settings.batch_max_jobs
        if self._seconds_per_job > 0:
            limit = min(limit, int(self._settings.batch_max_seconds / self._seconds_per_job))
        batch = []
        for entry in ready[: max(1, limit)]:
            if entry.spec.timeout_s is not None:
                break
            batch.append(entry)
        return batch

    async def _run_batch(self, batch: list[Entry]) -> None:
        ids = [e.job_id for e in batch]
        try:
            self._store.mark_running(ids)
        except StoreUnavailable as exc:
            # Without the mark a crash could run it twice: answer it, do not run it.
            # The store keeps the reason (ResultStore.problem): the node reports degraded
            # and intake refuses new work until a write succeeds again.
            log.error("cannot record that jobs start; not running them", reason=exc.reason,
                      jobs=ids)
            for job_id in ids:
                del self._jobs[job_id]
            refusal = JobError(ErrorCode.QUOTA_EXCEEDED, f"the driver cannot record this "
                               f"job durably ({exc.reason}); it was not run. Retry later.")
            self._finish([Outcome.failed(job_id, refusal) for job_id in ids])
            self._changed(False)
            return
        self.batch_started = time.monotonic()
        for entry in batch:
            entry.state = State.RUNNING
            self._metrics.queue_wait.observe(self.batch_started - entry.received)
        self._changed(False)
        announce = asyncio.get_running_loop().call_later(
            RUNNING_STATUS_AFTER_S, self._announce_running, ids)
        try:
            outcomes = await self._execute(batch)
        except Exception as exc:  # a bug here must cost this batch, not the runner
            log.exception("running a batch failed", jobs=ids)
            failed = JobError(ErrorCode.JOB_FAILED, f"the driver failed to run this job: "
                              f"{type(exc).__name__}: {exc!s:.300}")
            outcomes = [Outcome.failed(job_id, failed) for job_id in ids]
        announce.cancel()
        elapsed = time.monotonic() - self.batch_started
        self._metrics.execution.observe(elapsed)
        per_job = elapsed / len(batch)
        self._seconds_per_job = (per_job if not self._seconds_per_job
                                 else 0.8 * self._seconds_per_job + 0.2 * per_job)
        for job_id in ids:
            del self._jobs[job_id]
        self._finish(outcomes)
        for entry, outcome in zip(batch, outcomes, strict=True):
            log.info("job finished", job_id=entry.job_id, ok=outcome.ok,
                     error_code=None if outcome.error is None else outcome.error.code,
                     seconds=round(time.monotonic() - entry.received, 4))
        self._changed(False)
        if self._calibration_due:
            await self._refresh_calibration()

    def _announce_running(self, ids: list[str]) -> None:
        still = [job_id for job_id in ids
                 if (e := self._jobs.get(job_id)) is not None and e.state is State.RUNNING]
        if still:
            self._announce(still)

    async def _execute(self, batch: list[Entry]) -> list[Outcome]:
        own = batch[0].spec.timeout_s
        timeout = min(own, self._settings.job_timeout_s) if own else self._settings.job_timeout_s
        jobs = [e.prepared for e in batch if e.prepared is not None]
        try:
            try:
                done = await asyncio.wait_for(self.executor.run(jobs), timeout)
            except ProcessGone as exc:
                # It died while idle: nothing of this batch ran, so it may run now.
                log.warning("executor died while idle; restarting it", reason=exc.reason)
                await self.restart_executor()
                done = await asyncio.wait_for(self.executor.run(jobs), timeout)
            return done.outcomes
        except TimeoutError:
            log.error("job timed out: restarting the executor", jobs=[e.job_id for e in batch],
                      timeout_s=timeout)
            failure = JobError(ErrorCode.JOB_TIMEOUT,
                               f"the job ran past its timeout of {timeout:g} s and was stopped")
            await self.restart_executor()
            return [Outcome.failed(e.job_id, failure) for e in batch]
        except ProcessDied as exc:
            await self.restart_executor()
            return [self._crashed(e, exc.reason, len(batch)) for e in batch]

    @staticmethod
    def _crashed(entry: Entry, reason: str, size: int) -> Outcome:
        if entry.cancelled:
            return Outcome.failed(entry.job_id, JobError(ErrorCode.JOB_CANCELLED,
                                                         "cancelled while running"))
        log.error("executor crashed", job_id=entry.job_id, reason=reason)
        together = f" (one of {size} run together)" if size > 1 else ""
        return Outcome.failed(entry.job_id, JobError(
            ErrorCode.EXECUTOR_CRASHED,
            f"{reason} while running this job{together}; a fresh executor has started, "
            "resubmit to retry"))

    async def restart_executor(self) -> None:
        self._problems["executor"] = "executor restarting"
        self._changed(False)
        self._metrics.worker_restarts.inc()
        while not self._stopping:
            try:
                await self.executor.restart()
            except (StartFailedError, ProcessDied) as exc:
                log.error("executor failed to restart; retrying", reason=str(exc))
                await asyncio.sleep(1.0)
                continue
            log.info("executor restarted", pid=self.executor.pid,
                     restarts=self.executor.restarts)
            break
        self._problems.pop("executor", None)
        self._changed(False)

    async def _refresh_calibration(self) -> None:
        self._calibration_due = False
        try:
            await asyncio.wait_for(self.executor.refresh_calibration(), 60)
        except (TimeoutError, ProcessDied) as exc:
            log.warning("calibration refresh failed", reason=str(exc))
            await self.restart_executor()
            return
        self.calibrated_at = time.time()
        self._changed(True)  # the next heartbeat carries the fresh calibration

    async def drain(self, timeout: float) -> None:
        """Let the running batch finish within `timeout`; then stop it."""
        self.stop_taking_jobs()
        deadline = time.monotonic() + timeout
        while self.running and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self.running:
            log.warning("drain timeout: stopping the running job", jobs=self.running)
            self.executor.kill()
            while self.running and time.monotonic() < deadline + 5:
                await asyncio.sleep(0.02)

    async def stop(self) -> None:
        await self.parser.stop()
        await self.executor.stop()
