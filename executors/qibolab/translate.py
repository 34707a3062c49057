"""From a Qiskit circuit to what qibolab's compiler takes, and from readout samples
back to Qiskit bitstrings.

The daemon has already parsed the OpenQASM 2 or 3 text into a Qiskit circuit.
Qiskit's transpiler brings it to the platform's native gates and coupling map (a
`Target` built from the platform), and each native gate becomes the qibo gate that
qibolab's default compiler turns into pulses: rz -> RZ (a virtual Z), sx -> GPI2(0),
x -> GPI(0), cz/cx/iswap -> CZ/CNOT/iSWAP. Measurements are gathered into one qibo
`M` at the end so every qubit is read out at the same time (the emulator keeps
correlations only between simultaneous readouts; real readout lines are
multiplexed anyway). Why not qibo's own QASM reader: it drops the classical bit of
`measure q[i] -> c[j]` and keeps only the statement order, so Qiskit's bit order of
protocol §5 could not be kept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from executors.base import ErrorCode, JobError
from executors.calibration import TWO_QUBIT_GATES

if TYPE_CHECKING:
    from qiskit.circuit import QuantumCircuit
    from qiskit.transpiler import Target

# Delays in Qiskit units -> ns, for qibo's Align gate.
_NS_PER_UNIT = {"s": 1e9, "ms": 1e6, "us": 1e3, "ns": 1.0, "ps": 1e-3}


@dataclass(frozen=True, slots=True)
class NativeGateSet:
    """The natives a platform offers, in the physical qubit order Qiskit uses (the
    order of `platform.qubits`)."""

    wires: tuple[Any, ...]  # qibolab qubit names, index = Qiskit physical qubit
    single: dict[int, dict[str, float]]  # qubit -> {"sx"/"x"/"measure": duration ns}
    pairs: dict[tuple[int, int], dict[str, float]]  # (a, b) -> {"cz"/"cx"/"iswap": ns}
    dt_s: float | None = None  # one controller sample, for Qiskit delays in "dt"
    errors: dict[tuple[str, tuple[int, ...]], float] = field(default_factory=dict)

    @property
    def basis_gates(self) -> tuple[str, ...]:
        names = {"rz"}
        for gates in self.single.values():
            names.update(g for g in gates if g != "measure")
        for gates in self.pairs.values():
            names.update(gates)
        return tuple(sorted(names))

    @property
    def coupling_map(self) -> list[list[int]]:
        edges = []
        for (a, b), gates in self.pairs.items():
            edges.append([a, b])
            if any(g != "cx" for g in gates):  # CZ and iSWAP work in both directions
                edges.append([b, a])
        return sorted(edges)

    def target(self) -> Target:
        """A Qiskit `Target`: which gate runs where, how long it takes and, where the
        calibration says, how often it fails (so layout prefers the better qubits)."""
        from qiskit.circuit import Delay, Measure, Parameter
        from qiskit.circuit.library import CXGate, CZGate, RZGate, SXGate, XGate, iSwapGate
        from qiskit.transpiler import InstructionProperties, Target

        target = Target(num_qubits=len(self.wires), dt=self.dt_s)
        ops: dict[str, Any] = {"sx": SXGate(), "x": XGate(), "cz": CZGate(), "cx": CXGate(),
                               "iswap": iSwapGate()}

        def props(name: str, qubits: tuple[int, ...], ns: float) -> Any:
            return InstructionProperties(duration=ns * 1e-9,
                                         error=self.errors.get((name, qubits)))

        target.add_instruction(
            RZGate(Parameter("theta")),
            {(q,): InstructionProperties(duration=0.0, error=0.0) for q in self.single},
        )
        where: dict[tuple[int, ...], Any]
        for name in ("sx", "x"):
            where = {(q,): props(name, (q,), g[name]) for q, g in self.single.items() if name in g}
            if where:
                target.add_instruction(ops[name], where)
        where = {(q,): props("measure", (q,), g["measure"])
                 for q, g in self.single.items() if "measure" in g}
        if where:
            target.add_instruction(Measure(), where)
        for name in ("cz", "cx", "iswap"):
            where = {}
            for (a, b), gates in self.pairs.items():
                if name in gates:
                    where[(a, b)] = props(name, (a, b), gates[name])
                    if name != "cx":
                        where[(b, a)] = props(name, (b, a), gates[name])
            if where:
                target.add_instruction(ops[name], where)
        target.add_instruction(Delay(Parameter("t")), {(q,): None for q in self.single})
        return target


def native_gate_set(platform: Any, errors: dict[tuple[str, tuple[int, ...]], float]
                    ) -> NativeGateSet:
    """Read a qibolab platform's natives: RX90 (or RX) gives sx and x, MZ gives measure,
    a pair's CZ / CNOT / iSWAP gives cz / cx / iswap."""
    wires = tuple(platform.qubits)
    index = {name: i for i, name in enumerate(wires)}
    natives = platform.natives
    single: dict[int, dict[str, float]] = {}
    for name, gates in natives.single_qubit.items():
        if name not in index:
            continue
        entry: dict[str, float] = {}
        rotation = gates.RX90 if gates.RX90 is not None else gates.RX
        if rotation is not None:
            # qibolab plays sx as one RX90 pulse and x as one RX90 at twice the amplitude
            # (two pulses above amplitude 0.5); one pulse length is close enough for layout.
            entry["sx"] = entry["x"] = float(rotation.duration)
        if gates.MZ is not None:
            entry["measure"] = float(gates.MZ.duration)
        single[index[name]] = entry
    pairs: dict[tuple[int, int], dict[str, float]] = {}
    for (a, b), gates in natives.two_qubit.items():
        if a not in index or b not in index:
            continue
        entry = {}
        for native, qiskit_name in TWO_QUBIT_GATES.items():
            sequence = getattr(gates, native, None)
            if sequence is not None:
                entry[qiskit_name] = float(sequence.duration)
        if entry:
            pairs[(index[a], index[b])] = entry
    rate = platform.sampling_rate  # GS/s of the controller
    dt_s = 1e-9 / float(rate) if rate else None
    return NativeGateSet(wires, single, pairs, dt_s, errors)


@dataclass(frozen=True, slots=True)
class NativeCircuit:
    """A circuit ready for qibolab's compiler, with where each measurement lands."""

    circuit: Any  # qibo.models.Circuit
    measure: Any  # the qibo M gate, or None when nothing is measured
    clbits: dict[int, list[int]]  # physical qubit -> classical bits it was measured into
    width: int  # memory slots


def to_native(circuit: QuantumCircuit, gate_set: NativeGateSet, target: Target,
              seed: int, optimization_level: int) -> NativeCircuit:
    from qibo import Circuit, gates
    from qiskit import transpile

    if circuit.num_qubits > len(gate_set.wires):
        raise JobError(
            ErrorCode.QUOTA_EXCEEDED,
            f"the circuit uses {circuit.num_qubits} qubits; this platform has "
            f"{len(gate_set.wires)}",
            requested_qubits=circuit.num_qubits, max_qubits=len(gate_set.wires),
        )
    try:
        mapped = transpile(circuit, target=target, optimization_level=optimization_level,
                           seed_transpiler=seed)
    except Exception as exc:  # TranspilerError and friends: the circuit cannot map here
        raise JobError(
            ErrorCode.CIRCUIT_INVALID,
            f"the circuit cannot be mapped onto this platform's native gates and coupling "
            f"map: {exc}",
        ) from exc
    native = Circuit(len(gate_set.wires), wire_names=list(gate_set.wires))
    clbits: dict[int, list[int]] = {}
    measured: list[int] = []
    for instruction in mapped.data:
        op = instruction.operation
        name = op.name
        qubits = [mapped.find_bit(q).index for q in instruction.qubits]
        if name == "barrier":
            continue
        if name == "measure":
            clbit = mapped.find_bit(instruction.clbits[0]).index
            if qubits[0] not in clbits:
                measured.append(qubits[0])
            clbits.setdefault(qubits[0], []).append(clbit)
            continue
        late = [q for q in qubits if q in clbits]
        if late:
            raise JobError(
                ErrorCode.CIRCUIT_INVALID,
                f"'{name}' acts on qubit {late[0]} after it was measured; the qibolab "
                "executor runs measurements at the end of the circuit only",
            )
        native.add(_qibo_gate(gates, name, qubits, op, gate_set.dt_s))
    measure = None
    if measured:
        measure = gates.M(*measured)
        native.add(measure)
    return NativeCircuit(native, measure, clbits, circuit.num_clbits)


# Each native Qiskit gate as the qibo gate qibolab's compiler plays: sx and x are the
# GPI2 / GPI pulses at phase 0, rz a virtual Z.
_QIBO_GATES: dict[str, Callable[[Any, list[int], Any], Any]] = {
    "rz": lambda g, qubits, op: g.RZ(qubits[0], float(op.params[0])),
    "sx": lambda g, qubits, _: g.GPI2(qubits[0], 0.0),
    "x": lambda g, qubits, _: g.GPI(qubits[0], 0.0),
    "cz": lambda g, qubits, _: g.CZ(*qubits),
    "cx": lambda g, qubits, _: g.CNOT(*qubits),
    "iswap": lambda g, qubits, _: g.iSWAP(*qubits),
}


def _qibo_gate(gates: Any, name: str, qubits: list[int], op: Any, dt_s: float | None) -> Any:
    make = _QIBO_GATES.get(name)
    if make is not None:
        return make(gates, qubits, op)
    if name == "delay":
        return gates.Align(qubits[0], delay=round(_delay_ns(op, dt_s)))
    if name == "reset":
        raise JobError(ErrorCode.CIRCUIT_INVALID,
                       "reset is not supported by the qibolab executor (no active reset)")
    raise JobError(ErrorCode.CIRCUIT_INVALID,
                   f"'{name}' has no native form on this platform")


def _delay_ns(op: Any, dt_s: float | None) -> float:
    """A Qiskit delay's length in ns; one in "dt" needs the controller's sample time."""
    unit = op.unit
    if unit == "dt":
        if dt_s is None:
            raise JobError(ErrorCode.CIRCUIT_INVALID,
                           "a delay in 'dt' needs a controller sampling rate; this "
                           "platform has none, give the delay in ns")
        return float(op.duration) * dt_s * 1e9
    if unit in _NS_PER_UNIT:
        return float(op.duration) * _NS_PER_UNIT[unit]
    raise JobError(ErrorCode.CIRCUIT_INVALID,
                   f"a delay in {unit!r} has no fixed length; give it in s, ms, us, "
                   "ns, ps or dt")


def bitstrings(native: NativeCircuit, samples: dict[int, np.ndarray], shots: int) -> list[str]:
    """Qiskit memory strings: clbit j is character width-1-j; a clbit no measurement
    writes stays 0. `samples[q]` holds qubit q's 0/1 outcome per shot."""
    width = native.width
    bits = np.zeros((shots, width), dtype=np.uint8)
    for qubit, clbits in native.clbits.items():
        outcome = (np.asarray(samples[qubit]).reshape(shots) != 0).astype(np.uint8)
        for clbit in clbits:
            bits[:, width - 1 - clbit] = outcome
    table = np.array([ord("0"), ord("1")], dtype=np.uint8)
    chars = table[bits]
    return [row.tobytes().decode() for row in chars] if width else [""] * shots


def iq_memory(native: NativeCircuit, samples: dict[int, np.ndarray], shots: int,
              average: bool) -> list[Any]:
    """meas_level 1 memory in Qiskit's layout: per shot (or averaged) one [I, Q] pair
    per memory slot, slot j = clbit j; slots no measurement writes hold [0, 0]."""
    width = native.width
    shape = (width, 2) if average else (shots, width, 2)
    out = np.zeros(shape, dtype=float)
    for qubit, clbits in native.clbits.items():
        iq = np.asarray(samples[qubit], dtype=float)
        for clbit in clbits:
            if average:
                out[clbit] = iq.reshape(2)
            else:
                out[:, clbit] = iq.reshape(shots, 2)
    return list(out.tolist())
