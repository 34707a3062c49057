"""Soak: many small jobs through the embedded orchestrator into the real daemon (a
subprocess, over TLS NNG), a fixed number in flight. Prints jobs/s overall and per
segment, latency percentiles, the RSS of the daemon and of its executor worker at the
start and after each segment, and the result store's row count. Asserts nothing:
a failed job is counted and shown, not raised.

    python -m bench.soak [--jobs 20000] [--in-flight 32] [--segment 5000] [--shots 100]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sqlite3
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil  # a dependency of qiskit-aer, so always present beside the daemon

from bench.throughput import percentile
from bench.traffic import shapes
from frontends.qpi.orchestrator import LocalOrchestrator
from tests.conftest import Daemon, daemon_env, start_daemon


@dataclass
class Segment:
    jobs: int
    seconds: float
    latencies: list[float]
    outcomes: Counter[str] = field(default_factory=Counter)

    @property
    def rate(self) -> float:
        return self.jobs / self.seconds


def rss_mb(pid: int | None) -> float | None:
    """Resident set size from /proc/<pid>/status, in MiB; None if there is no such process."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return None


def worker_pid(daemon_pid: int) -> int | None:
    """The executor worker: the daemon's multiprocessing child that is not a resource tracker."""
    try:
        for child in psutil.Process(daemon_pid).children():
            cmd = " ".join(child.cmdline())
            if "--multiprocessing-fork" in cmd and "resource_tracker" not in cmd:
                return child.pid
    except psutil.Error:
        pass
    return None


def store_rows(data_dir: Path) -> int | None:
    db = data_dir / "results.sqlite3"
    if not db.exists():
        return None
    # Read-only beside the live daemon: WAL lets a reader in without blocking its writes.
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return int(con.execute("SELECT COUNT(*) FROM jobs").fetchone()[0])
    finally:
        con.close()


async def run_segment(orch: LocalOrchestrator, first: int, jobs: int, shots: int,
                      in_flight: int) -> Segment:
    """`jobs` Bell jobs with distinct OpenQASM 3 texts (seeded by job number, as
    qpi-client would send them), `in_flight` outstanding at all times."""
    # Built before the clock starts: the bench's own qasm3.dumps is not the daemon's time.
    payloads = iter(shapes(shots)["Bell"].jobs(iter(range(first, first + jobs)), jobs))
    latencies: list[float] = []
    outcomes: Counter[str] = Counter()

    async def client() -> None:
        for payload in payloads:
            t0 = time.perf_counter()
            record = orch.submit(payload)
            try:
                done = await orch.result(record.id, timeout=600)
            except TimeoutError:
                outcomes["no answer in 600 s"] += 1
                continue
            latencies.append(time.perf_counter() - t0)
            results = done.results or {}
            outcomes[done.status if "error" not in results
                     else f"{done.status} {results.get('error_code')}"] += 1

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(in_flight)))
    return Segment(jobs, time.perf_counter() - started, latencies, outcomes)


def memory_line(label: str, d: Daemon, data_dir: Path) -> str:
    daemon, worker = rss_mb(d.proc.pid), rss_mb(worker_pid(d.proc.pid))

    def mb(v: float | None) -> str:
        return "   -  " if v is None else f"{v:6.1f}"

    return (f"{label:<22} daemon RSS {mb(daemon)} MiB  worker RSS {mb(worker)} MiB  "
            f"store rows {store_rows(data_dir)}")


async def main(args: argparse.Namespace) -> None:
    orch = LocalOrchestrator(port=0, driver_name="soak", wire_format=args.wire_format)
    await orch.start()
    tmp = Path(tempfile.mkdtemp(prefix="qpi-soak-"))
    d = start_daemon(tmp, daemon_env(tmp, orch, QPI_LOG_LEVEL=args.log_level))
    data_dir = tmp / "data"
    try:
        while not orch.online:
            if d.proc.poll() is not None:
                raise SystemExit(f"daemon exited {d.proc.returncode}:\n{d.output()[-3000:]}")
            await asyncio.sleep(0.05)
        await run_segment(orch, -100, 100, args.shots, 4)  # warm: executor, codecs, store
        print(f"# {args.jobs} Bell jobs of {args.shots} shots, {args.in_flight} in flight, "
              f"wire format {args.wire_format}, daemon log level {args.log_level}, "
              f"{psutil.cpu_count()} cores; data in {tmp}", flush=True)
        print(memory_line("start (after warm-up)", d, data_dir), flush=True)
        print(f"{'segment':<16} {'jobs':>6} {'s':>8} {'jobs/s':>8} {'p50 ms':>8} {'p99 ms':>8}"
              "  outcomes", flush=True)
        segments: list[Segment] = []
        for index, first in enumerate(range(0, args.jobs, args.segment), 1):
            size = min(args.segment, args.jobs - first)
            seg = await run_segment(orch, first, size, args.shots, args.in_flight)
            segments.append(seg)
            lat = seg.latencies or [0.0]
            print(f"{first:>7}-{first + size - 1:<8} {size:>6} {seg.seconds:>8.1f} "
                  f"{seg.rate:>8.1f} {statistics.median(lat) * 1e3:>8.2f} "
                  f"{percentile(lat, 0.99) * 1e3:>8.2f}  {dict(seg.outcomes)}", flush=True)
            print(memory_line(f"  after segment {index}", d, data_dir), flush=True)
        total = sum(s.seconds for s in segments)
        everything = [x for s in segments for x in s.latencies] or [0.0]
        outcomes = sum((s.outcomes for s in segments), Counter())
        print(f"{'overall':<16} {args.jobs:>6} {total:>8.1f} {args.jobs / total:>8.1f} "
              f"{statistics.median(everything) * 1e3:>8.2f} "
              f"{percentile(everything, 0.99) * 1e3:>8.2f}  {dict(outcomes)}")
        print(memory_line("end", d, data_dir))
        print(f"orchestrator: {orch.connects} connect(s), "
              f"{sum(r.dispatches > 1 for r in orch.jobs.values())} job(s) dispatched again")
    finally:
        code = d.stop(timeout=60)
        await orch.stop()
        print(f"daemon exit status {code}; store rows after stop {store_rows(data_dir)}")
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--segment", type=int, default=5_000, help="jobs per reported segment")
    parser.add_argument("--in-flight", type=int, default=32, choices=range(16, 65),
                        metavar="16..64")
    parser.add_argument("--shots", type=int, default=100)
    parser.add_argument("--wire-format", choices=["msgpack", "json"], default="msgpack")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--keep", action="store_true", help="keep the data dir and daemon log")
    asyncio.run(main(parser.parse_args()))
