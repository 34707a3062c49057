"""Flat circuits straight into Aer's own circuit type (AerCircuit), skipping the
QuantumCircuit and the Python half of `AerSimulator.run`: its per-instruction scans
(operation types, variables, conditions) and its result objects cost about 1 ms of a
12-qubit QFT's 3.4, as much as the daemon's whole share of the job.

Only what Aer's own assembler (`qiskit_aer.backends.aer_compiler.assemble_circuit`)
passes through unchanged is taken: standard gates as one `gate` call each, `measure`,
`reset`, `barrier` (dropped, as Aer drops it). Anything else (a control state, a
matrix, a condition, a name Aer rewrites) returns None and the caller takes the
standard path. The same circuit through either path draws the same samples from the
same seed; tests/test_aer_native.py holds the two paths to that."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from executors.base import ErrorCode, JobError
from executors.flat import FlatCircuit

# The names `_assemble_op` hands to `AerCircuit.gate` as they are (qiskit-aer 0.18).
_GATES = frozenset({
    "ccx", "ccz", "cp", "cswap", "csx", "cx", "cy", "cz", "ecr", "h", "id", "mcp",
    "mcphase", "mcr", "mcrx", "mcry", "mcrz", "mcswap", "mcsx", "mcu", "mcu1", "mcu2",
    "mcu3", "mcx", "mcx_gray", "mcy", "mcz", "p", "r", "rx", "rxx", "ry", "ryy", "rz", "rzx",
    "rzz", "s", "sdg", "swap", "sx", "sxdg", "t", "tdg", "u", "x", "y", "z", "u1", "u2", "u3",
    "cu", "cu1", "cu2", "cu3", "crx", "cry", "crz",
})

_DROP, _MEASURE, _RESET, _GATE = -1, 0, 1, 2


class Raw:
    """One experiment's output as Aer's controller reports it."""

    __slots__ = ("counts", "memory", "time_taken")

    def __init__(self, counts: dict[str, int], memory: list[str] | None,
                 time_taken: float) -> None:
        self.counts, self.memory, self.time_taken = counts, memory, time_taken


class NativeRunner:
    """Lowers flat circuits for one AerSimulator and runs them on its controller."""

    def __init__(self, sim: Any) -> None:
        from qiskit_aer.backends.aer_compiler import generate_aer_config
        from qiskit_aer.backends.backend_utils import CircuitHeader
        from qiskit_aer.backends.controller_wrappers import AerCircuit

        self._sim = sim
        self._aer_circuit, self._header, self._config = (AerCircuit, CircuitHeader,
                                                         generate_aer_config)
        # As `AerSimulator.run` does: a gate outside the simulator's basis is an error
        # there, so it is not taken here.
        self._gates = _GATES & set(sim.configuration().basis_gates)

    @classmethod
    def for_simulator(cls, sim: Any) -> NativeRunner | None:
        """None where this qiskit-aer lacks what the direct path calls."""
        try:
            return cls(sim)
        except (ImportError, AttributeError):
            return None

    def lower(self, flat: FlatCircuit) -> Any | None:
        """The AerCircuit Aer would assemble from this circuit, or None."""
        found = [self._step(op) for op in flat.operations]
        steps = [step for step in found if step is not None]
        if len(steps) < len(found):
            return None
        num_qubits, num_memory = flat.num_qubits, flat.num_clbits
        phase = float(flat.global_phase)
        circuit = self._aer_circuit()
        circuit.set_header(self._header(
            n_qubits=num_qubits, qreg_sizes=[[r.name, r.size] for r in flat.qregs],
            memory_slots=num_memory, creg_sizes=[[r.name, r.size] for r in flat.cregs],
            name=flat.name, global_phase=phase))
        circuit.num_qubits, circuit.num_memory = num_qubits, num_memory
        circuit.global_phase_angle = phase
        gate, measure, reset = circuit.gate, circuit.measure, circuit.reset
        for index, qubits, clbits in flat.instructions:
            step = steps[index]
            kind = step[0]
            if kind == _GATE:
                gate(step[1], list(qubits), step[2], [], -1, None, step[3])
            elif kind == _MEASURE:
                measure(list(qubits), list(clbits), [])
            elif kind == _RESET:
                reset(list(qubits), -1)
        return circuit

    def _step(self, op: Any) -> tuple[Any, ...] | None:
        if getattr(op, "condition", None):
            return None
        name = op.name
        if name == "barrier":
            return (_DROP,)
        if name == "measure":
            return (_MEASURE,)
        if name == "reset":
            return (_RESET,)
        if name in self._gates:
            return (_GATE, name, op.params, op.label or name)
        return None

    def run(self, circuits: Sequence[Any], flats: Sequence[FlatCircuit],
            run_options: dict[str, Any]) -> list[Raw]:
        """Run lowered circuits in one controller call; JobError if one failed, or
        RuntimeError if the controller did not answer."""
        for circ_id, circuit in enumerate(circuits):
            circuit.circ_id = circ_id
        config = self._config(flats, self._sim.options, **run_options)
        output = self._sim._execute_circuits(list(circuits), None, config)
        if not isinstance(output, dict):
            raise RuntimeError("the simulation ended without a valid output")
        results = output.get("results") or []
        if len(results) != len(circuits):
            raise RuntimeError(output.get("status") or "the simulation returned no results")
        if all("circ_id" in result for result in results):
            results = sorted(results, key=lambda result: result["circ_id"])
        raws = []
        for result in results:
            if not result.get("success", False):
                raise JobError(ErrorCode.JOB_FAILED,
                               f"Aer failed an experiment: {result.get('status')}")
            data = result.get("data") or {}
            raws.append(Raw(data.get("counts") or {}, data.get("memory"),
                            float(result.get("time_taken", 0.0) or 0.0)))
        return raws
