"""The calibration snapshot a qibolab platform reports upstream: what the platform's
parameters say (frequencies, thresholds, native pulses, topology) merged with what a
qibocal `calibration.json` measured (T1, T2, readout and gate fidelities).

The snapshot's shape is the format of `executors.calibration`, so a saved heartbeat
calibration can drive an Aer digital twin of this QPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from executors.base import iso_utc
from executors.calibration import (
    DEFAULT_1Q_NS,
    DEFAULT_MEASURE_NS,
    TWO_QUBIT_GATES,
    qibocal_pair_figures,
    qibocal_qubit_figures,
)

CALIBRATION_FILE = "calibration.json"  # qibocal's name, next to parameters.json
PARAMETERS_FILE = "parameters.json"


class CalibrationFiles:
    """The files a snapshot comes from, and which of them changed since the last look."""

    def __init__(self, parameters: Path | None, calibration: Path | None) -> None:
        self.parameters = parameters
        self.calibration = calibration
        self._seen = self._stamps()

    def _stamps(self) -> dict[str, tuple[int, int] | None]:
        return {"parameters": _stat(self.parameters), "calibration": _stat(self.calibration)}

    def changed(self) -> set[str]:
        """Which of "parameters" and "calibration" were written (or removed) since the
        last call."""
        now = self._stamps()
        out = {name for name, stamp in now.items() if stamp != self._seen[name]}
        self._seen = now
        return out

    def timestamp(self) -> float:
        """When the newest of the files was written (0 when none exists)."""
        stamps = [s[0] / 1e9 for s in self._stamps().values() if s is not None]
        return max(stamps, default=0.0)

    def read_calibration(self) -> dict[str, Any] | None:
        """The qibocal calibration.json, or None when there is none. Raises ValueError
        (with the file named) when it exists but cannot be read."""
        path = self.calibration
        if path is None or not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object")
        return data


def snapshot(platform: Any, files: CalibrationFiles, qibocal: dict[str, Any] | None,
             errors: list[str], loaded_at: float) -> dict[str, Any]:
    """The heartbeat `calibration` map: per qubit and per pair, platform figures and
    measured figures side by side. Units are in the key names. Its timestamp is when
    the newest file was written, or `loaded_at` for a platform without files."""
    configs = platform.parameters.configs
    measured = qibocal_qubit_figures(qibocal) if qibocal else {}
    measured_pairs = qibocal_pair_figures(qibocal) if qibocal else {}
    qubits: dict[str, Any] = {}
    for position, (name, qubit) in enumerate(platform.qubits.items()):
        natives = platform.natives.single_qubit.get(name)
        entry: dict[str, Any] = {"index": position}
        entry["drive_frequency_hz"] = _field(configs.get(qubit.drive), "frequency")
        entry["readout_frequency_hz"] = _field(configs.get(qubit.probe), "frequency")
        acquisition = configs.get(qubit.acquisition)
        entry["threshold"] = _field(acquisition, "threshold")
        entry["iq_angle"] = _field(acquisition, "iq_angle")
        pulses = _pulses(natives) if natives is not None else {}
        entry["pulses"] = pulses
        rotation = pulses.get("RX90") or pulses.get("RX") or {}
        entry["gate_durations_ns"] = {
            "sx": rotation.get("duration_ns", DEFAULT_1Q_NS),
            "x": rotation.get("duration_ns", DEFAULT_1Q_NS),
            "measure": pulses.get("MZ", {}).get("duration_ns", DEFAULT_MEASURE_NS),
        }
        # The platform's pulses give the durations; where it has none, they are defaults.
        entry["assumed_durations"] = sorted(
            ({"sx", "x"} if "duration_ns" not in rotation else set())
            | ({"measure"} if "duration_ns" not in pulses.get("MZ", {}) else set()))
        for key, value in measured.get(str(name), {}).items():
            entry[key] = value
        qubits[str(name)] = entry
    index = {name: i for i, name in enumerate(platform.qubits)}
    pairs: dict[str, Any] = {}
    for (a, b), gates in platform.natives.two_qubit.items():
        key = f"{a}-{b}"
        names = [n for n in TWO_QUBIT_GATES if getattr(gates, n, None) is not None]
        if not names or a not in index or b not in index:
            continue
        first = getattr(gates, names[0])
        entry = {
            "qubits": [index[a], index[b]],
            "natives": names,
            "gate": TWO_QUBIT_GATES[names[0]],
            "duration_ns": float(first.duration),
        }
        figures = measured_pairs.get(key) or measured_pairs.get(f"{b}-{a}") or {}
        entry.update(figures)
        fidelity = figures.get("cz_fidelity") if names[0] == "CZ" else None
        entry["fidelity"] = fidelity if fidelity is not None else figures.get("rb_fidelity")
        pairs[key] = entry
    stamp = files.timestamp()
    out: dict[str, Any] = {
        "timestamp": iso_utc(stamp or loaded_at),
        "platform": platform.name,
        "qubits": qubits,
        "pairs": pairs,
        "topology": [list(map(index.get, pair)) for pair in platform.ordered_pairs],
        "sources": {
            "parameters": str(files.parameters) if files.parameters else None,
            "calibration": str(files.calibration) if qibocal is not None else None,
        },
    }
    if errors:
        out["errors"] = list(errors)
    return out


def gate_errors(snap: dict[str, Any]) -> dict[tuple[str, tuple[int, ...]], float]:
    """Measured error rates per (Qiskit gate, physical qubits), for the transpiler's layout."""
    out: dict[tuple[str, tuple[int, ...]], float] = {}
    for q in snap.get("qubits", {}).values():
        i = int(q["index"])
        if q.get("gate_fidelity") is not None:
            out[("sx", (i,))] = out[("x", (i,))] = max(0.0, 1 - float(q["gate_fidelity"]))
        if q.get("assignment_fidelity") is not None:
            out[("measure", (i,))] = max(0.0, 1 - float(q["assignment_fidelity"]))
    for p in snap.get("pairs", {}).values():
        if p.get("fidelity") is not None:
            a, b = p["qubits"]
            error = max(0.0, 1 - float(p["fidelity"]))
            out[(p["gate"], (a, b))] = out[(p["gate"], (b, a))] = error
    return out


def _pulses(natives: Any) -> dict[str, Any]:
    """Each native's pulses, summarised: duration, amplitude, envelope, channel."""
    out: dict[str, Any] = {}
    for name in ("RX", "RX90", "RX12", "MZ"):
        sequence = getattr(natives, name, None)
        if sequence is None:
            continue
        described = []
        for channel, pulse in sequence:
            item: dict[str, Any] = {"channel": str(channel), "kind": pulse.kind}
            probe = getattr(pulse, "probe", None) or pulse  # a readout wraps its probe pulse
            for attr in ("amplitude", "relative_phase"):
                if hasattr(probe, attr):
                    item[attr] = float(getattr(probe, attr))
            envelope = getattr(probe, "envelope", None)
            if envelope is not None:
                item["envelope"] = envelope.model_dump(mode="json")
            item["duration_ns"] = float(pulse.duration)
            described.append(item)
        out[name] = {"duration_ns": float(sequence.duration), "pulses": described}
    return out


def _field(config: Any, name: str) -> float | None:
    value = getattr(config, name, None) if config is not None else None
    return None if value is None else float(value)


def _stat(path: Path | None) -> tuple[int, int] | None:
    if path is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)

