"""The real daemon against the embedded orchestrator over TLS NNG, in both codecs."""

from __future__ import annotations

import math
from collections import Counter

from frontends.qpi.orchestrator import LocalOrchestrator
from tests.circuits import BELL, REGISTERS, SWEEP_QASM3
from tests.conftest import Daemon, run_job

GHZ_QASM3 = """OPENQASM 3.0;
include "stdgates.inc";
qubit[4] q;
bit[4] c;
h q[0];
cx q[0], q[1];
cx q[1], q[2];
cx q[2], q[3];
c = measure q;
"""


def assert_binomial(count: int, shots: int, p: float, sigmas: float = 5.0) -> None:
    """`count` successes of `shots` is consistent with probability `p`."""
    sd = math.sqrt(shots * p * (1 - p)) or 1e-9
    assert abs(count - shots * p) <= sigmas * sd + 1e-9, (count, shots, p)


async def test_bell_counts_match_exact_probabilities(
    orchestrator: LocalOrchestrator, daemon: Daemon
) -> None:
    shots = 4000
    res = await run_job(orchestrator, {"circuits": [BELL], "shots": shots})
    assert res["success"] is True and res["backend"] == "aer"
    counts = res["counts"]
    assert set(counts) <= {"00", "11"}
    assert sum(counts.values()) == shots == res["shots"]
    assert_binomial(counts.get("00", 0), shots, 0.5)
    header = res["circuit_results"][0]["header"]
    assert header["memory_slots"] == 2 and header["creg_sizes"] == [["c", 2]]


async def test_ghz_openqasm3(orchestrator: LocalOrchestrator, daemon: Daemon) -> None:
    res = await run_job(orchestrator, {"circuits": [{"circuit": GHZ_QASM3, "shots": 2000}]})
    counts = res["circuit_results"][0]["counts"]
    assert set(counts) <= {"0000", "1111"}
    assert_binomial(counts.get("1111", 0), 2000, 0.5)


async def test_parameter_sweep_each_row_is_an_experiment(
    orchestrator: LocalOrchestrator, daemon: Daemon
) -> None:
    thetas = [0.0, math.pi / 3, math.pi / 2, math.pi]
    res = await run_job(orchestrator, {
        "circuits": [{"circuit": SWEEP_QASM3, "parameter_values": [[t] for t in thetas]}],
        "shots": 3000,
    })
    experiments = res["circuit_results"]
    assert len(experiments) == len(thetas)
    for theta, exp in zip(thetas, experiments, strict=True):
        assert_binomial(exp["counts"].get("1", 0), 3000, math.sin(theta / 2) ** 2)


async def test_two_circuits_with_their_own_shots_and_memory(
    orchestrator: LocalOrchestrator, daemon: Daemon
) -> None:
    res = await run_job(orchestrator, {
        "circuits": [
            {"circuit": BELL, "shots": 100},
            {"circuit": GHZ_QASM3, "shots": 333, "memory": True},
        ],
        "shots": 10,
    })
    first, second = res["circuit_results"]
    assert first["shots"] == 100 and sum(first["counts"].values()) == 100
    assert "memory" not in first
    assert second["shots"] == 333 and sum(second["counts"].values()) == 333
    assert len(second["memory"]) == 333
    assert Counter(second["memory"]) == Counter(second["counts"])
    assert all(len(bits) == 4 for bits in second["memory"])


async def test_register_bit_order_is_qiskits(
    orchestrator: LocalOrchestrator, daemon: Daemon
) -> None:
    res = await run_job(orchestrator, {"circuits": [REGISTERS], "shots": 10, "memory": True})
    # Highest clbit left: b[1]=1 b[0]=0 a[0]=1.
    assert res["counts"] == {"101": 10}
    assert res["circuit_results"][0]["header"]["creg_sizes"] == [["a", 1], ["b", 2]]


async def test_invalid_circuit_names_index_line_and_column_then_serves_next(
    orchestrator: LocalOrchestrator, daemon: Daemon
) -> None:
    bad = BELL.replace("cx q[0],q[1];", "cx q[0],q[1]\nh q[1];")
    res = await run_job(orchestrator, {"circuits": [BELL, bad]})
    assert res["error_code"] == "CIRCUIT_INVALID"
    assert res["circuit_index"] == 1 and res["line"] == 7 and res["column"] >= 1
    assert "circuit 1" in res["error"] and "line 7" in res["error"]
    ok = await run_job(orchestrator, {"circuits": [BELL], "shots": 50})
    assert ok["success"] is True


async def test_bad_jobs_are_answered_with_errors(
    orchestrator: LocalOrchestrator, daemon: Daemon
) -> None:
    missing = await run_job(orchestrator, {"shots": 5})
    assert missing["error_code"] == "CIRCUIT_INVALID" and "circuits" in missing["error"]
    unbound = await run_job(orchestrator, {"circuits": [SWEEP_QASM3]})
    assert unbound["error_code"] == "CIRCUIT_INVALID" and "theta" in unbound["error"]
    too_big = await run_job(orchestrator, {"circuits": [
        "OPENQASM 2.0;\ninclude \"qelib1.inc\";\nqreg q[40];\ncreg c[40];\nmeasure q -> c;\n"]})
    assert too_big["error_code"] == "QUOTA_EXCEEDED"
    assert too_big["requested_qubits"] == 40 and too_big["max_qubits"] < 40
    legacy = await run_job(orchestrator, {"qasm": BELL, "shots": 20})
    assert sum(legacy["counts"].values()) == 20


async def test_malformed_frames_and_unknown_events_are_not_fatal(
    orchestrator: LocalOrchestrator, daemon: Daemon
) -> None:
    await orchestrator.send_raw(b"\x00garbage")
    await orchestrator.send_raw(b"{not json")
    await orchestrator.send_event("SomethingNew", {"x": 1})
    await orchestrator.send_event("JobDispatch", {"payload": {"circuits": [BELL]}})
    res = await run_job(orchestrator, {"circuits": [BELL], "shots": 10})
    assert res["success"] is True
    assert daemon.proc.poll() is None
