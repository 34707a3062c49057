"""OpenQASM 2/3 text to Qiskit circuits, with errors that carry line and column,
and parameter binding in the order Qiskit sorts parameters."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qiskit.circuit import QuantumCircuit

_VERSION = re.compile(r"^\s*(?://[^\n]*\n\s*|/\*.*?\*/\s*)*OPENQASM\s+(\d+)(?:\.\d+)?\s*;", re.S)
_QISKIT_POSITION = re.compile(r"^(?:<input>:)?(\d+),(\d+):\s*")
_ANTLR_POSITION = re.compile(r"^L(\d+):C(\d+):\s*")


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


def parse_qasm(source: str) -> QuantumCircuit:
    """Parse OpenQASM 2 or 3 text. Results are cached by text: callers must not
    mutate the returned circuit (binding parameters returns a copy)."""
    if not isinstance(source, str) or not source.strip():
        raise CircuitError("the circuit is empty; expected OpenQASM 2 or 3 text")
    return _parse_cached(source)


@lru_cache(maxsize=512)
def _parse_cached(source: str) -> QuantumCircuit:
    version = qasm_version(source)
    try:
        if version == 2:
            from qiskit import qasm2

            return qasm2.loads(source, custom_instructions=qasm2.LEGACY_CUSTOM_INSTRUCTIONS)
        from qiskit import qasm3

        return qasm3.loads(source)
    except Exception as exc:  # the loaders raise several unrelated types
        raise _located(exc) from None


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
