"""The result outbox: every answer the node owes, stored before it is sent (the one
place that rule lives), handed to the current connection, marked delivered (or kept
until acknowledged), and resent after a reconnect. When the store cannot be written
(disk full), answers are kept in memory, still delivered, and written once it can.

What goes out is what the orchestrator can take: only the event types it announced
(`Registration.events`; QPI's server handles JobResult alone), at no more events per
second than it accepts (`Registration.event_rate_limit`, else the `event_rate_limit`
setting; QPI's server drops the excess without a word). Results wait here, oldest
first, one per job however often the job is dispatched meanwhile.

Without acknowledgements a result is sent at most once on its own: it is marked
delivered in the store just before it is handed to the pipe (a few at a time, one
write; a result that goes out next, in the write that stores it), so neither a
reconnect nor a restart after a crash sends it again. One lost with a connection (or
a daemon) that dies in that instant is recovered by the orchestrator re-dispatching
the job (QPI's server does so after its job timeout), which is answered from the
store; sending it again instead would make an orchestrator that did get it (and charges
every result it accepts) charge twice. With acknowledgements a result is kept, and
resent after a reconnect, until its ResultAck."""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable

from aiolimiter import AsyncLimiter

from driver import logs
from driver.metrics import Metrics
from driver.outcome import Outcome
from driver.store import ResultStore, StoreUnavailable, packed
from frontends.qpi.nng import SocketClosed
from frontends.qpi.session import OrchestratorSession
from frontends.qpi.wire import Envelope, EventType, WireFormat, encode

DELIVERY_MARK_DELAY_S = 0.5  # marks ride along with the next result write, or go this late
RETRY_STORE_S = 5.0
# A paced connection sends in bursts of at most a tenth of a second's worth: the
# orchestrator's own bucket (QPI's holds a second's worth) keeps room for jitter.
BURST_S = 0.1
# On a paced connection, with more than this much sending owed, no further batch starts
# (`backlogged`): running jobs faster than their results can go out only takes the CPU
# that an orchestrator on the same host needs to keep up with its own rate limit.
SEND_AHEAD_S = 1.0
MARK_GROUP = 64  # unpaced: results marked delivered in one write before they are sent

log = logs.get("qpi.outbox")


class Outbox:
    def __init__(self, store: ResultStore, metrics: Metrics,
                 changed: Callable[[bool], None]) -> None:
        self._store = store
        self._metrics = metrics
        self._changed = changed
        self._owed: OrderedDict[str, Outcome] = OrderedDict()  # to send on this connection
        self._owed_since: dict[str, float] = {}  # monotonic time each became owed
        # Answers the store could not take, in memory until it can (delivered or not:
        # the store is also what answers a duplicate dispatch later).
        self._unstored: OrderedDict[str, Outcome] = OrderedDict()
        self._unstored_delivered: set[str] = set()
        self._refusals: set[str] = set()  # owed transient refusals: never stored
        self._transient: deque[Envelope] = deque(maxlen=256)  # heartbeats, JobStatus
        self._delivered: list[str] = []  # handed to a pipe, not yet marked in the store
        # Marked delivered as they were stored, to go out next (see `_goes_out_next`).
        self._premarked: set[str] = set()
        # While a connection's pump runs: whether its pace allows n sends now.
        self._room: Callable[[int], bool] | None = None
        self._mark_later: asyncio.TimerHandle | None = None
        self._flush = asyncio.Event()
        self.acks = False
        self._accepted: frozenset[str] = frozenset()  # event types this connection takes
        self._ahead = float("inf")  # results owed that make the outbox `backlogged`
        self.on_room: Callable[[], None] = lambda: None  # called when it no longer is
        metrics.pending.set_function(lambda: len(self._owed) + self._unsent_unstored())
        metrics.pending_age.set_function(self.oldest_owed_s)

    def _unsent_unstored(self) -> int:
        return sum(1 for job_id in self._unstored
                   if job_id not in self._owed and job_id not in self._unstored_delivered)

    @property
    def owed(self) -> int:
        return len(self._owed)

    def oldest_owed_s(self) -> float:
        """How long the oldest result owed has waited to go out (0 when none)."""
        if not self._owed_since:
            return 0.0
        return time.monotonic() - min(self._owed_since.values())

    def _owe(self, outcome: Outcome) -> None:
        """One pending send per job: a job owed already keeps its place in the queue."""
        self._owed[outcome.job_id] = outcome
        self._owed_since.setdefault(outcome.job_id, time.monotonic())

    def _sent(self, job_id: str) -> None:
        self._owed.pop(job_id, None)
        self._refusals.discard(job_id)
        self._premarked.discard(job_id)
        self._owed_since.pop(job_id, None)
        if len(self._owed) < self._ahead <= len(self._owed) + 1:
            self.on_room()  # just stopped being backlogged

    @property
    def backlogged(self) -> bool:
        """More results owed than SEND_AHEAD_S of sending at the connection's pace."""
        return len(self._owed) >= self._ahead

    # -- answers in -------------------------------------------------------------------------

    def finish(self, outcomes: list[Outcome]) -> None:
        """Final answers (counted by the core): made durable first, then sent."""
        ahead = self._goes_out_next(outcomes)
        try:
            # Delivery marks the store refused before a send ride along with the write, and
            # so do the marks of these answers where they are the next to go out.
            outcomes = self._store.finish(outcomes, delivered=[*self._delivered, *ahead])
            self._delivered.clear()
            self._premarked.update(ahead)
        except StoreUnavailable as exc:
            log.error("results cannot be made durable; keeping them in memory and "
                      "delivering them", reason=exc.reason,
                      jobs=[o.job_id for o in outcomes][:20])
            outcomes = [packed(outcome)[0] for outcome in outcomes]
            for outcome in outcomes:
                self._unstored[outcome.job_id] = outcome
            self._changed(False)
        for outcome in outcomes:
            self._refusals.discard(outcome.job_id)
            self._owe(outcome)
        self._flush.set()

    def _goes_out_next(self, outcomes: list[Outcome]) -> list[str]:
        """Without acks, a result is marked delivered just before it is handed to the pipe
        (`_mark_before_sending`). Answers that the pump sends next, on this turn of the
        loop (connected, nothing owed or queued before them, room in the pace), are marked
        in the write that stores them instead: one write fewer per answer."""
        if (self.acks or self._room is None or self._owed or self._transient
                or len(outcomes) > MARK_GROUP or not self._room(len(outcomes))):
            return []
        return [o.job_id for o in outcomes]

    def answer(self, outcome: Outcome) -> None:
        """A transient refusal (disabled, queue full; counted by the core): sent, not
        stored, so the same job dispatched again later can run."""
        self._owe(outcome)
        self._refusals.add(outcome.job_id)
        self._flush.set()

    def resend(self, outcome: Outcome) -> None:
        """A dispatch of a job already answered: the stored answer again, once per
        dispatch (nothing added while the answer still waits to go out)."""
        self._owe(outcome)
        self._flush.set()

    def takes(self, event_type: str) -> bool:
        """Whether the current connection's orchestrator handles `event_type`."""
        return event_type in self._accepted

    def event(self, envelope: Envelope) -> None:
        """A status event (Heartbeat, JobStatus): sent only where the orchestrator
        announced it handles the type; otherwise not even queued."""
        if envelope.type not in self._accepted:
            return
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

    # -- one connection ---------------------------------------------------------------------

    def connected(self, acks: bool, events: frozenset[str]) -> None:
        """Everything owed from before (this run or an earlier one) goes out first."""
        self.acks = acks
        self._accepted = events
        self._transient.clear()  # status from before this connection is stale
        handed = set(self._delivered)  # sent, their marks not yet written
        for outcome in self._store.undelivered(acks):
            if outcome.job_id not in self._owed and outcome.job_id not in handed:
                self._owe(outcome)
        for job_id, outcome in self._unstored.items():
            if job_id not in self._unstored_delivered and job_id not in self._owed:
                self._owe(outcome)
        self._flush.set()

    async def pump(self, session: OrchestratorSession, rate: float) -> None:
        """Send transient events and owed results until the connection closes, at most
        `rate` events a second (0: as fast as the connection takes them)."""
        fmt, name = session.registration.wire_format, session.registration.name
        pace, room = _pacer(rate)
        # Results marked delivered together, then sent: what one crash can send no more.
        group = max(1, int(rate * BURST_S)) if rate > 0 else MARK_GROUP
        self._ahead = max(1.0, math.ceil(rate * SEND_AHEAD_S)) if rate > 0 else float("inf")
        self._room = room
        self.on_room()
        try:
            await self._send_all(session, fmt, name, pace, group)
        finally:
            self._room = None

    async def _send_all(self, session: OrchestratorSession, fmt: WireFormat, name: str,
                        pace: Callable[[], Awaitable[None]], group: int) -> None:
        while True:
            await self._flush.wait()
            self._flush.clear()
            try:
                while self._transient:
                    env = self._transient[0]  # left queued until sent: `drained` waits
                    env.driver = name
                    await pace()
                    await session.send(encode(env, fmt))
                    if self._transient and self._transient[0] is env:
                        self._transient.popleft()
                pending = list(self._owed)
                for start in range(0, len(pending), group):
                    chunk = [j for j in pending[start:start + group] if j in self._owed]
                    marked = self._mark_before_sending(chunk)
                    for job_id in chunk:
                        await pace()
                        await self._send_result(session, job_id, marked)
            except SocketClosed:
                return
            if self._delivered and self._mark_later is None:
                # The next result write takes the marks along; if none comes, write them soon.
                self._mark_later = asyncio.get_running_loop().call_later(
                    DELIVERY_MARK_DELAY_S, self.mark_delivered)

    def _mark_before_sending(self, job_ids: list[str]) -> bool:
        """Without acks, mark `job_ids` delivered (with marks still owed) before they go:
        whether that was written. If not (the store refuses writes), they are marked
        after sending, as before, and a crash meanwhile may send them once more."""
        if self.acks:
            return False
        stored = [j for j in job_ids if j not in self._refusals and j not in self._unstored
                  and j not in self._premarked]
        if not stored:
            return True
        try:
            self._store.mark_delivered([*self._delivered, *stored])
        except StoreUnavailable:
            return False
        self._delivered.clear()
        return True

    async def _send_result(self, session: OrchestratorSession, job_id: str,
                           marked: bool) -> None:
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
            self._sent(job_id)
            return
        await session.send(frame)
        # With acks a result stays owed (on disk, or in memory) until its ResultAck.
        self._sent(job_id)
        if not self.acks:
            if not marked:
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
        """Wait (bounded) until everything owed, and the status events queued (the
        "draining" heartbeat), was handed to the connection."""
        self._flush.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while ((self._owed or self._transient) and not session.detached.is_set()
               and loop.time() < deadline):
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


def _pacer(rate: float) -> tuple[Callable[[], Awaitable[None]], Callable[[int], bool]]:
    """What to await before each send to keep under `rate` events a second, and whether
    the pace has room for n sends now."""
    if rate <= 0:
        return _now, lambda n: True
    burst = max(1.0, rate * BURST_S)
    limiter = AsyncLimiter(burst, burst / rate)
    return limiter.acquire, limiter.has_capacity


async def _now() -> None:
    return None
