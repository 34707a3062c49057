"""Jobs/s and latency of the daemon on real traffic (distinct OpenQASM 3 texts as qpi-client
sends them), through the embedded orchestrator over TLS NNG, beside the simulator's
ceiling measured in the same run: Aer's run time alone for the same circuits. Then one job
at a time (what a variational loop does: submit, wait, submit) beside a bare in-process
loop on the same texts (parse, run, next) and beside the transport alone (an echo driver
answering each dispatch over the same TLS NNG pipes), and the PSS of all the node's
processes at idle and after every job of the run.

The ceiling runs in a child process of its own (as the executor does): every circuit is
parsed first, off the clock, then each job is one `AerSimulator.run(...).result()`, in
sequence, and only those calls are timed. Cases are interleaved over rounds because
this machine is shared and noisy; the figures printed are medians over rounds. Also
measures the heartbeat intervals the orchestrator receives under QFT-12 load.
Prints figures; asserts nothing about speed (a job that fails stops the bench).

    python -m bench.throughput [--rounds 3] [--in-flight 16] [--jobs N] [--cases QFT-12,Bell]
                               [--window1-jobs 300] [--no-memory]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.traffic import SHOTS, Shape, pick, texts
from frontends.qpi.orchestrator import LocalOrchestrator
from frontends.qpi.wire import Envelope, EventType
from tests.conftest import Daemon, daemon_env, start_daemon

ROOT = Path(__file__).resolve().parent.parent

# Jobs per case per round when --jobs is not given: enough to keep 16 in flight for a
# few seconds at the goal rate, without making a round of random-20 take minutes.
DEFAULT_JOBS = {"QFT-12": 300, "random-20": 48, "Bell": 600, "sweep": 40}
GOALS = {"QFT-12": 0.8, "random-20": 0.9, "Bell": 0.5}  # driver jobs/s over the ceiling's
WINDOW1_GOAL_MS = 0.3  # one job at a time: p50 at most this far above the bare loop
PSS_GOAL_MIB = 150  # all the node's processes, idle
HEARTBEAT_TOLERANCE = 0.3


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# -- the ceiling: Aer alone, in a child process --------------------------------------------


def ceiling_child() -> None:
    """Child main: per request line (jobs' texts and shots), parse everything, then time
    one Aer run per job; answer with the run seconds of each job. With `bare`, each job
    is timed from its text: parse, then run (a loop a user writes in one process)."""
    from qiskit_aer import AerSimulator

    from executors.circuits import parse_qasm  # the daemon's parser: the same circuits

    sim = AerSimulator()
    for line in sys.stdin:
        request = json.loads(line)
        shots = int(request["shots"])
        seconds = []
        if request.get("bare"):
            for job in request["jobs"]:
                t0 = time.perf_counter()
                result = sim.run([parse_qasm(text) for text in job], shots=shots).result()
                seconds.append(time.perf_counter() - t0)
                if not result.success:
                    raise SystemExit(f"Aer failed a bare-loop job: {result.status}")
            print(json.dumps(seconds), flush=True)
            continue
        jobs = [[parse_qasm(text) for text in job] for job in request["jobs"]]
        for circuits in jobs:
            t0 = time.perf_counter()
            result = sim.run(circuits, shots=shots).result()
            seconds.append(time.perf_counter() - t0)
            if not result.success:
                raise SystemExit(f"Aer failed a ceiling job: {result.status}")
        print(json.dumps(seconds), flush=True)


class Ceiling:
    """Parent side of the ceiling child; started once, reused by every case and round."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT),
               "PYTHONWARNINGS": "ignore::DeprecationWarning"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.throughput", "--ceiling-child"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env,
        )

    def run(self, payloads: Sequence[dict[str, Any]], bare: bool = False) -> list[float]:
        """Aer run seconds of each job, in order (`bare`: parse and run, per job)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        shots = {int(p["shots"]) for p in payloads}
        if len(shots) != 1:
            raise ValueError(f"a ceiling batch needs one shot count, got {sorted(shots)}")
        request = {"shots": shots.pop(), "jobs": [texts(p) for p in payloads], "bare": bare}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise SystemExit(f"the ceiling child exited {self.proc.wait()}; see its stderr above")
        return [float(s) for s in json.loads(answer)]

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- the transport alone: an echo driver --------------------------------------------------

# What the echo answers every dispatch with: a result of the shape the node sends.
ECHO_RESULT = {"success": True, "executor": "echo", "circuit_results": [
    {"counts": {"00": 512, "11": 512}, "shots": 1024,
     "header": {"name": "circuit", "memory_slots": 2}}]}


def echo_child(host: str, in_port: int, out_port: int) -> None:
    """Child main: dial an orchestrator's NNG pipes as the node does (TLS, its CA on
    stdin) and answer each JobDispatch at once with ECHO_RESULT: no store, no parser, no
    executor. One job at a time through it is the floor that the transport (NNG over
    TLS, the codecs, an asyncio loop at each end) sets under any driver."""
    import pynng

    from frontends.qpi.nng import AsyncSocket, tls_client, url
    from frontends.qpi.wire import decode, encode

    ca_pem = json.loads(sys.stdin.readline())

    async def serve() -> None:
        pull = pynng.Pull0(tls_config=tls_client(host, ca_pem), recv_buffer_size=64)
        push = pynng.Push0(tls_config=tls_client(host, ca_pem))
        pull.dial(url(host, in_port, True), block=True)
        push.dial(url(host, out_port, True), block=True)
        inbound, outbound = AsyncSocket(pull), AsyncSocket(push)
        while True:
            env = decode(await inbound.recv())
            if env.type == EventType.JOB_DISPATCH:
                await outbound.send(encode(Envelope(
                    EventType.JOB_RESULT, {"job_id": env.payload["job_id"],
                                           "results": ECHO_RESULT}, driver="echo"), "msgpack"))

    asyncio.run(serve())


class Echo:
    """An orchestrator of its own with the echo driver connected to it."""

    def __init__(self) -> None:
        self.orch = LocalOrchestrator(port=0, driver_name="echo", wire_format="msgpack")
        self.proc: subprocess.Popen[str] | None = None

    async def start(self) -> None:
        await self.orch.start()
        identity = self.orch.nng_identity
        assert identity is not None
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.throughput", "--echo-child", self.orch.host,
             str(self.orch.nng_in_port), str(self.orch.nng_out_port)],
            stdin=subprocess.PIPE, text=True, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(identity.ca_pem) + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + 60
        while not self.orch.online:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the echo driver did not connect (exit {self.proc.poll()})")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        await self.orch.stop()


# -- the daemon side -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Beat:
    arrived: float  # time.monotonic() in this process
    sent: str  # the driver's timestamp on the envelope
    status: str


class TimedOrchestrator(LocalOrchestrator):
    """The embedded orchestrator, noting when each heartbeat arrives."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.beats: list[Beat] = []

    async def _on_event(self, env: Envelope) -> None:
        if env.type == EventType.HEARTBEAT:
            self.beats.append(Beat(time.monotonic(), env.ts, str(env.payload.get("status"))))
        await super()._on_event(env)


async def drive(orch: LocalOrchestrator, payloads: Sequence[dict[str, Any]],
                in_flight: int) -> tuple[float, list[float]]:
    """Submit every payload, `in_flight` outstanding at all times; (seconds, latencies)."""
    queue = iter(payloads)
    latencies: list[float] = []

    async def client() -> None:
        for payload in queue:
            t0 = time.perf_counter()
            record = orch.submit(payload)
            done = await orch.result(record.id, timeout=600)
            latencies.append(time.perf_counter() - t0)
            if done.status != "completed":
                results = done.results or {}
                raise SystemExit(f"job {record.id} {done.status}: {results.get('error_code')} "
                                 f"{results.get('error')}; the figures would be meaningless")

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(in_flight)))
    return time.perf_counter() - started, latencies


# -- one case, one round -----------------------------------------------------------------


@dataclass(slots=True)
class Figures:
    """One case's figures from one round."""

    rate: float
    p50: float
    p99: float
    ceiling_rate: float
    ceiling_p50: float

    @property
    def ratio(self) -> float:
        return self.rate / self.ceiling_rate


@dataclass(slots=True)
class Case:
    key: str  # the shape's key in traffic.shapes(), for goals and job counts
    shape: Shape
    distinct: bool
    jobs: int
    rounds: list[Figures] = field(default_factory=list)

    def median(self, name: str) -> float:
        return statistics.median(getattr(f, name) for f in self.rounds)


async def measure(case: Case, orch: LocalOrchestrator, ceiling: Ceiling, seeds: Iterator[int],
                  in_flight: int, ceiling_first: bool) -> float:
    """Run one round of `case` (both sides, on the same payloads); returns its wall seconds."""
    t0 = time.perf_counter()
    payloads = case.shape.jobs(seeds, case.jobs, case.distinct)  # built before any clock
    run_s: list[float] = []
    if ceiling_first:
        run_s = await asyncio.to_thread(ceiling.run, payloads)
    seconds, latencies = await drive(orch, payloads, in_flight)
    if not ceiling_first:
        run_s = await asyncio.to_thread(ceiling.run, payloads)
    case.rounds.append(Figures(
        rate=len(payloads) / seconds,
        p50=statistics.median(latencies),
        p99=percentile(latencies, 0.99),
        ceiling_rate=len(run_s) / sum(run_s),
        ceiling_p50=statistics.median(run_s),
    ))
    return time.perf_counter() - t0


def table(title: str, cases: Sequence[Case], goals: bool) -> None:
    print(f"\n{title}")
    print(f"{'case':<11} {'jobs':>5} {'jobs/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'Aer jobs/s':>10} {'Aer ms':>7} {'ratio':>6}  goal")
    for c in cases:
        ratio = c.median("ratio")
        goal = GOALS.get(c.key) if goals else None
        verdict = (f">= {goal:.1f}x {'meets' if ratio >= goal else 'below'}"
                   if goal is not None else "-")
        print(f"{c.shape.name:<11} {c.jobs:>5} {c.median('rate'):>8.1f} "
              f"{c.median('p50') * 1e3:>8.1f} {c.median('p99') * 1e3:>8.1f} "
              f"{c.median('ceiling_rate'):>10.1f} {c.median('ceiling_p50') * 1e3:>7.2f} "
              f"{ratio:>5.2f}x  {verdict}")


# -- one job at a time, and memory ----------------------------------------------------------


@dataclass(slots=True)
class WindowOne:
    """One job at a time through the daemon beside the bare loop, per round."""

    shape: Shape
    jobs: int
    daemon: list[tuple[float, float]] = field(default_factory=list)  # (p50, p99) per round
    bare: list[tuple[float, float]] = field(default_factory=list)
    echo: list[tuple[float, float]] = field(default_factory=list)

    async def measure(self, orch: LocalOrchestrator, ceiling: Ceiling, echo: Echo | None,
                      seeds: Iterator[int], bare_first: bool) -> None:
        payloads = self.shape.jobs(seeds, self.jobs)
        if bare_first:
            bare = await asyncio.to_thread(ceiling.run, payloads, True)
        _, latencies = await drive(orch, payloads, 1)
        if not bare_first:
            bare = await asyncio.to_thread(ceiling.run, payloads, True)
        if echo is not None:
            _, echoed = await drive(echo.orch, payloads, 1)
            self.echo.append((statistics.median(echoed), percentile(echoed, 0.99)))
        self.daemon.append((statistics.median(latencies), percentile(latencies, 0.99)))
        self.bare.append((statistics.median(bare), percentile(bare, 0.99)))

    def report(self, goal_ms: float) -> None:
        d50 = statistics.median(r[0] for r in self.daemon) * 1e3
        d99 = statistics.median(r[1] for r in self.daemon) * 1e3
        b50 = statistics.median(r[0] for r in self.bare) * 1e3
        b99 = statistics.median(r[1] for r in self.bare) * 1e3
        deltas = [(d[0] - b[0]) * 1e3 for d, b in zip(self.daemon, self.bare, strict=True)]
        print(f"\none job at a time: {self.shape.name}, {self.jobs} distinct jobs per round, "
              "submit, wait for the result, submit the next")
        print(f"{'':<28} {'p50 ms':>8} {'p99 ms':>8}")
        print(f"{'through the daemon':<28} {d50:>8.2f} {d99:>8.2f}")
        print(f"{'bare loop (parse + Aer run)':<28} {b50:>8.2f} {b99:>8.2f}")
        if self.echo:
            e50 = statistics.median(r[0] for r in self.echo) * 1e3
            e99 = statistics.median(r[1] for r in self.echo) * 1e3
            print(f"{'transport alone (echo)':<28} {e50:>8.2f} {e99:>8.2f}")
        delta = statistics.median(deltas)
        print(f"p50 over the bare loop: {delta:+.2f} ms (rounds: "
              f"{', '.join(f'{x:+.2f}' for x in deltas)}); goal <= +{goal_ms:g} ms: "
              f"{'meets' if delta <= goal_ms else 'above'}")
        if self.echo:
            own = [(d[0] - b[0] - e[0]) * 1e3
                   for d, b, e in zip(self.daemon, self.bare, self.echo, strict=True)]
            print(f"  of which the transport alone: {e50:.2f} ms (an echo driver over the "
                  "same TLS NNG pipes, answering at once);\n  the node's own (daemon, pipes, "
                  f"executor process) over the bare loop: {statistics.median(own):+.2f} ms "
                  f"(rounds: {', '.join(f'{x:+.2f}' for x in own)})")


def node_memory(pid: int) -> tuple[float, float, int]:
    """PSS and RSS (MiB) summed over the daemon and every process under it, and how many."""
    import psutil  # a test dependency

    root = psutil.Process(pid)
    pss = rss = 0.0
    procs = [root, *root.children(recursive=True)]
    for proc in procs:
        info = proc.memory_full_info()
        pss += info.pss
        rss += info.rss
    return pss / 2**20, rss / 2**20, len(procs)


# -- heartbeats under load ------------------------------------------------------------------


def _driver_time(ts: str) -> float:
    return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()


async def heartbeat_phase(orch: TimedOrchestrator, shape: Shape, seeds: Iterator[int],
                          in_flight: int, rate: float, seconds: float, period: float) -> None:
    """QFT-12 distinct load for about `seconds` (sized from the measured `rate`), then the
    intervals between the heartbeats that arrived meanwhile, against `period`."""
    jobs = max(4 * in_flight, math.ceil(rate * seconds))
    payloads = shape.jobs(seeds, jobs)
    first = len(orch.beats)
    took, _ = await drive(orch, payloads, in_flight)
    beats = orch.beats[first:]
    low, high = period * (1 - HEARTBEAT_TOLERANCE), period * (1 + HEARTBEAT_TOLERANCE)
    print(f"\nheartbeats under {shape.name} load: {jobs} jobs in {took:.1f} s "
          f"({jobs / took:.1f} jobs/s), {in_flight} in flight; configured period {period:g} s, "
          f"goal {low:.2f}..{high:.2f} s")
    if len(beats) < 3:
        print(f"  only {len(beats)} heartbeat(s) arrived: run the load longer "
              "(--heartbeat-load) to judge the period")
        return
    arrived = [b.arrived - a.arrived for a, b in itertools.pairwise(beats)]
    sent = [_driver_time(b.sent) - _driver_time(a.sent) for a, b in itertools.pairwise(beats)]
    changed = sum(a.status != b.status for a, b in itertools.pairwise(beats))
    for label, gaps in (("as received", arrived), ("as stamped by the driver", sent)):
        inside = sum(low <= g <= high for g in gaps)
        longest = max(gaps)
        print(f"  {label:<25} n={len(gaps):<4} median {statistics.median(gaps):.3f} s  "
              f"min {min(gaps):.3f}  max {longest:.3f}  within goal {inside}/{len(gaps)}; "
              f"longest {'within' if longest <= high else 'ABOVE'} {high:.2f} s")
    # The daemon also beats at once when its status flips (busy/idle at a batch boundary,
    # coalesced), even when the next batch starts straight away and the beat reads "busy"
    # again: intervals below the period are those, not a fast timer. A stall shows as the
    # longest interval.
    print(f"  {changed} of {len(arrived)} beats changed status; intervals under {low:.2f} s "
          "are beats sent on a status flip at a batch boundary, not the timer")


# -- main ------------------------------------------------------------------------------------


async def wait_online(orch: LocalOrchestrator, d: Daemon) -> None:
    deadline = time.monotonic() + 120
    while not orch.online:
        if d.proc.poll() is not None:
            raise SystemExit(f"daemon exited {d.proc.returncode}:\n{d.output()[-3000:]}")
        if time.monotonic() > deadline:
            raise SystemExit(f"daemon did not connect within 120 s:\n{d.output()[-3000:]}")
        await asyncio.sleep(0.05)


async def main(args: argparse.Namespace) -> None:
    chosen = pick(args.cases, args.shots, args.sweep_rows)
    primary = [Case(k, shape, True, args.jobs or DEFAULT_JOBS[k]) for k, shape in chosen.items()]
    secondary = ([] if args.no_identical else
                 [Case(k, shape, False, args.jobs or DEFAULT_JOBS[k])
                  for k, shape in chosen.items()])
    seeds = itertools.count(1)  # one stream for the whole run: no text is ever sent twice

    tmp = Path(tempfile.mkdtemp(prefix="qpi-bench-"))
    async with contextlib.AsyncExitStack() as stack:  # unwinds in reverse, on any exit
        stack.callback(remove, tmp, args.keep)
        orch = TimedOrchestrator(port=0, driver_name="bench", wire_format=args.wire_format)
        await orch.start()
        stack.push_async_callback(orch.stop)
        d = start_daemon(tmp, daemon_env(tmp, orch, QPI_DRIVER_NAME="bench",
                                         QPI_LOG_LEVEL=args.log_level,
                                         QPI_WIRE_FORMAT=args.wire_format,
                                         QPI_HEARTBEAT_INTERVAL=str(args.heartbeat)))
        stack.callback(stop_daemon, d)
        ceiling = Ceiling()
        stack.callback(ceiling.close)
        echo = None
        if args.window1_jobs > 0 and not args.no_echo:
            echo = Echo()
            stack.push_async_callback(echo.stop)
            await echo.start()
        await wait_online(orch, d)
        idle = None if args.no_memory else await _settled_memory(d)
        await rounds_and_report(args, orch, ceiling, echo, primary, secondary, seeds)
        if idle is not None:
            after = node_memory(d.proc.pid)
            done = sum(1 for job in orch.jobs.values() if job.status == "completed")
            print(f"\nmemory, all the node's processes (the daemon and its children; the "
                  f"orchestrator runs in this bench process):\n  idle, before the first "
                  f"job: PSS {idle[0]:.1f} MiB, RSS {idle[1]:.1f} MiB ({idle[2]} processes); goal "
                  f"PSS <= {PSS_GOAL_MIB} MiB: "
                  f"{'meets' if idle[0] <= PSS_GOAL_MIB else 'above'}"
                  f"\n  after {done} jobs: PSS {after[0]:.1f} MiB, RSS {after[1]:.1f} MiB "
                  f"({after[2]} processes)")


async def rounds_and_report(args: argparse.Namespace, orch: TimedOrchestrator,
                            ceiling: Ceiling, echo: Echo | None, primary: list[Case],
                            secondary: list[Case], seeds: Iterator[int]) -> None:
    """Warm up, run every case in every round, print the tables and the heartbeats."""
    for case in primary:  # warm both sides: executor, codecs, store, Aer
        warm = case.shape.jobs(seeds, 2 if case.key == "random-20" else 8)
        await drive(orch, warm, min(len(warm), args.in_flight))
        await asyncio.to_thread(ceiling.run, warm[:2])
    print(f"# {os.cpu_count()} cores, {args.in_flight} jobs in flight, {args.shots} shots, "
          f"wire format {args.wire_format}, daemon log level {args.log_level}, "
          f"{args.rounds} round(s); figures are medians over rounds", flush=True)
    bell = pick("Bell", args.shots)["Bell"]
    window1 = WindowOne(bell, args.window1_jobs) if args.window1_jobs > 0 else None
    if echo is not None:  # warm the echo's side too
        await drive(echo.orch, bell.jobs(seeds, 20), 1)
    for r in range(args.rounds):
        took = 0.0
        for case in primary + secondary:
            took += await measure(case, orch, ceiling, seeds, args.in_flight,
                                  ceiling_first=r % 2 == 1)
        if window1 is not None:
            t0 = time.perf_counter()
            await window1.measure(orch, ceiling, echo, seeds, bare_first=r % 2 == 1)
            took += time.perf_counter() - t0
        print(f"# round {r + 1} done in {took:.1f} s", flush=True)
    print("\njobs/s: through the daemon, first submit to last result; p50/p99: one job, "
          "submit to result\nAer jobs/s, Aer ms: the ceiling, Aer's run alone on the same "
          "circuits, one job at a time (no parsing, no transport); ratio: jobs/s over Aer "
          "jobs/s\n(the daemon runs queued jobs together in one Aer call, so it can pass 1x)")
    table("distinct OpenQASM 3 texts, as qpi-client sends them", primary, goals=True)
    if secondary:
        table("secondary: one identical text per case (the parse cache hits; not what "
              "clients send)", secondary, goals=False)
    if window1 is not None:
        window1.report(WINDOW1_GOAL_MS)
    qft = next((c for c in primary if c.key == "QFT-12"), None)
    if qft is not None and args.heartbeat_load > 0:
        await heartbeat_phase(orch, qft.shape, seeds, args.in_flight, qft.median("rate"),
                              args.heartbeat_load, args.heartbeat)


async def _settled_memory(d: Daemon) -> tuple[float, float, int]:
    """Idle memory once the node's processes have all started and stopped growing."""
    last = (0.0, 0.0, 0)
    for _ in range(50):
        now = node_memory(d.proc.pid)
        if now[2] == last[2] and abs(now[0] - last[0]) < 1.0:
            return now
        last = now
        await asyncio.sleep(0.2)
    return last


def stop_daemon(d: Daemon) -> None:
    code = d.stop(timeout=60)
    print(f"\n# daemon exit status {code}")
    if code != 0:
        print(d.output()[-3000:], file=sys.stderr)


def remove(tmp: Path, keep: bool) -> None:
    if keep:
        print(f"# kept the data dir and daemon log in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ceiling-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--in-flight", type=int, default=16)
    parser.add_argument("--jobs", type=int, default=0,
                        help="jobs per case per round (default: "
                             + ", ".join(f"{k} {v}" for k, v in DEFAULT_JOBS.items()) + ")")
    parser.add_argument("--cases", default=",".join(DEFAULT_JOBS),
                        help="comma-separated, from: " + ", ".join(DEFAULT_JOBS))
    parser.add_argument("--no-identical", action="store_true",
                        help="skip the identical-text secondary figures")
    parser.add_argument("--shots", type=int, default=SHOTS)
    parser.add_argument("--sweep-rows", type=int, default=16, help="bound circuits per sweep job")
    parser.add_argument("--heartbeat", type=float, default=1.0,
                        help="QPI_HEARTBEAT_INTERVAL for the daemon, seconds")
    parser.add_argument("--heartbeat-load", type=float, default=15.0,
                        help="seconds of QFT-12 load to watch heartbeats under (0: skip)")
    parser.add_argument("--wire-format", choices=["msgpack", "json"], default="msgpack")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--window1-jobs", type=int, default=300,
                        help="Bell jobs per round sent one at a time (0: skip)")
    parser.add_argument("--no-memory", action="store_true", help="skip the PSS figures")
    parser.add_argument("--no-echo", action="store_true",
                        help="skip the transport-alone figure (an echo driver) at window 1")
    parser.add_argument("--echo-child", nargs=3, metavar=("HOST", "IN", "OUT"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--keep", action="store_true", help="keep the data dir and daemon log")
    return parser.parse_args(argv)


if __name__ == "__main__":
    cli = parse_args()
    if cli.ceiling_child:
        ceiling_child()
    elif cli.echo_child:
        echo_child(cli.echo_child[0], int(cli.echo_child[1]), int(cli.echo_child[2]))
    else:
        asyncio.run(main(cli))
