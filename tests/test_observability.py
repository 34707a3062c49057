"""Heartbeats, Prometheus metrics and health endpoints, from the outside: the
real daemon, scraped over HTTP and heard by the embedded orchestrator."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from frontends.qpi.orchestrator import LocalOrchestrator
from frontends.qpi.wire import EventType
from tests.circuits import BELL
from tests.conftest import (
    COUNTING,
    Daemon,
    aer_max_qubits,
    daemon_env,
    heartbeats,
    start_connected,
    wait_for,
)

SLOW = COUNTING  # Aer that sleeps on `// sleep S`
HEARTBEAT_FIELDS = {"status", "executor", "queue_depth", "running_job", "counters", "uptime_s",
                    "version", "capabilities", "calibration"}


def http(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def http_url(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    _, text = http(port, "/metrics")
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(snap: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    return snap.get((name, tuple(sorted(labels.items()))), 0.0)


async def start_observed(tmp_path: Path, orch: LocalOrchestrator, **env: str) -> tuple[Daemon, int]:
    d = await start_connected(tmp_path, orch,
                              daemon_env(tmp_path, orch, QPI_METRICS_ADDR="127.0.0.1:0", **env))
    ports = re.findall(r'"port": (\d+), "event": "metrics listening"', d.output())
    assert ports, d.output()
    return d, int(ports[0])


async def test_metrics_move_by_the_right_amounts(tmp_path: Path) -> None:
    orch = LocalOrchestrator(port=0)
    await orch.start()
    d, port = await start_observed(tmp_path, orch)
    try:
        before = samples(port)
        ok = [orch.submit({"circuits": [BELL, BELL], "shots": 100}) for _ in range(3)]
        bad = [orch.submit({"circuits": ["OPENQASM 2.0;\nnope;\n"]}) for _ in range(2)]
        for record in ok + bad:
            await orch.result(record.id, timeout=60)
        await orch.send_raw(b"\x01 not a frame")
        await orch.send_event("Mystery", {})
        await wait_for(lambda: value(samples(port), "qpi_frames_malformed_total")
                       > value(before, "qpi_frames_malformed_total"), what="malformed counter")
        after = samples(port)

        def delta(name: str, **labels: str) -> float:
            return value(after, name, **labels) - value(before, name, **labels)

        assert delta("qpi_jobs_total", outcome="ok", executor="aer") == 3
        assert delta("qpi_jobs_total", outcome="CIRCUIT_INVALID", executor="aer") == 2
        assert delta("qpi_circuits_executed_total", executor="aer") == 6
        assert delta("qpi_shots_executed_total", executor="aer") == 600
        assert delta("qpi_job_queue_wait_seconds_count") == 5
        assert delta("qpi_job_execution_seconds_count") >= 1
        assert delta("qpi_frames_received_total", type="JobDispatch") == 5
        assert delta("qpi_frames_received_total", type="unknown") == 1
        assert delta("qpi_frames_malformed_total") == 1
        assert value(after, "qpi_orchestrator_connected") == 1
        assert value(after, "qpi_queue_depth") == 0
        assert value(after, "qpi_executor_info", executor="aer", device="cpu",
                     precision="double", max_qubits=str(aer_max_qubits())) == 1
        assert value(after, "process_resident_memory_bytes") > 0
        assert value(after, "qpi_heartbeats_sent_total") >= 1
    finally:
        assert d.stop() == 0, d.output()
        await orch.stop()


async def test_heartbeats_carry_every_field_at_the_interval_and_on_change(tmp_path: Path) -> None:
    orch = LocalOrchestrator(port=0, heartbeat_interval_s=0.5)
    await orch.start()
    d, _ = await start_observed(tmp_path, orch, QPI_EXECUTOR=SLOW)
    try:
        await wait_for(lambda: len(heartbeats(orch)) >= 4, what="timed heartbeats")
        beat = heartbeats(orch)[-1]
        assert set(beat) >= HEARTBEAT_FIELDS
        assert beat["status"] == "idle" and beat["executor"] == SLOW
        caps = beat["capabilities"]
        assert isinstance(caps, dict) and caps["device"] == "cpu"
        assert caps["max_qubits"] == aer_max_qubits() and caps["meas_levels"] == [2]
        # Aer without noise has no calibration: none is reported, no timestamp invented.
        assert beat["calibration"] is None
        times = [e.ts for e in orch.events if e.type == EventType.HEARTBEAT]
        assert len(times) >= 4

        seen = len(heartbeats(orch))
        record = orch.submit({"circuits": [BELL + "// sleep 1\n"]})
        await orch.result(record.id, timeout=60)
        await wait_for(lambda: heartbeats(orch)[-1]["status"] == "idle", what="idle again")
        statuses = [b["status"] for b in heartbeats(orch)[seen:]]
        assert "busy" in statuses, statuses
        # The first busy beat may come while the job is still being parsed (in hand, not
        # yet running); the job runs for 1 s against a 0.5 s period, so a timed beat
        # falls inside the run and names it.
        running = [b["running_job"] for b in heartbeats(orch)[seen:]
                   if b["status"] == "busy" and b["running_job"] is not None]
        assert running, statuses
        assert running[0]["job_id"] == record.id and running[0]["batch_size"] == 1
        assert running[0]["elapsed_s"] >= 0

        # The orchestrator shares this loop: fetch from a thread.
        raw = await asyncio.to_thread(http_url, f"{orch.url}/api/qpus/{orch.driver_name}")
        qpu = json.loads(raw)
        assert qpu["last_heartbeat"]["version"] == beat["version"]

        d.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(d.proc.wait, 60)
        assert heartbeats(orch)[-1]["status"] == "draining"
    finally:
        d.stop()
        await orch.stop()


async def test_readyz_follows_the_orchestrator(tmp_path: Path) -> None:
    orch = LocalOrchestrator(port=0)
    await orch.start()
    d, port = await start_observed(tmp_path, orch)
    try:
        await wait_for(lambda: http(port, "/readyz")[0] == 200, what="ready")
        assert http(port, "/healthz")[0] == 200
        await orch.stop_nng()
        await wait_for(lambda: http(port, "/readyz")[0] == 503, what="unready")
        _, body = http(port, "/readyz")
        assert "not connected to the orchestrator" in body
        assert http(port, "/healthz")[0] == 200  # alive, just not ready
        await orch.start_nng()
        await wait_for(lambda: http(port, "/readyz")[0] == 200, what="ready again")
        assert value(samples(port), "qpi_reconnects_total") >= 1
    finally:
        assert d.stop() == 0, d.output()
        await orch.stop()


async def test_status_command_prints_the_last_heartbeat(tmp_path: Path) -> None:
    orch = LocalOrchestrator(port=0, heartbeat_interval_s=0.3)
    await orch.start()
    d, _ = await start_observed(tmp_path, orch)
    try:
        await wait_for(lambda: orch.last_heartbeat is not None, what="a heartbeat")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "driver", "status", "--url", orch.url,
            env=daemon_env(tmp_path, None), stdout=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
        text = out.decode()
        assert proc.returncode == 0
        assert "online" in text and "status: idle" in text and "queue_depth: 0" in text
    finally:
        assert d.stop() == 0, d.output()
        await orch.stop()
