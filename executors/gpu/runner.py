"""Compilation of a lowered program into straight-line code (terminal measurements split
off for one-pass sampling, gates fused per straight run) and its execution on a backend:
a single pass when measurements are terminal, shot-count branching otherwise."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from executors.gpu.backend import Backend, Footprint, Pass
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

    @property
    def sampled_qubits(self) -> tuple[int, ...]:
        return tuple(sorted({q for q, _ in self.terminal}))

    def footprint(self, shots: int) -> Footprint:
        """What running this plan for `shots` shots allocates, for admission."""
        shapes: dict[tuple[tuple[int, ...], int, bool], int] = {}
        elements = 0
        for index, block in enumerate(self.blocks):
            width = 1 << len(block.targets)
            elements += width if block.diagonal else width * width
            shapes.setdefault((block.targets, len(block.controls), block.diagonal), index)
        passes = tuple(Pass(t, c, d, index) for (t, c, d), index in shapes.items())
        sampler = len(self.sampled_qubits) > MAX_MARGINAL_QUBITS
        return Footprint(self.num_qubits, passes, elements, shots if sampler else 0)

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
    return _Trajectories(plan, refs, backend, rng, max_saved_states).run(shots)


@dataclass(slots=True)
class _Branch:
    """The branch being followed: where it is, its classical bits and shot count, the
    outcomes it has seen (`path`) and those it must reproduce when replayed (`forced`)."""

    pc: int
    creg: int
    shots: int
    path: list[int]
    forced: tuple[int, ...]
    event: int = 0  # index into `forced`
    loops: int = 0


class _Trajectories:
    """One execution of a plan: the common prefix, then each branch in turn."""

    def __init__(
        self,
        plan: Plan,
        refs: Sequence[Any],
        backend: Backend,
        rng: np.random.Generator,
        max_saved_states: int,
    ) -> None:
        self.plan, self.refs, self.backend, self.rng = plan, refs, backend, rng
        self.code = plan.code
        self.budget = max_saved_states
        self.root_saved: Any = None
        self.first_event = next(
            (i for i, ins in enumerate(self.code) if not isinstance(ins, Apply)), len(self.code)
        )
        self.outcome = Outcome([], plan.sampled_qubits)

    def run(self, shots: int) -> Outcome:
        self._prefix()
        if self.first_event < len(self.code) and self.budget > 0:
            self.root_saved = self.backend.save()
            self.budget -= 1
        stack = [_Pending(self.first_event, 0, shots, (), (), None)]
        fresh = True
        while stack:
            item = stack.pop()
            if not fresh:
                self._resume(item)
            fresh = False
            branch = self._follow(item, stack)
            leaf = _sample_leaf(
                self.backend, self.outcome.sampled_qubits, branch.shots, self.rng, branch.creg
            )
            self.outcome.leaves.append(leaf)
        if self.root_saved is not None:
            self.backend.release(self.root_saved)
        return self.outcome

    def _prefix(self) -> None:
        # Everything before the first measurement, reset or jump is shared by all shots.
        self.backend.reset_state(self.plan.num_qubits)
        _apply_range(self.plan, self.refs, self.backend, 0, self.first_event)

    def _resume(self, item: _Pending) -> None:
        if item.saved is not None:
            self.backend.restore(item.saved)
            self.backend.release(item.saved)
            self.budget += 1
            return
        self.outcome.replays += 1
        if self.root_saved is not None:
            self.backend.restore(self.root_saved)
        else:
            self._prefix()

    def _follow(self, item: _Pending, stack: list[_Pending]) -> _Branch:
        branch = _Branch(item.pc, item.creg, item.shots, list(item.path), item.forced)
        code = self.code
        while branch.pc < len(code):
            ins = code[branch.pc]
            if isinstance(ins, Apply):
                _apply(self.plan, self.refs, self.backend, ins.block)
                branch.pc += 1
            elif isinstance(ins, (MeasureI, ResetI)):
                self._event(branch, ins, stack)
            elif isinstance(ins, JumpUnless):
                branch.pc = branch.pc + 1 if ins.condition.holds(branch.creg) else ins.target
            else:
                self._jump(branch, ins)
        return branch

    def _jump(self, branch: _Branch, ins: Jump) -> None:
        if ins.target <= branch.pc:
            branch.loops += 1
            if branch.loops > MAX_LOOP_ITERATIONS:
                raise RuntimeError("a while loop exceeded the iteration limit")
        branch.pc = ins.target

    def _event(self, branch: _Branch, ins: MeasureI | ResetI, stack: list[_Pending]) -> None:
        """A measurement or reset: draw its outcome (splitting the shots when both occur),
        then collapse the state onto it."""
        p0, p1 = self.backend.qubit_probabilities(ins.qubit)
        total = p0 + p1
        bit = self._outcome_of(branch, p1, total, stack)
        branch.path.append(bit)
        prob = max((p1 if bit else p0) / total if total > 0 else 1.0, 1e-300)
        if isinstance(ins, MeasureI):
            self.backend.collapse(ins.qubit, bit, prob)
            branch.creg = (branch.creg & ~(1 << ins.clbit)) | (bit << ins.clbit)
        else:
            self.backend.reset(ins.qubit, bit, prob)
        branch.pc += 1

    def _outcome_of(self, branch: _Branch, p1: float, total: float, stack: list[_Pending]) -> int:
        if branch.event < len(branch.forced):
            bit = branch.forced[branch.event]
            branch.event += 1
            return bit
        p_one = min(max(p1 / total, 0.0), 1.0) if total > 0 else 0.0
        ones = int(self.rng.binomial(branch.shots, p_one))
        if 0 < ones < branch.shots:
            # Both outcomes occur: this branch follows |1>, |0> waits.
            self._defer_zero(branch, branch.shots - ones, stack)
            branch.shots = ones
        return 1 if ones else 0

    def _defer_zero(self, branch: _Branch, shots: int, stack: list[_Pending]) -> None:
        self.outcome.branches += 1
        if self.budget > 0:
            self.budget -= 1
            saved = self.backend.save()
            stack.append(_Pending(branch.pc, branch.creg, shots, tuple(branch.path), (0,), saved))
        else:
            forced = (*branch.path, 0)
            stack.append(_Pending(self.first_event, 0, shots, (), forced, None))


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
