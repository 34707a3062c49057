"""Aer's noise physics: a calibration (`executors.calibration`) turned into a Qiskit
Aer noise model, so that a node without a QPU can stand in for the QPU it sits beside
(a digital twin). Only the `aer` executor uses it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from executors.calibration import (
    CalibrationFileError,
    DeviceFigures,
    QubitFigures,
    read_figures,
)

if TYPE_CHECKING:
    from qiskit.circuit import QuantumCircuit
    from qiskit_aer.noise import NoiseModel

# The single-qubit natives a twin transpiles to (qibolab's: a virtual Z, sx and x).
SINGLE_QUBIT_GATES = ("rz", "sx", "x")


def build_noise_model(figures: DeviceFigures) -> NoiseModel:
    """Thermal relaxation from T1/T2 over each gate's duration, depolarizing for the rest
    of the gate error that RB measured, and readout flips from the assignment fidelity."""
    from qiskit_aer.noise import NoiseModel, ReadoutError

    two_qubit = sorted({p.gate for p in figures.pairs} or {"cz"})
    model = NoiseModel(basis_gates=[*SINGLE_QUBIT_GATES, *two_qubit])
    by_index = {q.index: q for q in figures.qubits}
    for q in figures.qubits:
        for gate, ns in (("sx", q.sx_ns), ("x", q.x_ns)):
            error = _gate_error([q], ns, q.gate_fidelity)
            if error is not None:
                model.add_quantum_error(error, gate, [q.index])
        if q.assignment_fidelity is not None and q.assignment_fidelity < 1:
            flip = min(max(1.0 - q.assignment_fidelity, 0.0), 0.5)
            model.add_readout_error(ReadoutError([[1 - flip, flip], [flip, 1 - flip]]), [q.index])
    for pair in figures.pairs:
        a, b = pair.qubits
        # A symmetric gate (CZ, iSWAP) runs in either qubit order; CX only as calibrated.
        orders = [(a, b)] if pair.gate == "cx" else [(a, b), (b, a)]
        for first, second in orders:
            members = [by_index.get(i) or QubitFigures(index=i, name=str(i))
                       for i in (first, second)]
            error = _gate_error(members, pair.duration_ns, pair.fidelity)
            if error is not None:
                model.add_quantum_error(error, pair.gate, [first, second])
    return model


def _gate_error(qubits: list[QubitFigures], ns: float, fidelity: float | None) -> Any:
    """Relaxation over `ns` on every qubit, then depolarizing to reach `fidelity`."""
    from qiskit.quantum_info import process_fidelity
    from qiskit_aer.noise import depolarizing_error, thermal_relaxation_error

    relax = None
    for q in qubits:
        if not (q.t1_ns and q.t2_ns and q.t1_ns > 0 and q.t2_ns > 0):
            one = thermal_relaxation_error(float("inf"), float("inf"), ns)
        else:
            # Physical T2 <= 2 T1; calibration noise sometimes breaks it.
            one = thermal_relaxation_error(q.t1_ns, min(q.t2_ns, 2 * q.t1_ns), ns)
        # Qiskit orders tensor factors little-endian: the first qubit is the rightmost.
        relax = one if relax is None else one.expand(relax)
    assert relax is not None
    dim = 2 ** len(qubits)
    depolarize = None
    if fidelity is not None:
        # Average-gate fidelity F -> process fidelity, then solve
        # (1 - p) F_relax + p / d^2 = F_target for the depolarizing parameter p.
        target = ((dim + 1) * float(fidelity) - 1) / dim
        f_relax = float(process_fidelity(relax.to_quantumchannel()))
        p = (f_relax - target) / (f_relax - 1 / dim**2) if f_relax > 1 / dim**2 else 0.0
        p = min(max(p, 0.0), dim**2 / (dim**2 - 1))
        if p > 0:
            depolarize = depolarizing_error(p, len(qubits))
    if depolarize is None:
        return None if _is_identity(relax) else relax
    return depolarize if _is_identity(relax) else relax.compose(depolarize)


def _is_identity(error: Any) -> bool:
    from qiskit.quantum_info import process_fidelity

    return bool(abs(float(process_fidelity(error.to_quantumchannel())) - 1.0) < 1e-12)


@dataclass
class NoiseProfile:
    """A calibration file turned into a noise model, reread when the file changes."""

    path: Path
    figures: DeviceFigures
    model: NoiseModel
    seed_transpiler: int = 11
    _mtime: float = 0.0
    error: str | None = None

    @classmethod
    def load(cls, path: str | os.PathLike[str], seed_transpiler: int = 11) -> NoiseProfile:
        p = Path(path)
        figures = read_figures(p)
        return cls(p, figures, build_noise_model(figures), seed_transpiler, _stat(p))

    def refresh(self) -> bool:
        """Reread the file if it changed; True when the model was rebuilt. A file that
        no longer parses keeps the last good model, and `error` says why until the file
        changes again."""
        mtime = _stat(self.path)
        if mtime == self._mtime:
            return False
        self._mtime = mtime
        try:
            figures = read_figures(self.path)
            model = build_noise_model(figures)
        except CalibrationFileError as exc:
            self.error = str(exc)
            return False
        self.figures, self.model, self.error = figures, model, None
        return True

    @property
    def basis_gates(self) -> list[str]:
        return list(self.model.basis_gates)

    def coupling_map(self) -> list[list[int]] | None:
        edges: list[list[int]] = []
        for p in self.figures.pairs:
            edges.append(list(p.qubits))
            if p.gate != "cx":
                edges.append(list(p.qubits[::-1]))
        return edges or None

    def native_form(self, circuit: QuantumCircuit) -> QuantumCircuit:
        """The circuit as the twinned QPU would run it: its native gates and coupling map,
        so every gate and SWAP it would need picks up its error."""
        from qiskit import transpile
        from qiskit.transpiler import CouplingMap

        edges = self.coupling_map()
        coupling = None
        if edges is not None:
            coupling = CouplingMap(edges)
            for q in range(self.figures.num_qubits):
                if q not in coupling.physical_qubits:
                    coupling.add_physical_qubit(q)
        return transpile(
            circuit,
            basis_gates=[*self.basis_gates, "measure", "delay", "reset"],
            coupling_map=coupling,
            optimization_level=1,
            seed_transpiler=self.seed_transpiler,
        )

    def calibration(self) -> dict[str, Any]:
        figures = self.figures.to_wire()
        return {**figures, "errors": [self.error]} if self.error else figures


def _stat(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return -1.0
