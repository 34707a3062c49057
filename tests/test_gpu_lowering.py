"""Unit tests for the gpu executor's lowering and fusion: what a Qiskit circuit becomes
(controls kept, diagonals found, barriers dropped, definitions expanded) and how gates
are grouped into passes."""

from __future__ import annotations

import numpy as np
import pytest
from qiskit import QuantumCircuit
from qiskit.circuit import ClassicalRegister, Instruction, Parameter, QuantumRegister
from qiskit.circuit.classical import expr
from qiskit.circuit.exceptions import CircuitError
from qiskit.circuit.library import (
    CUGate,
    MCXGate,
    QFTGate,
    UnitaryGate,
    get_standard_gate_name_mapping,
)
from qiskit.quantum_info import Operator, random_unitary

from executors.base import ErrorCode, JobError
from executors.gpu.fusion import fuse, plan_fusion
from executors.gpu.lowering import (
    DIRECT_MATRIX_MAX_QUBITS,
    PARAMETRIC_DIAGONAL,
    Gate,
    IfElse,
    MatrixCache,
    Measure,
    Reset,
    Switch,
    WhileLoop,
    lower,
)
from executors.gpu.runner import Apply, JumpUnless, MeasureI, ResetI, compile_plan


def gates_of(qc: QuantumCircuit) -> list[Gate]:
    return lower(qc).gates()


def embed(gate: Gate, num_qubits: int) -> np.ndarray:
    """Full matrix of a lowered gate (little-endian), built independently of the kernels."""
    dim = 1 << num_qubits
    out = np.zeros((dim, dim), dtype=complex)
    base = gate.dense()
    for col in range(dim):
        if any(((col >> c) & 1) != v for c, v in zip(gate.controls, gate.ctrl_values, strict=True)):
            out[col, col] = 1
            continue
        t_in = sum(((col >> t) & 1) << j for j, t in enumerate(gate.targets))
        rest = col
        for t in gate.targets:
            rest &= ~(1 << t)
        for t_out in range(1 << len(gate.targets)):
            row = rest
            for j, t in enumerate(gate.targets):
                row |= ((t_out >> j) & 1) << t
            out[row, col] += base[t_out, t_in]
    return out


def program_operator(qc: QuantumCircuit) -> np.ndarray:
    program = lower(qc)
    u = np.eye(1 << qc.num_qubits, dtype=complex)
    for gate in program.gates():
        u = embed(gate, qc.num_qubits) @ u
    return u * np.exp(1j * program.global_phase)


def test_controlled_gates_keep_base_matrix_and_controls() -> None:
    qc = QuantumCircuit(5)
    qc.cx(3, 1)
    qc.ccx(0, 4, 2)
    qc.append(MCXGate(4), [0, 1, 2, 3, 4])
    qc.cx(2, 0, ctrl_state=0)
    qc.ch(1, 3)
    cx, ccx, mcx, open_cx, ch = gates_of(qc)
    x = np.array([[0, 1], [1, 0]])
    assert (cx.targets, cx.controls, cx.ctrl_values) == ((1,), (3,), (1,))
    assert np.allclose(cx.matrix, x) and not cx.diagonal
    assert (ccx.targets, ccx.controls) == ((2,), (0, 4))
    assert (mcx.targets, mcx.controls, mcx.ctrl_values) == ((4,), (0, 1, 2, 3), (1, 1, 1, 1))
    assert np.allclose(mcx.matrix, x)
    assert (open_cx.controls, open_cx.ctrl_values) == ((2,), (0,))
    assert np.allclose(ch.matrix, np.array([[1, 1], [1, -1]]) / np.sqrt(2))
    assert all(g.matrix.shape == (2, 2) for g in (cx, ccx, mcx, open_cx, ch))


def test_diagonal_gates_are_detected() -> None:
    qc = QuantumCircuit(3)
    qc.rz(0.3, 0)
    qc.cp(0.7, 0, 2)
    qc.rzz(0.2, 1, 2)
    qc.ccz(0, 1, 2)
    qc.t(1)
    qc.crz(0.4, 2, 0)
    qc.h(0)
    qc.rx(0.1, 1)
    lowered = gates_of(qc)
    assert [g.diagonal for g in lowered] == [True] * 6 + [False] * 2
    rz = lowered[0]
    assert rz.matrix.shape == (2,)
    assert np.allclose(rz.matrix, [np.exp(-0.15j), np.exp(0.15j)])
    cp = lowered[1]
    assert (cp.targets, cp.controls) == ((2,), (0,))
    assert np.allclose(cp.matrix, [1, np.exp(0.7j)])
    assert lowered[2].matrix.shape == (4,)


def test_parametric_diagonal_table_matches_qiskit() -> None:
    rng = np.random.default_rng(1)
    found = set()
    for name, gate in get_standard_gate_name_mapping().items():
        if not gate.params or name == "delay":
            continue
        bound = gate.to_mutable()
        bound.params = [float(x) for x in rng.uniform(0.1, 3.0, len(gate.params))]
        m = bound.to_matrix()
        if np.allclose(m, np.diag(np.diagonal(m))):
            found.add(name)
    assert found <= PARAMETRIC_DIAGONAL
    assert found == PARAMETRIC_DIAGONAL & set(get_standard_gate_name_mapping())


def test_value_diagonal_parametric_gate_keeps_its_structure() -> None:
    qc = QuantumCircuit(1)
    qc.ry(0.0, 0)  # the identity, but ry is dense for other angles
    (gate,) = gates_of(qc)
    assert not gate.diagonal and gate.matrix.shape == (2, 2)


def test_barriers_and_delays_are_dropped() -> None:
    qc = QuantumCircuit(2, 1)
    qc.h(0)
    qc.barrier()
    qc.delay(100, 1)
    qc.barrier(0)
    qc.x(1)
    qc.measure(1, 0)
    ops = lower(qc).ops
    assert [type(op).__name__ for op in ops] == ["Gate", "Gate", "Measure"]


def test_gate_without_matrix_is_decomposed() -> None:
    inner = QuantumCircuit(3, name="bellish")
    inner.h(0)
    inner.cx(0, 1)
    inner.rz(0.25, 2)
    inner.global_phase = 0.5
    custom = inner.to_gate()
    with pytest.raises(CircuitError):
        custom.to_matrix()  # really has no matrix of its own
    qc = QuantumCircuit(4)
    qc.append(custom, [3, 1, 0])
    lowered = gates_of(qc)
    assert [g.name for g in lowered] == ["h", "cx", "rz"]
    assert lowered[0].targets == (3,)
    assert (lowered[1].targets, lowered[1].controls) == ((1,), (3,))
    assert np.allclose(program_operator(qc), Operator(qc).data)


def test_wide_gate_with_matrix_is_decomposed_instead_of_materialised() -> None:
    qc = QuantumCircuit(DIRECT_MATRIX_MAX_QUBITS + 2)
    qc.append(QFTGate(DIRECT_MATRIX_MAX_QUBITS + 2), range(DIRECT_MATRIX_MAX_QUBITS + 2))
    lowered = gates_of(qc)
    assert len(lowered) > 1
    assert max(len(g.targets) for g in lowered) <= 2
    small = QuantumCircuit(3)
    small.append(QFTGate(3), [0, 1, 2])
    (qft,) = gates_of(small)
    assert qft.matrix.shape == (8, 8)


def test_cu_gate_phase_and_unitaries_match_qiskit() -> None:
    qc = QuantumCircuit(4)
    qc.append(CUGate(0.3, 0.2, 0.1, 0.7), [2, 0])
    qc.append(UnitaryGate(random_unitary(4, seed=3)), [1, 3])
    qc.append(UnitaryGate(random_unitary(2, seed=4)).control(2, ctrl_state=1), [0, 3, 2])
    qc.cswap(0, 1, 2)
    qc.mcp(0.4, [0, 1, 2], 3)
    lowered = gates_of(qc)
    cu = lowered[0]
    assert (cu.targets, cu.controls) == ((0,), (2,))
    assert np.allclose(program_operator(qc), Operator(qc).data)


def test_unbound_parameter_is_refused() -> None:
    theta = Parameter("theta")
    qc = QuantumCircuit(1)
    qc.rx(theta, 0)
    with pytest.raises(JobError) as err:
        lower(qc)
    assert err.value.code == ErrorCode.CIRCUIT_INVALID
    assert "theta" in err.value.message


def test_structure_key_ignores_parameter_values_only() -> None:
    theta = Parameter("theta")
    qc = QuantumCircuit(2)
    qc.h(0)
    qc.ry(theta, 1)
    qc.cx(0, 1)
    a = lower(qc.assign_parameters([0.1]))
    b = lower(qc.assign_parameters([0.9]))
    assert a.structure == b.structure
    other = QuantumCircuit(2)
    other.h(0)
    other.ry(0.1, 0)
    other.cx(0, 1)
    assert lower(other).structure != a.structure


def test_matrix_cache_shares_repeated_gates() -> None:
    cache = MatrixCache()
    qc = QuantumCircuit(2)
    qc.h(0)
    qc.h(1)
    qc.rx(0.3, 0)
    first = lower(qc, cache).gates()
    second = lower(qc, cache).gates()
    assert first[0].matrix is first[1].matrix
    assert all(a.matrix is b.matrix for a, b in zip(first, second, strict=True))
    assert first[2].key is not None and first[2].key != first[0].key


def test_control_flow_lowers_to_branches() -> None:
    qr = QuantumRegister(2)
    cr = ClassicalRegister(2, "c")
    qc = QuantumCircuit(qr, cr)
    qc.h(0)
    qc.measure(0, 0)
    with qc.if_test((cr[0], 1)) as else_:
        qc.x(1)
    with else_:
        qc.z(1)
    with qc.if_test(expr.logic_and(expr.equal(cr, 1), expr.logic_not(cr[1]))):
        qc.y(0)
    with qc.switch(cr) as case:
        with case(0, 3):
            qc.x(0)
        with case(case.DEFAULT):
            qc.h(0)
    with qc.while_loop((cr, 3)):
        qc.reset(0)
        qc.measure(0, 0)
    with qc.for_loop(range(3)) as i:
        qc.rx(i, 1)
    ops = lower(qc).ops
    kinds = [type(op).__name__ for op in ops]
    assert kinds == ["Gate", "Measure", "IfElse", "IfElse", "Switch", "WhileLoop"] + ["Gate"] * 3
    first, second, switch, loop = ops[2], ops[3], ops[4], ops[5]
    assert isinstance(first, IfElse) and isinstance(second, IfElse)
    assert first.condition.holds(0b01) and not first.condition.holds(0b10)
    assert [g.name for g in first.true_ops if isinstance(g, Gate)] == ["x"]
    assert [g.name for g in first.false_ops if isinstance(g, Gate)] == ["z"]
    # (c == 1) && !c[1]
    assert [second.condition.holds(v) for v in range(4)] == [False, True, False, False]
    assert isinstance(switch, Switch) and switch.cases[0][0] == frozenset({0, 3})
    assert switch.cases[1][0] is None
    assert isinstance(loop, WhileLoop) and isinstance(loop.body[0], Reset)
    assert isinstance(loop.body[1], Measure)
    unrolled = [g for g in ops[6:] if isinstance(g, Gate)]
    # for_loop unrolled with its loop parameter bound: rx(i) for i = 0, 1, 2
    assert [g.dense()[0, 0] for g in unrolled] == pytest.approx([np.cos(i / 2) for i in range(3)])


@pytest.mark.skipif(not hasattr(Instruction, "c_if"), reason="this Qiskit has no c_if")
def test_legacy_c_if_becomes_a_branch() -> None:  # pragma: no cover - Qiskit < 2.0 only
    qc = QuantumCircuit(1, 1)
    qc.x(0).c_if(qc.clbits[0], 1)
    (op,) = lower(qc).ops
    assert isinstance(op, IfElse)


def test_fusion_respects_width_and_order() -> None:
    rng = np.random.default_rng(5)
    qc = QuantumCircuit(6)
    for _ in range(60):
        a, b = rng.choice(6, 2, replace=False)
        if rng.random() < 0.5:
            qc.cx(int(a), int(b))
        else:
            qc.u(*rng.random(3), int(a))
            qc.rzz(float(rng.random()), int(a), int(b))
    gates = gates_of(qc)
    for k in (2, 3, 4, 5):
        blocks = plan_fusion(list(enumerate(gates)), k)
        assert all(len(b.targets) + len(b.controls) <= k for b in blocks)
        assert sorted(s for b in blocks for s in b.slots) == list(range(len(gates)))
        assert len(blocks) < len(gates)
        u = np.eye(64, dtype=complex)
        for b in blocks:
            m = fuse(b, gates)
            g = Gate("f", b.targets, m, b.diagonal, b.controls, b.ctrl_values)
            u = embed(g, 6) @ u
        assert np.allclose(u, Operator(qc).data, atol=1e-10)
    for k in (0, 1):
        blocks = plan_fusion(list(enumerate(gates)), k)
        assert [b.slots for b in blocks] == [(i,) for i in range(len(gates))]


def test_fused_diagonals_stay_diagonal() -> None:
    qc = QuantumCircuit(3)
    qc.rz(0.1, 0)
    qc.cp(0.2, 0, 1)
    qc.rzz(0.3, 1, 2)
    qc.t(2)
    gates = gates_of(qc)
    (block,) = plan_fusion(list(enumerate(gates)), 3)
    assert block.diagonal and block.targets == (0, 1, 2)
    d = fuse(block, gates)
    assert d.shape == (8,)
    assert np.allclose(np.diag(d), Operator(qc).data)


def test_fusion_never_crosses_measure_reset_or_conditional() -> None:
    qc = QuantumCircuit(2, 2)
    qc.h(0)
    qc.cx(0, 1)
    qc.measure(0, 0)
    qc.h(0)
    qc.h(1)
    qc.reset(1)
    qc.x(1)
    qc.s(0)
    with qc.if_test((qc.clbits[0], 1)):
        qc.z(0)
        qc.h(0)
    qc.t(0)
    qc.measure(1, 1)
    plan = compile_plan(lower(qc), 5)
    kinds = [type(i).__name__ for i in plan.code]
    assert kinds == [
        "Apply",
        "MeasureI",
        "Apply",
        "ResetI",
        "Apply",
        "JumpUnless",
        "Apply",
        "Apply",
    ]
    slots = [plan.blocks[i.block].slots for i in plan.code if isinstance(i, Apply)]
    # h,cx | h,h | x,s | z,h (inside the if) | t
    assert slots == [(0, 1), (2, 3), (4, 5), (6, 7), (8,)]
    assert plan.terminal == [(1, 1)]
    assert isinstance(plan.code[1], MeasureI) and isinstance(plan.code[3], ResetI)
    assert isinstance(plan.code[5], JumpUnless) and plan.code[5].target == 7


def test_terminal_measurements_are_split_off() -> None:
    qc = QuantumCircuit(3, 3)
    qc.reset(0)  # leading reset on a fresh qubit: dropped
    qc.h(0)
    qc.cx(0, 1)
    qc.measure(0, 0)
    qc.x(2)  # other qubit after the measurement: still terminal
    qc.measure(1, 1)
    qc.measure(2, 2)
    plan = compile_plan(lower(qc), 4)
    assert not plan.dynamic
    assert plan.terminal == [(0, 0), (1, 1), (2, 2)]
    again = QuantumCircuit(2, 1)
    again.h(0)
    again.measure(0, 0)
    again.h(0)  # the qubit is reused: the measurement is mid-circuit
    again.measure(1, 0)
    plan = compile_plan(lower(again), 4)
    assert plan.dynamic and plan.terminal == [(1, 0)]


def test_sweep_reuses_plan_and_recomputes_only_changed_blocks() -> None:
    from executors.gpu.executor import GpuExecutor

    theta = Parameter("t")
    qc = QuantumCircuit(3)
    qc.h(0)
    qc.cx(0, 1)
    qc.cx(1, 2)  # block 1 (fixed gates)
    qc.ry(theta, 2)
    qc.cx(2, 0)
    ex = GpuExecutor({"backend": "numpy", "fusion_max_qubits": 2})
    plan_a, mats_a, _ = ex.plan_for(qc.assign_parameters([0.3]))
    computed = plan_a.fused_products_computed
    plan_b, mats_b, _ = ex.plan_for(qc.assign_parameters([1.1]))
    assert plan_b is plan_a
    assert ex.stats == {**ex.stats, "plans_compiled": 1, "plan_cache_hits": 1}
    changed = [i for i, (a, b) in enumerate(zip(mats_a, mats_b, strict=True)) if a is not b]
    assert changed and len(changed) < len(mats_a)
    assert plan_b.fused_products_computed - computed == len(
        [i for i in changed if plan_a.blocks[i].fused]
    )


def test_zero_qubit_gates_fold_into_the_global_phase() -> None:
    from qiskit.circuit.library import GlobalPhaseGate

    qc = QuantumCircuit(3)
    qc.h(1)
    qc.append(GlobalPhaseGate(0.7), [])
    qc.append(GlobalPhaseGate(0.3).control(2, ctrl_state=1), [0, 2])
    qc.global_phase = 0.2
    program = lower(qc)
    assert all(g.targets for g in program.gates())  # no 0-target pass for any backend
    assert program.global_phase == pytest.approx(0.9)
    (phase,) = [g for g in program.gates() if g.name.startswith("cc")]
    # A controlled global phase is a diagonal on its controls: e^{0.3i} where q0=1, q2=0.
    assert phase.targets == (0, 2) and phase.diagonal and not phase.controls
    assert np.allclose(phase.matrix, [1, np.exp(0.3j), 1, 1])
    assert np.allclose(program_operator(qc), Operator(qc).data)


def test_footprint_counts_matrices_controls_and_the_sampler(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from executors.gpu import runner

    qc = QuantumCircuit(4, 4)
    qc.h(0)
    qc.mcx([0, 1, 2], 3)
    qc.rz(0.1, 2)
    qc.measure(range(4), range(4))
    plan = compile_plan(lower(qc), 1)
    fp = plan.footprint(100)
    assert fp.num_qubits == 4
    assert fp.matrix_elements == 4 + 4 + 2  # dense h, dense x (controls kept), diagonal rz
    shapes = {(p.targets, p.n_controls, p.diagonal) for p in fp.passes}
    assert shapes == {((0,), 0, False), ((3,), 3, False), ((2,), 0, True)}
    assert all(plan.blocks[p.block].targets == p.targets for p in fp.passes)
    assert fp.sampler_shots == 0  # 4 measured qubits: one marginal, no sampler
    monkeypatch.setattr(runner, "MAX_MARGINAL_QUBITS", 3)
    assert plan.footprint(100).sampler_shots == 100
