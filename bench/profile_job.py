"""Where one job's time goes, stage by stage, in this process: from the JobDispatch frame
to the JobResult frame, on distinct OpenQASM 3 texts as qpi-client sends them.

Each stage calls the daemon's own public function on the previous stage's output; jobs
of the cases alternate, one at a time, and the table shows each stage's median and its
share of the sum of medians. No transport and no event loop: what is left out here
(NNG, the queue, the daemon's bookkeeping) is the end-to-end figure of bench.throughput
minus this total. Prints figures; asserts nothing about speed.

    python -m bench.profile_job [--jobs 200] [--cases QFT-12,Bell] [--wire-format msgpack]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.traffic import SHOTS, Shape, pick
from driver import __version__
from driver import payload as payload_codec
from driver.jobs import Limits, prepare, read_spec, result_map
from executors.aer import AerExecutor
from executors.base import JobError, JobResult
from frontends.qpi.wire import Envelope, EventType, WireFormat, decode, encode

# What each stage stands for in the daemon, in the order a job meets them.
STAGES = {
    "decode": "frame decode (wire.decode)",
    "validate": "job validation (jobs.read_spec)",
    "prepare": "parse + admission (jobs.prepare)",
    "transfer": "to the executor process (driver.payload)",
    "run": "run (AerExecutor.run_many)",
    "result": "result map (jobs.result_map)",
    "encode": "result encoding (wire.encode)",
}


@dataclass(slots=True)
class Profile:
    """Seconds per stage of every profiled job of one case, and the sizes met on the way."""

    shape: Shape
    seconds: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in STAGES})
    sizes: dict[str, int] = field(default_factory=dict)

    def median(self, stage: str) -> float:
        return statistics.median(self.seconds[stage])

    def total(self) -> float:
        return sum(self.median(stage) for stage in STAGES)


def timed(into: list[float], fn: Callable[[], Any]) -> Any:
    t0 = time.perf_counter()
    out = fn()
    into.append(time.perf_counter() - t0)
    return out


def profile_one(profile: Profile, job_id: str, payload: dict[str, Any], limits: Limits,
                executor: AerExecutor, fmt: WireFormat, keep: bool = True) -> None:
    """One job through every stage; with `keep` False (warm-up) nothing is recorded."""
    s: dict[str, list[float]] = profile.seconds if keep else {stage: [] for stage in STAGES}
    # The orchestrator's side, off the clock: the frame the daemon receives.
    frame = encode(Envelope(EventType.JOB_DISPATCH, {"job_id": job_id, "payload": payload},
                            driver="bench"), fmt)
    env = timed(s["decode"], lambda: decode(frame))
    spec = timed(s["validate"], lambda: read_spec(env.payload["payload"], limits))
    job = timed(s["prepare"], lambda: prepare(job_id, spec, limits))
    # The prepared Job crosses to the executor process as the parser writes it.
    blob = b""

    def transfer() -> Any:
        nonlocal blob
        blob = payload_codec.dumps(job)
        return payload_codec.loads(blob, executor.takes_flat_circuits)

    received = timed(s["transfer"], transfer)
    outcome = timed(s["run"], lambda: executor.run_many([received]))[0]
    if isinstance(outcome, JobError):
        raise SystemExit(f"{profile.shape.name} job {job_id} failed: {outcome.code} "
                         f"{outcome.message}; the profile would be meaningless")
    result: JobResult = outcome
    results = timed(s["result"], lambda: result_map(result, "aer", __version__))
    out = timed(s["encode"], lambda: encode(Envelope(
        EventType.JOB_RESULT, {"job_id": job_id, "results": results}, driver="bench"), fmt))
    if keep:
        profile.sizes = {"dispatch frame": len(frame), "Job as sent": len(blob),
                         "result frame": len(out)}


def report(profiles: Sequence[Profile], jobs: int, shots: int, fmt: WireFormat) -> None:
    print(f"# one job at a time in this process; medians over {jobs} distinct jobs per case, "
          f"{shots} shots, wire format {fmt}; ms and share of the sum of medians")
    head = "".join(f" {p.shape.name + ' ms':>13} {'share':>6}" for p in profiles)
    print(f"{'stage':<36}{head}")
    for stage, label in STAGES.items():
        cells = "".join(f" {p.median(stage) * 1e3:>13.3f} {p.median(stage) / p.total():>6.1%}"
                        for p in profiles)
        print(f"{label:<36}{cells}")
    totals = "".join(f" {p.total() * 1e3:>13.3f} {'':>6}" for p in profiles)
    print(f"{'total (sum of medians)':<36}{totals}")
    print()
    for p in profiles:
        sizes = ", ".join(f"{name} {n:,} B" for name, n in p.sizes.items())
        print(f"{p.shape.name}: {p.shape.summary}; {sizes}")


def main(args: argparse.Namespace) -> None:
    executor = AerExecutor()
    caps = executor.capabilities()
    limits = Limits(max_qubits=caps.max_qubits, max_shots=caps.max_shots, max_circuits=1000)
    seeds = itertools.count(1)  # every job its own text: the parse cache never hits
    chosen = pick(args.cases, args.shots, args.sweep_rows)
    profiles = [Profile(shape) for shape in chosen.values()]
    # Built before any clock: the client's qasm3.dumps is not the daemon's time.
    payloads = {p.shape.name: p.shape.jobs(seeds, args.jobs + args.warm) for p in profiles}
    ids = itertools.count(1)
    try:
        for i in range(args.jobs + args.warm):
            for p in profiles:  # alternate cases, so a noisy moment lands on all of them
                profile_one(p, f"job-{next(ids):06d}", payloads[p.shape.name][i], limits,
                            executor, args.wire_format, keep=i >= args.warm)
    finally:
        executor.close()
    report(profiles, args.jobs, args.shots, args.wire_format)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200, help="profiled jobs per case")
    parser.add_argument("--warm", type=int, default=5, help="unrecorded jobs first, per case")
    parser.add_argument("--cases", default="QFT-12,Bell",
                        help="comma-separated, from: QFT-12, random-20, Bell, sweep")
    parser.add_argument("--shots", type=int, default=SHOTS)
    parser.add_argument("--sweep-rows", type=int, default=16, help="bound circuits per sweep job")
    parser.add_argument("--wire-format", choices=["msgpack", "json"], default="msgpack")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    return args


if __name__ == "__main__":
    main(parse_args())
