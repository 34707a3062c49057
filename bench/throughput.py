"""End-to-end throughput and latency of the daemon through the embedded
orchestrator over TLS NNG, beside a bare in-process Aer loop measured in the
same run. Prints medians and ratios; asserts nothing.

The bare loop runs in a child process of its own, as the daemon does, so neither
shares an interpreter with the orchestrator; cases are interleaved over rounds
because this machine is shared and noisy.

    python -m bench.throughput [--jobs 300] [--rounds 3] [--wire-format msgpack]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from driver.orchestrator import LocalOrchestrator  # noqa: E402

BELL = (ROOT / "examples/bell2.qasm").read_text()


def random_circuit_qasm(qubits: int = 20, layers: int = 20, seed: int = 7) -> str:
    """A quantum-volume-like circuit in standard gates: random U layers, random CX pairs."""
    rng = random.Random(seed)
    lines = ["OPENQASM 2.0;", 'include "qelib1.inc";', f"qreg q[{qubits}];",
             f"creg c[{qubits}];"]
    for _ in range(layers):
        for q in range(qubits):
            a, b, c = (rng.uniform(0, 6.283) for _ in range(3))
            lines.append(f"u3({a:.6f},{b:.6f},{c:.6f}) q[{q}];")
        order = list(range(qubits))
        rng.shuffle(order)
        for i in range(0, qubits - 1, 2):
            lines.append(f"cx q[{order[i]}],q[{order[i + 1]}];")
    lines.append("measure q -> c;")
    return "\n".join(lines) + "\n"


def unique(source: str, n: int) -> str:
    # A distinct text per job so neither side benefits from a parse cache.
    return source + f"// job {n}\n"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def bare_loop(source: str, jobs: int, shots: int) -> tuple[float, list[float]]:
    """Parse, then run one job at a time on one reused AerSimulator."""
    from qiskit import qasm2
    from qiskit_aer import AerSimulator

    sim = AerSimulator()
    latencies = []
    started = time.perf_counter()
    for n in range(jobs):
        t0 = time.perf_counter()
        qc = qasm2.loads(unique(source, n), custom_instructions=qasm2.LEGACY_CUSTOM_INSTRUCTIONS)
        sim.run(qc, shots=shots).result().get_counts()
        latencies.append(time.perf_counter() - t0)
    return jobs / (time.perf_counter() - started), latencies


async def driven(orch: LocalOrchestrator, source: str, jobs: int, shots: int,
                 in_flight: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    counter = iter(range(jobs))

    async def worker() -> None:
        for n in counter:
            t0 = time.perf_counter()
            record = orch.submit({"circuits": [unique(source, n)], "shots": shots})
            done = await orch.result(record.id, timeout=600)
            latencies.append(time.perf_counter() - t0)
            assert done.status == "completed", done.results

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return jobs / (time.perf_counter() - started), latencies


def bare_in_child(source: str, jobs: int, shots: int) -> list[float]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.throughput", "--bare", str(jobs), "--shots", str(shots)],
        input=source, capture_output=True, text=True, check=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    return list(json.loads(out.stdout))


def row(name: str, rate: float, lat: list[float]) -> str:
    return (f"{name:<38} {rate:>9.1f} {statistics.median(lat) * 1e3:>10.3f} "
            f"{percentile(lat, 0.99) * 1e3:>10.3f}")


async def main(args: argparse.Namespace) -> None:
    orch = LocalOrchestrator(port=0, driver_name="bench", wire_format=args.wire_format)
    await orch.start()
    data = tempfile.mkdtemp(prefix="qpi-bench-")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "QPI_ADDR": orch.url,
           "QPI_ACCESS_TOKEN": orch.token, "QPI_CA_FINGERPRINT": orch.ca_fingerprint or "",
           "QPI_DATA_DIR": data, "QPI_METRICS_ADDR": "", "QPI_LOG_FORMAT": "json",
           "QPI_LOG_LEVEL": args.log_level}
    log = open(Path(data) / "daemon.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "driver"], env=env, stdout=log, stderr=log)
    try:
        while not orch.online:
            if proc.poll() is not None:
                raise SystemExit(f"daemon exited {proc.returncode}; see {log.name}")
            await asyncio.sleep(0.05)
        big = random_circuit_qasm()
        await driven(orch, BELL, 50, 1024, 1)  # warm both sides
        cases: dict[str, list[float]] = {}
        rates: dict[str, list[float]] = {}

        def note(name: str, rate: float, lat: list[float]) -> None:
            cases.setdefault(name, []).extend(lat)
            rates.setdefault(name, []).append(rate)

        for _ in range(args.rounds):
            t0 = time.perf_counter()
            lat = bare_in_child(BELL, args.jobs, 1024)
            note("bare loop, Bell 1024 shots", len(lat) / sum(lat), lat)
            note("driver, Bell 1024 shots, 1 in flight",
                 *await driven(orch, BELL, args.jobs, 1024, 1))
            note("driver, Bell 1024 shots, 16 in flight",
                 *await driven(orch, BELL, args.jobs * 2, 1024, 16))
            lat = bare_in_child(big, args.big_jobs, 1024)
            note("bare loop, 20-qubit random", len(lat) / sum(lat), lat)
            note("driver, 20-qubit random, 1 in flight",
                 *await driven(orch, big, args.big_jobs, 1024, 1))
            print(f"# round done in {time.perf_counter() - t0:.1f} s", flush=True)
        print(f"# wire format {args.wire_format}, daemon log level {args.log_level}, "
              f"{os.cpu_count()} cores, {args.rounds} rounds; latencies in ms; jobs/s is "
              "the median over rounds")
        print(f"{'case':<38} {'jobs/s':>9} {'p50':>10} {'p99':>10}")
        for name, lat in cases.items():
            print(row(name, statistics.median(rates[name]), lat))
        med = {name: statistics.median(lat) for name, lat in cases.items()}
        rate = {name: statistics.median(r) for name, r in rates.items()}
        print()
        ratio = rate["driver, Bell 1024 shots, 16 in flight"] / rate["bare loop, Bell 1024 shots"]
        gap = (med["driver, Bell 1024 shots, 1 in flight"] - med["bare loop, Bell 1024 shots"])
        big_ratio = med["driver, 20-qubit random, 1 in flight"] / med["bare loop, 20-qubit random"]
        print(f"16 in flight / bare jobs/s:   {ratio:6.2f}x    (goal >= 1)")
        print(f"1 in flight p50 - bare p50:   {gap * 1e3:+6.3f} ms (goal <= +0.3 ms)")
        print(f"20-qubit p50 driver / bare:   {big_ratio:6.3f}x    (goal <= 1.05)")
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
        await orch.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bare", type=int, help=argparse.SUPPRESS)  # child: N jobs from stdin
    parser.add_argument("--shots", type=int, default=1024, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--big-jobs", type=int, default=7)
    parser.add_argument("--wire-format", choices=["msgpack", "json"], default="msgpack")
    parser.add_argument("--log-level", default="info")
    cli = parser.parse_args()
    if cli.bare:
        print(json.dumps(bare_loop(sys.stdin.read(), cli.bare, cli.shots)[1]))
    else:
        asyncio.run(main(cli))
