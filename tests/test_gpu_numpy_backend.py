"""CPU tests of the gpu executor: the lowering/fusion/measurement pipeline on the NumPy
backend against qiskit.quantum_info.Statevector and qiskit-aer, and the executor contract
(the cuStateVec backend's own tests are in test_gpu_custatevec.py)."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qiskit import QuantumCircuit
from qiskit.circuit import ClassicalRegister, QuantumRegister
from qiskit.circuit.classical import expr
from qiskit.circuit.library import DiagonalGate, UnitaryGate
from qiskit.quantum_info import Statevector, random_unitary
from qiskit_aer import AerSimulator
from scipy import stats

import executors
from executors import ExecutorUnavailable
from executors.base import ErrorCode, Experiment, Job, JobError, OptionError
from executors.gpu import runner
from executors.gpu.executor import GpuExecutor
from executors.gpu.numpy_backend import apply_dense, apply_diagonal
from tests.circuits import teleport

REPO = Path(__file__).resolve().parents[1]

# --- random circuits --------------------------------------------------------------------

ONE_QUBIT = ["h", "x", "y", "z", "s", "sdg", "t", "tdg", "sx", "rx", "ry", "rz", "p", "u"]
TWO_QUBIT = ["cx", "cy", "cz", "ch", "swap", "crx", "cry", "crz", "cp", "cu", "rzz", "rxx"]
TWO_QUBIT += ["ryy", "iswap", "ecr", "csx"]
THREE_QUBIT = ["ccx", "cswap", "ccz"]
WIDE = ["mcx", "mcp", "unitary", "cunitary", "diagonal", "open_cx"]


def add_gate(
    qc: QuantumCircuit, name: str, qubits: list[int], angles: list[float], seed: int
) -> None:
    a, b, c = angles
    if name in ("rx", "ry", "rz", "p"):
        getattr(qc, name)(a, qubits[0])
    elif name == "u":
        qc.u(a, b, c, qubits[0])
    elif name in ("crx", "cry", "crz", "cp", "rzz", "rxx", "ryy"):
        getattr(qc, name)(a, qubits[0], qubits[1])
    elif name == "cu":
        qc.cu(a, b, c, angles[0] / 2, qubits[0], qubits[1])
    elif name == "mcx":
        qc.mcx(qubits[:-1], qubits[-1])
    elif name == "mcp":
        qc.mcp(a, qubits[:-1], qubits[-1])
    elif name == "unitary":
        qc.append(UnitaryGate(random_unitary(1 << len(qubits), seed=seed)), qubits)
    elif name == "cunitary":
        base = UnitaryGate(random_unitary(2, seed=seed))
        n_ctrl = len(qubits) - 1
        qc.append(base.control(n_ctrl, ctrl_state=seed % (1 << n_ctrl)), qubits)
    elif name == "diagonal":
        phases = np.exp(1j * np.random.default_rng(seed).uniform(0, 2 * np.pi, 1 << len(qubits)))
        qc.append(DiagonalGate(list(phases)), qubits)
    elif name == "open_cx":
        qc.cx(qubits[0], qubits[1], ctrl_state=0)
    else:
        getattr(qc, name)(*qubits)


def width_of(name: str, n: int, draw: Callable[[Any], Any]) -> int:
    if name in ONE_QUBIT:
        return 1
    if name in TWO_QUBIT or name == "open_cx":
        return 2
    if name in THREE_QUBIT:
        return 3
    return int(draw(st.integers(min_value=2 if name != "unitary" else 1, max_value=min(n, 4))))


@st.composite
def random_circuits(
    draw: Callable[[Any], Any], max_qubits: int = 8, max_gates: int = 30
) -> QuantumCircuit:
    n = draw(st.integers(min_value=1, max_value=max_qubits))
    qc = QuantumCircuit(n)
    qc.global_phase = draw(st.floats(min_value=0, max_value=6.0))
    names = ONE_QUBIT + [g for g in TWO_QUBIT + THREE_QUBIT + WIDE if n >= 2]
    names = [g for g in names if g not in THREE_QUBIT or n >= 3]
    for _ in range(draw(st.integers(min_value=0, max_value=max_gates))):
        name = draw(st.sampled_from(names))
        k = width_of(name, n, draw)
        qubits = draw(st.permutations(range(n)))[:k]
        angles = [draw(st.floats(min_value=-7, max_value=7)) for _ in range(3)]
        add_gate(qc, name, list(qubits), angles, draw(st.integers(0, 10_000)))
    return qc


def fidelity(a: np.ndarray, b: np.ndarray) -> float:
    return float(abs(np.vdot(a, b)) ** 2 / (np.vdot(a, a).real * np.vdot(b, b).real))


EXECUTORS = {
    k: GpuExecutor({"backend": "numpy", "fusion_max_qubits": k, "seed": 1}) for k in (0, 2, 4, 5)
}


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(random_circuits())
def test_random_circuits_match_statevector_with_and_without_fusion(qc: QuantumCircuit) -> None:
    expected = Statevector(qc).data
    unfused = EXECUTORS[0].statevector(qc)
    assert fidelity(unfused, expected) >= 1 - 1e-10
    # Global phase included: the lowered program is the same operator, not just the same ray.
    assert np.allclose(unfused, expected, atol=1e-9)
    for k in (2, 4, 5):
        fused = EXECUTORS[k].statevector(qc)
        assert fidelity(fused, expected) >= 1 - 1e-10
        assert np.allclose(fused, unfused, atol=1e-9)


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(random_circuits(max_qubits=7, max_gates=20))
def test_single_precision_is_close(qc: QuantumCircuit) -> None:
    single = GpuExecutor({"backend": "numpy", "precision": "single"})
    state = single.statevector(qc)
    assert fidelity(state, Statevector(qc).data) >= 1 - 1e-5


# --- kernels --------------------------------------------------------------------------


def test_kernels_match_explicit_embedding() -> None:
    rng = np.random.default_rng(7)
    n = 5
    psi = rng.normal(size=1 << n) + 1j * rng.normal(size=1 << n)
    psi /= np.linalg.norm(psi)
    u = random_unitary(4, seed=11).data
    qc = QuantumCircuit(n)
    qc.append(UnitaryGate(u).control(2, ctrl_state=0b01), [3, 0, 4, 1])  # controls 3 (=1), 0 (=0)
    expected = Statevector(psi).evolve(qc).data
    out = apply_dense(psi.reshape((2,) * n).copy(), n, u, [4, 1], [3, 0], [1, 0]).reshape(-1)
    assert np.allclose(out, expected)
    d = np.exp(1j * rng.uniform(size=4))
    qd = QuantumCircuit(n)
    qd.append(UnitaryGate(np.diag(d)).control(1, ctrl_state=0), [2, 0, 3])
    tensor = psi.reshape((2,) * n).copy()
    apply_diagonal(tensor, n, d, [0, 3], [2], [0])
    assert np.allclose(tensor.reshape(-1), Statevector(psi).evolve(qd).data)


# --- bit order, counts, memory ------------------------------------------------------------


def aer_counts(qc: QuantumCircuit, shots: int, seed: int, memory: bool = False) -> Any:
    result = AerSimulator(seed_simulator=seed).run(qc, shots=shots, memory=memory).result()
    counts = {k.replace(" ", ""): v for k, v in result.get_counts().items()}
    if memory:
        return counts, [m.replace(" ", "") for m in result.get_memory()]
    return counts


def run_one(ex: GpuExecutor, qc: QuantumCircuit, shots: int, memory: bool = False) -> Any:
    result = ex.run(Job("job", (Experiment(qc, shots, memory=memory),)))
    return result.experiments[0]


def test_bit_order_of_counts_and_memory_matches_aer() -> None:
    q = QuantumRegister(5, "q")
    a = ClassicalRegister(3, "a")
    b = ClassicalRegister(4, "b")
    qc = QuantumCircuit(q, a, b)
    qc.x([0, 2, 3])
    qc.measure(0, 6)  # b[3]
    qc.measure(1, 0)
    qc.measure(2, 1)
    qc.measure(3, 4)  # b[1]
    qc.measure(4, 5)
    ex = GpuExecutor({"backend": "numpy", "seed": 3})
    res = run_one(ex, qc, 17, memory=True)
    expected_counts, expected_memory = aer_counts(qc, 17, 1, memory=True)
    assert res.counts == expected_counts == {"1010010": 17}
    assert res.memory == expected_memory
    assert res.header["memory_slots"] == 7
    assert res.header["creg_sizes"] == [["a", 3], ["b", 4]]


def test_unmeasured_clbits_and_overwrites_match_aer() -> None:
    qc = QuantumCircuit(3, 4)
    qc.x(1)
    qc.h(2)
    qc.measure(1, 3)
    qc.measure(2, 0)
    qc.measure(1, 0)  # overwrites clbit 0 with qubit 1 (always 1)
    ex = GpuExecutor({"backend": "numpy", "seed": 3})
    res = run_one(ex, qc, 50)
    assert res.counts == aer_counts(qc, 50, 2) == {"1001": 50}


def test_counts_and_memory_agree_and_are_seeded() -> None:
    qc = QuantumCircuit(4, 4)
    qc.h(range(4))
    qc.cx(0, 3)
    qc.measure(range(4), range(4))
    first = run_one(GpuExecutor({"backend": "numpy", "seed": 11}), qc, 3000, memory=True)
    again = run_one(GpuExecutor({"backend": "numpy", "seed": 11}), qc, 3000, memory=True)
    assert first.counts == again.counts and first.memory == again.memory
    assert first.memory is not None and len(first.memory) == 3000
    assert Counter(first.memory) == Counter(first.counts)
    assert all(len(k) == 4 for k in first.counts)
    # h on q3 then cx(0, 3) keeps q3 uniform and independent, so all 16 outcomes appear.
    assert len(first.counts) == 16
    # memory is not grouped: the first 100 shots show several distinct outcomes
    assert len(set(first.memory[:100])) > 4


def chi_square_vs_exact(counts: dict[str, int], probs: dict[str, float], shots: int) -> float:
    """p-value of a chi-square goodness-of-fit test, pooling outcomes expected < 5 times."""
    observed: list[float] = []
    expected: list[float] = []
    pooled_obs, pooled_exp = 0.0, 0.0
    for key in set(probs) | set(counts):
        e = probs.get(key, 0.0) * shots
        o = counts.get(key, 0)
        if e < 5:
            pooled_obs += o
            pooled_exp += e
        else:
            observed.append(o)
            expected.append(e)
    if pooled_exp > 0:
        observed.append(pooled_obs)
        expected.append(pooled_exp)
    elif pooled_obs:
        return 0.0
    if len(observed) < 2:
        return 1.0
    return float(stats.chisquare(observed, expected).pvalue)


def total_variation(a: dict[str, int], b: dict[str, float]) -> float:
    na = sum(a.values())
    nb = sum(b.values())
    return 0.5 * sum(abs(a.get(k, 0) / na - b.get(k, 0) / nb) for k in set(a) | set(b))


def exact_probabilities(qc: QuantumCircuit) -> dict[str, float]:
    """Exact outcome distribution of a circuit whose clbits are all set by final
    measurements, keyed like counts (clbit 0 rightmost)."""
    source: dict[int, int] = {}
    for inst in qc.data:
        if inst.operation.name == "measure":
            source[qc.find_bit(inst.clbits[0]).index] = qc.find_bit(inst.qubits[0]).index
    assert sorted(source) == list(range(qc.num_clbits))
    bare = qc.remove_final_measurements(inplace=False)
    probs = Statevector(bare).probabilities_dict(qargs=[source[c] for c in range(qc.num_clbits)])
    return {k: v for k, v in probs.items() if v > 1e-15}


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_terminal_sampling_matches_exact_probabilities(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 5
    qc = QuantumCircuit(n, n)
    for _ in range(12):
        a, b = (int(x) for x in rng.choice(n, 2, replace=False))
        qc.u(*rng.uniform(0, 3, 3), a)
        qc.cx(a, b)
    qc.measure(range(n), range(n))
    probs = exact_probabilities(qc)
    shots = 20_000
    res = run_one(GpuExecutor({"backend": "numpy", "seed": seed}), qc, shots)
    assert sum(res.counts.values()) == shots
    assert set(res.counts) <= set(probs)
    assert chi_square_vs_exact(res.counts, probs, shots) > 1e-6
    assert total_variation(res.counts, probs) < 0.03


def test_sampler_path_matches_exact_probabilities(monkeypatch: pytest.MonkeyPatch) -> None:
    # Force the one-pass sampler (used for wide measurements) instead of the marginal.
    monkeypatch.setattr(runner, "MAX_MARGINAL_QUBITS", 0)
    qc = QuantumCircuit(4, 3)
    qc.h(0)
    qc.ry(0.7, 1)
    qc.cx(0, 2)
    qc.cry(1.1, 1, 3)
    qc.measure([3, 0, 1], [0, 1, 2])
    shots = 20_000
    res = run_one(GpuExecutor({"backend": "numpy", "seed": 5}), qc, shots, memory=True)
    probs = exact_probabilities(qc)
    assert Counter(res.memory) == Counter(res.counts)
    assert chi_square_vs_exact(res.counts, probs, shots) > 1e-6
    assert total_variation(res.counts, probs) < 0.03


# --- mid-circuit measurement, reset, classical control ----------------------------------------


def dynamic_suite() -> list[QuantumCircuit]:
    circuits = [teleport(1.1)]
    qc = QuantumCircuit(3, 3)
    qc.h(0)
    qc.cx(0, 1)
    qc.reset(0)
    qc.h(0)
    qc.measure(0, 0)
    qc.cry(0.9, 1, 2)
    qc.measure([1, 2], [1, 2])
    circuits.append(qc)
    qr = QuantumRegister(3)
    cr = ClassicalRegister(2, "m")
    qc = QuantumCircuit(qr, cr, ClassicalRegister(1, "out"))
    qc.h([0, 1])
    qc.measure([0, 1], [0, 1])
    with qc.switch(cr) as case:
        with case(0):
            qc.ry(0.4, 2)
        with case(1, 2):
            qc.ry(1.3, 2)
        with case(case.DEFAULT):
            qc.x(2)
    qc.measure(2, 2)
    circuits.append(qc)
    qc = QuantumCircuit(2, 2)
    qc.ry(1.0, 0)
    qc.measure(0, 0)
    with qc.if_test(expr.logic_not(qc.clbits[0])) as else_:
        qc.h(1)
    with else_:
        qc.ry(0.3, 1)
    qc.measure(1, 1)
    qc.ry(0.5, 0)  # the first qubit is reused after its measurement
    qc.measure(0, 0)
    circuits.append(qc)
    for seed in range(4):
        circuits.append(random_dynamic(seed))
    return circuits


def random_dynamic(seed: int) -> QuantumCircuit:
    rng = np.random.default_rng(100 + seed)
    n = 4
    qc = QuantumCircuit(QuantumRegister(n, "q"), ClassicalRegister(n, "c"))
    cr = qc.cregs[0]
    for _ in range(6):
        kind = rng.integers(0, 5)
        a, b = (int(x) for x in rng.choice(n, 2, replace=False))
        if kind == 0:
            qc.measure(a, int(rng.integers(n)))
        elif kind == 1:
            qc.reset(a)
        elif kind == 2:
            with qc.if_test((cr[int(rng.integers(n))], int(rng.integers(2)))):
                qc.ry(float(rng.uniform(0, 3)), a)
                qc.cx(a, b)
        else:
            qc.u(*rng.uniform(0, 3, 3), a)
            qc.cx(a, b)
    qc.measure(range(n), range(n))
    return qc


def homogeneity_pvalue(a: dict[str, int], b: dict[str, int]) -> float:
    keys = sorted(set(a) | set(b))
    table = np.array([[a.get(k, 0) for k in keys], [b.get(k, 0) for k in keys]])
    if table.shape[1] < 2:
        return 1.0
    return float(stats.chi2_contingency(table).pvalue)


@pytest.mark.parametrize("index", range(8))
def test_dynamic_circuits_match_aer_in_distribution(index: int) -> None:
    qc = dynamic_suite()[index]
    shots = 8000
    ours = run_one(GpuExecutor({"backend": "numpy", "seed": 40 + index}), qc, shots).counts
    theirs = aer_counts(qc, shots, 40 + index)
    assert sum(ours.values()) == shots
    # Deterministic seeds: these either always pass or always fail. A wrong branch,
    # collapse or bit order moves whole outcomes and fails by a wide margin.
    assert homogeneity_pvalue(ours, theirs) > 1e-6
    assert total_variation(ours, {k: float(v) for k, v in theirs.items()}) < 0.05


def test_teleportation_transfers_the_state() -> None:
    theta = 1.1
    shots = 20_000
    res = run_one(GpuExecutor({"backend": "numpy", "seed": 9}), teleport(theta), shots, True)
    p_one = sum(v for k, v in res.counts.items() if k[0] == "1") / shots
    assert abs(p_one - np.sin(theta / 2) ** 2) < 0.015
    # the two mid-circuit outcomes are uniform and independent of the teleported bit
    for m in ("00", "01", "10", "11"):
        frac = sum(v for k, v in res.counts.items() if k[1:] == m) / shots
        assert abs(frac - 0.25) < 0.015
    assert res.memory is not None and Counter(res.memory) == Counter(res.counts)


def test_reset_and_feedback_are_exact() -> None:
    qc = QuantumCircuit(3, 3)
    qc.h(0)
    qc.cx(0, 1)
    qc.reset(0)  # q0 always |0>, q1 still random
    qc.measure(0, 0)
    qc.measure(1, 1)
    with qc.if_test((qc.clbits[1], 1)):
        qc.x(1)  # q1 flipped back to |0> whenever it read 1
    qc.measure(1, 2)
    res = run_one(GpuExecutor({"backend": "numpy", "seed": 4}), qc, 4000).counts
    assert set(res) == {"000", "010"}
    assert abs(res["010"] / 4000 - 0.5) < 0.05


def test_while_loop_repeat_until_success() -> None:
    qc = QuantumCircuit(1, 1)
    qc.h(0)
    qc.measure(0, 0)
    with qc.while_loop((qc.clbits[0], 0)):
        qc.reset(0)
        qc.h(0)
        qc.measure(0, 0)
    res = run_one(GpuExecutor({"backend": "numpy", "seed": 4}), qc, 500).counts
    assert res == {"1": 500}


def test_replay_without_saved_states_gives_the_same_distribution() -> None:
    qc = teleport(0.8)
    shots = 8000
    saving = GpuExecutor({"backend": "numpy", "seed": 21})
    replaying = GpuExecutor({"backend": "numpy", "seed": 22, "max_saved_states": 0})
    a = run_one(saving, qc, shots).counts
    b = run_one(replaying, qc, shots).counts
    assert saving.stats["replays"] == 0
    assert replaying.stats["replays"] > 0
    assert homogeneity_pvalue(a, b) > 1e-6


# --- executor contract ---------------------------------------------------------------------


def test_registry_and_capabilities() -> None:
    assert executors.load("gpu") is GpuExecutor
    ex = GpuExecutor({"backend": "numpy", "precision": "single", "fusion_max_qubits": 4})
    caps = ex.capabilities()
    assert caps.precision == "single"
    assert caps.device.startswith("cpu")
    assert caps.memory_bytes and caps.memory_bytes > 0
    assert 20 <= caps.max_qubits <= 62
    assert (1 << caps.max_qubits) * 8 * 3 <= caps.memory_bytes
    assert caps.extra["fusion_max_qubits"] == 4
    assert {"cx", "measure", "reset", "if_else", "unitary"} <= set(caps.basis_gates)


def test_too_many_qubits_is_refused_before_allocation() -> None:
    ex = GpuExecutor({"backend": "numpy"})
    qc = QuantumCircuit(48, 1)
    qc.h(0)
    qc.measure(0, 0)
    with pytest.raises(JobError) as err:
        ex.run(Job("big", (Experiment(qc, 10),)))
    assert err.value.code == ErrorCode.QUOTA_EXCEEDED
    details = err.value.to_result()
    assert details["required_bytes"] > details["available_bytes"]
    assert details["num_qubits"] == 48 and details["max_qubits"] < 48
    assert "GiB" in err.value.message


def test_shots_and_options_are_validated() -> None:
    ex = GpuExecutor({"backend": "numpy", "max_shots": 100})
    qc = QuantumCircuit(1, 1)
    qc.measure(0, 0)
    with pytest.raises(JobError) as err:
        ex.run(Job("j", (Experiment(qc, 101),)))
    assert err.value.code == ErrorCode.QUOTA_EXCEEDED
    with pytest.raises(JobError) as err:
        ex.run(Job("j", (Experiment(qc, 0),)))
    assert err.value.code == ErrorCode.CIRCUIT_INVALID
    # Values are the executor's to check; names the base class's (same for every executor).
    for bad in (
        {"precision": "half"},
        {"backend": "opencl"},
        {"fusion_max_qubits": 11},
        {"fusion_max_qubits": -1},
        {"max_shots": True},
        {"seed": "1"},
    ):
        with pytest.raises(OptionError) as opt:
            GpuExecutor({"backend": "numpy", **bad})
        name = next(iter(bad))
        assert repr(name) in str(opt.value), bad
    with pytest.raises(OptionError) as opt:
        GpuExecutor({"backend": "numpy", "fusion": 3})
    assert "unknown option" in str(opt.value) and "fusion_max_qubits" in str(opt.value)


def test_capabilities_declare_counts_only() -> None:
    assert GpuExecutor({"backend": "numpy"}).capabilities().meas_levels == (2,)


@pytest.mark.parametrize(
    "source", ["", "OPENQASM 3.0; this is not a program", "qreg q[1]; h q[9];"]
)
def test_runs_the_parsed_circuit_and_never_reads_its_text(source: str) -> None:
    # The daemon parses once; the executor must use Experiment.circuit, whatever the text.
    qc = QuantumCircuit(2, 2)
    qc.x(0)
    qc.cx(0, 1)
    qc.measure([0, 1], [0, 1])
    ex = GpuExecutor({"backend": "numpy", "seed": 3})
    result = ex.run(Job("j", (Experiment(qc, 50, source=source),)))
    assert result.experiments[0].counts == {"11": 50}


def test_parameter_sweep_job_reuses_plan() -> None:
    from qiskit.circuit import Parameter

    theta = Parameter("theta")
    qc = QuantumCircuit(2, 2)
    qc.ry(theta, 0)
    qc.cx(0, 1)
    qc.measure([0, 1], [0, 1])
    ex = GpuExecutor({"backend": "numpy", "seed": 1})
    angles = [0.0, np.pi / 2, np.pi]
    job = Job("sweep", tuple(Experiment(qc.assign_parameters([a]), 4000) for a in angles))
    result = ex.run(job)
    assert ex.stats["plans_compiled"] == 1 and ex.stats["plan_cache_hits"] == 2
    c0, c1, c2 = (r.counts for r in result.experiments)
    assert c0 == {"00": 4000} and c2 == {"11": 4000}
    assert abs(c1["11"] / 4000 - 0.5) < 0.05 and set(c1) == {"00", "11"}


def test_no_qubits_and_no_clbits() -> None:
    ex = GpuExecutor({"backend": "numpy", "seed": 0})
    assert run_one(ex, QuantumCircuit(0, 2), 5).counts == {"00": 5}
    qc = QuantumCircuit(1)
    qc.x(0)
    # Qiskit's own formatting of zero memory slots gives "0".
    assert run_one(ex, qc, 5).counts == {"0": 5}


# --- cuStateVec backend: availability and plumbing -------------------------------------------


def test_import_does_not_load_cuda_libraries() -> None:
    code = f"""
import sys
sys.path.insert(0, {str(REPO)!r})

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("cupy", "cuquantum", "cupy_backends"):
            raise AssertionError("imported " + name)
        return None

sys.meta_path.insert(0, Block())
import executors.gpu
assert "qiskit" not in sys.modules, "executors.gpu should import nothing heavy"
from executors.gpu import GpuExecutor
from qiskit import QuantumCircuit
from executors.base import Experiment, Job
qc = QuantumCircuit(1, 1)
qc.x(0)
qc.measure(0, 0)
ex = GpuExecutor({{"backend": "numpy"}})
print(ex.run(Job("j", (Experiment(qc, 3),))).experiments[0].counts)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "{'1': 3}"


@pytest.mark.skipif(
    "cupy" in sys.modules or __import__("importlib").util.find_spec("cupy") is not None,
    reason="cupy is installed here",
)
def test_missing_extra_says_how_to_install() -> None:
    with pytest.raises(ExecutorUnavailable) as err:
        GpuExecutor({})
    assert "pip install 'qpi-driver[gpu]'" in str(err.value)
    with pytest.raises(ExecutorUnavailable):
        executors.create("gpu", {"precision": "single"})


def test_memory_is_the_hosts_total_and_available_as_the_kernel_reports_them() -> None:
    """Not today's free memory called "total", and no figure made up where none is read."""
    from executors.gpu.numpy_backend import NumpyBackend

    meminfo = {line.split(":")[0]: int(line.split()[1]) * 1024
               for line in Path("/proc/meminfo").read_text().splitlines()}
    free, total = NumpyBackend().memory()
    assert total == meminfo["MemTotal"]
    assert 0 < free <= total
    caps = GpuExecutor({"backend": "numpy"}).capabilities()
    assert caps.to_wire()["memory"] == meminfo["MemTotal"]
