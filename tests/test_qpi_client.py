"""The public `qpi-client` package reads our results through its Qiskit backend,
and `qpi-driver submit` works against the local driver in local mode."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

from qiskit import QuantumCircuit
from qiskit.circuit import Parameter
from qpi_client import QPIClient

from frontends.qpi.orchestrator import LocalOrchestrator
from tests.conftest import (
    ROOT,
    Daemon,
    aer_max_qubits,
    daemon_env,
    local_url,
    start_daemon,
)


def _bell() -> QuantumCircuit:
    qc = QuantumCircuit(2, 2)
    qc.h(0)
    qc.cx(0, 1)
    qc.measure([0, 1], [0, 1])
    return qc


async def test_qpi_client_backend_reads_counts(
    orchestrator: LocalOrchestrator, daemon: Daemon
) -> None:
    def use_client() -> tuple[dict[str, int], int, dict[str, int]]:
        client = QPIClient(orchestrator.url, api_token="any")
        backend = client.get_backend(orchestrator.driver_name)
        result = backend.run(_bell(), shots=2048).result(timeout=60, wait=0.05)
        theta = Parameter("theta")
        qc = QuantumCircuit(1, 1)
        qc.rx(theta, 0)
        qc.measure(0, 0)
        swept = backend.run(qc, shots=500, parameter_values=[{theta: 3.141592653589793}])
        flipped = swept.result(timeout=60, wait=0.05).get_counts()
        return result.get_counts(), backend.num_qubits, flipped

    counts, num_qubits, flipped = await asyncio.to_thread(use_client)
    assert set(counts) <= {"00", "11"} and sum(counts.values()) == 2048
    assert min(counts.values()) > 800
    assert num_qubits == aer_max_qubits()  # Aer's limit, reported by GET /api/qpus/{name}
    assert flipped == {"1": 500}


async def test_qpi_client_sees_failures_as_errors(
    orchestrator: LocalOrchestrator, daemon: Daemon
) -> None:
    def use_client() -> str:
        client = QPIClient(orchestrator.url)
        backend = client.get_backend(orchestrator.driver_name)
        job = backend.run(qasm="OPENQASM 3.0;\nqubit[1] q;\nfoo q[0];\n", shots=10)
        try:
            job.result(timeout=60, wait=0.05)
        except RuntimeError as exc:
            return str(exc)
        return "no error"

    message = await asyncio.to_thread(use_client)
    assert "circuit 0" in message and "line 3" in message


async def test_local_mode_runs_a_circuit_end_to_end(tmp_path: Path) -> None:
    """`qpi-driver --executor aer` with no orchestrator, then `qpi-driver submit`."""
    env = daemon_env(tmp_path, None, QPI_LOG_FORMAT="console")
    d = start_daemon(tmp_path, env, "--executor", "aer", "--local-port", "0")
    try:
        url = await local_url(d)
        proc = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "driver", "submit", str(ROOT / "examples/bell.qasm"),
             "--shots", "500", "--url", url],
            env=env, capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        assert "completed on aer" in proc.stdout
        rows = re.findall(r"^\s+([01]{2})\s+(\d+)\s+[\d.]+%\s+#+$", proc.stdout, re.M)
        assert {k for k, _ in rows} <= {"00", "11"}
        assert sum(int(n) for _, n in rows) == 500
    finally:
        assert d.stop() == 0, d.output()
