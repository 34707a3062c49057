"""Fixtures and helpers that run the real daemon as a subprocess against the embedded
orchestrator, over real TLS NNG sockets on loopback, and read what it did from the
outside: results and heartbeats the orchestrator heard, the daemon's log, the
execution log of the counting executor."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from frontends.qpi.orchestrator import LocalOrchestrator
from frontends.qpi.wire import EventType

ROOT = Path(__file__).resolve().parent.parent
# Aer that logs every job it starts and misbehaves on markers (tests/executors_for_tests.py).
COUNTING = "tests.executors_for_tests:CountingExecutor"
EXECUTIONS_LOG = "executions.log"


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    log_path: Path

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def logged(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        """The daemon's JSON log records of `event` whose fields include `fields`."""
        out = []
        for line in self.output().splitlines():
            if event not in line:  # most lines: skip them before parsing
                continue
            try:
                record = json.loads(line)
            except ValueError:  # a traceback or a partly written line
                continue
            if (isinstance(record, dict) and record.get("event") == event
                    and all(record.get(k) == v for k, v in fields.items())):
                out.append(record)
        return out

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def daemon_env(tmp_path: Path, orch: LocalOrchestrator | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QPI_")}
    env.update(
        PYTHONPATH=str(ROOT),
        PYTHONUNBUFFERED="1",
        QPI_DATA_DIR=str(tmp_path / "data"),
        QPI_METRICS_ADDR="",
        QPI_LOG_FORMAT="json",
        QPI_DRIVER_NAME="test-node",
        QPI_BACKOFF_MAX_S="1",
    )
    if orch is not None:
        env.update(
            QPI_ADDR=orch.url,
            QPI_ACCESS_TOKEN=orch.token,
            QPI_CA_FINGERPRINT=orch.ca_fingerprint or "",
        )
    env.update(extra)
    return env


def start_daemon(tmp_path: Path, env: dict[str, str], *args: str,
                 prefix: Sequence[str] = ()) -> Daemon:
    """`prefix` runs the daemon through another command (e.g. `nsenter`)."""
    log_path = tmp_path / f"daemon-{time.monotonic_ns()}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "driver", *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    return Daemon(proc, log_path)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               every: float = 0.05) -> Any:
    """Poll `predicate` (something observable) until it is truthy; its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


async def wait_for(predicate: Any, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def local_url(d: Daemon) -> str:
    """The URL a daemon in local mode prints for its embedded stand-in, once connected."""
    found: list[str] = []

    def banner() -> bool:
        found[:] = re.findall(r"--url (http://127\.0\.0\.1:\d+)", d.output())
        return (bool(found) and "connected" in d.output()) or d.proc.poll() is not None

    await wait_for(banner, what="the local daemon's banner")
    assert found, d.output()
    return found[0]


async def start_connected(tmp_path: Path, orch: LocalOrchestrator, env: dict[str, str],
                          *args: str, timeout: float = 90.0) -> Daemon:
    """A daemon started and registered with `orch`; stopped again if it does not get there."""
    d = start_daemon(tmp_path, env, *args)
    try:
        await wait_for(lambda: orch.online or d.proc.poll() is not None, timeout=timeout,
                       what="the daemon to connect")
        assert d.proc.poll() is None, d.output()
    except BaseException:
        d.stop()
        raise
    return d


async def counting_daemon(tmp_path: Path, orch: LocalOrchestrator, **env: str) -> Daemon:
    """A connected daemon on the counting executor, which appends every job it starts to
    `tmp_path / EXECUTIONS_LOG` (read it with `executions`)."""
    options = json.dumps({"count_file": str(tmp_path / EXECUTIONS_LOG)})
    return await start_connected(tmp_path, orch, daemon_env(
        tmp_path, orch, QPI_EXECUTOR=COUNTING, QPI_EXECUTOR_OPTIONS=options, **env))


def executions(tmp_path: Path) -> list[str]:
    """The job_ids the counting executor started, one entry per execution, in order."""
    path = tmp_path / EXECUTIONS_LOG
    return path.read_text().split() if path.exists() else []


async def run_job(orch: LocalOrchestrator, job: dict[str, Any],
                  timeout: float = 120.0) -> dict[str, Any]:
    """Submit `job` and return the results map of its final answer."""
    done = await orch.result(orch.submit(job).id, timeout=timeout)
    assert done.results is not None
    return done.results


def heartbeats(orch: LocalOrchestrator) -> list[dict[str, Any]]:
    """Every heartbeat payload the orchestrator has received, oldest first."""
    return [e.payload for e in orch.events if e.type == EventType.HEARTBEAT]


def answers(orch: LocalOrchestrator, job_id: str) -> list[dict[str, Any]]:
    """Every results map the daemon sent for `job_id`, first answers and replays alike."""
    return [e.payload["results"] for e in orch.events
            if e.type == EventType.JOB_RESULT and e.payload.get("job_id") == job_id]


@functools.cache
def aer_max_qubits() -> int:
    """The widest circuit Aer runs on this machine: it derives it from the memory, and
    the aer executor reports it as its `max_qubits`."""
    from qiskit_aer import AerSimulator

    return int(AerSimulator().configuration().n_qubits)


@pytest.fixture(params=["msgpack", "json"])
def wire_format(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def orchestrator(wire_format: str) -> AsyncIterator[LocalOrchestrator]:
    orch = LocalOrchestrator(port=0, driver_name="test-qpu", wire_format=wire_format)  # type: ignore[arg-type]
    await orch.start()
    try:
        yield orch
    finally:
        await orch.stop()


@pytest.fixture
async def orch(request: pytest.FixtureRequest) -> AsyncIterator[LocalOrchestrator]:
    """An embedded orchestrator (msgpack) whose QPU is named after the test module."""
    name = request.module.__name__.rpartition(".")[2].removeprefix("test_")
    o = LocalOrchestrator(port=0, driver_name=name)
    await o.start()
    try:
        yield o
    finally:
        await o.stop()


@pytest.fixture
async def daemon(orchestrator: LocalOrchestrator, tmp_path: Path) -> AsyncIterator[Daemon]:
    d = await start_connected(tmp_path, orchestrator, daemon_env(tmp_path, orchestrator))
    try:
        yield d
    finally:
        code = d.stop()
        assert code == 0, f"daemon exited {code}:\n{d.output()}"


@pytest.fixture
def repo_root() -> Iterator[Path]:
    yield ROOT
