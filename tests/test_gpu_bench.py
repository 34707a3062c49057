"""The gpu bench's bound is a lower bound of exactly what it times: no upload inside the
timed region, one reset write counted, controlled passes counted at their 2^-c share."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from qiskit import QuantumCircuit

from bench import gpu as bench
from executors.gpu.executor import GpuExecutor


def controlled_circuit() -> QuantumCircuit:
    qc = QuantumCircuit(3)
    qc.h(0)
    qc.ccx(0, 1, 2)  # 2 controls: touches a quarter of the state
    qc.cx(0, 1)  # 1 control: half
    return qc


def test_bound_counts_the_reset_and_the_controlled_share() -> None:
    ex = GpuExecutor({"backend": "numpy"})
    _, plan = bench.apply_only(ex, controlled_circuit(), 0)
    assert [len(b.controls) for b in plan.blocks] == [0, 2, 1]
    state = 1 << 20
    expected = state + 2 * state + 2 * state // 4 + 2 * state // 2
    assert bench.bound_bytes(plan, state) == expected
    assert expected < plan.passes * 2 * state + state  # the old formula overstated it


def test_timed_region_has_no_upload_and_one_reset(monkeypatch: pytest.MonkeyPatch) -> None:
    ex = GpuExecutor({"backend": "numpy"})
    backend: Any = ex._backend
    calls = {"upload": 0, "reset_state": 0}
    for name in calls:
        original = getattr(backend, name)

        def spy(*args: Any, _name: str = name, _original: Any = original) -> Any:
            calls[_name] += 1
            return _original(*args)

        monkeypatch.setattr(backend, name, spy)
    run, _ = bench.apply_only(ex, controlled_circuit(), 2)
    uploads = calls["upload"]
    run()
    run()
    assert calls["upload"] == uploads  # matrices went up once, before timing
    assert calls["reset_state"] == 2


def test_cpu_reference_run_writes_a_json_report(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = ["--cpu-reference", "--qubits", "5", "--circuits", "ghz", "--precision", "single"]
    argv += ["--fusion-sweep", "2,3", "--repeats", "1", "--json", str(out)]
    assert bench.main(argv) == 0
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert {(r["kind"], r["k"]) for r in rows} == {
        ("unfused", 0),
        ("fused", 2),
        ("fused", 3),
        ("job", 5),
    }
    assert all(r["bound_ms"] > 0 for r in rows if r["kind"] in ("fused", "unfused"))
    assert report["copy_bandwidth_bytes_per_s"] > 0 and report["skipped"] == []
