"""A QCOS qcos-mc/1 superconducting program (RPHI, CZ, IDLE, ECHO, MEASURE) lowered to
OpenQASM 2 that the node's parser runs on any executor, and counts mapped back to QCOS's
key order (character j is the outcome of the j-th MEASURE qubit)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError


class ProgramError(ValueError):
    """The program is malformed; a device answers `malformed_request`."""


class ProgramTooLarge(ProgramError):
    """The program is well formed but beyond this device's limits; a device answers
    `limit_exceeded`."""


@dataclass(frozen=True, slots=True)
class Lowered:
    """A program as the node runs it."""

    qasm: str
    """OpenQASM 2 text: one qreg `q`, one creg `c` with c[j] = qubit readout[j]."""
    num_qubits: int
    """Highest qubit the program names, plus one: QCOS does not send a register width."""
    readout: tuple[int, ...]
    """MEASURE.qubits: the qubit behind each character of a QCOS count key."""
    instructions: int
    """How many instructions the program had, MEASURE included."""


Qubit = Annotated[int, Field(ge=0)]


class _Instruction(BaseModel):
    # Strict, so that true, 1.0 or "1" is an error rather than qubit 1. Unknown fields are
    # ignored, as everywhere in qcos-mc/1.
    model_config = ConfigDict(strict=True, frozen=True, allow_inf_nan=False, extra="ignore")

    order: Qubit | None = None
    """QCOS's sequencing index; the program must already be sorted by it."""

    @property
    def referenced(self) -> tuple[int, ...]:
        raise NotImplementedError


class _RPhi(_Instruction):
    op: Literal["RPHI"]
    qubit: Qubit
    axis: float
    angle: float

    @property
    def referenced(self) -> tuple[int, ...]:
        return (self.qubit,)


class _CZ(_Instruction):
    op: Literal["CZ"]
    ctrl: Qubit
    qubit: Qubit

    @property
    def referenced(self) -> tuple[int, ...]:
        return (self.ctrl, self.qubit)


class _Idle(_Instruction):
    op: Literal["IDLE"]
    qubit: Qubit
    delay_ns: float = Field(ge=0)

    @property
    def referenced(self) -> tuple[int, ...]:
        return (self.qubit,)


class _Echo(_Instruction):
    op: Literal["ECHO"]
    qubit: Qubit

    @property
    def referenced(self) -> tuple[int, ...]:
        return (self.qubit,)


class _Measure(_Instruction):
    op: Literal["MEASURE"]
    qubits: list[Qubit] = Field(min_length=1)

    @property
    def referenced(self) -> tuple[int, ...]:
        return tuple(self.qubits)


_Op = _RPhi | _CZ | _Idle | _Echo | _Measure
_OPS = ("RPHI", "CZ", "IDLE", "ECHO", "MEASURE")
_INSTRUCTION: TypeAdapter[_Op] = TypeAdapter(Annotated[_Op, Field(discriminator="op")])
_SUBSET: TypeAdapter[list[int]] = TypeAdapter(list[Qubit], config=ConfigDict(strict=True))
_HEX = re.compile(r"0[xX][0-9a-fA-F]+")


def lower(
    program: object, *, qubit_subset: object = None, max_qubits: int, max_instructions: int
) -> Lowered:
    """Check a QCOS program and write it as OpenQASM 2.

    `qubit_subset` is the request's `config.qubit_subset`; QCOS sends the readout order
    there, so when given it must equal MEASURE's qubits. Raises ProgramTooLarge past
    `max_qubits` or `max_instructions`, ProgramError for anything else wrong.
    """
    if not isinstance(program, list):
        raise ProgramError(
            f"the program must be a JSON list of instructions, got {type(program).__name__}"
        )
    if len(program) > max_instructions:
        raise ProgramTooLarge(
            f"the program has {len(program)} instructions; this device allows at most "
            f"{max_instructions}"
        )
    instructions = [_parse(index, item) for index, item in enumerate(program)]
    readout = _readout(instructions)
    if qubit_subset is not None:
        _check_subset(qubit_subset, readout)
    _check_order(instructions)
    for index, instruction in enumerate(instructions):
        _check_qubits(index, instruction, max_qubits)
    num_qubits = max(q for instruction in instructions for q in instruction.referenced) + 1
    return Lowered(
        qasm=_qasm(instructions, num_qubits, readout),
        num_qubits=num_qubits,
        readout=readout,
        instructions=len(instructions),
    )


def qcos_counts(counts: Mapping[str, int], width: int) -> dict[str, int]:
    """Re-key counts from Qiskit's order (c[width-1] leftmost) to QCOS's (c[0] leftmost).

    Keys may be binary (spaces ignored, short keys zero-padded) or hex ("0x5"); keys that
    name the same outcome are merged. ValueError on a key wider than `width`.
    """
    if width < 1:
        raise ValueError(f"a readout is at least one bit wide, got width {width}")
    out: dict[str, int] = {}
    for key, count in counts.items():
        outcome = _qiskit_bits(key, width)[::-1]
        out[outcome] = out.get(outcome, 0) + count
    return out


def _parse(index: int, item: object) -> _Op:
    if not isinstance(item, dict):
        raise ProgramError(f"instruction {index}: expected an object, got {type(item).__name__}")
    try:
        return _INSTRUCTION.validate_python(item)
    except ValidationError as exc:
        raise ProgramError(_describe(index, item, exc)) from None


def _describe(index: int, item: dict[str, Any], exc: ValidationError) -> str:
    """Pydantic's first few errors as one line that says where each is: its own text names
    a union branch and a URL, which whoever wrote the program does not need."""
    first = exc.errors()[0]
    expected = ", ".join(_OPS)
    if first["type"] == "union_tag_not_found":
        return f"instruction {index}: missing 'op'; expected one of {expected}"
    if first["type"] == "union_tag_invalid":
        return f"instruction {index}: unknown op {item['op']!r}; expected one of {expected}"
    problems = "; ".join(f"{_field(err['loc'][1:])}: {err['msg']}" for err in exc.errors()[:3])
    return f"instruction {index} ({item['op']}): {problems}"


def _field(loc: tuple[int | str, ...]) -> str:
    """('qubits', 2) -> 'qubits[2]'."""
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)[1:]


def _readout(instructions: list[_Op]) -> tuple[int, ...]:
    """MEASURE's qubits, once it is known to appear exactly once, last, without repeats."""
    where = [i for i, instruction in enumerate(instructions) if isinstance(instruction, _Measure)]
    if not where:
        raise ProgramError(
            f"the program has no MEASURE; it must end with one naming the qubits to read "
            f"({len(instructions)} instructions)"
        )
    if len(where) > 1:
        raise ProgramError(
            f"the program has {len(where)} MEASURE instructions (instructions "
            f"{', '.join(map(str, where))}); it must have exactly one, last"
        )
    if where[0] != len(instructions) - 1:
        raise ProgramError(
            f"instruction {where[0]} (MEASURE): MEASURE must be the last instruction; "
            f"{len(instructions) - 1 - where[0]} follow it"
        )
    measure = instructions[-1]
    assert isinstance(measure, _Measure)
    seen: set[int] = set()
    for qubit in measure.qubits:
        if qubit in seen:
            raise ProgramError(
                f"instruction {where[0]} (MEASURE): qubits: qubit {qubit} appears more than "
                f"once in {measure.qubits}"
            )
        seen.add(qubit)
    return tuple(measure.qubits)


def _check_subset(qubit_subset: object, readout: tuple[int, ...]) -> None:
    try:
        subset = _SUBSET.validate_python(qubit_subset)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = _field(("qubit_subset", *err["loc"]))
        raise ProgramError(
            f"config.{where}: {err['msg']}; expected a list of qubit indices"
        ) from None
    if tuple(subset) != readout:
        raise ProgramError(
            f"config.qubit_subset {subset} differs from the MEASURE qubits {list(readout)}; "
            f"both give the readout order, so they must be the same list"
        )


def _check_order(instructions: list[_Op]) -> None:
    """The program runs in list order, so an `order` that says otherwise is refused rather
    than ignored."""
    last: tuple[int, int] | None = None
    for index, instruction in enumerate(instructions):
        if instruction.order is None:
            continue
        if last is not None and instruction.order <= last[1]:
            raise ProgramError(
                f"instruction {index} ({instruction.op}): order: {instruction.order} does not "
                f"follow instruction {last[0]}'s order {last[1]}; list the instructions in "
                f"increasing order"
            )
        last = (index, instruction.order)


def _check_qubits(index: int, instruction: _Op, max_qubits: int) -> None:
    if isinstance(instruction, _CZ) and instruction.ctrl == instruction.qubit:
        raise ProgramError(
            f"instruction {index} (CZ): ctrl and qubit are both {instruction.qubit}; "
            f"CZ needs two different qubits"
        )
    for qubit in instruction.referenced:
        if qubit >= max_qubits:
            raise ProgramTooLarge(
                f"instruction {index} ({instruction.op}): qubit {qubit} is beyond this "
                f"device's {max_qubits} qubits (0 to {max_qubits - 1})"
            )


def _qasm(
    instructions: list[_Op],
    num_qubits: int,
    readout: tuple[int, ...],
) -> str:
    lines = [
        "OPENQASM 2.0;",
        'include "qelib1.inc";',
        f"qreg q[{num_qubits}];",
        f"creg c[{len(readout)}];",
    ]
    for instruction in instructions:
        match instruction:
            case _RPhi(qubit=qubit, axis=axis, angle=angle):
                # Qiskit's RGate(θ, φ) is U(θ, φ - π/2, -φ + π/2), with no global phase;
                # repr keeps every bit of each float, and qasm2 reads it back exactly.
                params = (angle, axis - math.pi / 2, -axis + math.pi / 2)
                lines.append(f"u3({','.join(map(repr, params))}) q[{qubit}];")
            case _CZ(ctrl=ctrl, qubit=qubit):
                lines.append(f"cz q[{ctrl}],q[{qubit}];")
            case _Idle() | _Echo():
                pass  # a delay and an undefined echo: nothing a simulator can play
    lines.extend(f"measure q[{qubit}] -> c[{j}];" for j, qubit in enumerate(readout))
    return "\n".join(lines) + "\n"


def _qiskit_bits(key: str, width: int) -> str:
    """A count key as exactly `width` bits, still in Qiskit's order."""
    token = key.replace(" ", "")
    if _HEX.fullmatch(token):
        value = int(token, 16)
        if value.bit_length() > width:
            raise ValueError(f"count key {key!r} does not fit the {width}-bit readout")
        return format(value, f"0{width}b")
    if not token or not set(token) <= {"0", "1"}:
        raise ValueError(f"count key {key!r} is neither a bitstring nor a hex word")
    if len(token) > width:
        raise ValueError(f"count key {key!r} is wider than the {width}-bit readout")
    return token.zfill(width)
