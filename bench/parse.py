"""OpenQASM 3 import time per circuit of the differential corpus (what qiskit.qasm3.dumps
emits for the circuits the tests and benchmarks use): the fast path of
executors.circuits (native importer where it is trusted) against the full importer
alone, with the path each circuit took. Prints medians; asserts nothing.

    python -m bench.parse [--repeat 15] [--only NAME]
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qiskit import ClassicalRegister, QuantumCircuit, QuantumRegister, qasm2, qasm3  # noqa: E402
from qiskit.circuit import Parameter  # noqa: E402
from qiskit.circuit.library import (  # noqa: E402
    QFTGate,
    U1Gate,
    U2Gate,
    U3Gate,
    efficient_su2,
    quantum_volume,
)
from qiskit.synthesis.qft import synth_qft_full  # noqa: E402
from qiskit.transpiler import CouplingMap  # noqa: E402

from executors.circuits import ImportPath, parse_qasm_traced  # noqa: E402
from tests.circuits import BELL, REGISTERS, SWEEP_QASM3, teleport  # noqa: E402

BASIS = ["rz", "sx", "x", "cx"]


@dataclass(frozen=True)
class CorpusCircuit:
    """One OpenQASM 3 text and the path executors.circuits is expected to take for it."""

    name: str
    text: str
    expect: ImportPath


def ghz(n: int) -> QuantumCircuit:
    qc = QuantumCircuit(n)
    qc.h(0)
    for q in range(n - 1):
        qc.cx(q, q + 1)
    qc.measure_all()
    return qc


def qft(n: int) -> QuantumCircuit:
    """QFT as bench.throughput runs it: synthesised to cp/h/swap, measured."""
    qc = synth_qft_full(n)
    qc.measure_all()
    return qc


def ry_then_qft(n: int, seed: int) -> QuantumCircuit:
    """QFT of a random product state, as bench.traffic's QFT-12 jobs are."""
    rng = random.Random(seed)
    qc = QuantumCircuit(n)
    for q in range(n):
        qc.ry(rng.uniform(0, math.pi), q)
    qc.compose(synth_qft_full(n), inplace=True)
    qc.measure_all()
    return qc


def bell_with_phase(angle: float) -> QuantumCircuit:
    qc = QuantumCircuit(2)
    qc.h(0)
    qc.cx(0, 1)
    qc.rz(angle, 1)
    qc.measure_all()
    return qc


def random_layers(qubits: int, layers: int, seed: int, style: str) -> QuantumCircuit:
    """Random single-qubit layers (u3, U as QuantumCircuit.u writes it, or rz-sx-rz)
    between random CX pairings."""
    rng = random.Random(seed)
    qc = QuantumCircuit(qubits, qubits)
    for _ in range(layers):
        for q in range(qubits):
            a, b, c = (rng.uniform(0, 2 * math.pi) for _ in range(3))
            if style == "u3":
                qc.append(U3Gate(a, b, c), [q])
            elif style == "U":
                qc.u(a, b, c, q)
            else:
                qc.rz(a, q)
                qc.sx(q)
                qc.rz(b, q)
        order = list(range(qubits))
        rng.shuffle(order)
        for i in range(0, qubits - 1, 2):
            qc.cx(order[i], order[i + 1])
    qc.measure(range(qubits), range(qubits))
    return qc


def several_registers() -> QuantumCircuit:
    """Registers of sizes 1, 3 and 2, bits measured out of order, mid-circuit."""
    a, b = QuantumRegister(1, "a"), QuantumRegister(3, "b")
    c, d, e = ClassicalRegister(2, "c"), ClassicalRegister(4, "d"), ClassicalRegister(1, "e")
    qc = QuantumCircuit(b, a, d, c, e)
    qc.h(a[0])
    qc.cx(a[0], b[2])
    qc.measure(b[2], d[3])
    qc.ccx(a[0], b[2], b[0])
    qc.cswap(b[0], b[1], a[0])
    qc.measure(a[0], c[1])
    qc.measure(b[0], e[0])
    qc.measure(b[1], d[0])
    return qc


def every_standard_gate() -> QuantumCircuit:
    """Each stdgates.inc gate Qiskit writes by name, with angles of every form dumps writes
    (pi multiples and fractions, 1/(n*pi), plain floats, negatives, tiny and huge)."""
    qc = QuantumCircuit(3, 3)
    angles = [math.pi, -math.pi, 2 * math.pi, math.pi / 2, -3 * math.pi / 4,
              7 * math.pi / 8, 1 / (2 * math.pi), -5 / (3 * math.pi), 0.123456789,
              -2.5e-7, 1.234e-5, 3.0e17, 99 * math.pi / 97]
    for i, angle in enumerate(angles):
        q = i % 3
        qc.rz(angle, q)
        qc.rx(angle, q)
        qc.ry(-angle, q)
        qc.p(angle, q)
        qc.append(U3Gate(angle, 0.5, -angle), [q])
        qc.u(-angle, angle, 0.25, q)
    qc.x(0)
    qc.y(1)
    qc.z(2)
    qc.h(0)
    qc.s(1)
    qc.sdg(2)
    qc.t(0)
    qc.tdg(1)
    qc.sx(2)
    qc.id(0)
    qc.append(U1Gate(0.5), [1])
    qc.append(U2Gate(math.pi / 2, -0.5), [2])
    qc.cx(0, 1)
    qc.cy(1, 2)
    qc.cz(2, 0)
    qc.cp(math.pi / 3, 0, 1)
    qc.crx(math.pi / 5, 1, 2)
    qc.cry(-math.pi / 7, 2, 0)
    qc.crz(0.75, 0, 2)
    qc.ch(1, 0)
    qc.swap(0, 2)
    qc.ccx(0, 1, 2)
    qc.cswap(2, 1, 0)
    qc.cu(math.pi / 2, math.pi / 4, -math.pi / 8, 0.3, 0, 1)
    qc.barrier()
    qc.barrier([0, 2])
    qc.measure([0, 1, 2], [2, 0, 1])
    return qc


def control_flow() -> list[tuple[str, QuantumCircuit]]:
    out = []
    qc = QuantumCircuit(2, 2)
    qc.h(0)
    qc.measure(0, 0)
    with qc.if_test((qc.clbits[0], 1)) as otherwise:
        qc.x(1)
    with otherwise:
        qc.h(1)
    qc.measure(1, 1)
    out.append(("if/else", qc))
    qc = QuantumCircuit(2, 1)
    with qc.for_loop(range(3)):
        qc.rx(math.pi / 4, 0)
        qc.cx(0, 1)
    qc.measure(1, 0)
    out.append(("for loop", qc))
    qc = QuantumCircuit(1, 1)
    qc.h(0)
    qc.measure(0, 0)
    with qc.while_loop((qc.clbits[0], 1)):
        qc.h(0)
        qc.measure(0, 0)
    out.append(("while loop", qc))
    return out


def parametrised() -> QuantumCircuit:
    theta, phi = Parameter("theta"), Parameter("phi")
    qc = QuantumCircuit(2, 2)
    qc.rx(theta, 0)
    qc.rz(2 * phi + math.pi / 2, 1)
    qc.cx(0, 1)
    qc.ry(theta - phi, 0)
    qc.measure([0, 1], [0, 1])
    return qc


def custom_gates() -> QuantumCircuit:
    sub = QuantumCircuit(2, name="entangle")
    sub.h(0)
    sub.cx(0, 1)
    alpha = Parameter("alpha")
    rot = QuantumCircuit(1, name="twist")
    rot.rz(alpha, 0)
    rot.sx(0)
    qc = QuantumCircuit(3, 3)
    qc.append(sub.to_gate(), [0, 1])
    qc.append(sub.to_gate(), [1, 2])
    qc.append(rot.assign_parameters({alpha: math.pi / 3}).to_gate(), [2])
    qc.append(rot.to_gate(), [0])  # left parametrised: an `input` and a gate with a parameter
    qc.measure([0, 1, 2], [0, 1, 2])
    return qc


def mid_circuit_reset() -> QuantumCircuit:
    qc = QuantumCircuit(2, 3)
    qc.x(0)
    qc.measure(0, 0)
    qc.reset(0)
    qc.h(1)
    qc.cx(1, 0)
    qc.measure(0, 1)
    qc.measure(1, 2)
    return qc


def corpus() -> list[CorpusCircuit]:
    """Everything the differential test holds the two paths to, in a fixed order."""
    out: list[CorpusCircuit] = []

    def add(name: str, circuit: QuantumCircuit | str, expect: ImportPath) -> None:
        text = circuit if isinstance(circuit, str) else qasm3.dumps(circuit)
        out.append(CorpusCircuit(name, text, expect))

    def from_qasm2(text: str) -> QuantumCircuit:
        return qasm2.loads(text, custom_instructions=qasm2.LEGACY_CUSTOM_INSTRUCTIONS)

    add("examples/bell.qasm", (ROOT / "examples/bell.qasm").read_text(), "native")
    add("examples/bell2.qasm via dumps", from_qasm2(BELL), "native")
    add("examples/ghz.qasm via dumps", from_qasm2((ROOT / "examples/ghz.qasm").read_text()),
        "native")
    add("tests REGISTERS via dumps", from_qasm2(REGISTERS), "native")
    add("tests SWEEP_QASM3 (input float)", SWEEP_QASM3, "full")
    add("teleport (if)", teleport(0.3), "full")
    add("GHZ-5", ghz(5), "native")
    add("GHZ-20", ghz(20), "native")
    add("QFT-12", qft(12), "native")
    add("random-20 u3/cx", random_layers(20, 13, 7, "u3"), "native")
    add("random-20 U/cx", random_layers(20, 8, 13, "U"), "native")
    add("random-20 rz/sx/cx", random_layers(20, 5, 11, "rz"), "native")
    add("QFT-12 after an ry layer", ry_then_qft(12, 3), "native")
    add("Bell with an rz", bell_with_phase(1.234), "native")
    for level in range(4):
        # From O2 the layout stage places the QFT on hardware qubits ($n).
        add(f"QFT-6 transpiled O{level}", _transpile(qft(6), optimization_level=level),
            "native")
        add(f"GHZ-5 transpiled O{level}", _transpile(ghz(5), optimization_level=level),
            "native")
    add("random-8 transpiled O3", _transpile(random_layers(8, 4, 3, "u3"),
                                             optimization_level=3), "native")
    add("GHZ-5 transpiled to a line ($n)",
        _transpile(ghz(5), optimization_level=1, coupling_map=CouplingMap.from_line(6)),
        "native")
    lib = QuantumCircuit(5)
    lib.append(QFTGate(5), range(5))
    lib.measure_all()
    add("QFTGate(5)", lib, "full")
    add("QFTGate(5) decomposed", lib.decompose(), "native")
    add("quantum_volume(4)", _measured(quantum_volume(4, seed=5)), "full")
    add("quantum_volume(4) transpiled", _transpile(_measured(quantum_volume(4, seed=5)),
                                                   optimization_level=1), "native")
    sweep = _measured(efficient_su2(8, reps=2))
    rng = random.Random(9)
    add("efficient_su2(8, reps=2) bound, as a sweep row",
        sweep.assign_parameters([rng.uniform(-math.pi, math.pi) for _ in sweep.parameters]),
        "native")
    su2 = _measured(efficient_su2(4, reps=1))
    add("efficient_su2(4) unbound", su2, "full")
    rng = random.Random(5)
    bound = su2.assign_parameters([rng.uniform(-math.pi, math.pi) for _ in su2.parameters])
    add("efficient_su2(4) bound", bound, "native")
    grid = [k * math.pi / 4 for k in range(len(su2.parameters))]
    add("efficient_su2(4) bound, pi/4 grid with 0", su2.assign_parameters(grid), "full")
    add("efficient_su2(4) bound, pi/4 grid", su2.assign_parameters([g + math.pi / 8
                                                                    for g in grid]), "native")
    for name, circuit in control_flow():
        add(name, circuit, "full")
    add("input parameters", parametrised(), "full")
    add("custom gate definitions", custom_gates(), "full")
    add("registers of several sizes", several_registers(), "native")
    add("mid-circuit measurement and reset", mid_circuit_reset(), "full")
    add("every standard gate", every_standard_gate(), "native")
    return out


def _measured(circuit: QuantumCircuit) -> QuantumCircuit:
    circuit = circuit.copy()
    circuit.measure_all()
    return circuit


def _transpile(circuit: QuantumCircuit, **options: object) -> QuantumCircuit:
    from qiskit import transpile

    return transpile(circuit, basis_gates=BASIS, seed_transpiler=1, **options)


def median_ms(parse: Callable[[str], object], text: str, repeat: int) -> float:
    """Median time of `parse` over `repeat` distinct texts (a comment of their own each),
    so the parse cache never answers, as with real traffic."""
    times = []
    for n in range(repeat):
        unique = f"{text}// parse {n} {time.perf_counter_ns()}\n"
        started = time.perf_counter()
        parse(unique)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def main(args: argparse.Namespace) -> None:
    warnings.simplefilter("ignore", DeprecationWarning)
    cases = [c for c in corpus() if args.only is None or args.only.lower() in c.name.lower()]
    print(f"# medians of {args.repeat} parses of distinct texts each, in ms; fast = "
          "executors.circuits.parse_qasm, full = qiskit.qasm3.loads alone")
    print(f"{'circuit':<44} {'ops':>5} {'path':>7} {'fast':>9} {'full':>9} {'speed-up':>9}")
    native = 0
    for case in cases:
        circuit, path = parse_qasm_traced(case.text)
        native += path == "native"
        fast_ms = median_ms(parse_qasm_traced, case.text, args.repeat)
        full_ms = median_ms(qasm3.loads, case.text, args.repeat)
        print(f"{case.name:<44} {circuit.size():>5} {path:>7} {fast_ms:>9.3f} {full_ms:>9.3f} "
              f"{full_ms / fast_ms:>8.1f}x")
    print(f"\n{native} of {len(cases)} corpus circuits take the native path")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--only", help="only circuits whose name contains this")
    main(parser.parse_args())
