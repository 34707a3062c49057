"""A plain circuit as data: its registers, its distinct operations and one tuple of bit
indices per instruction. Parsed jobs cross from the circuit parser to the executor
process in this form; an executor that can lower it straight to its simulator's own
circuit (Aer) skips building a QuantumCircuit it would only walk once."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from qiskit.circuit import QuantumCircuit


class Register(NamedTuple):
    name: str
    size: int


class FlatCircuit:
    """Everything a plain QuantumCircuit holds (no parameters, variables, layout or
    bits outside registers: `flatten` refuses those). Read-only by convention."""

    __slots__ = (
        "cregs",
        "global_phase",
        "instructions",
        "metadata",
        "name",
        "operations",
        "qregs",
    )

    def __init__(self, name: str, global_phase: float, metadata: dict[str, Any],
                 qregs: Sequence[tuple[str, int]], cregs: Sequence[tuple[str, int]],
                 operations: Sequence[Any], instructions: Sequence[tuple[int, tuple[int, ...],
                                                                           tuple[int, ...]]],
                 ) -> None:
        self.name = name
        self.global_phase = global_phase
        self.metadata = metadata
        self.qregs = [Register(*r) for r in qregs]
        self.cregs = [Register(*r) for r in cregs]
        self.operations = list(operations)
        self.instructions = instructions

    @property
    def num_qubits(self) -> int:
        return sum(r.size for r in self.qregs)

    @property
    def num_clbits(self) -> int:
        return sum(r.size for r in self.cregs)

    def __iter__(self) -> Iterator[tuple[Any, tuple[int, ...], tuple[int, ...]]]:
        """(operation, qubit indices, clbit indices) per instruction, in order."""
        operations = self.operations
        for index, qubits, clbits in self.instructions:
            yield operations[index], qubits, clbits

    def state(self) -> tuple[Any, ...]:
        """The constructor's arguments."""
        return (self.name, self.global_phase, self.metadata,
                [tuple(r) for r in self.qregs], [tuple(r) for r in self.cregs],
                self.operations, self.instructions)

    def to_circuit(self) -> QuantumCircuit:
        from qiskit.circuit import (
            CircuitInstruction,
            ClassicalRegister,
            QuantumCircuit,
            QuantumRegister,
        )

        circuit = QuantumCircuit(*[QuantumRegister(r.size, r.name) for r in self.qregs],
                                 *[ClassicalRegister(r.size, r.name) for r in self.cregs],
                                 name=self.name, global_phase=self.global_phase,
                                 metadata=self.metadata)
        qubits, clbits, append = circuit.qubits, circuit.clbits, circuit._append
        for op, qargs, cargs in self:
            append(CircuitInstruction(op, [qubits[q] for q in qargs],
                                      [clbits[c] for c in cargs]))
        return circuit


def flatten(circuit: QuantumCircuit) -> FlatCircuit | None:
    """The flat form, or None where the circuit holds more than it keeps. Instructions
    that share one operation object (the parser shares one per gate and angles) share
    it here too."""
    if (circuit.num_parameters or circuit.num_vars or circuit.num_stretches
            or circuit.layout is not None or circuit._op_start_times is not None
            or not isinstance(circuit.global_phase, int | float)):
        return None
    qubits = [bit for register in circuit.qregs for bit in register]
    clbits = [bit for register in circuit.cregs for bit in register]
    if qubits != circuit.qubits or clbits != circuit.clbits:
        return None  # loose bits, or bits in more than one register
    qubit_at = {bit: i for i, bit in enumerate(qubits)}
    clbit_at = {bit: i for i, bit in enumerate(clbits)}
    operations: list[Any] = []
    seen: dict[int, int] = {}
    instructions = []
    for instruction in circuit.data:
        op = instruction.operation
        index = seen.get(id(op))
        if index is None:
            index = seen[id(op)] = len(operations)
            operations.append(op)
        instructions.append((index, tuple(map(qubit_at.__getitem__, instruction.qubits)),
                             tuple(map(clbit_at.__getitem__, instruction.clbits))))
    return FlatCircuit(circuit.name, circuit.global_phase, dict(circuit.metadata or {}),
                       [(r.name, r.size) for r in circuit.qregs],
                       [(r.name, r.size) for r in circuit.cregs], operations, instructions)
