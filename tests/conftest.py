"""Fixtures that run the real daemon as a subprocess against the embedded
orchestrator, over real TLS NNG sockets on loopback."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from driver.orchestrator import LocalOrchestrator

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    log_path: Path

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

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


def start_daemon(tmp_path: Path, env: dict[str, str], *args: str) -> Daemon:
    log_path = tmp_path / f"daemon-{time.monotonic_ns()}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "driver", *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    return Daemon(proc, log_path)


async def wait_for(predicate: Any, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


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
async def daemon(orchestrator: LocalOrchestrator, tmp_path: Path) -> AsyncIterator[Daemon]:
    d = start_daemon(tmp_path, daemon_env(tmp_path, orchestrator))
    try:
        await wait_for(lambda: orchestrator.online or d.proc.poll() is not None,
                       what="the daemon to connect")
        assert d.proc.poll() is None, d.output()
        yield d
    finally:
        code = d.stop()
        assert code == 0, f"daemon exited {code}:\n{d.output()}"


@pytest.fixture
def repo_root() -> Iterator[Path]:
    yield ROOT
