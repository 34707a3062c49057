"""The outbox on its own, with a real store and a stand-in connection: when a result is
marked delivered, relative to when it is handed to the pipe."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from driver.metrics import Metrics
from driver.outcome import Outcome
from driver.store import ResultStore
from frontends.qpi.outbox import Outbox
from frontends.qpi.wire import EventType, decode


@dataclass
class Registration:
    wire_format: str = "msgpack"
    name: str = "node"


@dataclass
class Pipe:
    """Takes frames as a live connection would; notes, for each result handed to it,
    whether the store still listed it as undelivered at that moment."""

    store: ResultStore
    registration: Registration = field(default_factory=Registration)
    sent: list[tuple[str, bool]] = field(default_factory=list)  # (job_id, owed in store)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def send(self, frame: bytes) -> None:
        env = decode(frame)
        if env.type == EventType.JOB_RESULT:
            job_id = env.payload["job_id"]
            owed = {o.job_id for o in self.store.undelivered(acks=False)}
            self.sent.append((job_id, job_id in owed))
            self.arrived.set()


class CountingStore(ResultStore):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.writes = 0

    def _write(self, statements: Any) -> None:
        self.writes += 1
        super()._write(statements)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[CountingStore]:
    s = CountingStore(tmp_path / "r.sqlite3")
    yield s
    s.close()


def answer(job_id: str) -> Outcome:
    return Outcome.succeeded(job_id, {"counts": {"00": 3}})


async def pumping(outbox: Outbox, pipe: Pipe, rate: float) -> asyncio.Task[None]:
    """The outbox's pump on `pipe`, once it has started (it says so through on_room)."""
    started = asyncio.Event()
    outbox.on_room = started.set
    pump = asyncio.create_task(outbox.pump(pipe, rate))  # type: ignore[arg-type]
    await asyncio.wait_for(started.wait(), 10)
    return pump


async def serve(outbox: Outbox, pipe: Pipe, rate: float, jobs: list[str]) -> None:
    """Pump the outbox, finish `jobs` one after another (each once the one before was
    sent), then stop the pump."""
    pump = await pumping(outbox, pipe, rate)
    try:
        for job_id in jobs:
            pipe.arrived.clear()
            outbox.finish([answer(job_id)])
            await asyncio.wait_for(pipe.arrived.wait(), 10)
    finally:
        pump.cancel()
        await asyncio.gather(pump, return_exceptions=True)


@pytest.mark.parametrize("rate", [0.0, 100.0])
async def test_a_result_that_goes_out_next_is_stored_and_marked_in_one_write(
        store: CountingStore, rate: float) -> None:
    outbox = Outbox(store, Metrics(), lambda beat: None)
    pipe = Pipe(store)
    outbox.connected(acks=False, events=frozenset({EventType.JOB_RESULT}))
    await serve(outbox, pipe, rate, ["a", "b", "c"])
    # Each was marked delivered before it reached the pipe, as without this path...
    assert pipe.sent == [("a", False), ("b", False), ("c", False)]
    assert store.undelivered(acks=False) == []
    # ...in the write that stored it: one write per result, not two.
    assert store.writes == 3


async def test_with_acks_a_result_stays_owed_until_acknowledged(store: CountingStore) -> None:
    outbox = Outbox(store, Metrics(), lambda beat: None)
    pipe = Pipe(store)
    outbox.connected(acks=True, events=frozenset({EventType.JOB_RESULT}))
    await serve(outbox, pipe, 0.0, ["a"])
    assert pipe.sent == [("a", True)]
    assert [o.job_id for o in store.undelivered(acks=True)] == ["a"]
    assert store.writes == 1


async def test_results_queued_behind_others_are_marked_as_they_go(store: CountingStore) -> None:
    """Results that wait their turn (here: the pace has room for one a second) are not
    marked when stored: only just before each is handed over, so a stop in between
    leaves them owed on disk and sent after the next start."""
    outbox = Outbox(store, Metrics(), lambda beat: None)
    pipe = Pipe(store)
    outbox.connected(acks=False, events=frozenset({EventType.JOB_RESULT}))
    pump = await pumping(outbox, pipe, 1.0)
    try:
        outbox.finish([answer("first")])
        await asyncio.wait_for(pipe.arrived.wait(), 10)
        outbox.finish([answer("later")])  # the pace is spent for this second
        assert [o.job_id for o in store.undelivered(acks=False)] == ["later"]
    finally:
        pump.cancel()
        await asyncio.gather(pump, return_exceptions=True)
    assert pipe.sent == [("first", False)]
    assert outbox.owed_on_disk() == 1


async def test_without_a_connection_a_result_is_stored_owed(store: CountingStore) -> None:
    outbox = Outbox(store, Metrics(), lambda beat: None)
    outbox.finish([answer("a")])
    assert [o.job_id for o in store.undelivered(acks=False)] == ["a"]
