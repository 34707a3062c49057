"""QCOS qcos-mc/1 programs lowered to OpenQASM 2: the text parses with the node's parser,
RPHI is Qiskit's RGate, counts come back in QCOS's key order, and every malformed
program is refused with a message that names the instruction and field."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from qiskit.circuit.library import RGate
from qiskit.quantum_info import Operator, Statevector
from qiskit_aer import AerSimulator

from executors.circuits import parse_qasm
from frontends.qcos.program import ProgramError, ProgramTooLarge, lower, qcos_counts

LIMITS = {"max_qubits": 8, "max_instructions": 64}
PI = math.pi


def rphi(qubit: int, axis: float, angle: float) -> dict[str, Any]:
    return {"op": "RPHI", "qubit": qubit, "axis": axis, "angle": angle}


def cz(ctrl: int, qubit: int) -> dict[str, Any]:
    return {"op": "CZ", "ctrl": ctrl, "qubit": qubit}


def measure(*qubits: int) -> dict[str, Any]:
    return {"op": "MEASURE", "qubits": list(qubits)}


def x(qubit: int) -> dict[str, Any]:
    return rphi(qubit, 0.0, PI)


def y90(qubit: int, sign: float = 1.0) -> dict[str, Any]:
    return rphi(qubit, PI / 2, sign * PI / 2)


def sample(program: list[dict[str, Any]], shots: int = 200, **kwargs: Any) -> dict[str, int]:
    """Run a program as the node would, and return QCOS's counts."""
    lowered = lower(program, **LIMITS, **kwargs)
    circuit = parse_qasm(lowered.qasm)
    counts = AerSimulator(seed_simulator=7).run(circuit, shots=shots).result().get_counts()
    result = qcos_counts(counts, len(lowered.readout))
    assert sum(result.values()) == shots
    return result


def unitary_part(program: list[dict[str, Any]]) -> Any:
    return parse_qasm(lower(program, **LIMITS).qasm).remove_final_measurements(inplace=False)


# -- lowering ------------------------------------------------------------------------------


def test_lowered_text_parses_with_the_nodes_parser() -> None:
    program = [
        x(0),
        {"op": "IDLE", "qubit": 5, "delay_ns": 20.0},
        cz(0, 1),
        {"op": "ECHO", "qubit": 1},
        measure(2, 0),
    ]
    lowered = lower(program, **LIMITS)
    assert (lowered.num_qubits, lowered.readout, lowered.instructions) == (6, (2, 0), 5)
    circuit = parse_qasm(lowered.qasm)
    assert (circuit.num_qubits, circuit.num_clbits) == (6, 2)
    measured = [
        (circuit.find_bit(item.qubits[0]).index, circuit.find_bit(item.clbits[0]).index)
        for item in circuit.data
        if item.operation.name == "measure"
    ]
    assert measured == [(2, 0), (0, 1)]
    assert [item.operation.name for item in circuit.data] == ["u3", "cz", "measure", "measure"]


def test_qcos_fields_it_does_not_use_are_accepted() -> None:
    # QCOS's superconducting adapter puts `order` on every instruction.
    program = [{**x(0), "order": 0, "label": "pulse"}, {**measure(0), "order": 1}]
    assert lower(program, **LIMITS).readout == (0,)


@pytest.mark.parametrize(
    ("angle", "axis"),
    [(PI, 0.0), (PI / 2, PI / 2), (-PI / 2, PI / 2), (0.3, -1.1), (-2.5, 4.0), (1, 0), (0.0, 2.0)],
)
def test_rphi_is_qiskits_rgate(angle: float, axis: float) -> None:
    lowered = unitary_part([rphi(0, axis, angle), measure(0)])
    expected = RGate(angle, axis)
    assert Operator(lowered).equiv(Operator(expected))
    # Not merely up to a global phase: the same matrix.
    assert np.allclose(Operator(lowered).data, expected.to_matrix(), atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    angle=st.floats(-4 * PI, 4 * PI, allow_nan=False),
    axis=st.floats(-4 * PI, 4 * PI, allow_nan=False),
)
def test_rphi_is_qiskits_rgate_at_any_angle(angle: float, axis: float) -> None:
    lowered = unitary_part([rphi(0, axis, angle), measure(0)])
    assert np.allclose(Operator(lowered).data, RGate(angle, axis).to_matrix(), atol=1e-9)


@pytest.mark.parametrize("value", [0.1 + 2**-50, 1e-300, 5e-324, -1e20, 123456.789012345678])
def test_angles_keep_every_bit(value: float) -> None:
    circuit = parse_qasm(lower([rphi(0, value, value), measure(0)], **LIMITS).qasm)
    assert circuit.data[0].operation.params == [value, value - PI / 2, -value + PI / 2]


def test_idle_and_echo_change_nothing() -> None:
    gates = [y90(0), y90(1), cz(0, 1), rphi(1, 0.4, -0.7)]
    padded = [
        {"op": "IDLE", "qubit": 0, "delay_ns": 0},
        gates[0],
        {"op": "ECHO", "qubit": 1},
        gates[1],
        {"op": "IDLE", "qubit": 1, "delay_ns": 1500.5},
        gates[2],
        {"op": "ECHO", "qubit": 0},
        gates[3],
    ]
    plain = Statevector(unitary_part([*gates, measure(0, 1)]))
    assert Statevector(unitary_part([*padded, measure(0, 1)])) == plain
    # And the comparison can tell programs apart.
    assert Statevector(unitary_part([*gates[:3], measure(0, 1)])) != plain


# -- counts through a simulator ------------------------------------------------------------


@pytest.mark.parametrize(
    ("flipped", "readout", "key"),
    [
        (0, (0, 1), "10"),
        (0, (1, 0), "01"),
        (2, (0, 1, 2), "001"),
        (2, (2, 0, 1), "100"),
        (1, (1,), "1"),
        (0, (1,), "0"),
    ],
)
def test_key_character_j_is_readout_qubit_j(
    flipped: int, readout: tuple[int, ...], key: str
) -> None:
    assert sample([x(flipped), measure(*readout)]) == {key: 200}


def test_bell_pair_gives_only_00_and_11() -> None:
    counts = sample([y90(0), y90(1), cz(0, 1), y90(1, -1), measure(0, 1)])
    assert set(counts) == {"00", "11"}
    assert min(counts.values()) > 50


def test_ghz4_gives_only_0000_and_1111() -> None:
    program = [y90(q) for q in range(4)]
    for target in (1, 2, 3):
        program += [cz(0, target), y90(target, -1)]
    counts = sample([*program, measure(3, 1, 0, 2)])
    assert set(counts) == {"0000", "1111"}
    assert min(counts.values()) > 50


def test_agrees_with_qcos_own_superconducting_translation() -> None:
    """QCOS's adapter (folds Z into RPHI axes, turns CX into H-CZ-H) and this lowering must
    give the original circuit's distribution, keyed in QCOS's readout order."""
    adapter_module = pytest.importorskip("hal.mc.modalities.superconducting")
    source = (
        'OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[3];\ncreg c[3];\n'
        "ry(1.0) q[0];\nh q[1];\nt q[1];\nh q[1];\ncx q[1],q[2];\ns q[2];\nrx(3.0) q[2];\n"
        "rz(0.4) q[0];\nsx q[0];\ncy q[0],q[1];\nswap q[0],q[2];\nry(3.0) q[1];\n"
        "measure q[2] -> c[0];\nmeasure q[0] -> c[1];\nmeasure q[1] -> c[2];\n"
    )
    native = adapter_module.SuperconductingAdapter().translate(source)
    lowered = lower(native.instructions, qubit_subset=list(native.readout_order), **LIMITS)
    assert lowered.readout == (2, 0, 1)

    # probabilities_dict puts qargs[0] rightmost; reversed, character j is qubit qargs[j].
    original = parse_qasm(source).remove_final_measurements(inplace=False)
    probabilities = Statevector(original).probabilities_dict(qargs=[2, 0, 1])
    want = {str(key)[::-1]: float(p) for key, p in probabilities.items()}
    # Every other order of the characters moves some outcome by more than 0.2, so the
    # comparison below fails on any wrong key order.
    assert max(abs(want[key[::-1]] - p) for key, p in want.items()) > 0.2

    counts = sample(native.instructions, shots=4000, qubit_subset=[2, 0, 1])
    for key, p in want.items():
        assert abs(counts.get(key, 0) / 4000 - p) < 0.05, key


# -- malformed programs --------------------------------------------------------------------

# Each bad instruction goes in at index 2, after two good ones, before MEASURE.
BAD_INSTRUCTIONS = [
    (5, "instruction 2: expected an object, got int"),
    ([x(0)], "instruction 2: expected an object, got list"),
    ({"qubit": 0}, "instruction 2: missing 'op'"),
    ({"op": "H", "qubit": 0}, "instruction 2: unknown op 'H'; expected one of RPHI, CZ"),
    ({"op": "rphi", "qubit": 0, "axis": 0, "angle": 1}, "unknown op 'rphi'"),
    ({"op": "RPHI", "qubit": 0, "axis": 0}, r"instruction 2 \(RPHI\): angle: Field required"),
    ({**x(0), "qubit": True}, r"instruction 2 \(RPHI\): qubit: Input should be a valid integer"),
    ({**x(0), "qubit": 1.0}, r"\(RPHI\): qubit: Input should be a valid integer"),
    ({**x(0), "qubit": "1"}, r"\(RPHI\): qubit: Input should be a valid integer"),
    ({**x(0), "qubit": -1}, r"\(RPHI\): qubit: Input should be greater than or equal to 0"),
    ({**x(0), "angle": math.nan}, r"\(RPHI\): angle: Input should be a finite number"),
    ({**x(0), "axis": math.inf}, r"\(RPHI\): axis: Input should be a finite number"),
    ({**x(0), "angle": True}, r"\(RPHI\): angle: Input should be a valid number"),
    ({**x(0), "angle": "3.14"}, r"\(RPHI\): angle: Input should be a valid number"),
    ({"op": "CZ", "ctrl": "0", "qubit": 1}, r"instruction 2 \(CZ\): ctrl: Input should be a vali"),
    ({"op": "CZ", "ctrl": 0}, r"instruction 2 \(CZ\): qubit: Field required"),
    (cz(1, 1), r"instruction 2 \(CZ\): ctrl and qubit are both 1"),
    ({"op": "IDLE", "qubit": 0}, r"instruction 2 \(IDLE\): delay_ns: Field required"),
    ({"op": "IDLE", "qubit": 0, "delay_ns": -1}, r"delay_ns: Input should be greater than or eq"),
    ({"op": "IDLE", "qubit": 0, "delay_ns": math.inf}, r"delay_ns: Input should be a finite"),
    ({"op": "IDLE", "qubit": 0, "delay_ns": "10"}, r"delay_ns: Input should be a valid number"),
    ({"op": "IDLE", "qubit": False, "delay_ns": 1}, r"\(IDLE\): qubit: Input should be a valid"),
    ({"op": "ECHO"}, r"instruction 2 \(ECHO\): qubit: Field required"),
    ({"op": "ECHO", "qubit": -3}, r"\(ECHO\): qubit: Input should be greater than or equal to 0"),
    ({**x(0), "order": "2"}, r"instruction 2 \(RPHI\): order: Input should be a valid integer"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_INSTRUCTIONS)
def test_a_malformed_instruction_is_named(bad: object, message: str) -> None:
    with pytest.raises(ProgramError, match=message) as caught:
        lower([x(0), y90(1), bad, measure(0, 1)], **LIMITS)
    assert type(caught.value) is ProgramError


BAD_PROGRAMS = [
    ({"op": "MEASURE", "qubits": [0]}, "must be a JSON list of instructions, got dict"),
    ('[{"op": "MEASURE", "qubits": [0]}]', "must be a JSON list of instructions, got str"),
    (None, "must be a JSON list of instructions, got NoneType"),
    ([], "no MEASURE"),
    ([x(0), cz(0, 1)], "no MEASURE"),
    ([x(0), measure(0), cz(0, 1)], r"instruction 1 \(MEASURE\): MEASURE must be the last"),
    ([measure(0), measure(1)], "2 MEASURE instructions"),
    ([x(0), measure(0), x(1), measure(1)], r"2 MEASURE instructions \(instructions 1, 3\)"),
    ([x(0), measure()], r"instruction 1 \(MEASURE\): qubits: List should have at least 1 item"),
    ([x(0), {"op": "MEASURE"}], r"\(MEASURE\): qubits: Field required"),
    ([x(0), {"op": "MEASURE", "qubits": 0}], r"\(MEASURE\): qubits: Input should be a valid list"),
    ([x(0), measure(0, 1, 0)], r"\(MEASURE\): qubits: qubit 0 appears more than once"),
    ([{"op": "MEASURE", "qubits": [0, True]}], r"\(MEASURE\): qubits\[1\]: Input should be a val"),
    ([{"op": "MEASURE", "qubits": [0, -1]}], r"qubits\[1\]: Input should be greater than or eq"),
    (
        [{**x(0), "order": 4}, {**x(1), "order": 4}, measure(0)],
        r"instruction 1 \(RPHI\): order: 4 does not follow instruction 0's order 4",
    ),
]


@pytest.mark.parametrize(("program", "message"), BAD_PROGRAMS)
def test_a_malformed_program_is_refused(program: object, message: str) -> None:
    with pytest.raises(ProgramError, match=message) as caught:
        lower(program, **LIMITS)
    assert type(caught.value) is ProgramError


def test_qubit_subset_must_be_the_readout_order() -> None:
    program = [x(0), measure(1, 0)]
    assert lower(program, qubit_subset=[1, 0], **LIMITS).readout == (1, 0)
    with pytest.raises(ProgramError, match=r"qubit_subset \[0, 1\] differs .* qubits \[1, 0\]"):
        lower(program, qubit_subset=[0, 1], **LIMITS)
    with pytest.raises(ProgramError, match=r"qubit_subset \[1\] differs"):
        lower(program, qubit_subset=[1], **LIMITS)
    with pytest.raises(ProgramError, match=r"config.qubit_subset\[1\]: Input should be a valid"):
        lower(program, qubit_subset=[1, True], **LIMITS)
    with pytest.raises(ProgramError, match=r"config.qubit_subset: Input should be a valid list"):
        lower(program, qubit_subset="1,0", **LIMITS)


# -- limits --------------------------------------------------------------------------------


def test_the_device_limits_hold_at_their_edges() -> None:
    assert lower([x(7), measure(7)], **LIMITS).num_qubits == 8
    assert lower([x(0)] * 63 + [measure(0)], **LIMITS).instructions == 64


@pytest.mark.parametrize(
    ("program", "message"),
    [
        ([x(0)] * 64 + [measure(0)], "the program has 65 instructions; this device allows at "),
        ([x(8), measure(0)], r"instruction 0 \(RPHI\): qubit 8 is beyond this device's 8 qubits"),
        ([cz(9, 0), measure(0)], r"instruction 0 \(CZ\): qubit 9 is beyond"),
        ([cz(0, 10**30), measure(0)], r"\(CZ\): qubit 1000000000000000000000000000000 is beyo"),
        ([{"op": "IDLE", "qubit": 8, "delay_ns": 1}, measure(0)], r"\(IDLE\): qubit 8 is beyo"),
        ([{"op": "ECHO", "qubit": 8}, measure(0)], r"\(ECHO\): qubit 8 is beyond"),
        ([x(0), measure(0, 8)], r"instruction 1 \(MEASURE\): qubit 8 is beyond"),
    ],
)
def test_a_program_past_the_limits_is_too_large(
    program: list[dict[str, Any]], message: str
) -> None:
    with pytest.raises(ProgramTooLarge, match=message):
        lower(program, **LIMITS)


# -- count keys ----------------------------------------------------------------------------


def test_counts_are_reversed_into_qcos_order() -> None:
    assert qcos_counts({"001": 5, "110": 3}, 3) == {"100": 5, "011": 3}


def test_short_keys_are_padded_with_the_high_bits() -> None:
    # Qiskit "1" is c[0] = 1: QCOS's first character.
    assert qcos_counts({"1": 4, "10": 2}, 3) == {"100": 4, "010": 2}


def test_keys_for_one_outcome_are_merged() -> None:
    assert qcos_counts({"01": 3, "1": 2, "0x1": 1, "0 1": 4, "00": 7}, 2) == {"10": 10, "00": 7}


def test_hex_keys_are_widened_to_the_readout() -> None:
    assert qcos_counts({"0x0": 1, "0x1": 2, "0x4": 3, "0X6": 4}, 3) == {
        "000": 1,
        "100": 2,
        "001": 3,
        "011": 4,
    }


@pytest.mark.parametrize(
    ("counts", "width", "message"),
    [
        ({"101": 1}, 2, "wider than the 2-bit readout"),
        ({"0x4": 1}, 2, "does not fit the 2-bit readout"),
        ({"012": 1}, 3, "neither a bitstring nor a hex word"),
        ({"": 1}, 3, "neither a bitstring nor a hex word"),
        ({"0x": 1}, 3, "neither a bitstring nor a hex word"),
        ({"1": 1}, 0, "at least one bit wide"),
    ],
)
def test_keys_that_do_not_fit_are_refused(counts: dict[str, int], width: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        qcos_counts(counts, width)


# -- every executor runs what a program lowers to ------------------------------------------


def _counts_on(executor: Any, program: list[dict[str, Any]], shots: int) -> dict[str, int]:
    from executors.base import Experiment, Job

    lowered = lower(program, max_qubits=8, max_instructions=100)
    job = Job("qcos", (Experiment(parse_qasm(lowered.qasm), shots),))
    try:
        experiment = executor.run(job).experiments[0]
    finally:
        executor.close()
    return qcos_counts(experiment.counts, len(lowered.readout))


def test_the_gpu_executor_runs_lowered_programs() -> None:
    """Its NumPy backend (the same lowering as on a GPU, no CUDA needed)."""
    from executors.gpu import GpuExecutor

    flip = _counts_on(GpuExecutor({"backend": "numpy", "seed": 2}), [x(0), measure(0, 1)], 300)
    assert flip == {"10": 300}
    bell = _counts_on(GpuExecutor({"backend": "numpy", "seed": 2}),
                      [y90(0), y90(1), cz(0, 1), y90(1, -1), measure(1, 0)], 400)
    assert set(bell) == {"00", "11"} and min(bell.values()) > 100


def test_qibolab_emulator_runs_lowered_programs() -> None:
    """Pulse-level: QCOS's RPHI and CZ through qibolab's natives on the emulated device."""
    qibolab = pytest.importorskip("executors.qibolab", reason="needs the hardware extra")
    flip = _counts_on(qibolab.QibolabExecutor({"platform": "emulated_2q"}),
                      [x(1), measure(0, 1)], 500)
    assert flip.get("01", 0) > 400, flip  # the emulated device has real readout error

