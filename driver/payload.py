"""How a parsed job crosses from the circuit parser to the executor process: pickle,
with plain circuits in a flat form. Pickling a QuantumCircuit goes instruction by
instruction through Qiskit's reducers (about 0.7 ms for a 100-gate circuit, as much as
parsing it); the flat form is its registers, its distinct operations (the parser shares
one gate object between the instructions that use it) and one tuple of bit indices per
instruction, half the cost to write and no more to read. A circuit with anything else
(parameters, variables, a layout, bits outside registers) is pickled as it is."""

from __future__ import annotations

import io
import pickle
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qiskit.circuit import QuantumCircuit

Flat = tuple[Any, ...]


def dumps(obj: Any) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()


loads = pickle.loads


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        if type(obj).__name__ == "QuantumCircuit":  # no import: most objects are not one
            flat = flatten(obj)
            if flat is not None:
                return rebuild, flat
        return NotImplemented


def flatten(circuit: QuantumCircuit) -> Flat | None:
    """The flat form, or None where the circuit holds more than it keeps."""
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
    return (circuit.name, circuit.global_phase, dict(circuit.metadata or {}),
            [(r.name, r.size) for r in circuit.qregs], [(r.name, r.size) for r in circuit.cregs],
            operations, instructions)


def rebuild(name: str, global_phase: float, metadata: dict[str, Any],
            qregs: list[tuple[str, int]], cregs: list[tuple[str, int]],
            operations: list[Any], instructions: list[tuple[int, tuple[int, ...], tuple[int, ...]]],
            ) -> QuantumCircuit:
    from qiskit.circuit import (
        CircuitInstruction,
        ClassicalRegister,
        QuantumCircuit,
        QuantumRegister,
    )

    circuit = QuantumCircuit(*[QuantumRegister(size, reg) for reg, size in qregs],
                             *[ClassicalRegister(size, reg) for reg, size in cregs],
                             name=name, global_phase=global_phase, metadata=metadata)
    qubits, clbits, append = circuit.qubits, circuit.clbits, circuit._append
    for index, qargs, cargs in instructions:
        append(CircuitInstruction(operations[index], [qubits[q] for q in qargs],
                                  [clbits[c] for c in cargs]))
    return circuit
