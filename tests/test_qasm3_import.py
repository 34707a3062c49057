"""The fast OpenQASM 3 path (Qiskit's native importer where it is trusted) against the
full importer: over a corpus of what qiskit.qasm3.dumps emits, random circuits and
invalid programs, every circuit must come out identical to qasm3.loads's, every error
with today's message, line and column, and nothing the native importer prints may
reach the process's output."""

from __future__ import annotations

import math
import os
import re
import warnings
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qiskit import ClassicalRegister, QuantumCircuit, QuantumRegister, qasm3
from qiskit.circuit import Barrier, Gate, Parameter, ParameterExpression, Qubit
from qiskit.circuit.library import UGate
from qiskit.circuit.tools import pi_check
from qiskit.exceptions import ExperimentalWarning
from qiskit.quantum_info import Operator

from bench.parse import CorpusCircuit, corpus
from driver import payload
from executors.aer import AerExecutor
from executors.base import Experiment, Job
from executors.circuits import (
    CircuitError,
    _parse_cached,
    native_text,
    parse_qasm,
    parse_qasm_traced,
)
from frontends.qpi.orchestrator import LocalOrchestrator
from tests.conftest import Daemon, run_job


@pytest.fixture(autouse=True)
def uncached() -> None:
    """Parse afresh: a text another test parsed would otherwise come from the cache
    (tests here replace the native importer and must see it called)."""
    _parse_cached.cache_clear()

HEADER = 'OPENQASM 3.0;\ninclude "stdgates.inc";\n'
CORPUS = corpus()


def loop_free(name: str) -> str:
    """The full importer numbers loop variables from a counter of its own."""
    return re.sub(r"_loop_i_\d+", "_loop_i", name)


def exact(value: Any) -> Any:
    """A parameter as a comparable value that tells 0 from 0.0 and floats bit for bit."""
    if isinstance(value, bool | int):
        return ("int", value)
    if isinstance(value, float):
        return ("float", value.hex())
    if isinstance(value, ParameterExpression):
        names = sorted(loop_free(p.name) for p in value.parameters)
        return ("expression", loop_free(str(value)), names)
    if isinstance(value, QuantumCircuit):
        return ("block", describe(value))
    return (type(value).__name__, repr(value))


def describe(circuit: QuantumCircuit) -> dict[str, Any]:
    """Everything of a circuit a job's result can depend on, in a form == compares."""

    def where(bit: Any) -> Any:
        location = circuit.find_bit(bit)
        return location.index, [(register.name, index) for register, index in location.registers]

    layout = circuit.layout
    return {
        "name": re.sub(r"\d+", "N", circuit.name),
        "global_phase": exact(circuit.global_phase),
        "metadata": circuit.metadata,
        "qregs": [(register.name, register.size) for register in circuit.qregs],
        "cregs": [(register.name, register.size) for register in circuit.cregs],
        "qubits": [where(bit) for bit in circuit.qubits],
        "clbits": [where(bit) for bit in circuit.clbits],
        "parameters": [loop_free(parameter.name) for parameter in circuit.parameters],
        "vars": (circuit.num_input_vars, circuit.num_captured_vars, circuit.num_declared_vars),
        "layout": None if layout is None else (
            sorted((physical, circuit.find_bit(bit).index)
                   for physical, bit in layout.initial_layout.get_physical_bits().items()),
            sorted((circuit.find_bit(bit).index, index)
                   for bit, index in layout.input_qubit_mapping.items()),
            layout.final_layout,
        ),
        "data": [
            (
                type(instruction.operation).__name__,
                instruction.operation.name,
                instruction.operation.num_qubits,
                instruction.operation.num_clbits,
                [exact(param) for param in instruction.operation.params],
                [circuit.find_bit(bit).index for bit in instruction.qubits],
                [circuit.find_bit(bit).index for bit in instruction.clbits],
                getattr(instruction.operation, "label", None),
            )
            for instruction in circuit.data
        ],
    }


def assert_identical(fast: QuantumCircuit, full: QuantumCircuit) -> None:
    assert re.fullmatch(r"circuit-\d+(-\d+)?", fast.name), fast.name  # QuantumCircuit's default
    assert describe(fast) == describe(full)
    if fast.parameters:  # two imports make Parameters of equal name but their own uuid
        return
    assert fast == full
    unitary = fast.remove_final_measurements(inplace=False)
    if unitary.num_qubits <= 6 and all(
        isinstance(i.operation, Gate | Barrier) for i in unitary.data
    ):
        assert Operator(unitary) == Operator(full.remove_final_measurements(inplace=False))


def both_ways(text: str) -> tuple[QuantumCircuit, str, QuantumCircuit]:
    """The fast path's circuit and path, beside what the full importer alone builds."""
    circuit, path = parse_qasm_traced(text)
    return circuit, path, qasm3.loads(text)


# -- the corpus ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", CORPUS, ids=[case.name for case in CORPUS])
def test_the_fast_path_builds_what_the_full_importer_builds(case: CorpusCircuit) -> None:
    fast, path, full = both_ways(case.text)
    assert_identical(fast, full)
    # The expected path is part of the contract: a corpus circuit that silently stops
    # taking the native path loses the speed the daemon is sized for.
    assert path == case.expect


def test_most_of_what_the_benchmarks_send_takes_the_native_path() -> None:
    native = [case.name for case in CORPUS if parse_qasm_traced(case.text).path == "native"]
    for name in ("QFT-12", "random-20 u3/cx", "random-20 U/cx", "random-20 rz/sx/cx",
                 "examples/bell.qasm", "efficient_su2(4) bound"):
        assert name in native
    assert len(native) >= len(CORPUS) // 2


def test_every_constant_dumps_writes_for_an_angle_is_the_full_importers_float() -> None:
    # pi_check (what dumps uses) writes n*pi/d and n/(d*pi) for n, d up to 99; the full
    # importer evaluates them in Python, left to right, and the native path must get the
    # very same float out of its rewrite. Every multiple of pi (where the order of * and /
    # tells in the last bit), a sample of the divisions (one order only), and of the
    # negatives (negation is exact), to keep the full importer's share of this short.
    multiples: set[str] = set()
    divisions: set[str] = set()
    for d in range(1, 100):
        for n in range(1, 100):
            if math.gcd(n, d) == 1:
                multiples.add(pi_check(n * math.pi / d, output="qasm"))
                divisions.add(pi_check(n / (d * math.pi), output="qasm"))
    multiples = {form for form in multiples if "pi" in form}
    divisions = {form for form in divisions if "pi" in form}
    assert {"pi", "2*pi", "pi/2", "3*pi/4", "99*pi/97"} <= multiples
    assert {"1/(2*pi)", "5/(3*pi)"} <= divisions
    ordered = sorted(multiples) + sorted(divisions)[::7]
    ordered += ["-" + form for form in ordered[::25]]
    lines = [f"cu({', '.join(ordered[i:i + 4])}) q[0], q[1];"
             for i in range(0, len(ordered) - 3, 4)]
    text = HEADER + "qubit[2] q;\n" + "\n".join(lines) + "\n"
    fast, path, full = both_ways(text)
    assert path == "native"
    assert describe(fast) == describe(full)


# -- random circuits -------------------------------------------------------------------------

ONE_QUBIT = ["x", "y", "z", "h", "s", "sdg", "t", "tdg", "sx", "id"]
ROTATIONS = ["rx", "ry", "rz", "p"]
TWO_QUBIT = ["cx", "cy", "cz", "ch", "swap"]
CONTROLLED_ROTATIONS = ["crx", "cry", "crz", "cp"]

angles = st.one_of(
    st.floats(-10, 10, allow_nan=False),
    st.builds(lambda n, d, sign: sign * n * math.pi / d, st.integers(1, 99),
              st.integers(1, 99), st.sampled_from([1, -1])),
    st.builds(lambda n, d: n / (d * math.pi), st.integers(1, 99), st.integers(1, 99)),
    st.sampled_from([0.0, 1e-5, -2.5e-7, 3e17, math.pi, 2 * math.pi]),
)


@st.composite
def random_circuits(draw: st.DrawFn) -> QuantumCircuit:
    sizes = draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
    bits = draw(st.lists(st.integers(1, 3), max_size=2))
    qregs = [QuantumRegister(n, f"q{i}") for i, n in enumerate(sizes)]
    cregs = [ClassicalRegister(n, f"c{i}") for i, n in enumerate(bits)]
    qc = QuantumCircuit(*qregs, *cregs)
    qubits = st.integers(0, qc.num_qubits - 1)
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.integers(0, 6 if qc.num_qubits > 2 else 4))
        if kind == 0:
            qc.append(_gate(draw(st.sampled_from(ONE_QUBIT))), [draw(qubits)])
        elif kind == 1:
            getattr(qc, draw(st.sampled_from(ROTATIONS)))(draw(angles), draw(qubits))
        elif kind == 2:
            qc.append(UGate(draw(angles), draw(angles), draw(angles)), [draw(qubits)])
        elif kind == 3 and qc.num_clbits:
            qc.measure(draw(qubits), draw(st.integers(0, qc.num_clbits - 1)))
        elif kind == 4:
            qc.barrier(*draw(st.sets(qubits, min_size=1)))
        elif kind in (5, 6) and qc.num_qubits >= 2:
            a, b = draw(st.lists(qubits, min_size=2, max_size=2, unique=True))
            if kind == 5:
                getattr(qc, draw(st.sampled_from(TWO_QUBIT)))(a, b)
            else:
                getattr(qc, draw(st.sampled_from(CONTROLLED_ROTATIONS)))(draw(angles), a, b)
    return qc


def _gate(name: str) -> Gate:
    from qiskit.circuit import library

    names = {"x": "XGate", "y": "YGate", "z": "ZGate", "h": "HGate", "s": "SGate",
             "sdg": "SdgGate", "t": "TGate", "tdg": "TdgGate", "sx": "SXGate", "id": "IGate"}
    gate: Gate = getattr(library, names[name])()
    return gate


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_circuits())
def test_random_circuits_come_out_identical_whichever_path_they_take(qc: QuantumCircuit) -> None:
    text = qasm3.dumps(qc)
    fast, path, full = both_ways(text)
    assert_identical(fast, full)
    if path == "full":
        # Only the int angle (`rz(0)`) keeps a dumped random circuit from the native path.
        assert re.search(r"[(,]\s*-?0\s*[,)]", text), text


SEED_PROGRAM = (
    HEADER + "bit[2] c;\nqubit[3] q;\nqubit r;\nh q[0];\ncx q[0], q[1];\n"
    "U(pi/2, -3*pi/4, 0.25) q[2];\nrz(1/(2*pi)) r;\nccx q[0], q[1], q[2];\nbarrier q, r;\n"
    "c[0] = measure q[0];\nc[1] = measure r;\n"
)
TOKENS = ["q", "q[0]", "q[3]", "r", "c", "$0", "$2", ",", ";", "(", ")", "pi", "-", "*", "/",
          "2", "0", "0.5", "1.e-05", "U", "id", "cx", "h", "measure", "=", "[", "]", " ",
          "\n", "qubit", "bit", "qubit[2] s;", "//", "/*", "*/", "barrier", "reset", "_qpi_U"]


@st.composite
def mutated_programs(draw: st.DrawFn) -> str:
    """The seed program (inside the native subset) with a few random edits: most are no
    longer valid, some are, and a fair share of either still reaches the native importer."""
    text = SEED_PROGRAM
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(len(HEADER), len(text)))
        edit = draw(st.integers(0, 2))
        if edit == 0:
            text = text[:at] + text[at + draw(st.integers(1, 6)):]
        elif edit == 1:
            text = text[:at] + draw(st.sampled_from(TOKENS)) + text[at:]
        else:
            lines = text.split("\n")
            i, j = (draw(st.integers(2, len(lines) - 1)) for _ in range(2))
            lines[i], lines[j] = lines[j], lines[i]
            text = "\n".join(lines)
    return text


def test_the_program_mangled_below_is_one_the_native_importer_takes() -> None:
    assert parse_qasm_traced(SEED_PROGRAM).path == "native"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_programs())
def test_a_mangled_program_is_refused_or_built_exactly_as_the_full_importer_does(
    text: str,
) -> None:
    try:
        full = qasm3.loads(text)
    except Exception:
        full = None
    if full is None:
        with pytest.raises(CircuitError):
            parse_qasm(text)
    else:
        assert_identical(parse_qasm(text), full)


# -- invalid programs ----------------------------------------------------------------------

# (name, text, reason, line, column): what parse_qasm answered before the native path
# existed, i.e. the full importer's message and position.
INVALID = [
    ("index out of range", HEADER + "qubit[2] q;\nh q[2];\n",
     "a qubit or bit index is out of range of its register", None, None),
    ("undefined gate", HEADER + "qubit[2] q;\nfoo q[0];\n", "gate 'foo' is not defined.", 4, 1),
    ("missing semicolon", HEADER + "qubit[2] q;\nh q[0]\ncx q[0], q[1];\n",
     "syntax error near 'cx'", 5, 1),
    ("undefined register", HEADER + "qubit[2] q;\nh r[0];\n", "Undefined symbol 'r'.", 4, 53),
    ("register redeclared", HEADER + "qubit[2] q;\nqubit[3] q;\n",
     "register name \"q\" already exists", None, None),
    ("a qubit twice in one gate", HEADER + "qubit[2] q;\ncx q[0], q[0];\n",
     "duplicate bit arguments", None, None),
    ("a register against itself", HEADER + "qubit[2] q;\ncx q, q;\n",
     "duplicate bit arguments", None, None),
    ("wrong number of qubits", HEADER + "qubit[2] q;\ncx q[0];\n",
     "The amount of qubit(1)/clbit(0) arguments does not match the gate expectation (2).",
     None, None),
    ("a bit where a qubit goes", HEADER + "qubit[1] q;\nbit[1] c;\nh c[0];\n",
     "required a qubit or qubit register", 5, 3),
    ("measure sizes differ", HEADER + "qubit[2] q;\nbit[3] c;\nc = measure q;\n",
     "register size error", None, None),
    ("no include", "OPENQASM 3.0;\nqubit[1] q;\nh q[0];\n", "gate 'h' is not defined.", 3, 1),
    ("stdgates included twice", HEADER + 'include "stdgates.inc";\nqubit[1] q;\n',
     "'p' is already defined. Previous definition on line 2.", 3, 1),
    ("a register named as a gate", HEADER + "qubit[1] h;\nh h[0];\n",
     "Symbol 'h' already inserted in symbol table in this scope: Scope.GLOBAL", 3, 1),
    ("a qubit named U", HEADER + "qubit U;\nU(0.1, 0.2, 0.3) U;\n",
     "Symbol 'U' already inserted in symbol table in this scope: Scope.GLOBAL", 3, 1),
    ("a qubit named as the U stand-in", HEADER + "qubit _qpi_U;\nU(0.1, 0.2, 0.3) r;\n",
     "Undefined symbol 'r'.", 4, 18),
    ("use before declaration", HEADER + "h q[0];\nqubit[1] q;\n", "Undefined symbol 'q'.", 3, 41),
    ("U with one angle", HEADER + "qubit[1] q;\nU(0.1) q[0];\n",
     "UGate.__init__() missing 2 required positional arguments: 'phi' and 'lam'", None, None),
    ("hardware and declared qubits mixed", HEADER + "qubit[1] q;\nx $1;\n",
     "Physical qubit referenced in virtual addressing mode. Mixing modes not currently "
     "supported.", 4, 3),
    ("input beside an error", HEADER + "input float theta;\nqubit[1] q;\nrz(theta) r[0];\n",
     "Undefined symbol 'r'.", 5, 80),
]


@pytest.mark.parametrize(("name", "text", "reason", "line", "column"), INVALID,
                         ids=[case[0] for case in INVALID])
def test_errors_keep_the_full_importers_message_line_and_column(
    name: str, text: str, reason: str, line: int | None, column: int | None
) -> None:
    with pytest.raises(CircuitError) as caught:
        parse_qasm(text)
    assert (caught.value.reason, caught.value.line, caught.value.column) == (reason, line, column)
    with pytest.raises(Exception) as full:
        qasm3.loads(text)
    position = re.match(r"(\d+),(\d+): ", str(full.value).strip("'\""))
    if position:  # the full importer's own position, columns from 0
        assert (line, column) == (int(position[1]), int(position[2]) + 1)


def test_programs_the_native_importer_wrongly_accepts_are_refused() -> None:
    # The reason the result of the native importer is checked, not trusted.
    text = HEADER + "qubit[2] q;\ncx q[0], q[0];\n"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        assert qasm3.loads_experimental(text).size() == 1
    assert native_text(text) is not None
    with pytest.raises(CircuitError, match="duplicate bit arguments"):
        parse_qasm(text)


def test_invalid_programs_inside_the_native_subset_reach_the_native_importer() -> None:
    # So the positions above come through a failed native attempt, not only around it.
    inside = [name for name, text, *_ in INVALID if native_text(text) is not None]
    assert len(inside) >= 10, inside


# -- the fallback ---------------------------------------------------------------------------

FALLBACK = {
    # name: (text the native importer refuses, counts it must give with 256 shots)
    "reset and mid-circuit measurement": (
        HEADER + "qubit[1] q;\nbit[2] c;\nx q[0];\nc[0] = measure q[0];\nreset q[0];\n"
        "c[1] = measure q[0];\n", {"01": 256}),
    "if/else": (
        HEADER + "qubit[2] q;\nbit[2] c;\nx q[0];\nc[0] = measure q[0];\n"
        "if (c[0]) {\n  x q[1];\n} else {\n  h q[1];\n}\nc[1] = measure q[1];\n",
        {"11": 256}),
    "a gate definition": (
        HEADER + "gate flip a, b {\n  x a;\n  cx a, b;\n}\nqubit[2] q;\nbit[2] c;\n"
        "flip q[0], q[1];\nc = measure q;\n", {"11": 256}),
    "a delay": (
        HEADER + "qubit[1] q;\nbit[1] c;\nx q[0];\ndelay[100ns] q[0];\nc[0] = measure q[0];\n",
        {"1": 256}),
    "an int angle": (
        HEADER + "qubit[1] q;\nbit[1] c;\nrx(0) q[0];\nu3(pi, 0, pi) q[0];\n"
        "c[0] = measure q[0];\n", {"1": 256}),
}


@pytest.mark.parametrize("name", list(FALLBACK))
def test_a_program_the_native_importer_refuses_runs_through_the_full_importer(name: str) -> None:
    text, counts = FALLBACK[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        with pytest.raises(BaseException):  # noqa: B017 - refused one way or another
            qasm3.loads_experimental(text)
    circuit, path = parse_qasm_traced(text)
    assert path == "full"
    assert_identical(circuit, qasm3.loads(text))
    result = AerExecutor({"seed": 1}).run(Job("j", (Experiment(circuit, 256, source=text),)))
    assert result.experiments[0].counts == counts


def test_a_native_refusal_inside_the_subset_falls_back_to_the_same_circuit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    text = HEADER + "qubit[2] q;\nbit[2] c;\nh q[0];\ncx q[0], q[1];\nc = measure q;\n"
    assert parse_qasm_traced(text).path == "native"

    def refuse(*args: Any, **kwargs: Any) -> QuantumCircuit:
        raise qasm3.QASM3ImporterError("a future version refuses this")

    monkeypatch.setattr(qasm3, "loads_experimental", refuse)
    other = text + "// a different text, so not from the cache\n"
    circuit, path = parse_qasm_traced(other)
    assert path == "full"
    assert_identical(circuit, qasm3.loads(text))


# -- what the native importer prints -------------------------------------------------------


def test_the_native_importers_diagnostics_reach_neither_stdout_nor_stderr(
    capfd: pytest.CaptureFixture[str],
) -> None:
    refused = [
        HEADER + "qubit[2] q;\ncx q[0];\n",  # printed to stdout by the native importer
        HEADER + "qubit[2] q;\nbit[3] c;\nc = measure q;\n",
        "OPENQASM 3.0;\nqubit[1] q;\nh q[0];\n",
    ]
    for text in refused:
        assert native_text(text) is not None
        with pytest.raises(CircuitError):
            parse_qasm(text)
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")


def test_a_rust_panic_is_a_refusal_and_its_message_is_kept_out_of_stderr(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = qasm3.loads_experimental
    panicking = HEADER + "qubit[1] q;\nbarrier;\n"  # outside the subset: it panics

    def panic_instead(text: str, **kwargs: Any) -> QuantumCircuit:
        return real(panicking, **kwargs)

    monkeypatch.setattr(qasm3, "loads_experimental", panic_instead)
    text = HEADER + "qubit[1] q;\nbit[1] c;\nx q[0];\nc[0] = measure q[0];\n"
    circuit, path = parse_qasm_traced(text)
    assert path == "full"
    assert_identical(circuit, qasm3.loads(text))
    assert "panicked" not in capfd.readouterr().err


def test_what_other_code_writes_during_a_native_import_still_comes_out(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = qasm3.loads_experimental

    def meanwhile(text: str, **kwargs: Any) -> QuantumCircuit:
        os.write(1, b"another thread's line\n")
        os.write(2, b"another thread's warning\n")
        return real(text, **kwargs)

    monkeypatch.setattr(qasm3, "loads_experimental", meanwhile)
    assert parse_qasm_traced(HEADER + "qubit[1] q;\nh q[0];\n").path == "native"
    out, err = capfd.readouterr()
    assert (out, err) == ("another thread's line\n", "another thread's warning\n")


async def test_through_the_daemon_errors_keep_their_place_and_its_log_stays_clean(
    orchestrator: LocalOrchestrator, daemon: Daemon
) -> None:
    # Inside the native subset, refused by the native importer with a printed report.
    bad = "OPENQASM 3.0;\nqubit[1] q;\nbit[1] c;\nh q[0];\nc[0] = measure q[0];\n"
    res = await run_job(orchestrator, {"circuits": [bad]})
    assert res["error_code"] == "CIRCUIT_INVALID"
    assert (res["line"], res["column"]) == (4, 1) and "gate 'h' is not defined" in res["error"]
    # The full importer's ANTLR parser prints this to sys.stderr besides raising it (in
    # the daemon, fd 2; pytest's capture would take it before it got there).
    syntax = HEADER + "qubit3] q;\n"
    res = await run_job(orchestrator, {"circuits": [syntax]})
    assert res["error_code"] == "CIRCUIT_INVALID" and res["line"] == 3
    qft = next(case.text for case in CORPUS if case.name == "QFT-12")
    ok = await run_job(orchestrator, {"circuits": [qft], "shots": 64})
    assert ok["success"] is True
    log = daemon.output()
    for printed in ("UndefGateError", "Near this point", "ExperimentalWarning", "panicked",
                    "no viable alternative"):
        assert printed not in log


def test_the_experimental_warning_is_not_passed_on() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert parse_qasm_traced(HEADER + "qubit[1] q;\nx q[0];\n").path == "native"
    assert [w for w in caught if issubclass(w.category, ExperimentalWarning)] == []


# -- the rewrite itself ---------------------------------------------------------------------


def test_only_whole_arguments_are_rewritten() -> None:
    text = HEADER + "qubit[2] q;\n// rz(pi/2) in a comment\ncp(pi/2) q[0], q[1];\n" \
        "u3(-3*pi/4, 1/(2*pi), 2*pi) q[0];\nU(pi, 0.5, -pi) q[1];\n"
    rewritten = native_text(text)
    assert rewritten is not None
    assert f"cp({math.pi / 2!r}) q[0], q[1];" in rewritten
    assert f"u3({-(3 * math.pi) / 4!r}, {1 / (2 * math.pi)!r}, {2 * math.pi!r}) q[0];" \
        in rewritten
    assert rewritten.count("\n") == text.count("\n")  # positions of later lines unchanged
    fast, path, full = both_ways(text)
    assert path == "native"
    assert_identical(fast, full)


def test_hardware_qubits_are_the_full_importers_whatever_the_comments_say() -> None:
    text = HEADER + "// $9 is not used\nbit[2] c;\n/* nor $12 */\nx $3;\nc[0] = measure $0;\n" \
        "c[1] = measure $3;\nh $1; // $20\nU(pi/2, 0.5, -3*pi/4) $1;\ncx $1, $2;\n"
    fast, path, full = both_ways(text)
    assert path == "native"
    assert fast.num_qubits == 4
    assert_identical(fast, full)
    result = AerExecutor({"seed": 1}).run(Job("j", (Experiment(fast, 64, source=text),)))
    assert result.experiments[0].counts == {"10": 64}


@pytest.mark.parametrize("program", [
    "qubit[1] q;\nrz(pi+1.0) q[0];\n",  # an expression, not one of dumps's constants
    "qubit[1] q;\nrz(2*pi/0) q[0];\n",
    "qubit[1] q;\nrz(tau) q[0];\n",
    "qubit[1] Q;\nh Q[0];\n",  # the full importer renames it esc_Q
    "qubit[99999] q;\n",  # too large to hand to the native importer unchecked
    "qubit[2] q;\nh q[0:1];\n",
    "qubit[1] q;\nbarrier;\n",
])
def test_programs_outside_the_subset_are_not_tried_natively(program: str) -> None:
    assert native_text(HEADER + program) is None


def test_pi_forms_the_rewrite_knows_evaluate_left_to_right() -> None:
    # (3*pi)/4 and 3*(pi/4) differ in the last bit for some n/d; the full importer
    # computes the first, so must the rewrite.
    differs = [(n, d) for n in range(1, 100) for d in range(1, 100)
               if (n * math.pi) / d != n * (math.pi / d) and Fraction(n, d).denominator == d]
    assert differs  # the distinction is real
    n, d = differs[0]
    text = HEADER + f"qubit[1] q;\nrz({n}*pi/{d}) q[0];\n"
    fast, path, full = both_ways(text)
    assert path == "native"
    assert fast.data[0].operation.params[0] == (n * math.pi) / d
    assert describe(fast) == describe(full)


# -- shared gates, and the way a parsed job reaches the executor ---------------------------


def test_repeated_gates_share_one_object_and_keep_their_exact_angles() -> None:
    text = HEADER + ("qubit[2] q;\nrz(0.5) q[0];\nrz(0.5) q[1];\nrz(0.0) q[0];\nrz(-0.0) q[1];\n"
                     "h q[0];\nh q[1];\n")
    fast, path, full = both_ways(text)
    assert path == "native"
    assert_identical(fast, full)
    ops = [instruction.operation for instruction in fast.data]
    assert ops[0] is ops[1] and ops[4] is ops[5]
    assert ops[2] is not ops[3]  # 0.0 == -0.0, but they are different angles
    assert [exact(op.params[0]) for op in ops[2:4]] == [exact(0.0), exact(-0.0)]


@pytest.mark.parametrize("case", CORPUS, ids=[case.name for case in CORPUS])
def test_a_parsed_circuit_reaches_the_executor_unchanged(case: CorpusCircuit) -> None:
    circuit = parse_qasm(case.text)
    job = Job("job", (Experiment(circuit, shots=100, source=case.text),))
    back = payload.loads(payload.dumps(job))
    assert back.job_id == "job" and back.experiments[0].source == case.text
    arrived = back.experiments[0].circuit
    assert describe(arrived) == describe(circuit)
    assert arrived.name == circuit.name
    if not circuit.parameters:
        assert arrived == circuit


def test_plain_circuits_travel_flat_and_the_rest_as_they_are() -> None:
    flat = {case.name for case in CORPUS if payload.flatten(parse_qasm(case.text)) is not None}
    # What the native importer builds, less programs on hardware qubits (`$n`: a layout)
    # and on qubits outside registers.
    plain = {case.name for case in CORPUS if case.expect == "native"
             and (circuit := parse_qasm(case.text)).layout is None
             and sum(register.size for register in circuit.qregs) == circuit.num_qubits}
    assert len(plain) >= 10 and plain <= flat, sorted(plain - flat)
    with_parameters = QuantumCircuit(1)
    with_parameters.rx(Parameter("t"), 0)
    assert payload.flatten(with_parameters) is None
    assert payload.flatten(QuantumCircuit([Qubit()])) is None  # a bit in no register
    laid_out = parse_qasm(HEADER + "U(0.1, 0.2, 0.3) $1;\n")
    assert laid_out.layout is not None and payload.flatten(laid_out) is None
    for circuit in (with_parameters, laid_out):  # pickled as they are, and unchanged
        back = payload.loads(payload.dumps(circuit))
        assert describe(back) == describe(circuit)
