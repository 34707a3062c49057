"""Circuits the tests share."""

from __future__ import annotations

from pathlib import Path

from qiskit import ClassicalRegister, QuantumCircuit, QuantumRegister

BELL = (Path(__file__).resolve().parent.parent / "examples/bell2.qasm").read_text()

# Two registers, clbits written out of qubit order: a[0]=1, b[0]=0, b[1]=1 -> "101".
REGISTERS = """OPENQASM 2.0;
include "qelib1.inc";
qreg q[3];
creg a[1];
creg b[2];
x q[0];
x q[2];
measure q[0] -> a[0];
measure q[1] -> b[0];
measure q[2] -> b[1];
"""

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
