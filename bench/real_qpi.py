"""The node against the real QPI server (`../shared/qpi-server/qpi`): N distinct Bell
jobs submitted at once through the server's client API with the real `qpi-client`, the
time until every one is `completed`, and what the server's own records and log say
happened on the way: events dropped by its rate limit or for want of a handler, jobs its
recovery dispatched again, results it accepted twice, QPU seconds charged. Beside it,
the same jobs through our embedded stand-in (local mode) in the same run.

    python -m bench.real_qpi            # 1000 jobs: server defaults, limit raised, stand-in
    python -m bench.real_qpi --jobs 300 --kill-after 100 --no-standin
                                        # SIGKILL the server after 100 results, restart it

Needs root (a network namespace per server) and the server binary; prints figures and
asserts nothing."""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qpi_client import QPIClient

from bench.traffic import bell, qpi_client_payload
from tests.conftest import COUNTING, EXECUTIONS_LOG, daemon_env, start_daemon, wait_until
from tests.qpi_server import BASE, USER_SECONDS, Rig, rig, unavailable

BELL_KEYS = {"00", "11"}


@dataclass
class Figures:
    case: str
    jobs: int
    seconds: float
    completed: int
    wrong_counts: int
    rate_limited: int | None = None
    no_handler: int | None = None
    recovered: int | None = None
    accepted_twice: int | None = None
    run_twice: int = 0
    charged_s: float | None = None


def payloads(n: int) -> list[dict[str, Any]]:
    """qpi-client's body for n Bell circuits, each job's text its own."""
    return [qpi_client_payload([bell(seed)]) for seed in range(n)]


def submit_all(client_for: Any, bodies: Sequence[dict[str, Any]], qpu: str = "") -> list[str]:
    """Submit every body from 4 threads (each with its own client); job ids in order."""
    def one(body: dict[str, Any]) -> str:
        return str(client_for().submit_job(body["circuits"], shots=body["shots"],
                                           qpu_target=qpu))
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, bodies))


def bell_ok(results: Any) -> bool:
    if isinstance(results, str):
        results = json.loads(results or "null")
    if not isinstance(results, dict) or "error" in results:
        return False
    counts = results.get("counts") or {}
    return set(counts) <= BELL_KEYS and sum(counts.values()) == 1024


def executions(tmp: Path) -> list[str]:
    path = tmp / EXECUTIONS_LOG
    return path.read_text().split() if path.exists() else []


def run_against_server(tmp: Path, bodies: Sequence[dict[str, Any]], rate_limit: int,
                       kill_after: int | None, timeout: float,
                       extra_env: dict[str, str] | None = None) -> Figures:
    extra_env = extra_env or {}
    label = f"real server, --event-rate-limit {rate_limit or 'off'}"
    if kill_after is not None:
        label += f", SIGKILL after {kill_after} completed"
    gen = rig(tmp / "server", event_rate_limit=str(rate_limit))
    r: Rig = next(gen)
    options = json.dumps({"count_file": str(tmp / EXECUTIONS_LOG)})
    # The server announces no limit: the operator raises the daemon's with the server's.
    env = r.daemon_env(daemon_env(tmp, None, QPI_EXECUTOR=COUNTING,
                                  QPI_EXECUTOR_OPTIONS=options,
                                  QPI_EVENT_RATE_LIMIT=str(rate_limit), **extra_env))
    daemon = start_daemon(tmp, env, prefix=r.ns.prefix())
    try:
        wait_until(lambda: r.server.driver_record(r.creds.driver_id)["status"] == "online",
                   90, "the daemon to connect")
        start = time.monotonic()
        ids = r.ns.call(submit_all, lambda: QPIClient(BASE, r.creds.api_token), bodies,
                        r.creds.qpu_id)
        wanted = set(ids)

        if kill_after is not None:
            wait_until(lambda: r.server.unfinished() <= len(ids) - kill_after, timeout,
                       f"{kill_after} jobs to finish", every=0.25)
            r.server.kill()
            r.server.start()
        wait_until(lambda: r.server.unfinished() == 0, timeout, "every job to finish",
                   every=0.25)
        seconds = time.monotonic() - start
        jobs = r.server.jobs(wanted)
        counts = r.server.log_counts()
        runs = executions(tmp)
        return Figures(label, len(ids), seconds,
                       sum(j["status"] == "completed" for j in jobs.values()),
                       sum(not bell_ok(j["results"]) for j in jobs.values()),
                       counts.rate_limited, counts.no_handler, counts.recovered,
                       counts.accepted_twice, len(runs) - len(set(runs)),
                       USER_SECONDS - r.server.user_seconds(r.creds.user_id))
    finally:
        daemon.stop()
        gen.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_against_standin(tmp: Path, bodies: Sequence[dict[str, Any]],
                        timeout: float) -> Figures:
    port = free_port()
    options = json.dumps({"count_file": str(tmp / EXECUTIONS_LOG)})
    env = daemon_env(tmp, None, QPI_EXECUTOR=COUNTING, QPI_EXECUTOR_OPTIONS=options,
                     QPI_LOCAL_PORT=str(port))
    daemon = start_daemon(tmp, env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _listed(base), 90, "the local node to register")
        start = time.monotonic()
        ids = submit_all(lambda: QPIClient(base), bodies)
        wanted = set(ids)
        client = QPIClient(base)

        def done() -> list[dict[str, Any]] | None:
            jobs = [j for j in client.list_jobs() if j["id"] in wanted]
            final = [j for j in jobs if j["status"] in ("completed", "failed")]
            return jobs if len(final) == len(wanted) else None

        jobs = wait_until(done, timeout, "every job to finish", every=0.25)
        seconds = time.monotonic() - start
        runs = executions(tmp)
        return Figures("embedded stand-in (local mode)", len(ids), seconds,
                       sum(j["status"] == "completed" for j in jobs),
                       sum(not bell_ok(j["results"]) for j in jobs),
                       run_twice=len(runs) - len(set(runs)))
    finally:
        daemon.stop()


def _listed(base: str) -> bool:
    try:
        return bool(QPIClient(base).list_qpus())
    except OSError:
        return False


def show(rows: Sequence[Figures]) -> None:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        return f"{v:.1f}" if isinstance(v, float) else str(v)
    head = ["case", "jobs", "s to all done", "completed", "wrong counts", "rate-limited",
            "no handler", "re-dispatched", "accepted twice", "run twice", "QPU s charged"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for f in rows:
        print("| " + " | ".join(cell(v) for v in (
            f.case, f.jobs, f.seconds, f.completed, f.wrong_counts, f.rate_limited,
            f.no_handler, f.recovered, f.accepted_twice, f.run_twice, f.charged_s)) + " |")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--rate-limits", default="100,100000",
                        help="the server's --event-rate-limit per case (100 is its default)")
    parser.add_argument("--kill-after", type=int, default=None,
                        help="SIGKILL and restart the server once this many jobs completed")
    parser.add_argument("--no-standin", action="store_true")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--keep", action="store_true", help="keep the scratch directories")
    args = parser.parse_args(argv)
    if (reason := unavailable()) is not None:
        sys.exit(f"cannot run: {reason}")
    bodies = payloads(args.jobs)
    rows = []
    for limit in (int(x) for x in args.rate_limits.split(",")):
        tmp = Path(tempfile.mkdtemp(prefix="real-qpi-"))
        try:
            rows.append(run_against_server(tmp, bodies, limit, args.kill_after, args.timeout))
        finally:
            _remove(tmp, args.keep)
    if not args.no_standin:
        tmp = Path(tempfile.mkdtemp(prefix="real-qpi-standin-"))
        try:
            rows.append(run_against_standin(tmp, bodies, args.timeout))
        finally:
            _remove(tmp, args.keep)
    show(rows)


def _remove(tmp: Path, keep: bool) -> None:
    if keep:
        print(f"kept {tmp}", file=sys.stderr)
    else:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
