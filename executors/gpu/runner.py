"""Compilation of a lowered program into straight-line code (terminal measurements split
off for one-pass sampling, gates fused per straight run) and its execution on a backend:
a single pass when measurements are terminal, shot-count branching otherwise."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from executors.gpu.fusion import Block, FusedMatrices, plan_fusion
from executors.gpu.lowering import (
    Condition,
    Gate,
    IfElse,
    Measure,
    Op,
    Program,
    Reset,
    Switch,
    WhileLoop,
)

# Marginals over at most this many measured qubits are read whole (one abs2sum pass) and
# drawn from with a multinomial; wider ones go through the backend's sampler.
MAX_MARGINAL_QUBITS = 20
# A while loop that runs this often in one branch is taken to be non-terminating.
MAX_LOOP_ITERATIONS = 100_000


class Backend(Protocol):
    """What the runner needs from a state-vector backend (NumPy or cuStateVec)."""

    num_qubits: int

    def reset_state(self, num_qubits: int) -> None: ...
    def upload(self, matrices: Sequence[np.ndarray]) -> list[Any]: ...
    def apply_matrix(
        self, ref: Any, targets: Sequence[int], controls: Sequence[int], ctrl_values: Sequence[int]
    ) -> None: ...
    def apply_diagonal(
        self, ref: Any, targets: Sequence[int], controls: Sequence[int], ctrl_values: Sequence[int]
    ) -> None: ...
    def qubit_probabilities(self, qubit: int) -> tuple[float, float]: ...
    def collapse(self, qubit: int, outcome: int, probability: float) -> None: ...
    def reset(self, qubit: int, outcome: int, probability: float) -> None: ...
    def probabilities(self, qubits: Sequence[int]) -> np.ndarray: ...
    def sample(self, qubits: Sequence[int], shots: int, rng: np.random.Generator) -> np.ndarray: ...
    def save(self) -> Any: ...
    def restore(self, saved: Any) -> None: ...
    def release(self, saved: Any) -> None: ...


# --- straight-line code -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Apply:
    block: int  # index into Plan.blocks (and the bound matrix list)


@dataclass(frozen=True, slots=True)
class MeasureI:
    qubit: int
    clbit: int


@dataclass(frozen=True, slots=True)
class ResetI:
    qubit: int


@dataclass(frozen=True, slots=True)
class JumpUnless:
    condition: Condition
    target: int


@dataclass(frozen=True, slots=True)
class Jump:
    target: int


Instr = Apply | MeasureI | ResetI | JumpUnless | Jump


@dataclass(slots=True)
class Plan:
    """Matrix-free executable form of a program structure; `bind` supplies matrices."""

    num_qubits: int
    num_clbits: int
    code: list[Instr]
    blocks: list[Block]
    # (qubit, clbit) pairs read by one final sampling pass, in program order.
    terminal: list[tuple[int, int]]
    num_gates: int
    fusion_max_qubits: int
    _fused: FusedMatrices = field(init=False)

    def __post_init__(self) -> None:
        self._fused = FusedMatrices(self.blocks)

    @property
    def dynamic(self) -> bool:
        """True when some shots may differ in their state (mid-circuit measurement,
        reset or classical control): the runner then branches."""
        return any(not isinstance(i, Apply) for i in self.code)

    @property
    def passes(self) -> int:
        return sum(1 for i in self.code if isinstance(i, Apply))

    @property
    def max_targets(self) -> int:
        return max((len(b.targets) for b in self.blocks), default=0)

    @property
    def fused_products_computed(self) -> int:
        return self._fused.computed

    def bind(self, gates: Sequence[Gate]) -> list[np.ndarray]:
        if len(gates) != self.num_gates:
            raise ValueError("program does not match the plan's structure")
        return self._fused.matrices(gates)


def compile_plan(program: Program, fusion_max_qubits: int) -> Plan:
    ops = _drop_initial_resets(program.ops)
    ops, terminal = _split_terminal(ops)
    builder = _Builder(fusion_max_qubits)
    builder.emit(ops)
    builder.flush()
    return Plan(
        num_qubits=program.num_qubits,
        num_clbits=program.num_clbits,
        code=builder.code,
        blocks=builder.blocks,
        terminal=terminal,
        num_gates=builder.next_slot,
        fusion_max_qubits=fusion_max_qubits,
    )


def _op_qubits(op: Op) -> set[int]:
    if isinstance(op, Gate):
        return set(op.qubits)
    if isinstance(op, (Measure, Reset)):
        return {op.qubit}
    bodies: list[list[Op]]
    if isinstance(op, IfElse):
        bodies = [op.true_ops, op.false_ops]
    elif isinstance(op, WhileLoop):
        bodies = [op.body]
    else:
        bodies = [b for _, b in op.cases]
    out: set[int] = set()
    for body in bodies:
        for inner in body:
            out |= _op_qubits(inner)
    return out


def _drop_initial_resets(ops: list[Op]) -> list[Op]:
    # Qubits start in |0>, so a reset before anything touched the qubit is a no-op.
    touched: set[int] = set()
    out: list[Op] = []
    for op in ops:
        if isinstance(op, Reset) and op.qubit not in touched:
            continue
        touched |= _op_qubits(op)
        out.append(op)
    return out


def _split_terminal(ops: list[Op]) -> tuple[list[Op], list[tuple[int, int]]]:
    """Split off measurements that can be sampled at the end: nothing later touches the
    qubit, no control flow follows (it could read the bit) and no later mid-circuit
    measurement overwrites the clbit."""
    touched_later: set[int] = set()
    overwritten_later: set[int] = set()
    control_later = False
    terminal_idx: set[int] = set()
    for i in range(len(ops) - 1, -1, -1):
        op = ops[i]
        if isinstance(op, Measure):
            if (
                not control_later
                and op.qubit not in touched_later
                and op.clbit not in overwritten_later
            ):
                terminal_idx.add(i)
            else:
                overwritten_later.add(op.clbit)
        elif isinstance(op, (Gate, Reset)):
            touched_later |= _op_qubits(op)
        else:
            control_later = True
            touched_later |= _op_qubits(op)
    kept = [op for i, op in enumerate(ops) if i not in terminal_idx]
    terminal = [(ops[i].qubit, ops[i].clbit) for i in sorted(terminal_idx)]  # type: ignore[union-attr]
    return kept, terminal


class _Builder:
    def __init__(self, fusion_max_qubits: int) -> None:
        self.k = fusion_max_qubits
        self.code: list[Instr] = []
        self.blocks: list[Block] = []
        self.pending: list[tuple[int, Gate]] = []
        self.next_slot = 0

    def flush(self) -> None:
        for block in plan_fusion(self.pending, self.k):
            self.code.append(Apply(len(self.blocks)))
            self.blocks.append(block)
        self.pending = []

    def add(self, instr: Instr) -> int:
        self.flush()
        self.code.append(instr)
        return len(self.code) - 1

    def label(self) -> int:
        # A jump target ends a straight run: fusion must not cross it.
        self.flush()
        return len(self.code)

    def emit(self, ops: Sequence[Op]) -> None:
        # Slots are numbered in the same pre-order as lowering.iter_gates.
        for op in ops:
            if isinstance(op, Gate):
                self.pending.append((self.next_slot, op))
                self.next_slot += 1
            elif isinstance(op, Measure):
                self.add(MeasureI(op.qubit, op.clbit))
            elif isinstance(op, Reset):
                self.add(ResetI(op.qubit))
            elif isinstance(op, IfElse):
                branch = self.add(JumpUnless(op.condition, -1))
                self.emit(op.true_ops)
                if op.false_ops:
                    skip = self.add(Jump(-1))
                    self.code[branch] = JumpUnless(op.condition, self.label())
                    self.emit(op.false_ops)
                    self.code[skip] = Jump(self.label())
                else:
                    self.code[branch] = JumpUnless(op.condition, self.label())
            elif isinstance(op, WhileLoop):
                top = self.label()
                branch = self.add(JumpUnless(op.condition, -1))
                self.emit(op.body)
                self.add(Jump(top))
                self.code[branch] = JumpUnless(op.condition, self.label())
            else:
                self._switch(op)

    def _switch(self, op: Switch) -> None:
        ends: list[int] = []
        default: list[Op] | None = None
        for values, body in op.cases:
            if values is None:
                default = body
                continue
            branch = self.add(JumpUnless(Condition(op.target, values), -1))
            self.emit(body)
            ends.append(self.add(Jump(-1)))
            self.code[branch] = JumpUnless(Condition(op.target, values), self.label())
        if default is not None:
            self.emit(default)
        end = self.label()
        for j in ends:
            self.code[j] = Jump(end)


# --- execution -----------------------------------------------------------------------


@dataclass(slots=True)
class Leaf:
    """A group of shots that ended in the same classical state; `samples` holds their
    terminal-measurement outcomes (bit j is the outcome of Outcome.sampled_qubits[j])."""

    creg: int
    samples: np.ndarray  # int64 values over Outcome.sampled_qubits
    counts: np.ndarray | None = None  # when set: samples are distinct values, with counts


@dataclass(slots=True)
class Outcome:
    leaves: list[Leaf]
    sampled_qubits: tuple[int, ...]
    branches: int = 1
    replays: int = 0


@dataclass(slots=True)
class _Pending:
    pc: int
    creg: int
    shots: int
    path: tuple[int, ...]
    forced: tuple[int, ...]
    saved: Any


def execute(
    plan: Plan,
    refs: Sequence[Any],
    backend: Backend,
    shots: int,
    rng: np.random.Generator,
    max_saved_states: int = 4,
) -> Outcome:
    """Run `plan` for `shots` shots.

    Shots are carried as counts: at a mid-circuit measurement or reset with n shots the
    number that see |1> is Binomial(n, p1), and each outcome that some shot sees becomes
    its own branch (exactly the distribution of n independent trajectories). A branch
    waiting its turn keeps a saved copy of the state while `max_saved_states` allows,
    otherwise it is replayed from the start with its recorded outcomes forced.
    """
    sampled = tuple(sorted({q for q, _ in plan.terminal}))
    outcome = Outcome([], sampled)
    code = plan.code
    first_event = next((i for i, ins in enumerate(code) if not isinstance(ins, Apply)), len(code))

    backend.reset_state(plan.num_qubits)
    _apply_range(plan, refs, backend, 0, first_event)
    root_saved: Any = None
    budget = max_saved_states
    if first_event < len(code) and budget > 0:
        root_saved = backend.save()
        budget -= 1

    stack: list[_Pending] = [_Pending(first_event, 0, shots, (), (), None)]
    fresh = True
    while stack:
        item = stack.pop()
        if fresh:
            fresh = False
        elif item.saved is not None:
            backend.restore(item.saved)
            backend.release(item.saved)
            budget += 1
        else:
            outcome.replays += 1
            if root_saved is not None:
                backend.restore(root_saved)
            else:
                backend.reset_state(plan.num_qubits)
                _apply_range(plan, refs, backend, 0, first_event)
        pc, creg, n, path, forced = item.pc, item.creg, item.shots, list(item.path), item.forced
        event = 0  # index into `forced`
        loops = 0
        while pc < len(code):
            ins = code[pc]
            if isinstance(ins, Apply):
                _apply(plan, refs, backend, ins.block)
                pc += 1
            elif isinstance(ins, (MeasureI, ResetI)):
                p0, p1 = backend.qubit_probabilities(ins.qubit)
                total = p0 + p1
                if event < len(forced):
                    bit = forced[event]
                    event += 1
                else:
                    p_one = min(max(p1 / total, 0.0), 1.0) if total > 0 else 0.0
                    ones = int(rng.binomial(n, p_one))
                    if 0 < ones < n:
                        # Both outcomes occur: this branch follows |1>, |0> waits.
                        outcome.branches += 1
                        if budget > 0:
                            budget -= 1
                            saved = backend.save()
                            waiting = _Pending(pc, creg, n - ones, tuple(path), (0,), saved)
                        else:
                            forced_path = (*path, 0)
                            waiting = _Pending(first_event, 0, n - ones, (), forced_path, None)
                        stack.append(waiting)
                        n = ones
                    bit = 1 if ones else 0
                path.append(bit)
                prob = (p1 if bit else p0) / total if total > 0 else 1.0
                if isinstance(ins, MeasureI):
                    backend.collapse(ins.qubit, bit, max(prob, 1e-300))
                    creg = (creg & ~(1 << ins.clbit)) | (bit << ins.clbit)
                else:
                    backend.reset(ins.qubit, bit, max(prob, 1e-300))
                pc += 1
            elif isinstance(ins, JumpUnless):
                pc = pc + 1 if ins.condition.holds(creg) else ins.target
            else:
                if ins.target <= pc:
                    loops += 1
                    if loops > MAX_LOOP_ITERATIONS:
                        raise RuntimeError("a while loop exceeded the iteration limit")
                pc = ins.target
        outcome.leaves.append(_sample_leaf(backend, sampled, n, rng, creg))
    if root_saved is not None:
        backend.release(root_saved)
    return outcome


def _apply(plan: Plan, refs: Sequence[Any], backend: Backend, index: int) -> None:
    block = plan.blocks[index]
    if block.diagonal:
        backend.apply_diagonal(refs[index], block.targets, block.controls, block.ctrl_values)
    else:
        backend.apply_matrix(refs[index], block.targets, block.controls, block.ctrl_values)


def _apply_range(plan: Plan, refs: Sequence[Any], backend: Backend, start: int, stop: int) -> None:
    for ins in plan.code[start:stop]:
        assert isinstance(ins, Apply)
        _apply(plan, refs, backend, ins.block)


def _sample_leaf(
    backend: Backend,
    qubits: tuple[int, ...],
    shots: int,
    rng: np.random.Generator,
    creg: int,
) -> Leaf:
    if not qubits:
        return Leaf(creg, np.zeros(1, dtype=np.int64), np.array([shots], dtype=np.int64))
    if len(qubits) <= MAX_MARGINAL_QUBITS:
        probs = np.clip(backend.probabilities(qubits), 0.0, None)
        counts = rng.multinomial(shots, probs / probs.sum())
        values = np.flatnonzero(counts).astype(np.int64)
        return Leaf(creg, values, counts[values].astype(np.int64))
    return Leaf(creg, backend.sample(qubits, shots, rng))


# --- results ---------------------------------------------------------------------------


def to_counts(
    plan: Plan,
    outcome: Outcome,
    rng: np.random.Generator,
    want_memory: bool,
) -> tuple[dict[str, int], list[str] | None]:
    """Qiskit-format counts (and shuffled per-shot memory) from the leaves: highest clbit
    on the left, exactly num_clbits characters, only outcomes that occurred."""
    width = plan.num_clbits
    position = {q: j for j, q in enumerate(outcome.sampled_qubits)}
    # Later terminal measurements into the same clbit win, as in program order.
    final_source = {c: q for q, c in plan.terminal}
    mask = 0
    for c in final_source:
        mask |= 1 << c
    counts: dict[str, int] = {}
    memory: list[str] = []
    for leaf in outcome.leaves:
        if leaf.counts is not None:
            values, freq = leaf.samples, leaf.counts
            inverse = None
        else:
            values, inverse, freq = np.unique(leaf.samples, return_inverse=True, return_counts=True)
        keys = [
            format(creg, f"0{width}b")
            for creg in _cregs(leaf.creg & ~mask, values, final_source, position, width)
        ]
        for key, n in zip(keys, freq.tolist(), strict=True):
            counts[key] = counts.get(key, 0) + int(n)
        if want_memory:
            if inverse is None:
                for key, n in zip(keys, freq.tolist(), strict=True):
                    memory.extend([key] * int(n))
            else:
                memory.extend(keys[i] for i in inverse.tolist())
    if not want_memory:
        return counts, None
    # Leaves are grouped by branch and multinomial counts are sorted; a permutation makes
    # the per-shot sequence exchangeable, as independent shots would be.
    order = rng.permutation(len(memory))
    return counts, [memory[i] for i in order.tolist()]


def _cregs(
    base: int,
    values: np.ndarray,
    final_source: dict[int, int],
    position: dict[int, int],
    width: int,
) -> list[int]:
    """Classical register values for sampled terminal outcomes `values` over `base`."""
    if width <= 63:
        out = np.full(len(values), base, dtype=np.int64)
        for c, q in final_source.items():
            out |= ((values >> position[q]) & 1) << c
        return [int(v) for v in out.tolist()]
    result = []
    for value in values.tolist():
        creg = base
        for c, q in final_source.items():
            creg |= ((value >> position[q]) & 1) << c
        result.append(creg)
    return result


__all__ = [
    "MAX_MARGINAL_QUBITS",
    "Apply",
    "Backend",
    "Jump",
    "JumpUnless",
    "Leaf",
    "MeasureI",
    "Outcome",
    "Plan",
    "ResetI",
    "compile_plan",
    "execute",
    "to_counts",
]
