"""The calibration snapshot format: what a QPU executor reports in heartbeats and what
an Aer digital twin reads back. Contract only; the noise physics is `executors.aer_noise`.

Two file shapes are read:

* a *calibration snapshot*, as the `qibolab` executor reports it in heartbeats:
  `{"timestamp", "qubits": {name: {"index", "t1_ns", "t2_ns", "gate_fidelity",
  "assignment_fidelity", "gate_durations_ns": {"sx", "x", "measure"}, …}},
  "pairs": {"a-b": {"qubits": [i, j], "natives": ["CZ"], "fidelity", "duration_ns"}}}`;
* a qibocal `calibration.json` (`{"single_qubits": …, "two_qubits": …}`), whose
  times are in ns and whose readout `fidelity` is qibocal's 1 - P(0|1) - P(1|0).

Figures a file leaves out stay None (a twin adds no noise for them); durations it
leaves out take the defaults below and are reported as such.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from executors.base import iso_utc

# Used when a calibration gives no pulse durations (a qibocal file has none).
DEFAULT_1Q_NS = 40.0
DEFAULT_2Q_NS = 200.0
DEFAULT_MEASURE_NS = 1000.0

# Qiskit gate names for qibolab's two-qubit natives.
TWO_QUBIT_GATES = {"CZ": "cz", "CNOT": "cx", "iSWAP": "iswap"}


class CalibrationFileError(ValueError):
    """A calibration file could not be read; the message names the file and the problem."""


@dataclass(frozen=True, slots=True)
class QubitFigures:
    index: int
    name: str
    t1_ns: float | None = None
    t2_ns: float | None = None
    gate_fidelity: float | None = None  # average single-qubit gate fidelity (RB)
    assignment_fidelity: float | None = None  # 1 - (P(0|1) + P(1|0)) / 2
    sx_ns: float = DEFAULT_1Q_NS
    x_ns: float = DEFAULT_1Q_NS
    measure_ns: float = DEFAULT_MEASURE_NS
    # Durations no calibration gave ("sx", "x", "measure"): the defaults above, assumed.
    assumed: frozenset[str] = frozenset({"sx", "x", "measure"})


@dataclass(frozen=True, slots=True)
class PairFigures:
    qubits: tuple[int, int]
    gate: str = "cz"  # the Qiskit name of the native two-qubit gate
    fidelity: float | None = None  # average two-qubit gate fidelity
    duration_ns: float = DEFAULT_2Q_NS
    name: str = ""  # as the calibration file names the pair
    duration_assumed: bool = True  # no calibration gave it: DEFAULT_2Q_NS


@dataclass(frozen=True, slots=True)
class DeviceFigures:
    """What a noise model needs from a calibration, in Qiskit's physical qubit order."""

    qubits: tuple[QubitFigures, ...]
    pairs: tuple[PairFigures, ...] = ()
    timestamp: str | None = None
    source: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def num_qubits(self) -> int:
        return max((q.index for q in self.qubits), default=-1) + 1

    def to_wire(self) -> dict[str, Any]:
        """The figures as a heartbeat's `calibration` map."""
        return {
            "timestamp": self.timestamp,
            "source": self.source,
            "qubits": {
                q.name: {
                    "index": q.index,
                    "t1_ns": q.t1_ns,
                    "t2_ns": q.t2_ns,
                    "gate_fidelity": q.gate_fidelity,
                    "assignment_fidelity": q.assignment_fidelity,
                    "gate_durations_ns": {"sx": q.sx_ns, "x": q.x_ns, "measure": q.measure_ns},
                    # Which of those are this project's defaults, not measured figures.
                    "assumed_durations": sorted(q.assumed),
                }
                for q in self.qubits
            },
            "pairs": {
                p.name or f"{p.qubits[0]}-{p.qubits[1]}": {
                    "qubits": list(p.qubits),
                    "gate": p.gate,
                    "fidelity": p.fidelity,
                    "duration_ns": p.duration_ns,
                    "duration_assumed": p.duration_assumed,
                }
                for p in self.pairs
            },
            **self.extra,
        }


def read_figures(path: str | os.PathLike[str]) -> DeviceFigures:
    """Read a calibration snapshot or a qibocal calibration.json."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise CalibrationFileError(f"cannot read calibration file {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise CalibrationFileError(f"calibration file {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CalibrationFileError(f"calibration file {path} must hold a JSON object")
    stamp = data.get("timestamp") or iso_utc(path.stat().st_mtime)
    try:
        if "single_qubits" in data:
            return _from_qibocal(data, str(path), stamp)
        if "qubits" in data:
            return _from_snapshot(data, str(path), stamp)
    except (TypeError, ValueError, KeyError) as exc:
        raise CalibrationFileError(f"calibration file {path} is malformed: {exc}") from exc
    raise CalibrationFileError(
        f"calibration file {path} has neither 'qubits' (a qpi-driver calibration snapshot) "
        "nor 'single_qubits' (a qibocal calibration.json)"
    )


def qibocal_qubit_figures(data: Mapping[str, Any]) -> dict[str, dict[str, float | None]]:
    """Per-qubit T1, T2, readout and gate figures of a qibocal calibration.json, by qubit name."""
    out: dict[str, dict[str, float | None]] = {}
    for name, entry in (data.get("single_qubits") or {}).items():
        readout = entry.get("readout") or {}
        fidelity = readout.get("fidelity")
        qubit = entry.get("qubit") or {}
        out[str(name)] = {
            "t1_ns": _mean(entry.get("t1")),
            "t2_ns": _mean(entry.get("t2")),
            "t2_echo_ns": _mean(entry.get("t2_spin_echo")),
            "readout_fidelity": fidelity,
            "assignment_fidelity": None if fidelity is None else (1 + float(fidelity)) / 2,
            "gate_fidelity": _mean(entry.get("rb_fidelity")),
            "frequency_01_hz": qubit.get("frequency_01"),
            "frequency_12_hz": qubit.get("frequency_12"),
        }
    return out


def qibocal_pair_figures(data: Mapping[str, Any]) -> dict[str, dict[str, float | None]]:
    """Two-qubit RB and CZ fidelities of a qibocal calibration.json, by "a-b" pair name."""
    out: dict[str, dict[str, float | None]] = {}
    for name, entry in (data.get("two_qubits") or {}).items():
        out[str(name)] = {
            "rb_fidelity": _mean(entry.get("rb_fidelity")),
            "cz_fidelity": _mean(entry.get("cz_fidelity")),
        }
    return out


def _from_qibocal(data: Mapping[str, Any], source: str, stamp: str) -> DeviceFigures:
    singles = qibocal_qubit_figures(data)
    index = {name: i for i, name in enumerate(singles)}
    qubits = tuple(
        QubitFigures(
            index=index[name],
            name=name,
            t1_ns=f["t1_ns"],
            t2_ns=f["t2_ns"],
            gate_fidelity=f["gate_fidelity"],
            assignment_fidelity=f["assignment_fidelity"],
        )
        for name, f in singles.items()
    )
    pairs = []
    for name, f in qibocal_pair_figures(data).items():
        a, _, b = name.partition("-")
        if a not in index or b not in index:
            raise ValueError(f"pair {name!r} names a qubit that single_qubits lacks")
        fidelity = f["cz_fidelity"] if f["cz_fidelity"] is not None else f["rb_fidelity"]
        pairs.append(PairFigures(qubits=(index[a], index[b]), fidelity=fidelity, name=name))
    return DeviceFigures(qubits, tuple(pairs), stamp, source)


def _from_snapshot(data: Mapping[str, Any], source: str, stamp: str) -> DeviceFigures:
    qubits = []
    for i, (name, q) in enumerate(data["qubits"].items()):
        durations = q.get("gate_durations_ns") or {}
        # A snapshot this project wrote says which durations were assumed; those stay so.
        assumed = {k for k in ("sx", "x", "measure") if not durations.get(k)}
        if not durations.get("x") and durations.get("sx"):
            assumed.discard("x")  # x takes sx's measured duration
        assumed |= {str(k) for k in q.get("assumed_durations") or ()}
        qubits.append(QubitFigures(
            index=int(q.get("index", i)),
            name=str(name),
            t1_ns=_number(q.get("t1_ns")),
            t2_ns=_number(q.get("t2_ns")),
            gate_fidelity=_number(q.get("gate_fidelity")),
            assignment_fidelity=_number(q.get("assignment_fidelity")),
            sx_ns=float(durations.get("sx") or DEFAULT_1Q_NS),
            x_ns=float(durations.get("x") or durations.get("sx") or DEFAULT_1Q_NS),
            measure_ns=float(durations.get("measure") or DEFAULT_MEASURE_NS),
            assumed=frozenset(assumed),
        ))
    pairs = []
    for pair_name, p in (data.get("pairs") or {}).items():
        natives = [n for n in p.get("natives", ["CZ"]) if n in TWO_QUBIT_GATES]
        gate = p.get("gate") or (TWO_QUBIT_GATES[natives[0]] if natives else "cz")
        a, b = p["qubits"]
        pairs.append(PairFigures(
            qubits=(int(a), int(b)),
            gate=str(gate),
            fidelity=_number(p.get("fidelity")),
            duration_ns=float(p.get("duration_ns") or DEFAULT_2Q_NS),
            name=str(pair_name),
            duration_assumed=not p.get("duration_ns") or bool(p.get("duration_assumed")),
        ))
    return DeviceFigures(tuple(qubits), tuple(pairs), stamp, source)


def _mean(measure: Any) -> float | None:
    """qibocal stores a measured figure as [mean, error]; older files as a bare number."""
    if measure is None:
        return None
    if isinstance(measure, list | tuple):
        return None if not measure or measure[0] is None else float(measure[0])
    return float(measure)


def _number(value: Any) -> float | None:
    return None if value is None else float(value)

