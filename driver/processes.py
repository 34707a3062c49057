"""The daemon's child processes: the executor process (a crash, a hang or an OOM
kill costs the jobs in hand, never the daemon) and the circuit parser (parses and
checks the next jobs while the executor runs the current batch). Both are spawned
once and then serve typed messages (driver.messages) over a pipe."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.reduction import ForkingPickler
from typing import Any

from driver import logs, payload
from driver.jobs import prepare, result_map
from driver.messages import (
    Abandon,
    BatchDone,
    CalibrationReport,
    Parsed,
    ParseJob,
    PreparedJob,
    Ready,
    Record,
    Recorded,
    RefreshCalibration,
    RunBatch,
    Skip,
    StartFailed,
    Stop,
)
from driver.outcome import Outcome
from executors.base import ErrorCode, Job, JobError

# spawn, not fork: the parent runs NNG and event-loop threads a fork would copy mid-flight.
_CTX = multiprocessing.get_context("spawn")
# A message this small, to a child that has read everything sent before, goes straight
# into the (then empty, 64 KiB) pipe from the event loop; anything else goes through the
# sender thread, in order, so that a full pipe never holds the loop.
INLINE_BYTES = 32 * 1024


class ProcessDied(Exception):
    """The child exited while work was in hand; `reason` says how."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ProcessGone(ProcessDied):
    """The child was already dead when work was handed over: that work never started."""


class StartFailedError(Exception):
    def __init__(self, reason: str, unavailable: bool, misconfigured: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.unavailable = unavailable
        self.misconfigured = misconfigured


# -- child side --------------------------------------------------------------------------


def _executor_main(conn: multiprocessing.connection.Connection, name: str,
                   options: dict[str, Any], version: str, spin_s: float = 0.0) -> None:
    """Executor process: build the executor once, then run batches until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when we stop
    # OpenMP threads (Aer's) that spin long while they wait take the cores from the
    # daemon and the parser; threads that sleep at once (OMP_WAIT_POLICY=PASSIVE) slow a
    # 20-qubit circuit by 5-7%, waking for each gate. A short spin (libgomp's count, some
    # microseconds) keeps a circuit's gates back to back and frees the core between
    # batches. Set before the executor's libraries load; an operator's setting wins.
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    import executors

    try:
        executor = executors.create(name, options)
        caps = executor.capabilities()
    except Exception as exc:  # reported to the parent, which decides what to do
        conn.send(StartFailed(f"{type(exc).__name__}: {exc}",
                              isinstance(exc, executors.ExecutorUnavailable),
                              isinstance(exc, executors.OptionError)))
        return
    conn.send(Ready(caps, executor.calibration(), executor.health()))
    _settle()
    inbox = _Inbox(conn, spin_s)
    executor.recorder = inbox.record
    for message in inbox:
        if isinstance(message, RefreshCalibration):
            conn.send(CalibrationReport(executor.calibration(), executor.health(),
                                        executor.capabilities()))
        elif isinstance(message, RunBatch):
            skipped = inbox.skipped()
            parsed, answered, seconds = parse_here(executor, message.parse, skipped)
            outcomes = run_batch(executor, name, version, message.jobs, skipped, parsed)
            resumed = [resume_job(executor, name, version, job_id, state)
                       for job_id, state in message.resume]
            conn.send(BatchDone([*outcomes, *answered, *resumed], executor.health(), seconds))
            inbox.answered()
        elif isinstance(message, Abandon):
            for job_id, state in message.jobs:
                try:
                    executor.abandon(job_id, state)
                except Exception as exc:  # best effort: the job is answered already
                    logs.get("qpi.executor").warning("could not release a job's remote work",
                                                     job_id=job_id, reason=str(exc))
    executor.close()


def resume_job(executor: Any, name: str, version: str, job_id: str,
               state: dict[str, Any]) -> Outcome:
    """A job the last stop of the node left running remotely, finished from its record."""
    try:
        return Outcome.succeeded(job_id, result_map(executor.resume(job_id, state), name,
                                                    version))
    except JobError as exc:
        return Outcome.failed(job_id, exc)
    except Exception as exc:  # an executor bug fails the job, not the process
        return Outcome.failed(job_id, JobError(
            ErrorCode.JOB_FAILED, f"executor {name!r} failed to resume this job: "
            f"{type(exc).__name__}: {exc}"))


class _Inbox:
    """The executor's messages in order. The daemon sends the next batch while one runs,
    and may then cancel some of its jobs (Skip): before a batch starts, the Skips
    already in the pipe are read, and other messages read with them are kept in order.

    A client that sends one job at a time (submit, wait, submit) sends the next job a
    millisecond or so after the last result. Waking a process that sleeps in a blocking
    read costs tens of microseconds per hop on a VM (the idle vCPU has halted), so after
    a batch whose successor came within `spin_s`, the next read first polls the pipe for
    up to `spin_s`. A client that comes back later is waited for asleep, as are the jobs
    queued behind a batch (they are in the pipe already: nothing to poll for)."""

    def __init__(self, conn: multiprocessing.connection.Connection, spin_s: float = 0.0) -> None:
        self._conn = conn
        self._ahead: deque[Any] = deque()
        self._skips: set[str] = set()
        self._spin_s = spin_s
        self._answered_at: float | None = None  # when the last BatchDone went out
        self._soon = False  # whether the message after the one before came within spin_s

    def answered(self) -> None:
        """A batch's answer went out: the wait for the next message starts."""
        self._answered_at = time.monotonic()

    def _next(self) -> Any:
        """The next message from the pipe (EOFError once the daemon has closed it)."""
        since = self._answered_at
        if since is not None and self._soon:
            deadline = since + self._spin_s
            while not self._conn.poll() and time.monotonic() < deadline:
                pass
        message = self._conn.recv()
        if since is not None:
            self._soon = self._spin_s > 0 and time.monotonic() - since <= self._spin_s
            self._answered_at = None
        return message

    def record(self, job_id: str, state: dict[str, Any]) -> None:
        """The executor's `recorder`: the daemon stores `state` with the job and answers;
        what it sends meanwhile is kept in order (Skips noted)."""
        self._conn.send(Record(job_id, state))
        while True:
            try:
                message = self._conn.recv()
            except EOFError:
                raise JobError(ErrorCode.JOB_FAILED, "the driver went away before this "
                               "job's remote work was recorded; it was not started") from None
            if isinstance(message, Recorded) and message.job_id == job_id:
                break
            if isinstance(message, Skip):
                self._skips.update(message.job_ids)
            else:
                self._ahead.append(message)
        if message.problem is not None:
            raise JobError(ErrorCode.QUOTA_EXCEEDED, f"the driver cannot record this job's "
                           f"remote work durably ({message.problem}); it was not started. "
                           "Retry later.")

    def __iter__(self) -> Iterator[Any]:
        while True:
            if self._ahead:
                message = self._ahead.popleft()
            else:
                try:
                    message = self._next()
                except EOFError:
                    return
            if isinstance(message, Stop):
                return
            if isinstance(message, Skip):
                self._skips.update(message.job_ids)
                continue
            yield message

    def skipped(self) -> set[str]:
        """Jobs cancelled so far. A Skip names jobs of the batch about to start (the
        daemon sends one only for jobs waiting in the pipe) or, where it came too late,
        of a batch already run: each is used once."""
        with contextlib.suppress(EOFError, OSError):
            while self._conn.poll():
                message = self._conn.recv()
                if isinstance(message, Skip):
                    self._skips.update(message.job_ids)
                else:
                    self._ahead.append(message)
        skipped, self._skips = self._skips, set()
        return skipped


def run_batch(executor: Any, name: str, version: str, jobs: list[PreparedJob],
              skipped: set[str] | frozenset[str] = frozenset(),
              parsed: Sequence[Job] = ()) -> list[Outcome]:
    """Run prepared jobs (and `parsed`: jobs parsed in this process) together; an
    executor bug fails its jobs, not the process."""
    runnable = [job for job in jobs if job.job_id not in skipped]
    flat = bool(getattr(executor, "takes_flat_circuits", False))
    loaded = [*(payload.loads(job.payload, flat) for job in runnable), *parsed]
    try:
        results: list[Any] = executor.run_many(loaded) if loaded else []
    except Exception as exc:
        err = JobError(ErrorCode.JOB_FAILED,
                       f"executor {name!r} failed: {type(exc).__name__}: {exc}")
        results = [err] * len(loaded)
    by_id = dict(zip([job.job_id for job in loaded], results, strict=True))
    cancelled = JobError(ErrorCode.JOB_CANCELLED, "cancelled before it ran")
    outcomes = []
    for job_id in [*(job.job_id for job in jobs), *(job.job_id for job in parsed)]:
        res = by_id.get(job_id, cancelled)
        outcomes.append(Outcome.failed(job_id, res) if isinstance(res, JobError)
                        else Outcome.succeeded(job_id, result_map(res, name, version)))
    return outcomes


def parse_here(executor: Any, jobs: list[ParseJob], skipped: set[str] | frozenset[str]
               ) -> tuple[list[Job], list[Outcome], list[float]]:
    """A batch's jobs that come unparsed, parsed where they run: the jobs, as the
    executor would have read them from the pipe; the others' answers (refused as the
    parser would refuse them, or cancelled); and the seconds each parse took."""
    flat = bool(getattr(executor, "takes_flat_circuits", False))
    ready, answered, seconds = [], [], []
    for message in jobs:
        if message.job_id in skipped:
            answered.append(Outcome.failed(message.job_id, JobError(
                ErrorCode.JOB_CANCELLED, "cancelled before it ran")))
            continue
        started = time.perf_counter()
        try:
            job = prepare(message.job_id, message.spec, message.limits)
        except Exception as exc:
            answered.append(Outcome.failed(message.job_id, _refusal(exc)))
            continue
        finally:
            seconds.append(time.perf_counter() - started)
        ready.append(payload.as_read(job, flat))
    return ready, answered, seconds


def _parser_main(conn: multiprocessing.connection.Connection) -> None:
    """Parser process: parse and check each job in turn, answer in the same order."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _settle()
    for message in _messages(conn):
        conn.send(parse_job(message))


def _settle() -> None:
    """After start-up: move what the imports built (Qiskit, Aer: a few hundred thousand
    objects) out of the garbage collector's sight, so a full collection walks only what
    the jobs allocate."""
    gc.collect()
    gc.freeze()


def _messages(conn: multiprocessing.connection.Connection) -> Iterator[Any]:
    """What the daemon sends, until it says Stop or closes the pipe."""
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if isinstance(message, Stop):
            return
        yield message


def parse_job(message: ParseJob) -> Parsed:
    """Every circuit of the job parsed, bound and checked against the limits, or why not."""
    started = time.perf_counter()
    try:
        job = prepare(message.job_id, message.spec, message.limits)
    except Exception as exc:
        return Parsed(message.job_id, None, _refusal(exc), time.perf_counter() - started)
    prepared = PreparedJob(job_id=message.job_id, payload=payload.dumps(job))
    return Parsed(message.job_id, prepared, None, time.perf_counter() - started)


def _refusal(exc: Exception) -> JobError:
    if isinstance(exc, JobError):
        return exc
    # Qiskit refusing what validation let through: this job's fault
    return JobError(ErrorCode.CIRCUIT_INVALID, f"{type(exc).__name__}: {exc!s:.500}")


# -- parent side -------------------------------------------------------------------------


class ChildProcess:
    """Parent-side handle on one spawned child: start, receive without a thread, kill."""

    kind = "child"

    def __init__(self) -> None:
        self.process: multiprocessing.process.BaseProcess | None = None
        self._conn: multiprocessing.connection.Connection | None = None
        self._waiting: tuple[int, asyncio.Future[None]] | None = None
        self.restarts = 0
        self._sender = ThreadPoolExecutor(1, thread_name_prefix=f"qpi-{self.kind}-send")
        self._last_send: Future[None] | None = None

    def _hand_over(self, message: Any, drained: bool) -> None:
        """Send `message` in order with those before it: from the loop when the child has
        read all of those (`drained`) and it is small, else from the sender thread."""
        conn = self._conn
        if conn is None:
            return
        data = ForkingPickler.dumps(message)
        idle = self._last_send is None or self._last_send.done()
        if drained and idle and len(data) <= INLINE_BYTES:
            _send_quietly(conn, data)
        else:
            self._last_send = self._sender.submit(_send_quietly, conn, data)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def _spawn(self, target: Callable[..., None], args: tuple[Any, ...], name: str) -> None:
        parent, child = _CTX.Pipe(duplex=True)
        process = _CTX.Process(target=target, args=(child, *args), name=name, daemon=True)
        process.start()
        child.close()
        self.process, self._conn = process, parent

    def _send(self, message: Any) -> None:
        if self._conn is None or not self.alive:
            raise ProcessGone(self._death())
        try:
            self._conn.send(message)
        except OSError:  # it died between the check and the send
            raise ProcessGone(self._death()) from None

    async def _receive(self) -> Any:
        """Wait for the child's next message: the pipe's fd wakes the loop."""
        conn = self._conn
        if conn is None:
            raise ProcessDied(self._death())
        loop = asyncio.get_running_loop()
        while True:
            try:
                if conn.poll():
                    return conn.recv()
            except (EOFError, OSError):
                raise ProcessDied(self._death()) from None
            readable: asyncio.Future[None] = loop.create_future()
            fd = conn.fileno()
            loop.add_reader(fd, _wake, readable)
            self._waiting = (fd, readable)
            try:
                await readable
            finally:
                self._waiting = None
                loop.remove_reader(fd)

    def _death(self) -> str:
        process = self.process
        if process is None:
            return f"the {self.kind} process is gone"
        process.join(timeout=5)
        code = process.exitcode
        if code is None:
            return f"the {self.kind} process closed its pipe but did not exit"
        if code < 0:
            sig = signal.Signals(-code).name
            hint = " (killed, e.g. by the OOM killer)" if sig == "SIGKILL" else ""
            return f"the {self.kind} process died from signal {sig}{hint}"
        return f"the {self.kind} process exited with status {code}"

    def kill(self) -> None:
        """SIGKILL the child now; whatever awaits it fails with ProcessDied."""
        if self._waiting is not None:
            # The pipe is about to close: a closed fd never wakes the loop, so wake it here.
            fd, waiter = self._waiting
            asyncio.get_running_loop().remove_reader(fd)
            if not waiter.done():
                waiter.set_exception(ProcessDied(f"the {self.kind} process was stopped by "
                                                 "the driver"))
        process = self.process
        if process is not None and process.is_alive():
            os.kill(process.pid, signal.SIGKILL)  # type: ignore[arg-type]
            process.join(timeout=10)
        if self._conn is not None:
            self._conn.close()
        self.process, self._conn = None, None

    async def stop(self, timeout: float = 10.0) -> None:
        if self._conn is not None and self.alive:
            with contextlib.suppress(OSError):
                self._conn.send(Stop())
            assert self.process is not None
            await asyncio.to_thread(self.process.join, timeout)
        self.kill()


class ExecutorProcess(ChildProcess):
    """The executor in its own process: start, run a batch (awaitable), calibrate, kill."""

    kind = "executor"

    def __init__(self, name: str, options: dict[str, Any], version: str,
                 spin_s: float = 0.0) -> None:
        super().__init__()
        self.name, self.options, self.version = name, options, version
        self.spin_s = spin_s  # see _Inbox
        self.capabilities: Any = None
        self.calibration: dict[str, Any] | None = None
        self.fault: str | None = None  # the executor's own health report
        self._unanswered = 0  # batches handed over whose BatchDone has not come back
        # Stores a job's record (Executor.record) durably: None, or why it could not.
        self.on_record: Callable[[str, dict[str, Any]], str | None] = (
            lambda job_id, state: "no store to record in")

    async def start(self) -> None:
        self._spawn(_executor_main, (self.name, self.options, self.version, self.spin_s),
                    f"qpi-executor-{self.name}")
        reply = await self._receive()
        if isinstance(reply, StartFailed):
            await self.stop()
            raise StartFailedError(reply.reason, reply.unavailable, reply.misconfigured)
        assert isinstance(reply, Ready)
        self.capabilities, self.calibration, self.fault = (reply.capabilities,
                                                           reply.calibration, reply.fault)

    def kill(self) -> None:
        super().kill()
        self._unanswered = 0  # a fresh executor has been handed nothing

    async def restart(self) -> None:
        self.kill()
        self.restarts += 1
        await self.start()

    def submit(self, jobs: list[PreparedJob], parse: list[ParseJob] | None = None,
               resume: list[tuple[str, dict[str, Any]]] | None = None) -> None:
        """Hand over a batch (`parse`: jobs it parses itself first); it runs after those
        handed over before it, and `done()` answers each in turn. ProcessGone if the
        process is already dead (then the batch was never seen). Sent from a thread: a
        batch larger than the pipe's buffer would otherwise hold the event loop until
        the busy executor reads it."""
        if self._conn is None or not self.alive:
            raise ProcessGone(self._death())
        self._hand_over(RunBatch(jobs, parse or [], resume or []),
                        drained=self._unanswered == 0)
        self._unanswered += 1

    def abandon(self, jobs: list[tuple[str, dict[str, Any]]]) -> None:
        """Have the executor release the remote work of jobs it no longer runs."""
        self._hand_over(Abandon(jobs), drained=self._unanswered == 0)

    def skip(self, job_ids: list[str]) -> None:
        """Leave these jobs out of a handed-over batch that has not started yet."""
        self._hand_over(Skip(job_ids), drained=False)

    async def done(self) -> BatchDone:
        """The next handed-over batch's outcomes, in the order they were handed over.
        Meanwhile the executor's records (Executor.record) are stored and answered."""
        reply = await self._receive()
        while isinstance(reply, Record):
            problem = self.on_record(reply.job_id, reply.state)
            self._hand_over(Recorded(reply.job_id, problem), drained=False)
            reply = await self._receive()
        assert isinstance(reply, BatchDone)
        self._unanswered = max(0, self._unanswered - 1)
        self.fault = reply.fault
        return reply

    async def refresh_calibration(self) -> dict[str, Any] | None:
        """Between batches only: no handed-over batch may be outstanding."""
        self._send(RefreshCalibration())
        reply = await self._receive()
        assert isinstance(reply, CalibrationReport)
        self.calibration, self.fault = reply.calibration, reply.fault
        if reply.capabilities is not None:
            self.capabilities = reply.capabilities
        return self.calibration

    async def stop(self, timeout: float = 10.0) -> None:
        await super().stop(timeout)
        self._sender.shutdown(wait=False, cancel_futures=True)


class CircuitParser(ChildProcess):
    """Parses jobs ahead of the executor, in order, in a process of its own (the GIL
    would otherwise make parsing and running take turns). A crash or a hang is blamed
    on the job being parsed, which is answered CIRCUIT_INVALID; the jobs behind it are
    handed to a fresh parser. Nothing here runs a job, so nothing can run twice."""

    kind = "circuit parser"

    def __init__(self, on_parsed: Callable[[Parsed], None], timeout_s: float = 60.0) -> None:
        super().__init__()
        self._on_parsed = on_parsed
        self.timeout_s = timeout_s
        self._in_flight: OrderedDict[str, tuple[ParseJob, float]] = OrderedDict()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def start(self) -> None:
        self._spawn(_parser_main, (), "qpi-parser")
        logs.get("qpi.parser").info("circuit parser started", pid=self.pid)

    def submit(self, job: ParseJob) -> None:
        self._in_flight[job.job_id] = (job, time.monotonic())
        self._post(job)

    def _post(self, job: ParseJob) -> None:
        # A large job goes from the sender thread: it would block the loop until the busy
        # parser reads it. The parser has read all before when this is the only job.
        self._hand_over(job, drained=len(self._in_flight) == 1)

    async def serve(self) -> None:
        """Hand each answer to `on_parsed`; recover from a crashed or hung parser."""
        while True:
            try:
                reply = await asyncio.wait_for(self._receive(), self._time_left())
            except (ProcessDied, TimeoutError) as exc:
                await self._recover(exc)
                continue
            entry = self._in_flight.pop(reply.job_id, None)
            if self._in_flight:  # the next job's parse starts now: its timeout too
                head, (job, _) = next(iter(self._in_flight.items()))
                self._in_flight[head] = (job, time.monotonic())
            if entry is not None:
                self._on_parsed(reply)

    def _time_left(self) -> float | None:
        if not self._in_flight:
            return None
        _, since = next(iter(self._in_flight.values()))
        return max(0.0, since + self.timeout_s - time.monotonic())

    async def _recover(self, exc: Exception) -> None:
        """Answer the job being parsed, start a fresh parser, hand it the rest."""
        reason = (f"parsing took longer than {self.timeout_s:g} s"
                  if isinstance(exc, TimeoutError) else str(exc))
        self.kill()
        if self._in_flight:
            job_id, _ = self._in_flight.popitem(last=False)
            self._on_parsed(Parsed(job_id, None, JobError(
                ErrorCode.CIRCUIT_INVALID,
                f"the circuit parser failed on this job ({reason}); it was not run"), 0.0))
        self.restarts += 1
        self._spawn(_parser_main, (), "qpi-parser")
        logs.get("qpi.parser").warning("circuit parser restarted", reason=reason, pid=self.pid,
                                       resent=len(self._in_flight))
        now = time.monotonic()
        for job_id, (job, _) in list(self._in_flight.items()):
            self._in_flight[job_id] = (job, now)
            self._post(job)

    async def stop(self, timeout: float = 5.0) -> None:
        await super().stop(timeout)
        self._sender.shutdown(wait=False, cancel_futures=True)


def _send_quietly(conn: multiprocessing.connection.Connection, data: bytes | memoryview) -> None:
    """One pickled message (what Connection.send would write; the child's recv reads it)."""
    with contextlib.suppress(OSError, ValueError):  # a killed child: its parent resends
        conn.send_bytes(data)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
