"""Lowering of a bound Qiskit circuit into the executor's own op tree: gate matrices
(dense or diagonal, controlled gates as base matrix + controls), measure, reset and
classical control flow, with a structure key so parameter sweeps can reuse plans."""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from qiskit.circuit import (
    ClassicalRegister,
    Clbit,
    ControlledGate,
    Instruction,
    ParameterExpression,
    QuantumCircuit,
)
from qiskit.circuit.classical import expr, types
from qiskit.circuit.controlflow import (
    ForLoopOp,
    IfElseOp,
    SwitchCaseOp,
    WhileLoopOp,
)
from qiskit.circuit.controlflow.switch_case import CASE_DEFAULT
from qiskit.circuit.exceptions import CircuitError
from qiskit.circuit.library import get_standard_gate_name_mapping

from executors.base import ErrorCode, JobError

# Gates this wide or narrower are applied from their own matrix; wider ones (QFTGate(30)
# would be a 2^30 x 2^30 matrix) are decomposed through their definition instead.
DIRECT_MATRIX_MAX_QUBITS = 8
# Off-diagonal magnitudes at or below this count as zero when detecting diagonal gates.
DIAGONAL_ATOL = 1e-14
_MAX_DEFINITION_DEPTH = 64
_IGNORED = frozenset({"barrier", "delay", "snapshot", "label"})
# Parametrised standard gates that are diagonal for every parameter value. Others (ry,
# u, ...) are kept dense even at values where they happen to be diagonal (ry(0)), so a
# sweep through such a value keeps the same structure and reuses its plan.
PARAMETRIC_DIAGONAL = frozenset(
    {"p", "u1", "rz", "rzz", "cp", "cu1", "crz", "mcphase", "mcu1", "global_phase"}
)
_STANDARD_TYPES: frozenset[type] = frozenset(
    type(gate) for gate in get_standard_gate_name_mapping().values()
)

Matrix = np.ndarray


@dataclass(frozen=True, slots=True, eq=False)
class Gate:
    """A unitary on `targets` (bit j of the matrix index is targets[j]), applied only
    where every control qubit holds its control value. `matrix` is the 2^k x 2^k
    matrix, or the length-2^k diagonal when `diagonal` is set."""

    name: str
    targets: tuple[int, ...]
    matrix: Matrix
    diagonal: bool
    controls: tuple[int, ...] = ()
    ctrl_values: tuple[int, ...] = ()
    # Identifies the matrix's value (gate type and parameters) so fused products can be
    # reused across a sweep; None when unknown (e.g. an arbitrary UnitaryGate).
    key: Hashable | None = None

    @property
    def qubits(self) -> tuple[int, ...]:
        return self.controls + self.targets

    def structure(self) -> tuple[Any, ...]:
        return ("g", self.targets, self.controls, self.ctrl_values, self.diagonal)

    def dense(self) -> Matrix:
        """The target-space matrix as a dense 2^k x 2^k array."""
        return np.diag(self.matrix) if self.diagonal else self.matrix


@dataclass(frozen=True, slots=True)
class Measure:
    qubit: int
    clbit: int


@dataclass(frozen=True, slots=True)
class Reset:
    qubit: int


# A classical expression tree in plain tuples: hashable (it is part of the structure key)
# and cheap to evaluate against the classical bits packed into one int.
ExprNode = tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class ClassicalValue:
    """An unsigned value read from the classical bits: a register/bit or an expression."""

    bits: tuple[int, ...] = ()
    node: ExprNode | None = None

    def value(self, creg: int) -> int:
        if self.node is not None:
            return int(_evaluate(self.node, creg))
        out = 0
        for i, bit in enumerate(self.bits):
            out |= ((creg >> bit) & 1) << i
        return out


@dataclass(frozen=True, slots=True)
class Condition:
    """True when `target` is one of `values`, or (values None) when it is non-zero."""

    target: ClassicalValue
    values: frozenset[int] | None = None

    def holds(self, creg: int) -> bool:
        value = self.target.value(creg)
        return bool(value) if self.values is None else value in self.values


@dataclass(slots=True)
class IfElse:
    condition: Condition
    true_ops: list[Op]
    false_ops: list[Op]


@dataclass(slots=True)
class WhileLoop:
    condition: Condition
    body: list[Op]


@dataclass(slots=True)
class Switch:
    # Cases in order; a None value set is the default case.
    target: ClassicalValue
    cases: list[tuple[frozenset[int] | None, list[Op]]]


Op = Gate | Measure | Reset | IfElse | WhileLoop | Switch


@dataclass(slots=True)
class Program:
    """A lowered circuit. `gates()` lists every Gate in a fixed order (its slot number);
    two programs with equal `structure` differ only in their gate matrices."""

    num_qubits: int
    num_clbits: int
    ops: list[Op]
    global_phase: float = 0.0
    structure: tuple[Any, ...] = field(default=())

    def gates(self) -> list[Gate]:
        return list(iter_gates(self.ops))


def iter_gates(ops: Sequence[Op]) -> Iterator[Gate]:
    for op in ops:
        if isinstance(op, Gate):
            yield op
        elif isinstance(op, IfElse):
            yield from iter_gates(op.true_ops)
            yield from iter_gates(op.false_ops)
        elif isinstance(op, WhileLoop):
            yield from iter_gates(op.body)
        elif isinstance(op, Switch):
            for _, body in op.cases:
                yield from iter_gates(body)


def structure_of(ops: Sequence[Op]) -> tuple[Any, ...]:
    out: list[Any] = []
    for op in ops:
        if isinstance(op, Gate):
            out.append(op.structure())
        elif isinstance(op, Measure):
            out.append(("m", op.qubit, op.clbit))
        elif isinstance(op, Reset):
            out.append(("r", op.qubit))
        elif isinstance(op, IfElse):
            out.append(("if", op.condition, structure_of(op.true_ops), structure_of(op.false_ops)))
        elif isinstance(op, WhileLoop):
            out.append(("while", op.condition, structure_of(op.body)))
        else:
            out.append(("switch", op.target, tuple((v, structure_of(b)) for v, b in op.cases)))
    return tuple(out)


class MatrixCache:
    """Memo of standard-gate matrices keyed by gate type and parameters, shared across
    experiments so a sweep recomputes only the gates whose parameters changed."""

    def __init__(self, max_entries: int = 8192) -> None:
        self._data: dict[Hashable, tuple[Matrix, bool]] = {}
        self._max = max_entries

    def get(
        self, key: Hashable, build: Callable[[], Matrix], diagonal_by_type: bool | None = None
    ) -> tuple[Matrix, bool]:
        """The matrix for `key` (diagonal form if diagonal). `diagonal_by_type`, when
        given, decides diagonality from the gate type instead of the values."""
        hit = self._data.get(key)
        if hit is None:
            matrix = np.ascontiguousarray(build(), dtype=np.complex128)
            diagonal = is_diagonal(matrix)
            if diagonal_by_type is not None:
                diagonal = diagonal and diagonal_by_type
            stored = np.ascontiguousarray(np.diagonal(matrix)) if diagonal else matrix
            stored.setflags(write=False)
            if len(self._data) >= self._max:
                self._data.clear()
            hit = self._data[key] = (stored, diagonal)
        return hit


def is_diagonal(matrix: Matrix) -> bool:
    off = matrix - np.diag(np.diagonal(matrix))
    return bool(np.all(np.abs(off) <= DIAGONAL_ATOL))


def lower(circuit: QuantumCircuit, cache: MatrixCache | None = None) -> Program:
    """Lower a bound circuit; raises JobError(CIRCUIT_INVALID) for what cannot run."""
    lowerer = _Lowerer(circuit, cache or MatrixCache())
    ops = lowerer.block(
        circuit,
        list(range(circuit.num_qubits)),
        list(range(circuit.num_clbits)),
        depth=0,
        top=True,
    )
    phase = lowerer.phase + _bound_float(circuit.global_phase, "global phase")
    return Program(
        num_qubits=circuit.num_qubits,
        num_clbits=circuit.num_clbits,
        ops=ops,
        global_phase=phase,
        structure=(circuit.num_qubits, circuit.num_clbits, structure_of(ops)),
    )


def _invalid(message: str, **details: Any) -> JobError:
    return JobError(ErrorCode.CIRCUIT_INVALID, message, **details)


def _bound_float(value: Any, what: str) -> float:
    if isinstance(value, ParameterExpression):
        if value.parameters:
            names = sorted(p.name for p in value.parameters)
            raise _invalid(f"{what} has unbound parameters: {', '.join(names)}")
        value = complex(value)
    if isinstance(value, complex):
        if abs(value.imag) > 1e-12:
            raise _invalid(f"{what} is complex ({value})")
        return float(value.real)
    return float(value)


def _param_key(params: Sequence[Any], name: str) -> tuple[Any, ...] | None:
    out: list[Any] = []
    for p in params:
        if isinstance(p, ParameterExpression):
            out.append(_bound_float(p, f"gate {name!r}"))
        elif isinstance(p, (int, float, np.integer, np.floating)):
            out.append(float(p))
        else:
            return None  # arrays or other objects: not a cheap, reliable key
    return tuple(out)


@dataclass(frozen=True, slots=True)
class _Site:
    """Where an instruction sits: its circuit, and its qubits/clbits in the top circuit."""

    circ: QuantumCircuit
    qubits: list[int]
    clbits: list[int]
    cmap: Sequence[int]
    depth: int


class _Lowerer:
    def __init__(self, top: QuantumCircuit, cache: MatrixCache) -> None:
        self.top = top
        self.cache = cache
        self.phase = 0.0

    # --- blocks -----------------------------------------------------------------------

    def block(
        self,
        circ: QuantumCircuit,
        qmap: Sequence[int],
        cmap: Sequence[int],
        depth: int,
        top: bool = False,
    ) -> list[Op]:
        if depth > _MAX_DEFINITION_DEPTH:
            raise _invalid("gate definitions nest too deeply (recursive definition?)")
        out: list[Op] = []
        for inst in circ.data:
            qubits = [qmap[circ.find_bit(q).index] for q in inst.qubits]
            clbits = [cmap[circ.find_bit(c).index] for c in inst.clbits]
            self.instruction(circ, inst.operation, qubits, clbits, cmap, depth, out)
        if not top:
            self.phase += _bound_float(circ.global_phase, "global phase")
        return out

    def instruction(
        self,
        circ: QuantumCircuit,
        op: Instruction,
        qubits: list[int],
        clbits: list[int],
        cmap: Sequence[int],
        depth: int,
        out: list[Op],
    ) -> None:
        """Lower one instruction into `out`: ignored ones, a legacy condition, the named
        non-gate instructions, control flow, and everything else as a gate."""
        if op.name in _IGNORED:
            return
        legacy = getattr(op, "condition", None)
        if legacy is not None and not isinstance(op, (IfElseOp, WhileLoopOp)):
            self.legacy_condition(circ, op, legacy, qubits, clbits, cmap, depth, out)
            return
        at = _Site(circ, qubits, clbits, cmap, depth)
        handler = _BY_NAME.get(op.name)
        if handler is not None and (handler[0] is None or isinstance(op, handler[0])):
            handler[1](self, at, op, out)
            return
        if clbits and op.definition is None:
            raise _invalid(f"instruction {op.name!r} writes classical bits and cannot be simulated")
        self.gate(op, qubits, clbits, depth, out)

    def legacy_condition(
        self,
        circ: QuantumCircuit,
        op: Instruction,
        legacy: Any,
        qubits: list[int],
        clbits: list[int],
        cmap: Sequence[int],
        depth: int,
        out: list[Op],
    ) -> None:
        # Qiskit < 2.0 `c_if`: the same as an if_test around the bare instruction.
        body: list[Op] = []
        bare = op.to_mutable()
        bare.condition = None
        self.instruction(circ, bare, qubits, clbits, cmap, depth, body)
        out.append(IfElse(self.condition(circ, cmap, legacy), body, []))

    # --- non-gate instructions, one small step each (dispatched through _BY_NAME) -----

    def measure(self, at: _Site, op: Instruction, out: list[Op]) -> None:
        out.extend(Measure(q, c) for q, c in zip(at.qubits, at.clbits, strict=True))

    def reset(self, at: _Site, op: Instruction, out: list[Op]) -> None:
        out.extend(Reset(q) for q in at.qubits)

    def if_else(self, at: _Site, op: Instruction, out: list[Op]) -> None:
        true_body = op.blocks[0]
        false_body = op.blocks[1] if len(op.blocks) > 1 else None
        cond = self.condition(at.circ, at.cmap, op.condition)
        true_ops = self.body(at.circ, true_body, at.qubits, at.clbits, at.depth)
        false_ops = (
            self.body(at.circ, false_body, at.qubits, at.clbits, at.depth) if false_body else []
        )
        out.append(IfElse(cond, true_ops, false_ops))

    def while_loop(self, at: _Site, op: Instruction, out: list[Op]) -> None:
        cond = self.condition(at.circ, at.cmap, op.condition)
        body = self.body(at.circ, op.blocks[0], at.qubits, at.clbits, at.depth)
        out.append(WhileLoop(cond, body))

    def for_loop(self, at: _Site, op: Instruction, out: list[Op]) -> None:
        indexset, loop_param, body_circ = op.params
        for value in indexset:
            bound = (
                body_circ.assign_parameters({loop_param: value}, inplace=False)
                if loop_param is not None and loop_param in body_circ.parameters
                else body_circ
            )
            out.extend(self.body(at.circ, bound, at.qubits, at.clbits, at.depth))

    def switch(self, at: _Site, op: Instruction, out: list[Op]) -> None:
        target = self.classical_value(at.circ, at.cmap, op.target)
        cases: list[tuple[frozenset[int] | None, list[Op]]] = []
        for values, case_body in op.cases_specifier():
            ops = self.body(at.circ, case_body, at.qubits, at.clbits, at.depth)
            if any(v is CASE_DEFAULT for v in values):
                cases.append((None, ops))
            else:
                cases.append((frozenset(int(v) for v in values), ops))
        out.append(Switch(target, cases))

    def box(self, at: _Site, op: Instruction, out: list[Op]) -> None:
        out.extend(self.body(at.circ, op.blocks[0], at.qubits, at.clbits, at.depth))

    def loop_control(self, at: _Site, op: Instruction, out: list[Op]) -> None:
        raise _invalid(f"{op.name} is not supported by the gpu executor")

    def body(
        self,
        circ: QuantumCircuit,
        body: QuantumCircuit,
        qubits: list[int],
        clbits: list[int],
        depth: int,
    ) -> list[Op]:
        # A control-flow body's bits map positionally onto the instruction's bits.
        return self.block(body, qubits, clbits, depth + 1)

    # --- gates ------------------------------------------------------------------------

    def gate(
        self, op: Instruction, qubits: list[int], clbits: list[int], depth: int, out: list[Op]
    ) -> None:
        name = op.name
        params = _param_key(op.params, name)
        standard = type(op) in _STANDARD_TYPES and params is not None
        if op.num_qubits == 0 and self.global_phase_gate(op):
            return
        if isinstance(op, ControlledGate) and op.num_ctrl_qubits > 0:
            lowered = self.controlled(op, qubits, params if standard else None)
            if lowered is not None:
                out.append(lowered)
                return
        elif op.num_qubits <= DIRECT_MATRIX_MAX_QUBITS and not op.num_clbits:
            key = (type(op).__name__, name, op.num_qubits, params) if standard else None
            found = self.matrix(op, key, _diagonal_by_type(name, params))
            if found is not None:
                matrix, diagonal = found
                out.append(Gate(name, tuple(qubits), matrix, diagonal, key=key))
                return
        definition = op.definition
        if definition is None:
            raise _invalid(f"instruction {name!r} has neither a matrix nor a definition")
        out.extend(self.block(definition, qubits, clbits, depth + 1))

    def global_phase_gate(self, op: Instruction) -> bool:
        """Fold a 0-qubit gate (GlobalPhaseGate, a 1x1 unitary) into the program's global
        phase: nothing reaches a backend with zero targets. False when it has no matrix."""
        try:
            value = complex(np.asarray(op.to_matrix(), dtype=np.complex128).reshape(-1)[0])
        except Exception:  # no matrix: the caller decomposes the definition
            return False
        self.phase += math.atan2(value.imag, value.real)
        return True

    def matrix(
        self, op: Instruction, key: Hashable | None, diagonal_by_type: bool | None
    ) -> tuple[Matrix, bool] | None:
        def build() -> Matrix:
            return np.asarray(op.to_matrix(), dtype=np.complex128)

        try:
            if key is not None:
                return self.cache.get(key, build, diagonal_by_type)
            matrix = build()
        except Exception:  # no __array__: the caller decomposes the definition
            return None
        if is_diagonal(matrix):
            return np.ascontiguousarray(np.diagonal(matrix)), True
        return matrix, False

    def controlled(
        self, op: ControlledGate, qubits: list[int], params: tuple[Any, ...] | None
    ) -> Gate | None:
        n_ctrl = op.num_ctrl_qubits
        ctrl_state = int(op.ctrl_state)
        controls = tuple(qubits[:n_ctrl])
        targets = tuple(qubits[n_ctrl:])
        ctrl_values = tuple((ctrl_state >> i) & 1 for i in range(n_ctrl))
        if len(targets) > DIRECT_MATRIX_MAX_QUBITS:
            return None
        key = (
            ("ctrl", type(op).__name__, op.name, op.num_qubits, n_ctrl, params)
            if params is not None
            else None
        )
        base = op.base_gate
        # Controlled gates whose own parameters do not all live on the base gate (CU's
        # gamma is a phase on the controlled subspace) are read off their full matrix;
        # small ones too, which also checks the base against the gate itself.
        from_full = len(op.params) != len(base.params) or op.num_qubits <= 4

        base_usable = len(op.params) == len(base.params) and base.num_qubits == len(targets)

        def build() -> Matrix:
            if from_full:
                try:
                    full = np.asarray(op.to_matrix(), dtype=np.complex128)
                    return _controlled_block(full, n_ctrl, ctrl_state)
                except CircuitError:  # no full matrix (MCXGate, a controlled global phase)
                    if not base_usable:
                        raise
            elif not base_usable:
                raise ValueError("base gate width does not match the target count")
            return np.asarray(base.to_matrix(), dtype=np.complex128)

        try:
            if key is not None:
                matrix, diagonal = self.cache.get(key, build, _diagonal_by_type(op.name, params))
            else:
                raw = build()
                diagonal = is_diagonal(raw)
                matrix = np.ascontiguousarray(np.diagonal(raw)) if diagonal else raw
        except Exception:  # no usable matrix: the caller decomposes the definition
            return None
        if not targets:
            return _phase_on_controls(op.name, matrix, controls, ctrl_values, key)
        return Gate(op.name, targets, matrix, diagonal, controls, ctrl_values, key=key)

    # --- classical --------------------------------------------------------------------

    def clbit_index(self, circ: QuantumCircuit, cmap: Sequence[int], bit: Clbit) -> int:
        try:
            return cmap[circ.find_bit(bit).index]
        except Exception:
            return self.top.find_bit(bit).index

    def classical_value(
        self, circ: QuantumCircuit, cmap: Sequence[int], target: Any
    ) -> ClassicalValue:
        if isinstance(target, Clbit):
            return ClassicalValue(bits=(self.clbit_index(circ, cmap, target),))
        if isinstance(target, ClassicalRegister):
            return ClassicalValue(bits=tuple(self.clbit_index(circ, cmap, b) for b in target))
        if isinstance(target, expr.Expr):
            return ClassicalValue(node=self.expr(circ, cmap, target))
        raise _invalid(f"unsupported classical target {target!r}")

    def condition(self, circ: QuantumCircuit, cmap: Sequence[int], cond: Any) -> Condition:
        if isinstance(cond, tuple):
            target, value = cond
            return Condition(self.classical_value(circ, cmap, target), frozenset({int(value)}))
        if isinstance(cond, expr.Expr):
            return Condition(ClassicalValue(node=self.expr(circ, cmap, cond)))
        raise _invalid(f"unsupported condition {cond!r}")

    def var(
        self, circ: QuantumCircuit, cmap: Sequence[int], node: expr.Var, width: int
    ) -> ExprNode:
        var = node.var
        if isinstance(var, Clbit):
            return ("bits", (self.clbit_index(circ, cmap, var),), width)
        if isinstance(var, ClassicalRegister):
            return ("bits", tuple(self.clbit_index(circ, cmap, b) for b in var), width)
        raise _invalid(f"classical variable {node.name!r} is not supported")

    def expr(self, circ: QuantumCircuit, cmap: Sequence[int], node: expr.Expr) -> ExprNode:
        width = _width(node.type)
        if isinstance(node, expr.Var):
            return self.var(circ, cmap, node, width)
        if isinstance(node, expr.Value):
            return ("value", int(node.value), width)
        if isinstance(node, expr.Cast):
            return ("cast", self.expr(circ, cmap, node.operand), width)
        if isinstance(node, expr.Unary):
            if node.op.name not in _UNARY:
                raise _invalid(f"classical operator {node.op.name} is not supported")
            return ("unary", node.op.name, self.expr(circ, cmap, node.operand), width)
        if isinstance(node, expr.Binary):
            if node.op.name not in _BINARY:
                raise _invalid(f"classical operator {node.op.name} is not supported")
            left = self.expr(circ, cmap, node.left)
            right = self.expr(circ, cmap, node.right)
            return ("binary", node.op.name, left, right, width)
        if isinstance(node, expr.Index):
            return ("index", self.expr(circ, cmap, node.target), self.expr(circ, cmap, node.index))
        raise _invalid(f"classical expression {type(node).__name__} is not supported")


_Handler = Callable[[_Lowerer, _Site, Instruction, list[Op]], None]
# Non-gate instructions by name, with the type the instruction must have (None: any).
_BY_NAME: dict[str, tuple[type | None, _Handler]] = {
    "measure": (None, _Lowerer.measure),
    "reset": (None, _Lowerer.reset),
    "if_else": (IfElseOp, _Lowerer.if_else),
    "while_loop": (WhileLoopOp, _Lowerer.while_loop),
    "for_loop": (ForLoopOp, _Lowerer.for_loop),
    "switch_case": (SwitchCaseOp, _Lowerer.switch),
    "box": (None, _Lowerer.box),
    "break_loop": (None, _Lowerer.loop_control),
    "continue_loop": (None, _Lowerer.loop_control),
}


def _diagonal_by_type(name: str, params: tuple[Any, ...] | None) -> bool | None:
    # Gates without parameters have one fixed matrix: its own diagonality is stable.
    return (name in PARAMETRIC_DIAGONAL) if params else None


def _width(kind: types.Type) -> int:
    # 0 marks a Bool; Uint carries its width so NOT and overflow wrap correctly.
    if isinstance(kind, types.Uint):
        return int(kind.width)
    if isinstance(kind, types.Bool):
        return 0
    raise _invalid(f"classical type {kind} is not supported")


def _wrap(value: int, width: int) -> int:
    return int(bool(value)) if width == 0 else value & ((1 << width) - 1)


_UNARY: dict[str, Callable[[int, int], int]] = {
    "BIT_NOT": lambda v, w: (~v) & ((1 << w) - 1) if w else int(not v),
    "LOGIC_NOT": lambda v, w: int(not v),
}
_BINARY: dict[str, Callable[[int, int], int]] = {
    "BIT_AND": lambda a, b: a & b,
    "BIT_OR": lambda a, b: a | b,
    "BIT_XOR": lambda a, b: a ^ b,
    "LOGIC_AND": lambda a, b: int(bool(a) and bool(b)),
    "LOGIC_OR": lambda a, b: int(bool(a) or bool(b)),
    "EQUAL": lambda a, b: int(a == b),
    "NOT_EQUAL": lambda a, b: int(a != b),
    "LESS": lambda a, b: int(a < b),
    "LESS_EQUAL": lambda a, b: int(a <= b),
    "GREATER": lambda a, b: int(a > b),
    "GREATER_EQUAL": lambda a, b: int(a >= b),
    "SHIFT_LEFT": lambda a, b: a << b,
    "SHIFT_RIGHT": lambda a, b: a >> b,
    "ADD": lambda a, b: a + b,
    "SUB": lambda a, b: a - b,
    "MUL": lambda a, b: a * b,
}


def _evaluate(node: ExprNode, creg: int) -> int:
    kind = node[0]
    if kind == "bits":
        _, bits, width = node
        out = 0
        for i, bit in enumerate(bits):
            out |= ((creg >> bit) & 1) << i
        return out
    if kind == "value":
        return int(node[1])
    if kind == "cast":
        return _wrap(_evaluate(node[1], creg), node[2])
    if kind == "unary":
        _, op, operand, width = node
        return _UNARY[op](_evaluate(operand, creg), width)
    if kind == "binary":
        _, op, left, right, width = node
        return _wrap(_BINARY[op](_evaluate(left, creg), _evaluate(right, creg)), width)
    if kind == "index":
        return (_evaluate(node[1], creg) >> _evaluate(node[2], creg)) & 1
    raise ValueError(f"unknown expression node {kind!r}")


def _phase_on_controls(
    name: str,
    matrix: Matrix,
    controls: tuple[int, ...],
    ctrl_values: tuple[int, ...],
    key: Hashable | None,
) -> Gate:
    """A controlled 0-qubit gate (a controlled global phase) is a diagonal on its
    controls: the phase where they hold their control values, 1 elsewhere."""
    value = complex(np.asarray(matrix).reshape(-1)[0])
    diagonal = np.ones(1 << len(controls), dtype=np.complex128)
    diagonal[sum(v << j for j, v in enumerate(ctrl_values))] = value
    diagonal.setflags(write=False)
    phase_key = ("phase-on-controls", key) if key is not None else None
    return Gate(name, controls, diagonal, True, key=phase_key)


def _controlled_block(full: Matrix, n_ctrl: int, ctrl_state: int) -> Matrix:
    """The target-space block of a controlled gate's full matrix (controls are the low
    bits of the index), checking that it acts as identity elsewhere."""
    dim = full.shape[0]
    n_targets = int(math.log2(dim)) - n_ctrl
    idx = np.array([ctrl_state | (t << n_ctrl) for t in range(1 << n_targets)])
    block = full[np.ix_(idx, idx)]
    rest = full.copy()
    rest[np.ix_(idx, idx)] = np.eye(1 << n_targets)
    if not np.allclose(rest, np.eye(dim), atol=1e-12):
        raise ValueError("controlled gate does not act as identity off its control state")
    return np.ascontiguousarray(block)


__all__ = [
    "DIRECT_MATRIX_MAX_QUBITS",
    "PARAMETRIC_DIAGONAL",
    "ClassicalValue",
    "Condition",
    "Gate",
    "IfElse",
    "MatrixCache",
    "Measure",
    "Op",
    "Program",
    "Reset",
    "Switch",
    "WhileLoop",
    "is_diagonal",
    "iter_gates",
    "lower",
    "structure_of",
]
