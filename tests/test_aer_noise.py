"""The aer executor's options, and Aer as a digital twin: the `noise_calibration` option
builds a noise model from a calibration file, and Bell counts get worse exactly where the
figures do."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from executors.aer import AerExecutor
from executors.base import Experiment, Job, OptionError
from executors.circuits import parse_qasm
from frontends.qpi.orchestrator import LocalOrchestrator
from tests.circuits import BELL
from tests.conftest import ROOT, daemon_env, heartbeats, run_job, start_connected, wait_for

SHOTS = 20_000

GOOD: dict[str, Any] = {"t1": 80_000.0, "t2": 60_000.0, "rb": 0.9995, "readout": 0.99, "cz": 0.995}


def qibocal_file(path: Path, *, t1: float, t2: float, rb: float, readout: float, cz: float,
                 qubits: int = 2, pairs: tuple[tuple[int, int], ...] = ((0, 1),)) -> Path:
    """A qibocal-format calibration.json (times in ns, readout fidelity 2F-1)."""
    path.write_text(json.dumps({
        "single_qubits": {str(q): {"t1": [t1, 10.0], "t2": [t2, 10.0],
                                   "readout": {"fidelity": readout}, "rb_fidelity": [rb, 1e-4]}
                          for q in range(qubits)},
        "two_qubits": {f"{a}-{b}": {"cz_fidelity": [cz, 1e-3]} for a, b in pairs},
    }))
    return path


def error_fraction(executor: AerExecutor, qasm: str = BELL,
                   right: tuple[str, ...] = ("00", "11")) -> float:
    """Share of shots outside the ideal outcomes (for a Bell pair: bits that disagree)."""
    job = Job("j", (Experiment(parse_qasm(qasm), SHOTS),))
    counts = executor.run(job).experiments[0].counts
    assert sum(counts.values()) == SHOTS
    return sum(n for bits, n in counts.items() if bits not in right) / SHOTS


def clearly_more(worse: float, better: float) -> bool:
    """`worse` exceeds `better` by more than 6 binomial standard deviations."""
    sd = math.sqrt((worse * (1 - worse) + better * (1 - better)) / SHOTS)
    return worse - better > 6 * sd


def test_a_misspelt_option_is_refused_not_ignored() -> None:
    with pytest.raises(OptionError, match=r"unknown option\(s\) 'seeed' for executor 'aer'; "
                       r"it knows: .*\bseed\b"):
        AerExecutor({"seeed": 1})
    # Every option the executor documents is one it declares.
    executor = AerExecutor({"method": "statevector", "seed": 1, "precision": "single",
                            "max_qubits": 5, "max_shots": 10, "max_parallel_threads": 1})
    assert executor.capabilities().max_qubits == 5
    assert executor.capabilities().precision == "single"


def test_the_calibration_format_needs_no_simulator() -> None:
    """The snapshot format is contract: reading it loads no Qiskit, Aer or NumPy."""
    probe = ("import sys, executors.calibration; print(sorted({m.split('.')[0] for m in "
             "sys.modules} & {'qiskit', 'qiskit_aer', 'numpy', 'qibolab'}))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_noise_follows_the_calibration(tmp_path: Path) -> None:
    ideal = error_fraction(AerExecutor({"seed": 1}))
    good = AerExecutor({"seed": 1, "noise_calibration":
                        str(qibocal_file(tmp_path / "good.json", **GOOD))})
    bad = AerExecutor({"seed": 1, "noise_calibration": str(qibocal_file(
        tmp_path / "bad.json", t1=8_000.0, t2=5_000.0, rb=0.99, readout=0.8, cz=0.85))})
    good_errors, bad_errors = error_fraction(good), error_fraction(bad)
    assert ideal == 0.0
    assert clearly_more(good_errors, 0.0)
    assert clearly_more(bad_errors, good_errors)
    # Readout alone flips a bit of a pair with probability ~2p: the model is not off by much.
    assert 0.015 < good_errors < 0.05 and 0.2 < bad_errors < 0.4


@pytest.mark.parametrize("worse", [
    {"readout": 0.8},
    {"cz": 0.85},
    {"t1": 2_000.0, "t2": 1_500.0},
    {"rb": 0.97},
])
def test_each_worse_figure_means_more_errors(tmp_path: Path, worse: dict[str, float]) -> None:
    base = AerExecutor({"seed": 2, "noise_calibration":
                        str(qibocal_file(tmp_path / "base.json", **GOOD))})
    figures: dict[str, Any] = {**GOOD, **worse}
    degraded = AerExecutor({"seed": 2, "noise_calibration":
                            str(qibocal_file(tmp_path / "worse.json", **figures))})
    assert clearly_more(error_fraction(degraded), error_fraction(base)), worse


def test_twin_routes_like_the_qpu(tmp_path: Path) -> None:
    """Three CX on three qubits fit a triangle; on a line 0-1-2 they need a SWAP, that
    is three more CZ, each with its error."""
    def twin(name: str, pairs: tuple[tuple[int, int], ...]) -> AerExecutor:
        cal = qibocal_file(tmp_path / f"{name}.json", t1=1e9, t2=1e9, rb=1.0, readout=1.0,
                           cz=0.95, qubits=3, pairs=pairs)
        return AerExecutor({"seed": 3, "noise_calibration": str(cal)})

    triangle = 'OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[3];\ncreg c[3];\nx q[0];\n' \
        "cx q[0],q[1];\ncx q[1],q[2];\ncx q[0],q[2];\nmeasure q -> c;\n"
    line = twin("line", ((0, 1), (1, 2)))
    full = twin("full", ((0, 1), (1, 2), (0, 2)))
    assert clearly_more(error_fraction(line, triangle, ("011",)),
                        error_fraction(full, triangle, ("011",)))
    assert line.capabilities().max_qubits == 3
    assert set(line.capabilities().basis_gates) >= {"rz", "sx", "x", "cz"}


def test_snapshot_shape_with_durations(tmp_path: Path) -> None:
    """The heartbeat shape: longer gates relax more at the same T1/T2."""
    def snapshot(ns: float) -> Path:
        path = tmp_path / f"snap-{ns}.json"
        qubit = {"t1_ns": 5_000.0, "t2_ns": 4_000.0,
                 "gate_durations_ns": {"sx": ns, "x": ns, "measure": 500.0}}
        path.write_text(json.dumps({
            "timestamp": "2026-11-21T10:00:00.000Z",
            "qubits": {"q0": {"index": 0, **qubit}, "q1": {"index": 1, **qubit}},
            "pairs": {"q0-q1": {"qubits": [0, 1], "gate": "cz", "duration_ns": 10 * ns}},
        }))
        return path

    short = AerExecutor({"seed": 4, "noise_calibration": str(snapshot(20.0))})
    long = AerExecutor({"seed": 4, "noise_calibration": str(snapshot(400.0))})
    assert clearly_more(error_fraction(long), error_fraction(short))
    cal = short.calibration()
    assert cal is not None and cal["timestamp"] == "2026-11-21T10:00:00.000Z"
    assert cal["qubits"]["q1"]["t1_ns"] == 5_000.0 and cal["pairs"]["q0-q1"]["gate"] == "cz"
    # Every duration was given: none is reported as assumed.
    assert cal["qubits"]["q1"]["assumed_durations"] == []
    assert cal["pairs"]["q0-q1"]["duration_assumed"] is False


def test_durations_a_calibration_lacks_are_reported_as_assumed(tmp_path: Path) -> None:
    """A qibocal file has no pulse durations: the twin's defaults are said to be such."""
    cal = AerExecutor({"noise_calibration": str(qibocal_file(
        tmp_path / "cal.json", t1=8_000.0, t2=5_000.0, rb=0.99, readout=0.8, cz=0.85))}
    ).calibration()
    assert cal is not None
    for qubit in cal["qubits"].values():
        assert qubit["assumed_durations"] == ["measure", "sx", "x"]
    assert all(pair["duration_assumed"] is True for pair in cal["pairs"].values())
    # A snapshot that says so keeps them assumed when read back (a twin of a twin).
    (tmp_path / "again.json").write_text(json.dumps(cal))
    again = AerExecutor({"noise_calibration": str(tmp_path / "again.json")}).calibration()
    assert again is not None
    assert [q["assumed_durations"] for q in again["qubits"].values()] == [
        q["assumed_durations"] for q in cal["qubits"].values()]
    assert all(pair["duration_assumed"] is True for pair in again["pairs"].values())


def test_calibration_reloads_when_the_file_changes(tmp_path: Path) -> None:
    path = qibocal_file(tmp_path / "cal.json", **GOOD)
    twin = AerExecutor({"seed": 5, "noise_calibration": str(path)})

    def calibration() -> dict[str, Any]:
        cal = twin.calibration()
        assert cal is not None
        return cal

    before = error_fraction(twin)
    assert calibration()["qubits"]["0"]["assignment_fidelity"] == pytest.approx(0.995)
    qibocal_file(path, **{**GOOD, "readout": 0.6})
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert calibration()["qubits"]["0"]["assignment_fidelity"] == pytest.approx(0.8)
    assert clearly_more(error_fraction(twin), before)
    path.write_text("{ not json")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 2 * 10**9))
    kept = calibration()
    assert kept["qubits"]["0"]["assignment_fidelity"] == pytest.approx(0.8)
    assert "not valid JSON" in kept["errors"][0]


def test_unreadable_calibration_is_refused_at_start(tmp_path: Path) -> None:
    (tmp_path / "empty.json").write_text("[]")
    # An option the executor cannot use: exit 78 through the daemon (test_admission).
    with pytest.raises(OptionError, match=r"'noise_calibration'.*empty\.json"):
        AerExecutor({"noise_calibration": str(tmp_path / "empty.json")})
    with pytest.raises(OptionError, match=r"'noise_calibration'.*cannot read"):
        AerExecutor({"noise_calibration": str(tmp_path / "missing.json")})


async def test_twin_through_the_daemon(tmp_path: Path) -> None:
    cal = qibocal_file(tmp_path / "cal.json", t1=8_000.0, t2=5_000.0, rb=0.99, readout=0.8,
                       cz=0.85)
    orch = LocalOrchestrator(port=0, heartbeat_interval_s=0.5)
    await orch.start()
    env = daemon_env(tmp_path, orch, QPI_EXECUTOR="aer",
                     QPI_EXECUTOR_OPTIONS=json.dumps({"noise_calibration": str(cal), "seed": 6}))
    d = await start_connected(tmp_path, orch, env)
    try:
        res = await run_job(orch, {"circuits": [BELL], "shots": 4000})
        assert res["success"] is True, res
        wrong = res["counts"].get("01", 0) + res["counts"].get("10", 0)
        assert 0.2 * 4000 < wrong < 0.4 * 4000
        await wait_for(lambda: bool(heartbeats(orch)), what="a heartbeat")
        beat = heartbeats(orch)[-1]
        assert beat["capabilities"]["max_qubits"] == 2
        assert beat["calibration"]["qubits"]["1"]["t1_ns"] == 8_000.0
        assert beat["calibration"]["timestamp"]
    finally:
        assert d.stop() == 0, d.output()
        await orch.stop()
