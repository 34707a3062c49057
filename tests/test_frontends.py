"""The seam between the core and its front ends: jobs keyed by where they came from, a
store from before front ends read as QPI's, the queue and the executor shared fairly,
front ends chosen by name."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgpack
import pytest

from driver.core import Core, load_frontend
from driver.jobs import JobSpec
from driver.metrics import Metrics
from driver.outcome import Outcome
from driver.runner import Entry, State, _fair
from driver.settings import ConfigError, load_settings
from driver.store import ResultStore
from executors.base import ErrorCode

# The jobs table as every release before front ends wrote it (keyed by job_id alone).
OLD_SCHEMA = """
CREATE TABLE jobs (
    job_id    TEXT PRIMARY KEY,
    state     TEXT NOT NULL,
    result    BLOB,
    started   REAL NOT NULL,
    finished  REAL,
    delivered INTEGER NOT NULL DEFAULT 0,
    acked     INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX jobs_pending ON jobs (state, delivered, acked);
CREATE INDEX jobs_finished ON jobs (finished);
"""


def test_a_store_from_before_front_ends_is_read_as_qpis(tmp_path: Path) -> None:
    path = tmp_path / "results.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    db.executemany("INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?)", [
        ("owed", "done", msgpack.packb({"counts": {"0": 1}}), 1.0, 2.0, 0, 0),
        ("sent", "done", msgpack.packb({"counts": {"1": 1}}), 1.0, 3.0, 1, 0),
        ("was-running", "running", None, 1.0, None, 0, 0),
    ])
    db.commit()
    db.close()

    store = ResultStore(path)
    try:
        columns = [r[1] for r in store._db.execute("PRAGMA table_info(jobs)")]
        assert "origin" in columns
        assert [o.job_id for o in store.undelivered(acks=False)] == ["owed"]
        assert store.state("sent") == ("done", Outcome("sent", {"counts": {"1": 1}}))
        assert store.recover_interrupted() == ["was-running"]
        # Another front end's job of the same name is a row of its own.
        assert store.state("owed", origin="qcos") is None
        store.finish([Outcome("owed", {"counts": {"11": 5}})], origin="qcos",
                     all_delivered=True)
        assert store.state("owed") == ("done", Outcome("owed", {"counts": {"0": 1}}))
        assert store.state("owed", origin="qcos") == (
            "done", Outcome("owed", {"counts": {"11": 5}}))
        # QPI's only: the one never sent, and the interrupted one's answer
        assert [o.job_id for o in store.undelivered(acks=False)] == ["owed", "was-running"]
        assert store.undelivered(acks=False, origin="qcos") == []  # polled: stored delivered
    finally:
        store.close()
    reopened = ResultStore(path)  # migrated once: opening again changes nothing
    try:
        assert reopened.count() == 4
    finally:
        reopened.close()


def _entry(origin: str, n: int) -> Entry:
    spec = JobSpec.model_validate({"circuits": ["x"]})
    return Entry(f"{origin}-{n}", spec, origin, f"r{origin}{n}", State.READY)


def test_batches_take_each_front_end_in_turn() -> None:
    flood = [_entry("qpi", n) for n in range(5)]
    few = [_entry("qcos", n) for n in range(2)]
    order = _fair([*flood[:3], few[0], *flood[3:], few[1]])
    assert [e.job_id for e in order] == ["qpi-0", "qcos-0", "qpi-1", "qcos-1", "qpi-2",
                                         "qpi-3", "qpi-4"]
    assert _fair(flood) == flood  # one front end: arrival order


class _Runner:
    def __init__(self, waiting: dict[str, int]) -> None:
        self.by_origin = waiting

    @property
    def waiting(self) -> int:
        return sum(self.by_origin.values())

    def waiting_of(self, origin: str) -> int:
        return self.by_origin.get(origin, 0)


def _core(waiting: dict[str, int], frontends: list[str], limit: int = 10) -> Core:
    settings: Any = SimpleNamespace(max_queued_jobs=limit, executor="aer")
    store: Any = SimpleNamespace(problem=None)
    runner: Any = _Runner(waiting)
    nothing: Any = None  # status and notifier: full() reads neither
    core = Core(settings, Metrics(), store, runner, nothing, nothing, asyncio.Event())
    for name in frontends:
        core.frontends[name] = SimpleNamespace(name=name)
    return core


def test_a_full_queue_still_takes_the_front_end_below_its_share() -> None:
    core = _core({"qpi": 9, "qcos": 1}, ["qpi", "qcos"])
    refusal = core.full("qpi")
    assert refusal is not None and refusal.code == ErrorCode.QUOTA_EXCEEDED
    assert "queue is full" in refusal.message
    assert core.full("qcos") is None  # 1 of its 5
    core = _core({"qpi": 5, "qcos": 5}, ["qpi", "qcos"])
    assert core.full("qpi") is not None and core.full("qcos") is not None
    alone = _core({"qpi": 10}, ["qpi"])
    assert alone.full("qpi") is not None
    assert _core({"qpi": 9}, ["qpi"]).full("qpi") is None


def test_front_ends_are_chosen_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_frontend("qpi").__name__ == "QpiFrontend"
    with pytest.raises(ValueError, match="unknown front end 'nope'"):
        load_frontend("nope")
    with pytest.raises(ValueError, match="cannot be loaded"):
        load_frontend("no.such.module:Frontend")
    for key in [k for k in os.environ if k.startswith("QPI_")]:
        monkeypatch.delenv(key)
    assert load_settings({"frontends": "qcos"}).local_mode is False  # no stand-in
    assert load_settings({}).local_mode is True
    with pytest.raises(ConfigError, match="orchestrator_url is required to serve QPI beside"):
        load_settings({"frontends": "qpi, qcos"})
    with pytest.raises(ConfigError, match="unknown front end 'mqtt'"):
        load_settings({"frontends": "mqtt"})
