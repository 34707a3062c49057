"""The job queue and runner: one ordered structure for every job in hand (waiting to be
parsed, parsed and ready, handed to the executor, running), batching, the executor
process, timeouts, cancel and crash recovery. The rule that a job never runs twice
lives here: a job is marked running in the store before the executor sees it, and a
crashed batch is answered, never re-run.

The executor is kept fed: while one batch runs, the next already waits in its pipe, so
it starts the moment the one before ends, not after a round trip through this busy
process. The executor runs batches strictly in order, which keeps crashes exact: the
batch that dies is the first without an answer, and the one behind it never started
(it runs on the fresh executor)."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import itertools
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

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
from driver.store import QPI, ResultStore, StoreUnavailable
from executors.base import ErrorCode, JobError

PARSE_AHEAD = 64  # jobs handed to the parser before the executor asks for them
# One job at a time (a variational loop: submit, wait, submit), nothing else in hand: a
# job this small is parsed in the executor process, where it runs, saving the round trip
# through the parser (two pipe hops and a wake-up of each process). Larger jobs, and any
# job with others in hand, go through the parser, which keeps parsing off the executor.
PARSE_HERE_CIRCUITS = 4
PARSE_HERE_BYTES = 16 * 1024
RUNNING_STATUS_AFTER_S = 0.05  # JobStatus "running" only for jobs that last
PIPELINE = 2  # batches in the executor: the one running and the next, in its pipe
# The next batch is put together once the running one is this far through its expected
# time: late enough that the jobs parsed meanwhile join it, early enough to be there.
STAGE_AT = 0.5

log = logs.get("qpi.runner")


class State(enum.Enum):
    WAITING = "waiting"  # not yet handed to the parser
    PARSING = "parsing"
    READY = "ready"
    HANDED = "handed"  # in the executor's pipe, behind the running batch
    RUNNING = "running"


@dataclass(slots=True)
class Entry:
    """`ref` names the job inside the node (the parser, the executor): its job_id,
    unless another front end's job in hand has that id."""

    job_id: str
    spec: JobSpec | None  # None: a job resumed from its record (nothing to parse)
    origin: str = QPI
    ref: str = ""
    state: State = State.WAITING
    prepared: PreparedJob | None = None
    received: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    # Answered already: cancelled while handed over, or left running remotely at a stop
    # (answered after the next start, from its record).
    answered: bool = False
    record: dict[str, Any] | None = None  # the executor's record of its remote work

    @property
    def timeout_s(self) -> float | None:
        return self.spec.timeout_s if self.spec is not None else None


@dataclass(slots=True)
class Batch:
    """Jobs handed to the executor together; `started` is when it began to run (when
    the batch before it ended), 0 while it waits behind one."""

    entries: list[Entry]
    submitted: bool = True  # False: the executor was found dead before it took it
    started: float = 0.0
    parse_here: bool = False  # its one job goes unparsed: the executor parses it

    @property
    def ids(self) -> list[str]:
        return [e.job_id for e in self.entries]


Finish = Callable[[str, list[Outcome]], None]  # (origin, outcomes of its jobs)


def by_origin(entries: Iterable[Entry]) -> dict[str, list[Entry]]:
    groups: dict[str, list[Entry]] = {}
    for entry in entries:
        groups.setdefault(entry.origin, []).append(entry)
    return groups


def _fair(ready: list[Entry]) -> list[Entry]:
    """Ready jobs in the order a batch takes them: one from each front end in turn (in
    arrival order within each), so a flood from one never starves another."""
    groups = by_origin(ready)
    if len(groups) < 2:
        return ready
    turns = itertools.zip_longest(*groups.values())
    return [entry for turn in turns for entry in turn if entry is not None]


class JobRunner:
    """Takes admitted jobs, has them parsed ahead, runs them in order in batches, and
    hands every outcome to `finish` exactly once, with the front end it came from.
    Front ends share it fairly: batches take ready jobs from each in turn."""

    def __init__(self, settings: Settings, executor: ExecutorProcess, store: ResultStore,
                 metrics: Metrics, finish: Finish,
                 announce: Callable[[str, list[str]], None], changed: Callable[[bool], None],
                 problems: dict[str, str],
                 may_run: Callable[[str], bool] = lambda origin: True) -> None:
        self._settings = settings
        self.executor = executor
        self._store = store
        self._metrics = metrics
        self._finish = finish
        self._announce = announce
        self._changed = changed
        self._problems = problems
        # Per front end: False while its results wait to go out (a paced connection: see
        # Outbox.backlogged) or its orchestrator holds it; its jobs wait here meanwhile,
        # and other front ends' jobs run.
        self._may_run = may_run
        self.limits = Limits(1, 1, 1)
        self.parser = CircuitParser(self._parsed)
        executor.on_record = self._record
        self._jobs: OrderedDict[str, Entry] = OrderedDict()  # by ref, in arrival order
        self._refs: dict[tuple[str, str], str] = {}  # (origin, job_id) -> ref
        self._clash = itertools.count(1)
        self._wake = asyncio.Event()
        self._calibration_due = False
        self._stopping = False
        self._batches: deque[Batch] = deque()  # handed to the executor, oldest (running) first
        self._stage_open = True  # whether the next batch may be handed over yet
        self._stage_timer: asyncio.TimerHandle | None = None
        self._gone = ""  # how the executor was found dead when a batch was handed over
        # While the executor restarts nothing is handed over: the batches that never
        # started go to the fresh one first, in their order.
        self._restarting = False
        self.batch_started = 0.0
        self._seconds_per_job = 0.0  # moving average over batches: bounds a batch's cost
        self.calibrated_at = 0.0  # wall time of the last calibration refresh that succeeded
        self.calibration_failed: tuple[float, str] | None = None  # when the last failed, why

    # -- what the other parts read ---------------------------------------------------------

    def in_hand(self, origin: str, job_id: str) -> bool:
        return (origin, job_id) in self._refs

    def state_of(self, origin: str, job_id: str) -> State | None:
        """Where a job in hand stands; None when not in hand, or already answered (one
        cancelled in the executor's pipe waits there only to be skipped)."""
        ref = self._refs.get((origin, job_id))
        if ref is None or self._jobs[ref].answered:
            return None
        return self._jobs[ref].state

    @property
    def waiting(self) -> int:
        """Jobs in hand that are not running (the queue depth)."""
        return sum(1 for e in self._jobs.values() if e.state is not State.RUNNING)

    def waiting_of(self, origin: str) -> int:
        return sum(1 for e in self._jobs.values()
                   if e.origin == origin and e.state is not State.RUNNING)

    @property
    def seconds_per_job(self) -> float:
        """What a job has taken lately (0: none has run yet)."""
        return self._seconds_per_job

    @property
    def running(self) -> list[str]:
        return [e.job_id for e in self._jobs.values() if e.state is State.RUNNING]

    def wake(self) -> None:
        """Look again for a batch to hand over (e.g. a front end may run jobs again)."""
        self._wake.set()

    # -- admission, parsing, cancel --------------------------------------------------------

    async def start(self, limits: Limits) -> None:
        self.limits = limits
        await self.parser.start()

    def admit(self, job_id: str, spec: JobSpec, origin: str = QPI) -> None:
        entry = self._enter(Entry(job_id, spec, origin))
        if not self._parse_where_it_runs(entry):
            self._feed_parser()

    def resume(self, jobs: list[tuple[str, str, dict[str, Any]]]) -> None:
        """Jobs the last stop left running remotely, (origin, job_id, record): each is
        finished from its record by the executor, first, never submitted again."""
        for origin, job_id, record in jobs:
            self._enter(Entry(job_id, None, origin, state=State.READY, record=record))
        if jobs:
            log.info("resuming jobs left running remotely by the last stop", jobs=len(jobs))
            self._wake.set()

    def _enter(self, entry: Entry) -> Entry:
        job_id, origin = entry.job_id, entry.origin
        entry.ref = (job_id if job_id not in self._jobs
                     else f"{origin}:{job_id}#{next(self._clash)}")
        self._jobs[entry.ref] = entry
        self._refs[(origin, job_id)] = entry.ref
        return entry

    def _record(self, ref: str, state: dict[str, Any]) -> str | None:
        """The executor's record of a running job's remote work, made durable before that
        work starts (ExecutorProcess.on_record): None, or why it could not be."""
        entry = self._jobs.get(ref)
        if entry is None or entry.state is not State.RUNNING or entry.answered:
            return "the job is no longer running here (cancelled)"
        try:
            self._store.record(entry.origin, entry.job_id, self._settings.executor, state)
        except StoreUnavailable as exc:
            self._changed(False)
            return exc.reason
        entry.record = state
        return None

    def _parse_where_it_runs(self, entry: Entry) -> bool:
        """With nothing else in hand, hand a small job to the executor unparsed (see
        PARSE_HERE_BYTES); True if it was handed over (or answered)."""
        assert entry.spec is not None
        if (len(self._jobs) != 1 or self._batches or self.parser.in_flight
                or self._stopping or self._restarting or self._calibration_due
                or not self._may_run(entry.origin)
                or len(entry.spec.circuits) > PARSE_HERE_CIRCUITS
                or sum(len(c.circuit) for c in entry.spec.circuits) > PARSE_HERE_BYTES):
            return False
        if self._mark_running([entry]):  # never run twice: marked before it is handed over
            batch = Batch([entry], parse_here=True)
            entry.state = State.HANDED
            self._batches.append(batch)
            self._submit(batch)
            self._wake.set()
        return True

    def _forget(self, entry: Entry) -> None:
        if self._jobs.pop(entry.ref, None) is not None:
            self._refs.pop((entry.origin, entry.job_id), None)

    def _answer(self, entry: Entry, error: JobError) -> None:
        self._finish(entry.origin, [Outcome.failed(entry.job_id, error)])

    def _feed_parser(self) -> None:
        for entry in self._jobs.values():
            if self.parser.in_flight >= PARSE_AHEAD:
                return
            if entry.state is State.WAITING and entry.spec is not None:
                entry.state = State.PARSING
                self.parser.submit(ParseJob(entry.ref, entry.spec, self.limits))

    def _parsed(self, reply: Parsed) -> None:
        entry = self._jobs.get(reply.job_id)
        if entry is None:  # cancelled while it was being parsed
            return
        self._metrics.parse.observe(reply.seconds)
        if reply.prepared is None:
            # It leaves the queue here, as a job that starts does in _run_batch.
            self._metrics.queue_wait.observe(time.monotonic() - entry.received)
            self._forget(entry)
            assert reply.error is not None
            self._answer(entry, reply.error)
        else:
            entry.state, entry.prepared = State.READY, reply.prepared
            self._stage()
        self._feed_parser()

    def cancel(self, job_id: str, origin: str = QPI) -> bool:
        """Cancel a job in hand (its answer goes to `finish`); False if not in hand."""
        ref = self._refs.get((origin, job_id))
        if ref is None:
            return False
        entry = self._jobs[ref]
        if entry.state is State.HANDED:
            # Left out of its batch if that has not started; if it has (the answer that
            # it did is on its way), its result is dropped: the job stays cancelled.
            if not entry.answered:
                entry.cancelled = entry.answered = True
                self.executor.skip([ref])
                self._answer(entry, JobError(ErrorCode.JOB_CANCELLED, "cancelled before it "
                                             "ran (next in line at the executor)"))
            return True
        if entry.state is not State.RUNNING:
            self._forget(entry)
            self._answer(entry, JobError(ErrorCode.JOB_CANCELLED, "cancelled while queued"))
            self._feed_parser()
            return True
        entry.cancelled = True
        log.info("cancelling the running job: stopping the executor", job_id=job_id)
        self.executor.kill()
        return True

    def request_calibration(self) -> None:
        self._calibration_due = True
        self._wake.set()

    # -- the run loop ------------------------------------------------------------------------

    async def run(self) -> None:
        """Run ready jobs until stopped; a refresh of the calibration waits for a gap."""
        while True:
            self._stage()
            if self._batches:
                await self._complete_head()
            elif self._stopping:
                return
            elif self._calibration_due:
                await self._refresh_calibration()
            else:
                await self._wake.wait()
                self._wake.clear()

    def stop_taking_jobs(self) -> None:
        self._stopping = True
        self._wake.set()

    def _next_batch(self) -> list[Entry]:
        allowed: dict[str, bool] = {}
        ready = _fair([e for e in self._jobs.values() if e.state is State.READY and
                       allowed.setdefault(e.origin, self._may_run(e.origin))])
        if not ready:
            return []
        if ready[0].spec is None:  # resumed jobs go together, before any other
            return [e for e in ready if e.spec is None]
        # Jobs that ask for their own timeout run alone, so the timeout is theirs. Others
        # run together up to batch_max_jobs and, by the time jobs took lately, about
        # batch_max_seconds of work: a crash costs at most that batch.
        if ready[0].timeout_s is not None:
            return ready[:1]
        limit = self._settings.batch_max_jobs
        if self._seconds_per_job > 0:
            limit = min(limit, int(self._settings.batch_max_seconds / self._seconds_per_job))
        batch = []
        for entry in ready[: max(1, limit)]:
            if entry.spec is None or entry.timeout_s is not None:
                break
            batch.append(entry)
        return batch

    # -- handing batches over ----------------------------------------------------------------

    def _stage(self) -> None:
        """Hand the executor the next batch: at once when it has none, or, behind the
        one running, once that is STAGE_AT through its expected time."""
        while (len(self._batches) < PIPELINE and not self._stopping and not self._restarting
               and not self._calibration_due and (not self._batches or self._stage_open)):
            entries = self._next_batch()
            if not entries:
                return
            if not self._mark_running(entries):
                continue
            batch = Batch(entries)
            for entry in entries:
                entry.state = State.HANDED
            self._batches.append(batch)
            self._submit(batch)
            self._wake.set()

    def _mark_running(self, entries: list[Entry]) -> bool:
        ids = [e.job_id for e in entries]
        try:
            for origin, group in by_origin(entries).items():
                self._store.mark_running([e.job_id for e in group], origin)
        except StoreUnavailable as exc:
            # Without the mark a crash could run it twice: answer it, do not run it.
            # The store keeps the reason (ResultStore.problem): the node reports degraded
            # and intake refuses new work until a write succeeds again. (Jobs of one front
            # end already marked are answered too: they stay marked, answered failed.)
            log.error("cannot record that jobs start; not running them", reason=exc.reason,
                      jobs=ids)
            refusal = JobError(ErrorCode.QUOTA_EXCEEDED, f"the driver cannot record this "
                               f"job durably ({exc.reason}); it was not run. Retry later.")
            for origin, group in by_origin(entries).items():
                for entry in group:
                    self._forget(entry)
                self._finish(origin, [Outcome.failed(e.job_id, refusal) for e in group])
            self._changed(False)
            return False
        return True

    def _submit(self, batch: Batch) -> None:
        try:
            if batch.parse_here:
                self.executor.submit([], [ParseJob(e.ref, e.spec, self.limits)
                                          for e in batch.entries if e.spec is not None])
            else:
                self.executor.submit(
                    [e.prepared for e in batch.entries if e.prepared is not None],
                    resume=[(e.ref, e.record) for e in batch.entries
                            if e.spec is None and e.record is not None])
            batch.submitted = True
        except ProcessGone as exc:
            batch.submitted = False
            self._gone = exc.reason

    def _begin(self, batch: Batch) -> None:
        """The batch at the head starts to run: its clock, its JobStatus, and when the
        next one may be put together."""
        if batch.started:
            return
        batch.started = self.batch_started = time.monotonic()
        for entry in batch.entries:
            entry.state = State.RUNNING
            self._metrics.queue_wait.observe(batch.started - entry.received)
        self._changed(False)
        if self._stage_timer is not None:
            self._stage_timer.cancel()
            self._stage_timer = None
        expected = self._seconds_per_job * len(batch.entries)
        self._stage_open = expected <= 0
        if not self._stage_open:
            self._stage_timer = asyncio.get_running_loop().call_later(
                STAGE_AT * expected, self._open_stage)

    def _open_stage(self) -> None:
        self._stage_timer = None
        self._stage_open = True
        self._stage()

    # -- one batch's end ----------------------------------------------------------------------

    async def _complete_head(self) -> None:
        head = self._batches[0]
        if not head.submitted:
            # It died while idle: nothing handed to it ran, so all of it may run now. (The
            # batches go in order: where the head reached it, a death blames the head.)
            log.warning("executor died while idle; restarting it", reason=self._gone)
            if not await self._fresh_executor():
                return
        self._begin(head)
        announce = asyncio.get_running_loop().call_later(
            RUNNING_STATUS_AFTER_S, self._announce_running, head.entries)
        try:
            outcomes = await self._outcomes(head)
        except Exception as exc:  # a bug here must cost this batch, not the runner
            log.exception("running a batch failed", jobs=head.ids)
            failed = JobError(ErrorCode.JOB_FAILED, f"the driver failed to run this job: "
                              f"{type(exc).__name__}: {exc!s:.300}")
            outcomes = [Outcome.failed(e.ref, failed) for e in head.entries]
        announce.cancel()
        if self._batches and self._batches[0] is head:
            self._batches.popleft()
        if self._batches:
            self._begin(self._batches[0])  # already running in the executor
        self._stage()  # before the bookkeeping: the executor is not to wait on it
        self._account(head, outcomes)
        if self._calibration_due and not self._batches:
            await self._refresh_calibration()

    async def _outcomes(self, head: Batch) -> list[Outcome]:
        own = head.entries[0].timeout_s
        timeout = min(own, self._settings.job_timeout_s) if own else self._settings.job_timeout_s
        left = max(0.0, head.started + timeout - time.monotonic())
        try:
            done = await asyncio.wait_for(self.executor.done(), left)
            for seconds in done.parse_seconds:
                self._metrics.parse.observe(seconds)
            return done.outcomes
        except TimeoutError:
            log.error("job timed out: restarting the executor", jobs=head.ids,
                      timeout_s=timeout)
            failure = JobError(ErrorCode.JOB_TIMEOUT,
                               f"the job ran past its timeout of {timeout:g} s and was stopped")
            self._batches.popleft()
            await self._fresh_executor(self._remote_work(head))
            return [Outcome.failed(e.ref, failure) for e in head.entries]
        except ProcessDied as exc:
            self._batches.popleft()
            if self._stopping:
                self._leave_running(head)
            await self._fresh_executor(self._remote_work(head))
            return [self._crashed(e, exc.reason, len(head.entries)) for e in head.entries
                    if not e.answered]

    @staticmethod
    def _remote_work(batch: Batch) -> list[tuple[str, dict[str, Any]]]:
        """What the executor recorded for the jobs of a batch it no longer runs (and that
        are answered now): for the fresh executor to release."""
        return [(e.ref, e.record) for e in batch.entries
                if e.record is not None and not e.answered]

    def _leave_running(self, batch: Batch) -> None:
        """The node stops (a drain that ran out of time) while jobs wait on remote work
        they recorded: not answered now, they stay running in the store with their
        record, and the next start resumes them; the remote tasks run on meanwhile."""
        left = [e for e in batch.entries if e.record is not None and not e.cancelled]
        for entry in left:
            entry.answered = True
        if left:
            log.warning("jobs left running remotely; the next start resumes them",
                        jobs=[e.job_id for e in left])

    async def _fresh_executor(self, release: list[tuple[str, dict[str, Any]]] | None = None
                              ) -> bool:
        """Restart the executor, have it `release` remote work of jobs answered here, and
        hand it again the batches that never started; when stopping, there is none to
        restart: they go back to the queue, unmarked."""
        await self.restart_executor()
        waiting = [b for b in self._batches if not b.started or not b.submitted]
        if not self.executor.alive:
            if release:
                log.warning("cannot release remote work: no executor", jobs=len(release))
            self._batches.clear()
            for batch in waiting:
                self._unstage(batch)
            return False
        if release:
            self.executor.abandon(release)
        for batch in list(self._batches):
            for entry in batch.entries:
                if entry.answered:  # cancelled while it waited: never to run
                    self._forget(entry)
            batch.entries = [e for e in batch.entries if not e.answered]
            if batch.entries:
                self._submit(batch)
            else:
                self._batches.remove(batch)
        return True

    def _unstage(self, batch: Batch) -> None:
        """Jobs that never reached a live executor, back to ready (a later dispatch of
        them may run), or answered if cancelled meanwhile."""
        for entry in batch.entries:
            if entry.answered:
                self._forget(entry)
            else:  # one handed over unparsed goes to the parser, should it run later
                entry.state = State.WAITING if batch.parse_here else State.READY
        try:  # (a resumed job stays marked, with its record: the next start resumes it)
            for origin, group in by_origin(e for e in batch.entries if e.spec is not None).items():
                self._store.unmark_running([e.job_id for e in group], origin)
        except StoreUnavailable as exc:  # they stay marked: a restart answers them failed
            log.warning("cannot unmark jobs that never ran", reason=exc.reason, jobs=batch.ids)

    def _account(self, head: Batch, outcomes: list[Outcome]) -> None:
        elapsed = time.monotonic() - head.started
        self._metrics.execution.observe(elapsed)
        per_job = elapsed / len(head.entries)
        self._seconds_per_job = (per_job if not self._seconds_per_job
                                 else 0.8 * self._seconds_per_job + 0.2 * per_job)
        by_ref = {o.job_id: o for o in outcomes}  # the executor knows jobs by their ref
        answers: dict[str, list[Outcome]] = {}
        finished: list[tuple[Entry, Outcome]] = []
        now = time.monotonic()
        for entry in head.entries:
            self._forget(entry)
            if entry.answered:
                continue  # cancelled while handed over: answered then
            outcome = by_ref.get(entry.ref)
            if outcome is None:  # a bug; the job is still owed an answer
                log.error("the executor's answer left out a job", job_id=entry.job_id)
                outcome = Outcome.failed(entry.job_id, JobError(
                    ErrorCode.JOB_FAILED, "the driver lost track of this job's result"))
            elif entry.ref != entry.job_id:
                outcome = dataclasses.replace(outcome, job_id=entry.job_id)
            answers.setdefault(entry.origin, []).append(outcome)
            finished.append((entry, outcome))
        for origin, done in answers.items():
            self._finish(origin, done)
        # The answers are stored and their front ends woken to send them; the log lines and
        # the status change come after those sends, on this turn of the loop.
        asyncio.get_running_loop().call_soon(self._finished, finished, now)

    def _finished(self, finished: list[tuple[Entry, Outcome]], now: float) -> None:
        for entry, outcome in finished:
            log.info("job finished", job_id=entry.job_id, ok=outcome.ok,
                     error_code=None if outcome.error is None else outcome.error.code,
                     seconds=round(now - entry.received, 4))
        self._changed(False)

    def _announce_running(self, entries: list[Entry]) -> None:
        still = [e for e in entries if self._jobs.get(e.ref) is e and e.state is State.RUNNING]
        for origin, group in by_origin(still).items():
            self._announce(origin, [e.job_id for e in group])

    @staticmethod
    def _crashed(entry: Entry, reason: str, size: int) -> Outcome:
        if entry.cancelled:
            return Outcome.failed(entry.ref, JobError(ErrorCode.JOB_CANCELLED,
                                                      "cancelled while running"))
        log.error("executor crashed", job_id=entry.job_id, reason=reason)
        together = f" (one of {size} run together)" if size > 1 else ""
        return Outcome.failed(entry.ref, JobError(
            ErrorCode.EXECUTOR_CRASHED,
            f"{reason} while running this job{together}; a fresh executor has started, "
            "resubmit to retry"))

    async def restart_executor(self) -> None:
        self._problems["executor"] = "executor restarting"
        self._changed(False)
        self._metrics.worker_restarts.inc()
        self._restarting = True
        try:
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
        finally:
            self._restarting = False
        self._problems.pop("executor", None)
        self._changed(False)

    async def _refresh_calibration(self) -> None:
        self._calibration_due = False
        try:
            await asyncio.wait_for(self.executor.refresh_calibration(), 60)
        except (TimeoutError, ProcessDied) as exc:
            log.warning("calibration refresh failed", reason=str(exc))
            self.calibration_failed = (time.time(), str(exc) or type(exc).__name__)
            await self.restart_executor()
            self._changed(True)
            return
        self.calibrated_at = time.time()
        self._changed(True)  # the next heartbeat carries the fresh calibration

    async def drain(self, timeout: float) -> None:
        """Let the running batch finish within `timeout`; then stop it."""
        self.stop_taking_jobs()
        deadline = time.monotonic() + timeout
        while self._batches and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self._batches:
            log.warning("drain timeout: stopping the running job", jobs=self.running)
            self.executor.kill()
            while self._batches and time.monotonic() < deadline + 5:
                await asyncio.sleep(0.02)

    async def stop(self) -> None:
        await self.parser.stop()
        await self.executor.stop()
