"""The daemon, unchanged, against the real QPI server (`../shared/qpi-server/qpi`, the
public sopherapps/qpi orchestrator), judged from the server's own records and log: every
job completed with the right counts, nothing dropped by its rate limit or for want of a
handler, nothing recovered by its re-dispatch, no result accepted (and charged) twice, no
job run twice. Skips with the reason where the server cannot run (a user's clone has no
`../shared`; a namespace needs root)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from qpi_client import QPIClient

from bench.real_qpi import bell_ok, payloads, submit_all
from tests.conftest import (
    COUNTING,
    EXECUTIONS_LOG,
    Daemon,
    daemon_env,
    executions,
    start_daemon,
    wait_until,
)
from tests.qpi_server import BASE, USER_SECONDS, Rig, rig, unavailable

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))

# Enough to cross the server's default rate limit (100 events/s, burst 100) five times
# over, and to finish well inside its default job timeout (20 s).
LOAD_JOBS = 500
METRICS = "127.0.0.1:9464"  # inside the server's namespace: nothing else listens there

RigFactory = Callable[..., Rig]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RigFactory]:
    """Starts the real server with the given flags (its defaults otherwise); stopped after."""
    started: list[Iterator[Rig]] = []

    def make(**flags: str) -> Rig:
        gen = rig(tmp_path / "server", **flags)
        started.append(gen)
        return next(gen)

    yield make
    for gen in started:
        gen.close()


def node(r: Rig, tmp_path: Path, **env: str) -> Daemon:
    """The daemon on the counting executor, dialled into the server's namespace, online."""
    options = json.dumps({"count_file": str(tmp_path / EXECUTIONS_LOG)})
    d = start_daemon(tmp_path, r.daemon_env(daemon_env(
        tmp_path, None, QPI_EXECUTOR=COUNTING, QPI_EXECUTOR_OPTIONS=options,
        QPI_METRICS_ADDR=METRICS, **env)), prefix=r.ns.prefix())
    try:
        wait_until(lambda: online(r) or d.proc.poll() is not None, 90,
                   "the daemon to connect")
        assert d.proc.poll() is None, d.output()
    except BaseException:
        d.stop()
        raise
    return d


def online(r: Rig) -> bool:
    return r.server.driver_record(r.creds.driver_id)["status"] == "online"


def submit(r: Rig, bodies: list[dict[str, Any]]) -> list[str]:
    return r.ns.call(submit_all, lambda: QPIClient(BASE, r.creds.api_token), bodies,
                     r.creds.qpu_id)


def marked(marker: str) -> dict[str, Any]:
    """A Bell job whose text carries a counting-executor marker (`// until PATH`, ...)."""
    text = ('OPENQASM 3.0;\ninclude "stdgates.inc";\n// ' + marker + '\n'
            "bit[2] c;\nqubit[2] q;\nh q[0];\ncx q[0], q[1];\n"
            "c[0] = measure q[0];\nc[1] = measure q[1];\n")
    return {"circuits": [{"circuit": text}], "shots": 1024}


def all_finished(r: Rig) -> bool:
    return r.server.unfinished() == 0


def readyz(r: Rig) -> dict[str, Any]:
    resp = r.ns.call(requests.get, f"http://{METRICS}/readyz", timeout=5)
    return dict(resp.json())


def assert_each_completed_once(r: Rig, tmp_path: Path, ids: list[str]) -> None:
    """Every job completed with Bell counts, accepted once, run once; nothing dropped."""
    jobs = r.server.jobs(set(ids))
    assert len(jobs) == len(ids)
    assert [i for i, j in jobs.items() if j["status"] != "completed"] == []
    assert [i for i, j in jobs.items() if not bell_ok(j["results"])] == []
    counts = r.server.log_counts()
    assert counts.rate_limited == 0, "events dropped by the server's rate limit"
    assert counts.no_handler == 0, "events of a type the server cannot handle"
    assert counts.accepted_twice == 0, {k: n for k, n in counts.accepted.items() if n > 1}
    assert {i: counts.accepted[i] for i in ids if counts.accepted[i] != 1} == {}
    runs = executions(tmp_path)
    assert sorted(set(runs)) == sorted(ids) and len(runs) == len(ids), "a job ran twice"


def test_distinct_jobs_under_load_complete_once_with_nothing_dropped(
        server: RigFactory, tmp_path: Path) -> None:
    r = server()
    d = node(r, tmp_path)
    try:
        ids = submit(r, payloads(LOAD_JOBS))
        wait_until(lambda: all_finished(r), 120, "every job to finish", every=0.25)
        assert_each_completed_once(r, tmp_path, ids)
        counts = r.server.log_counts()
        assert counts.recovered == 0, "jobs the server's recovery dispatched again"
        assert all(counts.dispatches[i] == 1 for i in ids)
        # The node sent the server no status events: the events it keeps show none.
        assert r.server.records("events") == []
        connected = d.logged("connected")
        assert connected and connected[-1]["events"] == ["JobResult"]
        assert connected[-1]["events_per_s"] == 100.0
    finally:
        assert d.stop() == 0, d.output()


def test_server_killed_and_restarted_under_load(server: RigFactory, tmp_path: Path) -> None:
    r = server()
    d = node(r, tmp_path)
    try:
        ids = submit(r, payloads(300))
        wait_until(lambda: r.server.unfinished() <= 200, 60, "100 jobs to finish",
                   every=0.1)
        r.server.kill()
        r.server.start()
        # Results lost with the connection come back through the server's recovery (20 s
        # job timeout, 10 s interval), answered from the node's store.
        wait_until(lambda: all_finished(r), 120, "every job to finish", every=0.25)
        assert_each_completed_once(r, tmp_path, ids)
        assert d.logged("disconnected from orchestrator; registering again")
    finally:
        assert d.stop() == 0, d.output()


def test_job_longer_than_the_job_timeout_runs_once_and_is_accepted_once(
        server: RigFactory, tmp_path: Path) -> None:
    r = server(job_timeout="3s", recovery_interval="1s")
    d = node(r, tmp_path)
    release = tmp_path / "release"
    try:
        [job] = submit(r, [marked(f"until {release}")])
        # The server gives up on the running job and dispatches it again; the node absorbs
        # the copy of the job it is running.
        wait_until(lambda: r.server.log_counts().dispatches[job] >= 2, 60,
                   "the server to dispatch the job again")
        wait_until(lambda: d.logged("duplicate dispatch absorbed", job_id=job), 30,
                   "the node to absorb the copy")
        release.touch()
        wait_until(lambda: all_finished(r), 60, "the job to finish")
        assert_each_completed_once(r, tmp_path, [job])
        charged = USER_SECONDS - r.server.user_seconds(r.creds.user_id)
        assert 0 < charged < 60, charged  # once: from the last dispatch to the result
    finally:
        assert d.stop() == 0, d.output()


def test_driver_toggled_off_and_on(server: RigFactory, tmp_path: Path) -> None:
    r = server()
    d = node(r, tmp_path, QPI_DISABLED_RETRY_S="1")
    try:
        r.server.toggle_driver(r.creds.driver_id, False)
        wait_until(lambda: d.logged("driver disabled"), 60, "the node to hear it is disabled")
        assert d.logged("driver disabled")[0]["retry_in_s"] == 1.0
        state = wait_until(lambda: (s := readyz(r))["status"] == "unready" and s, 30,
                           "/readyz to say why")
        assert any("disabled" in reason for reason in state["reasons"]), state
        [job] = submit(r, payloads(1))  # waits, pending, while the driver is off
        assert r.server.jobs({job})[job]["status"] == "pending"
        r.server.toggle_driver(r.creds.driver_id, True)
        wait_until(lambda: all_finished(r), 60, "the job to run once enabled")
        assert_each_completed_once(r, tmp_path, [job])
        wait_until(lambda: readyz(r)["status"] == "ready", 30, "/readyz to clear")
    finally:
        assert d.stop() == 0, d.output()


def test_full_queue_holds_off_reading_instead_of_failing_jobs(
        server: RigFactory, tmp_path: Path) -> None:
    """To this server a refusal is final (`failed`): a full queue must hold off instead."""
    r = server()
    d = node(r, tmp_path, QPI_MAX_QUEUED_JOBS="2", QPI_BATCH_MAX_JOBS="1")
    try:
        ids = submit(r, [marked("sleep 0.05") for _ in range(40)])
        wait_until(lambda: all_finished(r), 120, "every job to finish", every=0.25)
        jobs = r.server.jobs(set(ids))
        assert [j["results"] for j in jobs.values() if j["status"] != "completed"] == []
        assert d.logged("holding off dispatches")
        assert r.server.log_counts().accepted_twice == 0
        assert len(executions(tmp_path)) == len(ids)
    finally:
        assert d.stop() == 0, d.output()
