"""The executor in a child process owned by the daemon: a crash, a hang or an
OOM kill costs the jobs in hand, never the daemon. The child pays its start-up
(imports, device context) once and then runs batches until told to stop."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
from dataclasses import dataclass
from typing import Any

from driver.jobs import JobSpec, Limits, prepare, result_map
from executors.base import ErrorCode, JobError

# spawn, not fork: the parent runs NNG and event-loop threads a fork would copy mid-flight.
_CTX = multiprocessing.get_context("spawn")


@dataclass(frozen=True, slots=True)
class WorkItem:
    job_id: str
    spec: JobSpec


class WorkerDied(Exception):
    """The child exited while jobs were in hand; `reason` says how."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class WorkerGone(WorkerDied):
    """The child was already dead when a batch was handed over: the batch never started."""


def _child(conn: multiprocessing.connection.Connection, name: str, options: dict[str, Any],
           version: str) -> None:
    """Child process main: build the executor once, then serve batches."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when we stop
    import executors

    try:
        executor = executors.create(name, options)
        caps = executor.capabilities()
    except Exception as exc:  # reported to the parent, which decides what to do
        conn.send(("failed", f"{type(exc).__name__}: {exc}",
                   isinstance(exc, executors.ExecutorUnavailable)))
        return
    conn.send(("ready", caps, executor.calibration(), executor.health()))
    while True:
        try:
            message = conn.recv()
        except EOFError:
            break
        kind = message[0]
        if kind == "stop":
            break
        if kind == "calibration":
            conn.send(("calibration", executor.calibration(), executor.health()))
            continue
        _, items, limits = message
        results = run_batch(executor, name, version, items, limits)
        conn.send(("done", results, executor.health()))
    executor.close()


def run_batch(executor: Any, name: str, version: str, items: list[WorkItem],
              limits: Limits) -> list[dict[str, Any]]:
    """Prepare every job (all circuits checked before any runs), run the valid ones together."""
    outcomes: list[dict[str, Any] | None] = [None] * len(items)
    ready = []
    for i, item in enumerate(items):
        try:
            ready.append((i, prepare(item.job_id, item.spec, limits)))
        except JobError as exc:
            outcomes[i] = exc.to_result()
        except Exception as exc:  # Qiskit refusing what validation let through: this job's fault
            outcomes[i] = JobError(ErrorCode.CIRCUIT_INVALID,
                                   f"{type(exc).__name__}: {exc!s:.500}").to_result()
    if ready:
        try:
            results = executor.run_many([job for _, job in ready])
        except Exception as exc:  # an executor bug fails its jobs, not the worker
            err = JobError(ErrorCode.JOB_FAILED,
                           f"executor {name!r} failed: {type(exc).__name__}: {exc}")
            results = [err] * len(ready)
        for (i, _), res in zip(ready, results, strict=True):
            outcomes[i] = (res.to_result() if isinstance(res, JobError)
                           else result_map(res, name, version))
    return [o if o is not None else {} for o in outcomes]


class Worker:
    """Parent-side handle: start, run a batch (awaitable), kill, restart."""

    def __init__(self, name: str, options: dict[str, Any], version: str) -> None:
        self.name, self.options, self.version = name, options, version
        self.process: multiprocessing.process.BaseProcess | None = None
        self._conn: multiprocessing.connection.Connection | None = None
        self.capabilities: Any = None
        self.calibration: dict[str, Any] | None = None
        self.fault: str | None = None  # the executor's own health report
        self.restarts = 0
        self._waiting: tuple[int, asyncio.Future[None]] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    async def start(self) -> None:
        parent, child = _CTX.Pipe(duplex=True)
        process = _CTX.Process(target=_child, args=(child, self.name, self.options,
                                                    self.version),
                               name=f"qpi-executor-{self.name}", daemon=True)
        process.start()
        child.close()
        self.process, self._conn = process, parent
        reply = await self._receive()
        if reply[0] == "failed":
            await self.stop()
            raise WorkerStartFailed(reply[1], unavailable=bool(reply[2]))
        _, self.capabilities, self.calibration, self.fault = reply

    async def restart(self) -> None:
        self.kill()
        self.restarts += 1
        await self.start()

    async def run(self, items: list[WorkItem], limits: Limits) -> list[dict[str, Any]]:
        if self._conn is None or self.process is None or not self.process.is_alive():
            raise WorkerGone(self._death())
        try:
            self._conn.send(("run", items, limits))
        except OSError:  # it died between the check and the send
            raise WorkerGone(self._death()) from None
        reply = await self._receive()
        self.fault = reply[2]
        return list(reply[1])

    async def refresh_calibration(self) -> dict[str, Any] | None:
        assert self._conn is not None
        self._conn.send(("calibration",))
        _, self.calibration, self.fault = await self._receive()
        return self.calibration

    async def _receive(self) -> Any:
        """Wait for the child's next message without a thread: the pipe's fd wakes the loop."""
        conn = self._conn
        assert conn is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                if conn.poll():
                    return conn.recv()
            except (EOFError, OSError):
                raise WorkerDied(self._death()) from None
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
            return "the executor process is gone"
        process.join(timeout=5)
        code = process.exitcode
        if code is None:
            return "the executor process closed its pipe but did not exit"
        if code < 0:
            sig = signal.Signals(-code).name
            hint = " (killed, e.g. by the OOM killer)" if sig == "SIGKILL" else ""
            return f"the executor process died from signal {sig}{hint}"
        return f"the executor process exited with status {code}"

    def kill(self) -> None:
        """SIGKILL the child now; a batch awaiting it fails with WorkerDied."""
        if self._waiting is not None:
            # The pipe is about to close: a closed fd never wakes the loop, so wake it here.
            fd, waiter = self._waiting
            asyncio.get_running_loop().remove_reader(fd)
            if not waiter.done():
                waiter.set_exception(WorkerDied("the executor process was stopped by the driver"))
        process = self.process
        if process is not None and process.is_alive():
            os.kill(process.pid, signal.SIGKILL)  # type: ignore[arg-type]
            process.join(timeout=10)
        if self._conn is not None:
            self._conn.close()
        self.process, self._conn = None, None

    async def stop(self, timeout: float = 10.0) -> None:
        if self._conn is not None and self.process is not None and self.process.is_alive():
            with contextlib.suppress(OSError):
                self._conn.send(("stop",))
            await asyncio.to_thread(self.process.join, timeout)
        self.kill()


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class WorkerStartFailed(Exception):
    def __init__(self, reason: str, unavailable: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.unavailable = unavailable
