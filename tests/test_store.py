"""The durable result store on its own: owed results, acks, interrupted jobs, retention."""

from __future__ import annotations

from pathlib import Path

from driver.store import ResultStore


def test_owed_results_survive_reopen_and_follow_acks(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite3"
    store = ResultStore(path)
    store.mark_running(["a", "b", "c"])
    store.finish([("a", {"counts": {"0": 1}}), ("b", {"error": "x", "error_code": "JOB_FAILED"})])
    store.close()
    store = ResultStore(path)
    assert [j for j, _ in store.undelivered(acks=False)] == ["a", "b"]
    assert store.recover_interrupted() == ["c"]  # was running when the process died
    state = store.state("c")
    assert state is not None and state[1] is not None
    assert state[1]["error_code"] == "EXECUTOR_CRASHED"
    store.mark_delivered(["a", "b", "c"])
    assert store.undelivered(acks=False) == []
    assert {j for j, _ in store.undelivered(acks=True)} == {"a", "b", "c"}
    store.mark_acked("a")
    assert {j for j, _ in store.undelivered(acks=True)} == {"b", "c"}
    assert store.state("a") == ("done", {"counts": {"0": 1}})
    assert store.state("zzz") is None


def test_prune_drops_only_delivered_results(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "r.sqlite3", retention_s=0.0, max_rows=1000)
    store.finish([(f"j{i}", {"n": i}) for i in range(10)])
    store.mark_delivered([f"j{i}" for i in range(6)])
    assert store.prune() == 6
    assert store.count() == 4  # never delivered: still owed, kept
    capped = ResultStore(tmp_path / "c.sqlite3", retention_s=1e9, max_rows=3)
    capped.finish([(f"k{i}", {"n": i}) for i in range(5)])
    capped.mark_delivered([f"k{i}" for i in range(5)])
    assert capped.prune() == 2 and capped.count() == 3
    assert capped.state("k0") is None and capped.state("k4") is not None
