"""OpenQASM 2/3 text to Qiskit circuits, with errors that carry line and column,
and parameter binding in the order Qiskit sorts parameters. OpenQASM 3 goes through
Qiskit's native importer where it builds the full importer's circuit, and through the
full importer otherwise."""

from __future__ import annotations

import math
import os
import re
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

if TYPE_CHECKING:
    from qiskit.circuit import QuantumCircuit

_VERSION = re.compile(r"^\s*(?://[^\n]*\n\s*|/\*.*?\*/\s*)*OPENQASM\s+(\d+)(?:\.\d+)?\s*;", re.S)
_QISKIT_POSITION = re.compile(r"^(?:<input>:)?(\d+),(\d+):\s*")
_ANTLR_POSITION = re.compile(r"^L(\d+):C(\d+):\s*")

ImportPath = Literal["qasm2", "native", "full"]
"""Which importer built a circuit: Qiskit's OpenQASM 2 loader, Qiskit's native (Rust)
OpenQASM 3 importer, or the full pure-Python one (qiskit_qasm3_import)."""


class CircuitError(ValueError):
    """A circuit could not be parsed or bound; `line`/`column` are 1-based."""

    def __init__(self, message: str, line: int | None = None, column: int | None = None) -> None:
        where = f"line {line}, column {column}: " if line is not None else ""
        super().__init__(where + message)
        self.reason = message
        self.line = line
        self.column = column


def qasm_version(source: str) -> int:
    match = _VERSION.match(source)
    if match is None:
        raise CircuitError(
            "missing OpenQASM version header; start the circuit with 'OPENQASM 2.0;' or "
            "'OPENQASM 3.0;'",
            1,
            1,
        )
    version = int(match.group(1))
    if version not in (2, 3):
        raise CircuitError(f"unsupported OpenQASM version {version}; use 2 or 3", 1, 1)
    return version


class ParsedCircuit(NamedTuple):
    """A parsed circuit and the importer that built it."""

    circuit: QuantumCircuit
    path: ImportPath


def parse_qasm(source: str) -> QuantumCircuit:
    """Parse OpenQASM 2 or 3 text. Results are cached by text: callers must not
    mutate the returned circuit (binding parameters returns a copy)."""
    return parse_qasm_traced(source).circuit


def parse_qasm_traced(source: str) -> ParsedCircuit:
    """`parse_qasm`, also saying which importer built the circuit (for tests and
    benchmarks; the circuit is the same whichever it was)."""
    if not isinstance(source, str) or not source.strip():
        raise CircuitError("the circuit is empty; expected OpenQASM 2 or 3 text")
    return _parse_cached(source)


@lru_cache(maxsize=512)
def _parse_cached(source: str) -> ParsedCircuit:
    version = qasm_version(source)
    if version == 3:
        native = _load_native(source)
        if native is not None:
            return ParsedCircuit(native, "native")
    try:
        if version == 2:
            from qiskit import qasm2

            circuit = qasm2.loads(source, custom_instructions=qasm2.LEGACY_CUSTOM_INSTRUCTIONS)
            return ParsedCircuit(circuit, "qasm2")
        from qiskit import qasm3

        # Always the original text, so every error and position is the full importer's.
        # Held like the native importer's: its ANTLR parser prints each syntax error to
        # stderr ("line 3:6 no viable alternative at input ...") besides raising it.
        with _OUTPUT_LOCK, _output_held() as quiet:
            circuit = qasm3.loads(source)
            quiet.release()
        return ParsedCircuit(circuit, "full")
    except Exception as exc:  # the loaders raise several unrelated types
        raise _located(exc) from None


# The native importer (qiskit.qasm3.loads_experimental) is an order of magnitude faster
# than qiskit_qasm3_import, but handles only part of OpenQASM 3 and does some checks less
# (it accepts `cx q[0], q[0]`). It is tried only on programs made entirely of the
# statements below, in the forms qiskit.qasm3.dumps writes them, after the constants
# dumps writes for angles (`pi/2`, `-3*pi/4`, `1/(2*pi)`) are replaced by the float the
# full importer computes for them; anything else, and anything it refuses, goes to the
# full importer with the original text. tests/test_qasm3_import.py holds both to the
# same circuit over a corpus of what dumps emits.

# The gates of stdgates.inc, and the builtin U (dumps writes it for Qiskit's UGate and the
# native importer cannot build it: it is renamed, see _native_gates).
_NATIVE_GATES = (
    "p", "x", "y", "z", "h", "s", "sdg", "t", "tdg", "sx", "rx", "ry", "rz", "cx", "cy",
    "cz", "cp", "crx", "cry", "crz", "ch", "swap", "ccx", "cswap", "cu", "CX", "phase",
    "cphase", "id", "u1", "u2", "u3", "U",
)  # fmt: skip
# Names, less the builtin constants and the keywords a name could collide with. A
# register's must be one the full importer keeps as written (it escapes others: `Q`
# becomes `esc_Q`); a lone qubit or bit (`qubit _qubit0;`) has no name in the circuit.
_RESERVED = (
    r"(?!(?:U|pi|tau|euler|measure|barrier|reset|qubit|bit|gate|if|for|while|let|const|"
    r"input|output|delay|box|include|defcal|extern|def|return|true|false)(?!\w))"
)
_REGISTER = rf"{_RESERVED}[a-z][A-Za-z0-9_]*"
_NAME = rf"{_RESERVED}[A-Za-z_][A-Za-z0-9_]*"
# Sizes and indices of at most four digits: the native importer allocates a declared
# register before anything checks its size (qubit[99999999999999] runs out of memory).
_INDEX = r"\s*\[\s*\d{1,4}\s*\]"
# Hardware qubits (`$3`, as dumps writes a transpiled circuit's) become declared qubits
# for the native importer, which cannot address them (see _native_program).
_OPERAND = rf"(?:{_NAME}(?:{_INDEX})?|\$\d{{1,4}})"
_OPERANDS = rf"{_OPERAND}(?:\s*,\s*{_OPERAND})*"
# Float literals as repr() and dumps (f"{x:#}") write them; "3.e+17" gets its missing 0
# (the native importer panics on a point with no digit after it). Ints stay with the full
# importer, which keeps `rz(0)`'s angle an int.
_FLOAT = r"\d+\.\d+(?:e[+-]?\d+)?|\d+\.e[+-]?\d+|\d+e[+-]?\d+"
_COUNT = r"[1-9]\d{0,5}"  # no zero (pi/0 is the full importer's error) and no huge ints
_PI = rf"(?:{_COUNT}\*)?pi(?:/{_COUNT})?|{_COUNT}/\({_COUNT}\*pi\)"
_ARGUMENT = rf"-?(?:{_FLOAT}|{_PI})"
_STATEMENTS = (
    r'include\s*"stdgates\.inc"',
    rf"(?:qubit|bit)(?:{_INDEX}\s*{_REGISTER}|\s+{_NAME})",
    rf"(?:{'|'.join(_NATIVE_GATES)})(?!\w)"
    rf"(?:\s*\(\s*{_ARGUMENT}(?:\s*,\s*{_ARGUMENT})*\s*\)\s*|\s+){_OPERANDS}",
    rf"{_OPERAND}\s*=\s*measure\s+{_OPERAND}",
    rf"barrier\s+{_OPERANDS}",  # a bare `barrier;` makes the native importer panic
)
_SPACE = r"\s+|//[^\n]*|/\*.*?\*/"
_NATIVE_SUBSET = re.compile(
    # Possessive: a program outside the subset fails fast instead of backtracking.
    rf"(?:{_SPACE})*+OPENQASM\s+3\.\d+\s*;(?:{_SPACE}|(?:{'|'.join(_STATEMENTS)})\s*;)*+",
    re.S,
)
# A whole gate argument (between `(` or `,` and `,` or `)`) in one of the forms above.
_PI_ARGUMENT = re.compile(
    rf"(?<=[(,])(\s*)(-?)(?:({_COUNT})/\(({_COUNT})\*pi\)|(?:({_COUNT})\*)?pi(?:/({_COUNT}))?)"
    r"(?=\s*[,)])"
)
_BARE_POINT = re.compile(r"(?<=\d)\.(?=e)")
_BUILTIN_U = re.compile(r"(?<![\w$])U(?=\s*\()")
_HARDWARE_QUBIT = re.compile(r"\$(\d+)")
# Within the subset `//` and `/*` start nothing but comments (no strings but the include's).
_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)
_QUBIT_DECLARATION = re.compile(r"(?<!\w)qubit(?!\w)")
# Names the native importer reads in place of U and of `$n`. Where a program uses them
# itself, the native importer sees them declared twice and refuses.
_U_STANDIN = "_qpi_U"
_HARDWARE_STANDIN = "_qpi_hw"


class _NativeProgram(NamedTuple):
    text: str  # what the native importer reads
    hardware_qubits: int  # how many `$n` the full importer would create; 0 if none


def native_text(source: str) -> str | None:
    """The text to give the native importer, or None where the program is outside what
    it is trusted with."""
    program = _native_program(source)
    return None if program is None else program.text


def _native_program(source: str) -> _NativeProgram | None:
    if _NATIVE_SUBSET.fullmatch(source) is None:
        return None
    text = _PI_ARGUMENT.sub(_pi_literal, source) if "pi" in source else source
    if ".e" in text:
        text = _BARE_POINT.sub(".0", text)
    declared = ""  # declarations for the native importer, put on the header's line so
    # that line numbers stay as they were
    if "U" in text and _BUILTIN_U.search(text):
        declared += f" gate {_U_STANDIN}(theta, phi, lambda) a {{}}"
        text = _BUILTIN_U.sub(_U_STANDIN, text)
    hardware = 0
    if "$" in text:
        code = _COMMENT.sub("", text)  # a `$7` in a comment creates no qubit
        indices = [int(index) for index in _HARDWARE_QUBIT.findall(code)]
        if indices:
            if _QUBIT_DECLARATION.search(code):
                return None  # mixed addressing: the full importer's error to give
            hardware = max(indices) + 1
            declared += "".join(f" qubit {_HARDWARE_STANDIN}{i};" for i in range(hardware))
            text = _HARDWARE_QUBIT.sub(lambda m: f"{_HARDWARE_STANDIN}{int(m[1])}", text)
    if declared:
        header = _VERSION.match(text)
        if header is None:  # cannot happen: the subset starts with the header
            return None
        text = text[: header.end()] + declared + text[header.end() :]
    return _NativeProgram(text, hardware)


def _pi_literal(match: re.Match[str]) -> str:
    """The float the full importer computes for one constant, evaluated the same way:
    Python ints and floats, left to right (`3*pi/4` is (3*pi)/4)."""
    space, minus, over, under, times, by = match.groups()
    if over is not None:
        value = int(over) / (int(under) * math.pi)
    else:
        value = math.pi if times is None else int(times) * math.pi
        if by is not None:
            value = value / int(by)
    # Negation is exact, so -(x) equals the full importer's (-3)*pi/4 bit for bit.
    return space + repr(-value if minus else value)


_OUTPUT_LOCK = threading.Lock()  # held while fds 1 and 2 point at scratch files
_WARNING = "This is an experimental native version of the OpenQASM 3 importer"


def _after_fork() -> None:
    # A child forked while another thread held the lock would wait on it forever; the
    # parent's scratch files are the parent's.
    global _OUTPUT_LOCK
    _OUTPUT_LOCK = threading.Lock()
    for scratch in _scratch.values():
        with suppress(OSError):
            os.close(scratch)
    _scratch.clear()


os.register_at_fork(after_in_child=_after_fork)


def _load_native(source: str) -> QuantumCircuit | None:
    """The native importer's circuit, or None where the full importer must decide."""
    program = _native_program(source)
    if program is None:
        return None
    from qiskit import qasm3
    from qiskit.exceptions import ExperimentalWarning

    with _OUTPUT_LOCK, _output_held() as quiet, warnings.catch_warnings():
        warnings.filterwarnings("ignore", _WARNING, ExperimentalWarning)
        try:
            circuit = qasm3.loads_experimental(program.text, custom_gates=_native_gates())
        except Exception:
            return None
        except BaseException as exc:  # a Rust panic is a BaseException (pyo3's PanicException)
            if type(exc).__name__ != "PanicException":
                raise
            return None
        quiet.release()
    if not _distinct_bits(circuit):
        return None
    if program.hardware_qubits:
        _lay_out_on_hardware(circuit)
    return circuit


def _lay_out_on_hardware(circuit: QuantumCircuit) -> None:
    """The layout the full importer gives a program on hardware qubits: its qubits are
    $0..$n in order, each laid out on its own index."""
    from qiskit.transpiler import Layout, TranspileLayout

    # Set as qiskit_qasm3_import sets it: QuantumCircuit has no public setter for it.
    circuit._layout = TranspileLayout(
        initial_layout=Layout.from_qubit_list(circuit.qubits),
        input_qubit_mapping={bit: i for i, bit in enumerate(circuit.qubits)},
        final_layout=None,
    )


@lru_cache(maxsize=1)
def _native_gates() -> list[Any]:
    """stdgates.inc built as the full importer builds it: `id` is U(0, 0, 0) (ints), and
    the stand-in for the builtin U is a UGate. Each constructor is memoized (see
    _GateMemo)."""
    from qiskit.circuit.library import UGate
    from qiskit.qasm3 import STDGATES_INC_GATES, CustomGate

    def identity() -> UGate:
        return UGate(0, 0, 0)

    gates = [(g.constructor, g.name, g.num_params, g.num_qubits)
             for g in STDGATES_INC_GATES if g.name != "id"]
    gates += [(identity, "id", 0, 1), (UGate, _U_STANDIN, 3, 1)]
    memo = _GateMemo()
    return [CustomGate(memo.constructor(make, name), name, params, qubits)
            for make, name, params, qubits in gates]


class _GateMemo:
    """One gate object per (name, angles), shared by every instruction and circuit that
    uses it. Building a Qiskit gate in Python costs 10-50 us (a controlled gate builds
    and copies its base gate) and most of a circuit's gates repeat (H, CX, the QFT's
    pi/2^k phases): sharing cuts the import by about half and the pickle that carries
    the circuit to the executor by a third. Gates are immutable here: nothing in the
    daemon or the executors changes an operation in place (binding copies, and only
    circuits with parameters are bound; these gates' angles are numbers)."""

    LIMIT = 4096  # distinct gates kept; then the memo starts again

    def __init__(self) -> None:
        self._gates: dict[tuple[Any, ...], Any] = {}

    def constructor(self, make: Callable[..., Any], name: str) -> Callable[..., Any]:
        gates = self._gates

        def build(*angles: Any) -> Any:
            # The type is part of the key (rz(1) and rz(1.0) are different circuits), and
            # a zero's sign (0.0 == -0.0).
            key = (name, *[(type(a), a or repr(a)) for a in angles])
            gate = gates.get(key)
            if gate is None:
                if len(gates) >= self.LIMIT:
                    gates.clear()
                gate = gates[key] = make(*angles)
            return gate

        return build


def _distinct_bits(circuit: QuantumCircuit) -> bool:
    """The native importer builds `cx q[0], q[0]`, which the full one rejects."""
    for instruction in circuit.data:
        qubits, clbits = instruction.qubits, instruction.clbits
        if len(qubits) > 1 and len(set(qubits)) != len(qubits):
            return False
        if len(clbits) > 1 and len(set(clbits)) != len(clbits):
            return False
    return True


class _HeldOutput:
    """Whether what reached fds 1 and 2 during an import is passed on: not the
    importer's diagnostics when it fails, but whatever other threads wrote meanwhile
    when it succeeds (neither importer prints anything then)."""

    def __init__(self) -> None:
        self.keep = False

    def release(self) -> None:
        self.keep = True


_scratch: dict[tuple[int, int], int] = {}  # (pid, fd) -> scratch file; a fork opens its own


@contextmanager
def _output_held() -> Iterator[_HeldOutput]:
    """Point fds 1 and 2 at scratch files: the native importer prints its parse errors
    to the process's stdout and Rust panics to its stderr, which would reach the daemon's
    logs. Callers hold _OUTPUT_LOCK. The redirection is the whole process's for a few
    milliseconds: a child another thread started meanwhile would inherit it, so parse
    where nothing else starts processes (the daemon's parser process)."""
    held = _HeldOutput()
    saved: list[tuple[int, int, int]] = []  # (fd, its saved copy, scratch)
    _flush_python_streams()  # what Python code wrote before goes out now
    try:
        for fd in (1, 2):
            try:
                scratch = _scratch_file(fd)
                copy = os.dup(fd)
            except OSError:  # not open, or no scratch file (disk full): left as it is
                continue
            saved.append((fd, copy, scratch))
            os.dup2(scratch, fd)
        yield held
    finally:
        _flush_python_streams()  # ANTLR prints through sys.stderr, and into the held fds
        for fd, copy, scratch in saved:
            os.dup2(copy, fd)
            os.close(copy)
            if held.keep and os.lseek(scratch, 0, os.SEEK_CUR):
                _copy_out(scratch, fd)


def _flush_python_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            with suppress(OSError, ValueError):  # closed or detached: nothing pending
                stream.flush()


def _scratch_file(fd: int) -> int:
    key = (os.getpid(), fd)
    scratch = _scratch.get(key)
    if scratch is None:
        scratch, path = tempfile.mkstemp(prefix="qpi-qasm3-")
        os.unlink(path)
        _scratch[key] = scratch
    os.ftruncate(scratch, 0)
    os.lseek(scratch, 0, os.SEEK_SET)
    return scratch


def _copy_out(scratch: int, fd: int) -> None:
    os.lseek(scratch, 0, os.SEEK_SET)
    while chunk := os.read(scratch, 65536):
        view = memoryview(chunk)
        while view:  # a pipe or socket may take less than all of it
            view = view[os.write(fd, view) :]


def _located(exc: BaseException) -> CircuitError:
    """Turn a loader's exception into a CircuitError with a 1-based position."""
    if isinstance(exc, IndexError):
        # qiskit_qasm3_import lets an out-of-range register index escape as a bare IndexError
        return CircuitError("a qubit or bit index is out of range of its register")
    message = getattr(exc, "message", None) or str(exc)
    for pattern in (_QISKIT_POSITION, _ANTLR_POSITION):
        match = pattern.match(message)
        if match:  # both loaders count columns from 0
            line, column = int(match.group(1)), int(match.group(2)) + 1
            return CircuitError(message[match.end() :], line, column)
    token = _offending_token(exc)
    if token is not None:
        text = getattr(token, "text", "")
        return CircuitError(f"syntax error near {text!r}", token.line, token.column + 1)
    return CircuitError(message or type(exc).__name__)


def _offending_token(exc: BaseException) -> Any:
    """ANTLR (the OpenQASM 3 parser) hides the position in the exception chain."""
    seen: set[int] = set()
    stack: list[Any] = [exc]
    while stack:
        item = stack.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        token = getattr(item, "offendingToken", None)
        if token is not None and getattr(token, "line", None) is not None:
            return token
        if isinstance(item, BaseException):
            stack.extend([item.__cause__, item.__context__, *item.args])
    return None


def bind(circuit: QuantumCircuit, values: Sequence[float] | None) -> QuantumCircuit:
    """Bind one row of `parameter_values` in Qiskit's parameter order."""
    params = circuit.parameters
    if values is None:
        if len(params):
            names = ", ".join(p.name for p in params)
            raise CircuitError(
                f"the circuit has unbound parameters ({names}); send parameter_values"
            )
        return circuit
    if not len(params):
        # qpi-client binds parameters itself and still sends the values it used.
        return circuit
    if not all(math.isfinite(v) for v in values):
        raise CircuitError("parameter_values must be finite numbers (no NaN or infinity)")
    if len(values) != len(params):
        names = ", ".join(p.name for p in params)
        raise CircuitError(
            f"parameter_values row has {len(values)} values but the circuit has "
            f"{len(params)} parameters ({names})"
        )
    return circuit.assign_parameters(list(values))
