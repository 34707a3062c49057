"""The durable result store on its own: owed results, acks, interrupted jobs, retention."""

from __future__ import annotations

from pathlib import Path

from driver.outcome import Outcome
from driver.store import ResultStore
from executors.base import ErrorCode, JobError


def ok(job_id: str, result: dict[str, object]) -> Outcome:
    return Outcome.succeeded(job_id, dict(result))


def test_owed_results_survive_reopen_and_follow_acks(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite3"
    store = ResultStore(path)
    store.mark_running(["a", "b", "c"])
    store.finish([ok("a", {"counts": {"0": 1}}),
                  Outcome.failed("b", JobError(ErrorCode.JOB_FAILED, "x"))])
    store.close()
    store = ResultStore(path)
    owed = store.undelivered(acks=False)
    assert [o.job_id for o in owed] == ["a", "b"]
    assert owed[1].error is not None and owed[1].error.code == "JOB_FAILED"
    assert store.recover_interrupted() == ["c"]  # was running when the process died
    state = store.state("c")
    assert state is not None and state[1] is not None
    # The daemon stopped with it in hand: not labelled an executor crash nobody saw.
    interrupted = state[1].to_wire()
    assert interrupted["error_code"] == "JOB_FAILED" and interrupted["interrupted"] is True
    assert "the driver stopped while this job was running" in interrupted["error"]
    store.mark_delivered(["a", "b", "c"])
    assert store.undelivered(acks=False) == []
    assert {o.job_id for o in store.undelivered(acks=True)} == {"a", "b", "c"}
    store.mark_acked("a")
    assert {o.job_id for o in store.undelivered(acks=True)} == {"b", "c"}
    assert store.state("a") == ("done", ok("a", {"counts": {"0": 1}}))
    assert store.state("zzz") is None


def test_prune_drops_only_delivered_results(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "r.sqlite3", retention_s=0.0, max_rows=1000)
    store.finish([ok(f"j{i}", {"n": i}) for i in range(10)])
    store.mark_delivered([f"j{i}" for i in range(6)])
    assert store.prune() == 6
    assert store.count() == 4  # never delivered: still owed, kept
    capped = ResultStore(tmp_path / "c.sqlite3", retention_s=1e9, max_rows=3)
    capped.finish([ok(f"k{i}", {"n": i}) for i in range(5)])
    capped.mark_delivered([f"k{i}" for i in range(5)])
    assert capped.prune() == 2 and capped.count() == 3
    assert capped.state("k0") is None and capped.state("k4") is not None


def test_recorded_remote_work_survives_a_stop_for_its_executor_only(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite3"
    store = ResultStore(path)
    store.mark_running(["remote", "local"])
    store.mark_running(["task"], "qcos")
    record = {"tasks": [{"id": "t-1", "shots": 10}], "deadline": 1.5}
    store.record("qpi", "remote", "oqc", record)
    store.record("qcos", "task", "oqc", record)
    store.close()
    store = ResultStore(path)  # after a crash, under the same executor: resumed, not failed
    assert store.recover_interrupted(resumes="oqc") == ["local"]
    assert store.resumable("oqc") == [("qpi", "remote", record), ("qcos", "task", record)]
    state = store.state("remote")
    assert state is not None and state[0] == "running"
    store.finish([ok("remote", {"counts": {"0": 10}})])  # answered: its record goes
    assert store.resumable("oqc") == [("qcos", "task", record)]
    store.close()
    store = ResultStore(path)  # now under another executor: nothing can resume it
    assert store.recover_interrupted(resumes="aer") == ["task"]
    assert store.resumable("oqc") == []
    answer = store.state("task", "qcos")
    assert answer is not None and answer[1] is not None and answer[1].error is not None
