"""Job payloads as `qpi-client` sends them: OpenQASM 3 from `qiskit.qasm3.dumps`, a
different text for every job, parameter sweeps bound row by row. Shared by the benches.

    python -m bench.traffic      # describe each shape; check it against qpi-client if installed
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from qiskit import QuantumCircuit, qasm3
from qiskit.circuit import Parameter
from qiskit.circuit.library import efficient_su2
from qiskit.synthesis.qft import synth_qft_full

SHOTS = 1024
IDENTICAL_SEED = 0  # every job of an identical-text run is built from this seed

Bindings = Sequence[Mapping[Parameter, float]]


def qpi_client_payload(circuits: Sequence[QuantumCircuit], shots: int = SHOTS,
                       parameter_values: Bindings | None = None) -> dict[str, Any]:
    """The body `QPIBackend.run(circuits, shots=..., parameter_values=[{param: value}, ...])`
    posts: each bound circuit dumped as its own OpenQASM 3 text, the values it was bound
    with sent beside it (qpi_client/provider.py and client.py, mirrored line for line)."""
    entries: list[dict[str, Any]] = []
    for index, qc in enumerate(circuits):
        if parameter_values and index < len(parameter_values) and parameter_values[index]:
            row = parameter_values[index]
            entries.append({
                "circuit": qasm3.dumps(qc.assign_parameters(dict(row))),
                "parameter_values": [[float(row[p]) for p in qc.parameters]],
            })
        else:
            entries.append({"circuit": qasm3.dumps(qc)})
    return {"circuits": entries, "shots": shots, "meas_level": 2, "meas_return": "single"}


# -- circuits: each a function of a seed, so every job is different but costs the same ----


@cache
def _qft12() -> QuantumCircuit:
    return synth_qft_full(12)


def qft12(seed: int) -> QuantumCircuit:
    """QFT on 12 qubits (Qiskit's synthesis: H, CP, SWAP) of a random product state:
    one ry layer whose angles come from the seed, then the QFT and a full measurement."""
    rng = random.Random(seed)
    qc = QuantumCircuit(12, name="qft12")
    for q in range(12):
        qc.ry(rng.uniform(0, math.pi), q)
    qc.compose(_qft12(), inplace=True)
    qc.measure_all()
    return qc


def random20(seed: int, layers: int = 8) -> QuantumCircuit:
    """20 qubits, 8 layers of a random U on every qubit and CX on a random pairing
    (240 gates, 260 instructions with the measurements), fresh from each seed."""
    rng = random.Random(seed)
    qc = QuantumCircuit(20, name="random20")
    for _ in range(layers):
        for q in range(20):
            qc.u(rng.uniform(0, 2 * math.pi), rng.uniform(0, 2 * math.pi),
                 rng.uniform(0, 2 * math.pi), q)
        order = list(range(20))
        rng.shuffle(order)
        for i in range(0, 20, 2):
            qc.cx(order[i], order[i + 1])
    qc.measure_all()
    return qc


def bell(seed: int) -> QuantumCircuit:
    """A Bell pair with a phase of the job's own before measurement (a phase sweep's
    shape): the counts are a Bell pair's whatever the angle."""
    qc = QuantumCircuit(2, name="bell")
    qc.h(0)
    qc.cx(0, 1)
    qc.rz(random.Random(seed).uniform(0, 2 * math.pi), 1)
    qc.measure_all()
    return qc


@cache
def _ansatz(qubits: int) -> QuantumCircuit:
    qc = efficient_su2(qubits, reps=2)
    qc.measure_all()
    return qc


def sweep(seed: int, rows: int, qubits: int = 8) -> tuple[list[QuantumCircuit], Bindings]:
    """A variational sweep: EfficientSU2 (`qubits`, 2 reps) with `rows` random bindings,
    one circuit per row as `backend.run([ansatz] * rows, parameter_values=[...])` takes it."""
    ansatz = _ansatz(qubits)
    rng = random.Random(seed)
    bindings = [{p: rng.uniform(-math.pi, math.pi) for p in ansatz.parameters}
                for _ in range(rows)]
    return [ansatz] * rows, bindings


# -- shapes: what a bench case submits ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Shape:
    """One kind of job: `name` for tables, `summary` for headers, `payload(seed)` the body."""

    name: str
    summary: str
    payload: Callable[[int], dict[str, Any]]

    def jobs(self, seeds: Iterator[int], n: int, distinct: bool = True) -> list[dict[str, Any]]:
        """`n` payloads: one per seed drawn from `seeds`, or `n` copies of the identical
        text (built once, as a client resending one circuit would)."""
        if not distinct:
            one = self.payload(IDENTICAL_SEED)
            return [one] * n
        return [self.payload(seed) for seed in itertools.islice(seeds, n)]


def one_circuit(build: Callable[[int], QuantumCircuit],
                shots: int) -> Callable[[int], dict[str, Any]]:
    """A payload maker for jobs of one circuit, built from the seed."""
    return lambda seed: qpi_client_payload([build(seed)], shots)


def sweep_shape(rows: int = 16, qubits: int = 8, shots: int = SHOTS) -> Shape:
    def payload(seed: int) -> dict[str, Any]:
        circuits, bindings = sweep(seed, rows, qubits)
        return qpi_client_payload(circuits, shots, bindings)

    return Shape(f"sweep {rows}x",
                 f"EfficientSU2 on {qubits} qubits, {rows} bound rows per job", payload)


def shapes(shots: int = SHOTS, sweep_rows: int = 16) -> dict[str, Shape]:
    """Every shape the benches use, by name."""
    return {
        "QFT-12": Shape("QFT-12", "QFT on 12 qubits after a random ry layer",
                        one_circuit(qft12, shots)),
        "random-20": Shape("random-20", "20 qubits x 260 instructions of random U and CX",
                           one_circuit(random20, shots)),
        "Bell": Shape("Bell", "Bell pair with a job-specific rz", one_circuit(bell, shots)),
        "sweep": sweep_shape(sweep_rows, shots=shots),
    }


def pick(names: str, shots: int = SHOTS, sweep_rows: int = 16) -> dict[str, Shape]:
    """The shapes named in a comma-separated list (a bench's --cases), by name."""
    every = shapes(shots, sweep_rows)
    keys = [k.strip() for k in names.split(",") if k.strip()]
    unknown = [k for k in keys if k not in every]
    if unknown or not keys:
        raise SystemExit(f"unknown or no case(s) in {names!r}; choose from {', '.join(every)}")
    return {k: every[k] for k in keys}


def texts(payload: Mapping[str, Any]) -> list[str]:
    """The OpenQASM texts of one payload, in order."""
    return [entry["circuit"] for entry in payload["circuits"]]


# -- self-check ---------------------------------------------------------------------------


class _RecordingClient:
    """Enough of `qpi_client.QPIClient` for `QPIBackend.run` to hand over its job body."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    def get_qpu(self, name: str) -> dict[str, Any]:
        return {"name": name, "num_qubits": 30}

    def submit_job(self, circuits: list[dict[str, Any]], shots: int = 1024, meas_level: int = 2,
                   meas_return: str = "single", qpu_target: str = "") -> str:
        body: dict[str, Any] = {"circuits": circuits, "shots": shots, "meas_level": meas_level,
                                "meas_return": meas_return}
        if qpu_target:
            body["qpu_target"] = qpu_target
        self.bodies.append(body)
        return f"job-{len(self.bodies)}"


def check_against_qpi_client(shots: int = SHOTS) -> str:
    """Build one job of each kind through qpi-client itself and compare the bodies."""
    try:
        from qpi_client.provider import QPIBackend
    except ImportError:
        return "qpi-client not installed: payload form not cross-checked"
    client = _RecordingClient()
    backend = QPIBackend(client)
    backend.run(qft12(1), shots=shots)
    backend.run(bell(1), shots=shots)
    circuits, bindings = sweep(1, 4)
    backend.run(circuits, shots=shots, parameter_values=list(bindings))
    ours = [qpi_client_payload([qft12(1)], shots), qpi_client_payload([bell(1)], shots),
            qpi_client_payload(circuits, shots, bindings)]
    for name, theirs, mine in zip(("QFT-12", "Bell", "sweep"), client.bodies, ours, strict=True):
        if theirs != mine:
            raise SystemExit(f"bench.traffic builds {name} jobs unlike qpi-client does; "
                             "compare qpi_client/provider.py run() with qpi_client_payload()")
    return "payloads identical to what qpi-client's QPIBackend.run submits"


def main() -> None:
    seeds = itertools.count(1)
    print(f"{'shape':<11} {'circuits':>8} {'qubits':>6} {'instr':>6} {'bytes':>7} "
          f"{'distinct/5':>10}  summary")
    for shape in shapes().values():
        jobs = shape.jobs(seeds, 5)
        first = texts(jobs[0])
        distinct = len({tuple(texts(job)) for job in jobs})
        same = len({tuple(texts(job)) for job in shape.jobs(seeds, 5, distinct=False)})
        if same != 1:
            raise SystemExit(f"{shape.name}: identical-text jobs came out different")
        circuit = qasm3.loads(first[0])
        print(f"{shape.name:<11} {len(first):>8} {circuit.num_qubits:>6} {circuit.size():>6} "
              f"{len(first[0]):>7} {distinct:>10}  {shape.summary}")
    print(check_against_qpi_client())


if __name__ == "__main__":
    main()
