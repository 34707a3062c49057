"""Nothing lost, nothing run twice (protocol §6): crashes, hangs, duplicates,
restarts, disconnects, cancel, disabled QPU, backpressure, graceful stop, secrets."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
from pathlib import Path
from typing import Any

from frontends.qpi.orchestrator import LocalOrchestrator
from frontends.qpi.wire import EventType, encode
from tests.circuits import BELL
from tests.conftest import (
    EXECUTIONS_LOG,
    answers,
    counting_daemon,
    daemon_env,
    executions,
    heartbeats,
    run_job,
    start_connected,
    wait_for,
)


def store_state(tmp_path: Path, job_id: str) -> str | None:
    """The job's state in the daemon's result store (`running` once handed over)."""
    db = sqlite3.connect(f"file:{tmp_path / 'data' / 'results.sqlite3'}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT state FROM jobs WHERE job_id=?", (job_id,)).fetchone()
    except sqlite3.OperationalError:  # not created yet
        return None
    finally:
        db.close()
    return None if row is None else str(row[0])


def marked(marker: str) -> str:
    return BELL + f"// {marker}\n"


async def barrier(orch: LocalOrchestrator) -> None:
    """Returns once the daemon has answered every frame sent before it: a job dispatched
    now reaches the daemon behind them on the same socket, and a replayed answer goes out
    at intake, before the new job has even run."""
    ok = await run_job(orch, {"circuits": [BELL], "shots": 8})
    assert ok["success"] is True


async def test_segfault_fails_only_that_job_and_a_fresh_worker_serves(
    tmp_path: Path, orch: LocalOrchestrator
) -> None:
    d = await counting_daemon(tmp_path, orch)
    try:
        crashed = await run_job(orch, {"circuits": [marked("segfault")]})
        assert crashed["error_code"] == "EXECUTOR_CRASHED"
        assert "SIGSEGV" in str(crashed["error"])
        exited = await run_job(orch, {"circuits": [marked("exit")]})
        assert "exited with status 3" in str(exited["error"])
        ok = await run_job(orch, {"circuits": [BELL], "shots": 64})
        assert ok["success"] is True
    finally:
        assert d.stop() == 0, d.output()
    assert "executor restarted" in d.output()


async def test_capabilities_are_the_restarted_workers_not_a_copy_from_start(
    tmp_path: Path
) -> None:
    orch = LocalOrchestrator(port=0, heartbeat_interval_s=0.5)
    await orch.start()
    d = await counting_daemon(tmp_path, orch)
    try:
        first = int((tmp_path / f"{EXECUTIONS_LOG}.pid").read_text())
        await wait_for(lambda: heartbeats(orch), what="a heartbeat")
        assert heartbeats(orch)[-1]["capabilities"]["worker_pid"] == first
        assert orch.capabilities["worker_pid"] == first  # what the connect carried
        crashed = await run_job(orch, {"circuits": [marked("exit")]})
        assert crashed["error_code"] == "EXECUTOR_CRASHED"
        await wait_for(lambda: heartbeats(orch)[-1]["capabilities"]["worker_pid"] != first,
                       what="a heartbeat with the fresh worker's capabilities")
        fresh = int((tmp_path / f"{EXECUTIONS_LOG}.pid").read_text())
        assert heartbeats(orch)[-1]["capabilities"]["worker_pid"] == fresh != first
    finally:
        assert d.stop() == 0, d.output()
        await orch.stop()


async def test_hang_times_out_and_the_next_job_runs(
    tmp_path: Path, orch: LocalOrchestrator
) -> None:
    d = await counting_daemon(tmp_path, orch, QPI_JOB_TIMEOUT_S="30")
    try:
        hung = await run_job(orch, {"circuits": [marked("hang")], "timeout_s": 1.5})
        assert hung["error_code"] == "JOB_TIMEOUT" and "1.5 s" in str(hung["error"])
        ok = await run_job(orch, {"circuits": [BELL], "shots": 64})
        assert ok["success"] is True
    finally:
        assert d.stop() == 0, d.output()


async def test_duplicates_are_absorbed_or_answered_never_rerun(
    tmp_path: Path, orch: LocalOrchestrator
) -> None:
    d = await counting_daemon(tmp_path, orch)
    try:
        record = orch.submit({"circuits": [marked("sleep 1.0")], "shots": 32})
        await wait_for(lambda: record.status == "running", what="the job to run")
        again = {"job_id": record.id, "payload": record.payload}
        await orch.send_event(EventType.JOB_DISPATCH, again)  # while running: absorbed
        await orch.result(record.id, timeout=60)
        first = record.results
        await orch.send_event(EventType.JOB_DISPATCH, again)  # finished: stored answer
        await wait_for(lambda: record.results_received >= 2, what="the stored answer")
        assert record.results == first
        await barrier(orch)  # nothing more is on its way for the two dispatches
        assert record.results_received == 2
    finally:
        assert d.stop() == 0, d.output()
    assert executions(tmp_path).count(record.id) == 1


async def test_result_store_survives_a_daemon_restart(
    tmp_path: Path, orch: LocalOrchestrator
) -> None:
    d = await counting_daemon(tmp_path, orch)
    record = orch.submit({"circuits": [BELL], "shots": 100})
    await orch.result(record.id, timeout=60)
    assert d.stop() == 0
    d = await counting_daemon(tmp_path, orch)
    try:
        before = record.results_received
        await orch.send_event(EventType.JOB_DISPATCH,
                              {"job_id": record.id, "payload": record.payload})
        await wait_for(lambda: record.results_received > before, what="the stored answer")
    finally:
        assert d.stop() == 0, d.output()
    assert executions(tmp_path).count(record.id) == 1


async def test_results_made_while_disconnected_are_sent_after_reconnect(
    tmp_path: Path, orch: LocalOrchestrator
) -> None:
    orch.acks = True
    d = await counting_daemon(tmp_path, orch)
    try:
        record = orch.submit({"circuits": [marked("sleep 1.5")], "shots": 16})
        await wait_for(lambda: record.status == "running", what="the job to run")
        await orch.stop_nng()  # the orchestrator goes away mid-job
        # The job finishes with nobody to hand it to.
        await wait_for(lambda: d.logged("job finished", job_id=record.id), timeout=60,
                       what="the job to finish while the orchestrator is away")
        await orch.start_nng()  # new ports: the daemon must register again
        await orch.result(record.id, timeout=60)
        assert record.status == "completed"
        ok = await run_job(orch, {"circuits": [BELL], "shots": 8})
        assert ok["success"] is True
    finally:
        assert d.stop() == 0, d.output()
    assert executions(tmp_path).count(record.id) == 1
    assert orch.connects >= 2


async def test_cancel_queued_and_running_jobs(tmp_path: Path, orch: LocalOrchestrator) -> None:
    orch.heartbeat_interval_s = 0.2  # the queue depth, as heartbeats report it
    d = await counting_daemon(tmp_path, orch)
    try:
        running = orch.submit({"circuits": [marked("sleep 60")], "timeout_s": 120})
        await wait_for(lambda: running.status == "running", what="the job to run")
        queued = orch.submit({"circuits": [BELL]})
        await wait_for(lambda: queued.dispatches == 1, what="dispatch")
        await wait_for(lambda: any(b["queue_depth"] == 1 for b in heartbeats(orch)),
                       what="the daemon to queue the second job behind the first")
        await orch.send_event(EventType.JOB_CANCEL, {"job_id": queued.id})
        await orch.send_event(EventType.JOB_CANCEL, {"job_id": running.id})
        for record in (queued, running):
            await orch.result(record.id, timeout=60)
            assert record.status == "cancelled", record.results
            assert record.results is not None and record.results["error_code"] == "JOB_CANCELLED"
        ok = await run_job(orch, {"circuits": [BELL], "shots": 8})
        assert ok["success"] is True
    finally:
        assert d.stop() == 0, d.output()
    assert queued.id not in executions(tmp_path)


async def test_cancel_a_job_waiting_in_the_executors_pipe(
    tmp_path: Path, orch: LocalOrchestrator
) -> None:
    """While one batch runs, the next waits in the executor's pipe; cancelling a job of
    it leaves it out (it never runs) and does not disturb the running one."""
    d = await counting_daemon(tmp_path, orch)
    release = tmp_path / "release"
    try:
        first = orch.submit({"circuits": [marked(f"until {release}")]})  # runs until released
        await wait_for(lambda: first.id in executions(tmp_path), what="the first job to start")
        handed = orch.submit({"circuits": [BELL]})
        # Handed over: the store marks a job running as it goes into the executor's pipe.
        await wait_for(lambda: store_state(tmp_path, handed.id) == "running",
                       what="the second job to be handed to the executor")
        await orch.send_event(EventType.JOB_CANCEL, {"job_id": handed.id})
        await orch.result(handed.id, timeout=60)
        assert handed.status == "cancelled", handed.results
        assert handed.results is not None
        assert "before it ran" in handed.results["error"], handed.results
        assert first.status != "completed"  # answered while the first still runs
        release.touch()
        await orch.result(first.id, timeout=60)
        assert first.status == "completed", first.results
        ok = await run_job(orch, {"circuits": [BELL], "shots": 8})
        assert ok["success"] is True
    finally:
        assert d.stop() == 0, d.output()
    assert handed.id not in executions(tmp_path)
    assert executions(tmp_path).count(first.id) == 1


async def test_disabled_qpu_refuses_jobs_until_enabled(
    tmp_path: Path, orch: LocalOrchestrator
) -> None:
    d = await counting_daemon(tmp_path, orch)
    try:
        await orch.send_event(EventType.QPU_STATE, {"state": "disabled"})
        record = orch.submit({"circuits": [BELL], "shots": 8})
        await orch.result(record.id, timeout=60)
        assert record.results is not None and record.results["error_code"] == "QPU_DISABLED"
        await orch.send_event(EventType.QPU_STATE, {"state": "online"})
        ok = await run_job(orch, {"circuits": [BELL], "shots": 8})
        assert ok["success"] is True
        # A refusal is not a stored result: the same job dispatched again now runs.
        before = record.results_received
        await orch.send_event(EventType.JOB_DISPATCH,
                              {"job_id": record.id, "payload": record.payload})
        await wait_for(lambda: record.results_received > before, what="the re-run")
        assert answers(orch, record.id)[-1]["success"] is True
    finally:
        assert d.stop() == 0, d.output()


async def test_queue_cap_is_answered_not_silent(tmp_path: Path, orch: LocalOrchestrator) -> None:
    d = await counting_daemon(tmp_path, orch, QPI_MAX_QUEUED_JOBS="2")
    release = tmp_path / "release"
    try:
        # Runs until released: the five behind it all arrive while it holds the executor.
        slow = orch.submit({"circuits": [marked(f"until {release}")], "timeout_s": 60})
        await wait_for(lambda: slow.id in executions(tmp_path), what="the job to run")
        records = [orch.submit({"circuits": [BELL], "shots": 8}) for _ in range(5)]
        await wait_for(lambda: sum(r.results is not None for r in records) == 3,
                       what="three refusals while the queue is full")
        release.touch()
        for record in records:
            await orch.result(record.id, timeout=60)
        codes = [r.results.get("error_code") if r.results else None for r in records]
        assert codes.count("QUOTA_EXCEEDED") == 3, codes
        assert codes.count(None) == 2
        full = next(r.results for r in records if r.results and "error" in r.results)
        assert "queue is full (2 jobs)" in str(full["error"])
    finally:
        assert d.stop() == 0, d.output()


async def test_sigterm_lets_the_running_job_finish_and_delivers_it(
    tmp_path: Path, orch: LocalOrchestrator
) -> None:
    d = await counting_daemon(tmp_path, orch)
    record = orch.submit({"circuits": [marked("sleep 1.5")], "shots": 16})
    await wait_for(lambda: record.status == "running", what="the job to run")
    d.proc.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(d.proc.wait, 60)
    assert code == 0, d.output()
    assert record.status == "completed"
    assert "stop requested: draining" in d.output()


async def test_oversized_frames_and_circuits_are_refused(
    tmp_path: Path, orch: LocalOrchestrator
) -> None:
    d = await counting_daemon(tmp_path, orch, QPI_MAX_FRAME_BYTES="65536",
                              QPI_MAX_CIRCUIT_BYTES="4096")
    try:
        huge = {"job_id": "huge-1", "payload": {"circuits": ["x" * 100_000]}}
        await orch.send_raw(encode_env(huge))  # over the frame cap: dropped before decoding
        big = await run_job(orch, {"circuits": [BELL + "// " + "y" * 5000 + "\n"]})
        assert big["error_code"] == "QUOTA_EXCEEDED" and big["max_circuit_bytes"] == 4096
        ok = await run_job(orch, {"circuits": [BELL], "shots": 8})
        assert ok["success"] is True
        # What the orchestrator sees of the oversized frame: nothing. Its job_id was never
        # read, so there is no answer, no status and no run, while the jobs sent after it
        # (answered above) were served.
        assert not [e for e in orch.events if e.payload.get("job_id") == "huge-1"]
        assert d.proc.poll() is None, d.output()
    finally:
        assert d.stop() == 0, d.output()
    assert "huge-1" not in executions(tmp_path)


def encode_env(payload: dict[str, Any]) -> bytes:
    from frontends.qpi.wire import Envelope

    return encode(Envelope(EventType.JOB_DISPATCH, payload), "msgpack")


async def test_token_never_appears_in_output_or_events(tmp_path: Path) -> None:
    token = "tok-SECRET-" + "9f8e7d6c5b4a"
    orch = LocalOrchestrator(port=0, token=token)
    await orch.start()
    try:
        d = await start_connected(tmp_path, orch,
                                  daemon_env(tmp_path, orch, QPI_LOG_LEVEL="debug"))
        for job in ({"circuits": [BELL]}, {"circuits": ["OPENQASM 2.0; bad"]},
                    {"circuits": [BELL], "shots": -1}, {"nothing": token}):
            await run_job(orch, job)
        await orch.send_event("Bogus", {"token": token})
        assert d.stop() == 0
        sent = b"".join(encode(env, "json") for env in orch.events)
        assert orch.events
        assert token.encode() not in sent
        assert token not in d.output()
        assert token not in json.dumps(orch.last_heartbeat or {})
    finally:
        await orch.stop()


async def test_sighup_rereads_the_config_file(tmp_path: Path, orch: LocalOrchestrator) -> None:
    config = tmp_path / "driver.toml"
    config.write_text('log_level = "info"\n')
    d = await start_connected(tmp_path, orch, daemon_env(tmp_path, orch), "--config",
                              str(config))
    try:
        config.write_text('log_level = "debug"\n')
        d.proc.send_signal(signal.SIGHUP)
        await wait_for(lambda: '"log_level": "debug", "event": "reloaded"' in d.output(),
                       what="the reload")
        ok = await run_job(orch, {"circuits": [BELL], "shots": 8})
        assert ok["success"] is True  # still serving
    finally:
        assert d.stop() == 0, d.output()
