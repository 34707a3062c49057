"""Circuits the tests share."""

from __future__ import annotations

from pathlib import Path

from qiskit import ClassicalRegister, QuantumCircuit, QuantumRegister

BELL = (Path(__file__).resolve().parent.parent / "examples/bell2.qasm").read_text()

SWEEP_QASM3 = """OPENQASM 3.0;
include "stdgates.inc";
input float theta;
qubit[1] q;
bit[1] c;
rx(theta) q[0];
c[0] = measure q[0];
"""


def teleport(theta: float) -> QuantumCircuit:
    """Teleports ry(theta)|0> with mid-circuit measurements and conditionals."""
    q = QuantumRegister(3, "q")
    m = ClassicalRegister(2, "m")
    out = ClassicalRegister(1, "out")
    qc = QuantumCircuit(q, m, out)
    qc.ry(theta, 0)
    qc.h(1)
    qc.cx(1, 2)
    qc.cx(0, 1)
    qc.h(0)
    qc.measure(0, m[0])
    qc.measure(1, m[1])
    with qc.if_test((m[1], 1)):
        qc.x(2)
    with qc.if_test((m[0], 1)):
        qc.z(2)
    qc.measure(2, out[0])
    return qc
