"""Chaos: hundreds of jobs while the orchestrator's NNG side restarts on new ports
and the executor worker is SIGKILLed, then protocol §6 checked job by job:
one final answer each, nothing executed twice (counted by the executor itself,
not inferred), duplicates really exercised, and a daemon that still stops cleanly."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import psutil
import pytest

from frontends.qpi.orchestrator import FINAL, JobRecord, LocalOrchestrator
from frontends.qpi.wire import EventType
from tests.circuits import BELL
from tests.conftest import (
    EXECUTIONS_LOG,
    Daemon,
    counting_daemon,
    executions,
    heartbeats,
    wait_for,
)

JOBS = 300
SHOTS = 32
RESTARTS = 6  # orchestrator NNG restarts at random moments (plus one inside a kill window)
KILLS = 2  # executor SIGKILLs, each while a known job is mid-execution


def bell(n: int, marker: str = "") -> str:
    # A distinct text per job, so a result can never be confused with another job's.
    return BELL + f"// job {n}\n" + (f"// {marker}\n" if marker else "")


def worker_pid(daemon: Daemon, tmp_path: Path) -> int:
    """The executor process, as the counting executor names it: a child of the daemon."""
    pid = int((tmp_path / f"{EXECUTIONS_LOG}.pid").read_text())
    kids = {c.pid for c in psutil.Process(daemon.proc.pid).children(recursive=True)}
    assert pid in kids, (pid, kids)
    return pid


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def restart_orchestrator(orch: LocalOrchestrator, rng: random.Random) -> None:
    await orch.stop_nng()
    await asyncio.sleep(rng.uniform(0.0, 0.4))  # sometimes the daemon's redial finds nothing
    await orch.start_nng()


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_restarts_and_worker_kills_lose_nothing_and_run_nothing_twice(
    tmp_path: Path,
) -> None:
    seed = int(os.environ.get("CHAOS_SEED") or time.time_ns() % 1_000_000)
    print(f"chaos seed {seed} (rerun with CHAOS_SEED={seed})")
    rng = random.Random(seed)
    orch = LocalOrchestrator(port=0, driver_name="chaos", wire_format="msgpack")
    await orch.start()
    d = await counting_daemon(tmp_path, orch)
    records: list[JobRecord] = []
    victims: list[JobRecord] = []
    started_at_kill: set[str] = set()  # every job the executor had begun when it was killed
    restarts = 0
    try:
        async def submit_all() -> None:
            for n in range(JOBS):
                marker = "sleep 0.05" if rng.random() < 0.25 else ""
                records.append(orch.submit({"circuits": [bell(n, marker)], "shots": SHOTS}))
                if n % 10 == 9:
                    await asyncio.sleep(rng.uniform(0.0, 1.0))

        async def kill_mid_job(k: int) -> None:
            nonlocal restarts
            # A job that sleeps far longer than the test: it can only end by the kill.
            victim = orch.submit({"circuits": [bell(10_000 + k, "sleep 60")], "shots": SHOTS})
            victims.append(victim)
            await wait_for(lambda: victim.id in executions(tmp_path), timeout=120,
                           what=f"victim {k} to start executing")
            if k == 0:
                # A restart while a job runs and others queue behind it makes the
                # orchestrator re-dispatch them: duplicates the daemon must absorb.
                await restart_orchestrator(orch, rng)
                restarts += 1
                await wait_for(lambda: orch.online, timeout=60, what="reconnect")
                # The victim itself is among them: kill only once the daemon has taken
                # its duplicate in, so the kill lands on a daemon holding duplicates.
                await wait_for(lambda: d.logged("duplicate dispatch absorbed",
                                                job_id=victim.id), timeout=60,
                               what=f"the daemon to absorb victim {k}'s re-dispatch")
            pid = worker_pid(d, tmp_path)
            os.kill(pid, signal.SIGKILL)
            # Every job begun so far, the killed worker's batch included (it is logged
            # before it runs); a fresh worker needs seconds to import Aer, so none of its
            # jobs can be in here yet.
            started_at_kill.update(executions(tmp_path))

        async def chaos() -> None:
            nonlocal restarts
            plan = ["restart"] * RESTARTS + ["kill"] * KILLS
            rng.shuffle(plan)
            kills = 0
            for step in plan:
                await asyncio.sleep(rng.uniform(0.2, 2.5))
                if step == "restart":
                    await restart_orchestrator(orch, rng)
                    restarts += 1
                else:
                    await kill_mid_job(kills)
                    kills += 1

        started = time.monotonic()
        await asyncio.gather(submit_all(), chaos())
        everything = records + victims
        try:
            await wait_for(lambda: all(r.status in FINAL for r in everything), timeout=150,
                           what="every job to be answered")
        except AssertionError as exc:
            missing = [(r.id, r.status, r.dispatches) for r in everything if r.status not in FINAL]
            raise AssertionError(f"{exc}; unanswered (id, status, dispatches): {missing[:10]}, "
                                 f"{len(missing)} in all") from None
        # Late duplicate answers (replays from the store) must arrive before they are
        # judged: one more job, dispatched behind every duplicate, is answered after them.
        barrier = orch.submit({"circuits": [bell(JOBS)], "shots": SHOTS})
        await orch.result(barrier.id, timeout=90)
        assert barrier.status == "completed", barrier.results
        print(f"{len(everything)} jobs, {restarts} restarts, {len(victims)} kills in "
              f"{time.monotonic() - started:.1f} s; {orch.connects} connects, "
              f"{sum(r.status == 'failed' for r in everything)} crashed, "
              f"{sum(r.dispatches > 1 for r in everything)} re-dispatched, "
              f"{sum(r.results_received > 1 for r in everything)} answered twice or more")

        # Exactly one final result per job: every answer the daemon sent for a job
        # (first ones and those replayed from its store) says the same thing.
        answers: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for env in orch.events:
            if env.type == EventType.JOB_RESULT:
                answers[str(env.payload.get("job_id"))].append(env.payload["results"])
        for r in everything:
            assert answers[r.id], f"{r.id} has no JobResult event"
            assert all(a == r.results for a in answers[r.id]), (r.id, answers[r.id])
            assert r.results is not None
            if r.status == "completed":
                assert sum(r.results["counts"].values()) == SHOTS, r.results
                assert set(r.results["counts"]) <= {"00", "11"}, r.results
            else:
                # Only a job the killed worker had begun may fail, and only as a crash.
                assert r.status == "failed", (r.id, r.status, r.results)
                assert r.results["error_code"] == "EXECUTOR_CRASHED", (r.id, r.results)
                assert r.id in started_at_kill, (r.id, r.results)
        for v in victims:
            assert v.status == "failed" and v.results is not None, (v.id, v.status)
            assert "SIGKILL" in str(v.results["error"]), v.results
        crashed = sum(r.status == "failed" for r in everything)
        assert crashed <= KILLS * 64  # at most one batch per kill (QPI_BATCH_MAX_JOBS)

        # Nothing executed twice, and everything executed: the executor's own log.
        runs = Counter(executions(tmp_path))
        assert not [j for j, n in runs.items() if n > 1], runs.most_common(5)
        assert set(runs) == {r.id for r in everything} | {barrier.id}

        # The chaos really happened: re-dispatches reached the daemon and were absorbed
        # or answered from the store, and every restart cost a re-registration.
        assert restarts >= RESTARTS + 1
        assert any(r.dispatches > 1 for r in everything)
        assert orch.connects >= restarts + 1
        assert d.proc.poll() is None, d.output()
    finally:
        code = d.stop(timeout=60)
        await orch.stop()
    assert code == 0, f"daemon exited {code}:\n{d.output()[-5000:]}"


async def test_worker_killed_between_jobs_is_replaced(tmp_path: Path) -> None:
    """The executor dying while idle (OOM killer, an operator) must cost no job: the
    next job runs on a fresh worker."""
    orch = LocalOrchestrator(port=0, driver_name="idle-kill", wire_format="msgpack",
                             heartbeat_interval_s=0.3)
    await orch.start()
    d = await counting_daemon(tmp_path, orch, QPI_DRAIN_TIMEOUT_S="5")
    try:
        first = orch.submit({"circuits": [bell(1)], "shots": SHOTS})
        await orch.result(first.id, timeout=90)
        pid = worker_pid(d, tmp_path)
        os.kill(pid, signal.SIGKILL)
        await wait_for(lambda: not alive(pid), timeout=30, what="the worker to die")
        # An idle moment, the daemon not reading the dead pipe: two heartbeats go out
        # with the worker dead and no job in hand.
        beats = len(heartbeats(orch))
        await wait_for(lambda: len(heartbeats(orch)) >= beats + 2, timeout=30,
                       what="two heartbeats with the worker dead")
        second = orch.submit({"circuits": [bell(2)], "shots": SHOTS})
        await wait_for(lambda: second.status in FINAL or d.proc.poll() is not None, timeout=30,
                       what="an answer to the job sent after the idle worker was killed")
        assert d.proc.poll() is None, d.output()
        # It never started, so it runs on a fresh worker: a worker that died idle costs
        # no job (neither a crash answer nor silence).
        assert second.status == "completed", (second.status, second.results)
        third = orch.submit({"circuits": [bell(3)], "shots": SHOTS})
        await orch.result(third.id, timeout=90)
        assert third.status == "completed", third.results
    finally:
        code = d.stop(timeout=60)
        await orch.stop()
    assert code == 0, f"daemon exited {code}:\n{d.output()[-5000:]}"
    assert Counter(executions(tmp_path))[second.id] <= 1
