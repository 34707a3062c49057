"""The result outbox: every answer the node owes, stored before it is sent (the one
place that rule lives), handed to the current connection, marked delivered (or kept
until acknowledged), and resent after a reconnect. When the store cannot be written
(disk full), answers are kept in memory, still delivered, and written once it can."""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Callable

from driver import logs
from driver.metrics import Metrics
from driver.nng import SocketClosed
from driver.outcome import Outcome
from driver.session import OrchestratorSession
from driver.store import ResultStore, StoreUnavailable, packed
from driver.wire import Envelope, EventType, encode

DELIVERY_MARK_DELAY_S = 0.5  # marks ride along with the next result write, or go this late
RETRY_STORE_S = 5.0

log = logs.get("qpi.outbox")


class Outbox:
    def __init__(self, store: ResultStore, metrics: Metrics, executor: str,
                 changed: Callable[[bool], None]) -> None:
        self._store = store
        self._metrics = metrics
        self._executor = executor
        self._changed = changed
        self._owed: OrderedDict[str, Outcome] = OrderedDict()  # to send on this connection
        # Answers the store could not take, in memory until it can (delivered or not:
        # the store is also what answers a duplicate dispatch later).
        self._unstored: OrderedDict[str, Outcome] = OrderedDict()
        self._unstored_delivered: set[str] = set()
        self._transient: deque[Envelope] = deque(maxlen=256)  # heartbeats, JobStatus
        self._delivered: list[str] = []  # handed to a pipe, not yet marked in the store
        self._mark_later: asyncio.TimerHandle | None = None
        self._flush = asyncio.Event()
        self.acks = False
        metrics.pending.set_function(lambda: len(self._owed) + self._unsent_unstored())

    def _unsent_unstored(self) -> int:
        return sum(1 for job_id in self._unstored
                   if job_id not in self._owed and job_id not in self._unstored_delivered)

    @property
    def owed(self) -> int:
        return len(self._owed)

    # -- answers in -------------------------------------------------------------------------

    def finish(self, outcomes: list[Outcome]) -> None:
        """A final answer: made durable first, then sent; counted here, once."""
        try:
            # Delivery marks ride along with the write: after a crash, a result handed
            # over but not yet marked is sent once more, which the protocol allows.
            outcomes = self._store.finish(outcomes, delivered=self._delivered)
            self._delivered.clear()
        except StoreUnavailable as exc:
            log.error("results cannot be made durable; keeping them in memory and "
                      "delivering them", reason=exc.reason,
                      jobs=[o.job_id for o in outcomes][:20])
            outcomes = [packed(outcome)[0] for outcome in outcomes]
            for outcome in outcomes:
                self._unstored[outcome.job_id] = outcome
            self._changed(False)
        for outcome in outcomes:
            self._owed[outcome.job_id] = outcome
            self._count(outcome)
        self._flush.set()

    def answer(self, outcome: Outcome) -> None:
        """A transient refusal (disabled, queue full): sent, counted, not stored, so the
        same job dispatched again later can run."""
        self._owed[outcome.job_id] = outcome
        self._count(outcome)
        self._flush.set()

    def resend(self, outcome: Outcome) -> None:
        """A duplicate dispatch of a job already answered: the stored answer again."""
        self._owed[outcome.job_id] = outcome
        self._flush.set()

    def event(self, envelope: Envelope) -> None:
        self._transient.append(envelope)
        self._flush.set()

    def acked(self, job_id: str) -> None:
        if job_id in self._unstored:
            self._unstored_delivered.add(job_id)
        try:
            self._store.mark_acked(job_id)
        except StoreUnavailable as exc:
            log.warning("cannot record a ResultAck; the result may be sent again",
                        job_id=job_id, reason=exc.reason)

    def _count(self, outcome: Outcome) -> None:
        self._metrics.jobs.labels(outcome.label, self._executor).inc()
        if outcome.ok:
            experiments = outcome.experiments()
            self._metrics.circuits.labels(self._executor).inc(len(experiments))
            self._metrics.shots.labels(self._executor).inc(
                sum(int(e.get("shots", 0)) for e in experiments))

    # -- one connection ---------------------------------------------------------------------

    def connected(self, acks: bool) -> None:
        """Everything owed from before (this run or an earlier one) goes out first."""
        self.acks = acks
        for outcome in self._store.undelivered(acks):
            self._owed.setdefault(outcome.job_id, outcome)
        for job_id, outcome in self._unstored.items():
            if job_id not in self._unstored_delivered:
                self._owed.setdefault(job_id, outcome)
        self._flush.set()

    async def pump(self, session: OrchestratorSession) -> None:
        """Send transient events and owed results until the connection closes."""
        fmt, name = session.registration.wire_format, session.registration.name
        while True:
            await self._flush.wait()
            self._flush.clear()
            try:
                while self._transient:
                    env = self._transient.popleft()
                    env.driver = name
                    await session.send(encode(env, fmt))
                for job_id in list(self._owed):
                    await self._send_result(session, job_id)
            except SocketClosed:
                return
            if self._delivered and self._mark_later is None:
                # The next result write takes the marks along; if none comes, write them soon.
                self._mark_later = asyncio.get_running_loop().call_later(
                    DELIVERY_MARK_DELAY_S, self.mark_delivered)

    async def _send_result(self, session: OrchestratorSession, job_id: str) -> None:
        outcome = self._owed.get(job_id)
        if outcome is None:
            return
        env = Envelope(EventType.JOB_RESULT, {"job_id": job_id, "results": outcome.to_wire()},
                       driver=session.registration.name)
        try:
            frame = encode(env, session.registration.wire_format)
        except (TypeError, ValueError, OverflowError) as exc:
            # The store sanitises results, so this is a bug; never stall the outbox.
            log.error("result cannot be encoded; dropped", job_id=job_id, reason=str(exc))
            self._owed.pop(job_id, None)
            return
        await session.send(frame)
        # With acks a result stays owed (on disk, or in memory) until its ResultAck.
        self._owed.pop(job_id, None)
        if not self.acks:
            self._delivered.append(job_id)
            if job_id in self._unstored:
                self._unstored_delivered.add(job_id)

    def mark_delivered(self) -> None:
        self._mark_later = None
        if not self._delivered:
            return
        try:
            self._store.mark_delivered(self._delivered)
            self._delivered.clear()
        except StoreUnavailable:
            pass  # kept; the next successful write takes them along

    async def drained(self, session: OrchestratorSession, timeout: float) -> None:
        """Wait (bounded) until everything owed was handed to the connection."""
        self._flush.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._owed and not session.detached.is_set() and loop.time() < deadline:
            await asyncio.sleep(0.01)

    # -- the store coming back --------------------------------------------------------------

    async def retry_store(self) -> None:
        """While the store refuses writes, try again; write what is kept in memory."""
        while True:
            await asyncio.sleep(RETRY_STORE_S)
            if self._store.problem is None and not self._unstored:
                continue
            kept = list(self._unstored.values())
            delivered = [*self._delivered, *self._unstored_delivered]
            try:
                if kept:
                    self._store.finish(kept, delivered=delivered)
                    self._delivered.clear()
                else:
                    self._store.probe()
            except StoreUnavailable:
                continue
            for outcome in kept:
                self._unstored.pop(outcome.job_id, None)
                self._unstored_delivered.discard(outcome.job_id)
            if kept:
                log.info("results kept in memory are now stored", results=len(kept))
            self._changed(False)

    def close(self) -> None:
        if self._mark_later is not None:
            self._mark_later.cancel()
        self.mark_delivered()

    def owed_on_disk(self) -> int:
        return len(self._store.undelivered(self.acks)) + self._unsent_unstored()
