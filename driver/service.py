"""The daemon's life story: start the executor, register, dial, serve jobs,
drain and stop. `Driver.run()` reads in that order."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pynng

import executors
from driver import __version__, logs
from driver.jobs import JobSpec, Limits, prepare, read_spec, result_map
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
from driver.settings import EX_CONFIG, Settings
from driver.tls import FingerprintMismatch
from driver.wire import Envelope, EventType, FrameError, decode, encode
from executors.base import ErrorCode, Executor, JobError

EX_UNAVAILABLE = 69  # sysexits.h: the chosen executor cannot run here
EX_NOPERM = 77  # sysexits.h: the orchestrator failed the CA pin

log = logs.get("qpi.driver")


@dataclass(slots=True)
class QueuedJob:
    job_id: str
    spec: JobSpec
    received: float = field(default_factory=time.monotonic)


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
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.should_exit = asyncio.Event()
        self.executor: Executor | None = None
        self.limits = Limits(1, 1, 1)
        self.capabilities: dict[str, Any] = {}
        self.disabled = False
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="executor")
        self._queue: deque[QueuedJob] = deque()
        self._work = asyncio.Event()
        self._active: dict[str, str] = {}  # job_id -> "queued" | "running"
        self._finished: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._outbox: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._transient: deque[Envelope] = deque(maxlen=256)
        self._flush = asyncio.Event()
        self._link: Link | None = None
        self._session: Session | None = None
        self._runner: asyncio.Task[None] | None = None
        self._signals = 0

    # -- life story -------------------------------------------------------------------

    async def run(self) -> int:
        code = await self.startup()
        if code:
            return code
        try:
            return await self.main_loop()
        finally:
            await self.shutdown()

    async def startup(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.handle_exit, sig)
        name = self.settings.executor
        try:
            self.executor = await loop.run_in_executor(
                self._pool, executors.create, name, self.settings.executor_options
            )
        except executors.ExecutorUnavailable as exc:
            log.error("executor unavailable", executor=name, reason=str(exc))
            return EX_UNAVAILABLE
        caps = self.executor.capabilities()
        self.capabilities = caps.to_wire()
        self.limits = Limits(
            max_qubits=min(self.settings.max_qubits or caps.max_qubits, caps.max_qubits),
            max_shots=min(self.settings.max_shots, caps.max_shots),
            max_circuits=self.settings.max_circuits,
        )
        log.info("executor ready", executor=name, max_qubits=self.limits.max_qubits,
                 device=caps.device, precision=caps.precision)
        self._runner = asyncio.create_task(self._run_jobs(), name="job-runner")
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
                await sleep_or_exit(exc.retry_after or 60.0, self.should_exit)
                continue
            except (OrchestratorDown, ProtocolMismatch, pynng.NNGException) as exc:
                delay = backoff.next_delay()
                log.warning("orchestrator not reachable", reason=str(exc),
                            retry_in_s=round(delay, 2))
                await sleep_or_exit(delay, self.should_exit)
                continue
            backoff.reset()
            await self._serve(link)
        return 0

    async def shutdown(self) -> None:
        log.info("draining", running=[j for j, s in self._active.items() if s == "running"])
        if self._runner is not None:
            self._runner.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self.executor is not None:
            self.executor.close()
        log.info("stopped", results_undelivered=len(self._outbox))

    def handle_exit(self, sig: int) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second signal: exiting at once", signal=signal.Signals(sig).name)
            os._exit(1)
        log.info("stop requested", signal=signal.Signals(sig).name)
        self.should_exit.set()

    # -- one connected session --------------------------------------------------------

    async def _serve(self, link: Link) -> None:
        session = link.session
        self._link, self._session = link, session
        log.info("connected", name=session.name, host=session.nng_host,
                 wire_format=session.wire_format, tls=session.ca_pem is not None)
        tasks = [
            asyncio.create_task(self._receive(link), name="receive"),
            asyncio.create_task(self._send(link), name="send"),
        ]
        self._flush.set()
        stop = asyncio.create_task(self.should_exit.wait())
        gone = asyncio.create_task(link.detached.wait())
        try:
            await asyncio.wait([stop, gone, *tasks], return_when=asyncio.FIRST_COMPLETED)
            if self.should_exit.is_set():
                await self._drain(link)
        finally:
            self._link = None
            for task in (*tasks, stop, gone):
                task.cancel()
            link.close()
            await asyncio.gather(*tasks, return_exceptions=True)
        if not self.should_exit.is_set():
            log.warning("disconnected from orchestrator; registering again")

    async def _drain(self, link: Link) -> None:
        """Let the running batch finish and hand its results over, within the timeout."""
        deadline = time.monotonic() + self.settings.job_timeout_s
        while any(s == "running" for s in self._active.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self._flush.set()
        for _ in range(50):
            if not self._outbox or link.detached.is_set():
                break
            await asyncio.sleep(0.01)

    async def _receive(self, link: Link) -> None:
        assert link.pull is not None
        while True:
            try:
                frame = await link.pull.recv()
            except SocketClosed:
                return
            self._on_frame(frame)

    async def _send(self, link: Link) -> None:
        assert link.push is not None
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
                    await link.push.send(encode(env, fmt))
                    self._outbox.pop(job_id, None)
            except SocketClosed:
                return

    # -- inbound events ---------------------------------------------------------------

    def _on_frame(self, frame: bytes) -> None:
        try:
            env = decode(frame)
        except FrameError as exc:
            log.warning("malformed frame dropped", reason=str(exc), size=len(frame))
            return
        if env.type == EventType.JOB_DISPATCH:
            self._on_dispatch(env.payload)
        elif env.type == EventType.JOB_CANCEL:
            self._on_cancel(env.payload)
        elif env.type == EventType.QPU_STATE:
            state = env.payload.get("state")
            self.disabled = state == "disabled"
            log.info("qpu state", state=state)
        elif env.type == EventType.RESULT_ACK:
            pass  # results leave the outbox once sent; acks matter to the durable store
        else:
            log.info("unknown event type dropped", type=env.type, id=env.id)

    def _on_dispatch(self, payload: dict[str, Any]) -> None:
        job_id = payload.get("job_id")
        if not isinstance(job_id, str) or not job_id or len(job_id) > 256:
            log.warning("JobDispatch without a usable job_id dropped", job_id=repr(job_id)[:80])
            return
        if job_id in self._active:
            log.info("duplicate dispatch absorbed", job_id=job_id, state=self._active[job_id])
            return
        if job_id in self._finished:
            log.info("duplicate dispatch answered from stored result", job_id=job_id)
            self._answer(job_id, self._finished[job_id])
            return
        try:
            if self.disabled:
                raise JobError(ErrorCode.QPU_DISABLED, "this QPU is disabled by the orchestrator")
            if len(self._queue) >= self.settings.max_queued_jobs:
                raise JobError(
                    ErrorCode.QUOTA_EXCEEDED,
                    f"the driver's queue is full ({self.settings.max_queued_jobs} jobs); "
                    "retry later",
                )
            spec = read_spec(payload.get("payload"))
        except JobError as exc:
            self._finish(job_id, exc.to_result())
            return
        self._active[job_id] = "queued"
        self._queue.append(QueuedJob(job_id, spec))
        self._work.set()

    def _on_cancel(self, payload: dict[str, Any]) -> None:
        job_id = payload.get("job_id")
        for item in self._queue:
            if item.job_id == job_id:
                self._queue.remove(item)
                self._finish(job_id, JobError(ErrorCode.JOB_CANCELLED, "cancelled while queued")
                             .to_result())
                return

    # -- running jobs -----------------------------------------------------------------

    async def _run_jobs(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._work.wait()
            if not self._queue:
                self._work.clear()
                continue
            batch = [self._queue.popleft()
                     for _ in range(min(len(self._queue), self.settings.batch_max_jobs))]
            for item in batch:
                self._active[item.job_id] = "running"
                self._status(item.job_id, "running")
            outcomes = await loop.run_in_executor(self._pool, self._execute, batch)
            for item, results in zip(batch, outcomes, strict=True):
                self._finish(item.job_id, results)
                ok = "error" not in results
                log.info("job finished", job_id=item.job_id, ok=ok,
                         error_code=results.get("error_code"),
                         seconds=round(time.monotonic() - item.received, 4))

    def _execute(self, batch: list[QueuedJob]) -> list[dict[str, Any]]:
        """Worker thread: prepare every job, run the valid ones together."""
        assert self.executor is not None
        outcomes: list[dict[str, Any] | None] = [None] * len(batch)
        ready = []
        for i, item in enumerate(batch):
            try:
                ready.append((i, prepare(item.job_id, item.spec, self.limits)))
            except JobError as exc:
                outcomes[i] = exc.to_result()
        if ready:
            try:
                results = self.executor.run_many([job for _, job in ready])
            except Exception as exc:  # an executor bug must not take the daemon down
                log.exception("executor raised", executor=self.settings.executor)
                err = JobError(ErrorCode.JOB_FAILED, f"executor {self.settings.executor!r} "
                               f"failed: {type(exc).__name__}: {exc}")
                results = [err] * len(ready)
            for (i, _), res in zip(ready, results, strict=True):
                outcomes[i] = (res.to_result() if isinstance(res, JobError)
                               else result_map(res, self.settings.executor, __version__))
        return [o if o is not None else {} for o in outcomes]

    # -- outbound ---------------------------------------------------------------------

    def _finish(self, job_id: str, results: dict[str, Any]) -> None:
        self._active.pop(job_id, None)
        self._finished[job_id] = results
        while len(self._finished) > 10_000:
            self._finished.popitem(last=False)
        self._answer(job_id, results)

    def _answer(self, job_id: str, results: dict[str, Any]) -> None:
        self._outbox[job_id] = results
        self._flush.set()

    def _status(self, job_id: str, state: str) -> None:
        if self._link is not None:
            self._transient.append(Envelope(EventType.JOB_STATUS,
                                            {"job_id": job_id, "state": state}))
            self._flush.set()
