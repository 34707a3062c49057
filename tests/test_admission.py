"""Admission and the parser ahead of the executor: what the node refuses before it
queues (meas_level, executor options) and what a parser crash costs (one job)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
from pathlib import Path

import psutil
import pytest
from qiskit import QuantumCircuit, qasm3
from qiskit.circuit.library import QFTGate

from frontends.qpi.orchestrator import LocalOrchestrator
from tests.circuits import BELL
from tests.conftest import daemon_env, run_job, start_connected, start_daemon, wait_for


async def test_meas_level_the_executor_does_not_return_is_refused_at_admission(
    tmp_path: Path, orch: LocalOrchestrator
) -> None:
    d = await start_connected(tmp_path, orch, daemon_env(tmp_path, orch))
    try:
        refused = await run_job(orch, {"circuits": [BELL], "meas_level": 1})
        assert refused["error_code"] == "CIRCUIT_INVALID"
        assert refused["meas_levels"] == [2]
        assert "meas_level 2" in str(refused["error"])
        ok = await run_job(orch, {"circuits": [BELL], "shots": 16})
        assert ok["success"] is True
    finally:
        assert d.stop() == 0, d.output()


def test_a_misspelt_executor_option_stops_the_start_with_a_config_error(
    tmp_path: Path,
) -> None:
    env = daemon_env(tmp_path, None, QPI_EXECUTOR_OPTIONS='{"seeed": 3}')
    d = start_daemon(tmp_path, env)
    assert d.proc.wait(120) == 78, d.output()
    assert "unknown option(s) 'seeed' for executor 'aer'" in d.output()


@pytest.mark.parametrize(("executor", "options", "named"), [
    ("aer", {"precision": "triple"}, "option 'precision' of executor 'aer'"),
    ("aer", {"method": "bogus"}, "option 'method' of executor 'aer'"),
    ("aer", {"max_qubits": "x"}, "option 'max_qubits' of executor 'aer'"),
    ("aer", {"noise_calibration": "/nonexistent/cal.json"},
     "option 'noise_calibration' of executor 'aer'"),
    ("qibolab", {"platform": "dummy", "optimization_level": 7},
     "option 'optimization_level' of executor 'qibolab'"),
])
def test_a_bad_executor_option_value_is_a_config_error_naming_it(
    tmp_path: Path, executor: str, options: dict[str, object], named: str
) -> None:
    """Exit 78 (EX_CONFIG), which the systemd units do not restart, never a bare 1."""
    env = daemon_env(tmp_path, None, QPI_EXECUTOR=executor,
                     QPI_EXECUTOR_OPTIONS=json.dumps(options))
    d = start_daemon(tmp_path, env)
    assert d.proc.wait(120) == 78, d.output()
    assert named in d.output()


def slow_text(i: int) -> str:
    """A distinct text with a custom gate definition: the full importer's slow path."""
    qc = QuantumCircuit(8)
    qc.append(QFTGate(8), range(8))
    qc.rz(0.001 * (i + 1), 0)
    qc.measure_all()
    return qasm3.dumps(qc)


async def test_a_parser_killed_mid_parse_costs_that_job_only(
    tmp_path: Path, orch: LocalOrchestrator
) -> None:
    d = await start_connected(tmp_path, orch, daemon_env(tmp_path, orch))
    try:
        pid = int(re.findall(r'"pid": (\d+), "event": "circuit parser started"', d.output())[0])
        parser = psutil.Process(pid)
        idle = parser.cpu_times().user
        victim = orch.submit({"circuits": [slow_text(i) for i in range(200)], "shots": 8})
        behind = orch.submit({"circuits": [BELL], "shots": 8})
        # Mid-parse, as the parser itself shows: it has spent CPU on the victim (whose
        # 200 circuits take seconds), and the victim has no answer yet.
        await wait_for(lambda: parser.cpu_times().user - idle >= 0.3, timeout=60,
                       what="the parser to be busy with the victim")
        assert victim.results is None, "parsed before it could be killed mid-parse"
        os.kill(pid, signal.SIGKILL)
        done = await orch.result(victim.id, timeout=120)
        assert done.results is not None and done.results["error_code"] == "CIRCUIT_INVALID"
        assert "circuit parser failed on this job" in str(done.results["error"])
        after = await orch.result(behind.id, timeout=120)
        assert after.results is not None and after.results["success"] is True
        await wait_for(lambda: "circuit parser restarted" in d.output(), what="the restart")
    finally:
        assert d.stop() == 0, d.output()


async def test_a_wrong_ca_fingerprint_is_reported_while_the_executor_warms(
    tmp_path: Path, orch: LocalOrchestrator
) -> None:
    from frontends.qpi.tls import generate_identity

    other = generate_identity("127.0.0.1").ca_fingerprint
    d = start_daemon(tmp_path, daemon_env(tmp_path, orch, QPI_CA_FINGERPRINT=other))
    code = await asyncio.to_thread(d.proc.wait, 60)
    assert code == 77, d.output()
    assert "root CA fingerprint mismatch" in d.output()
    assert "executor ready" not in d.output()  # it did not wait for the executor
    assert orch.connects == 0


async def test_a_failing_background_part_is_logged_restarted_then_stops_the_daemon() -> None:
    from structlog.testing import capture_logs

    from driver.service import TASK_RESTARTS_PER_MINUTE, supervised

    runs: list[int] = []
    stopped: list[bool] = []

    async def flaky() -> None:
        runs.append(1)
        if len(runs) == 1:
            raise RuntimeError("store gone")  # fails once, then runs to its end
        await asyncio.sleep(0)

    async def broken() -> None:
        raise RuntimeError("always")

    with capture_logs() as flaky_logs:
        await supervised("flaky", flaky, lambda: stopped.append(True), pause_s=0)
    assert len(runs) == 2 and not stopped
    assert [e["event"] for e in flaky_logs] == ["a part of the daemon failed; restarting it"]
    assert flaky_logs[0]["part"] == "flaky" and flaky_logs[0]["log_level"] == "error"

    with capture_logs() as broken_logs:
        await supervised("broken", broken, lambda: stopped.append(True), pause_s=0)
    assert stopped == [True]
    events = [e["event"] for e in broken_logs]
    assert events.count("a part of the daemon failed; restarting it") == TASK_RESTARTS_PER_MINUTE
    assert events[-1] == "a part of the daemon keeps failing; stopping"
    assert broken_logs[-1]["log_level"] == "critical"
