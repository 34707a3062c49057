"""A data directory that fills up (issue 14 §1), the way it happened: a real, small
filesystem (a 512 KiB tmpfs), jobs whose results are large. The node keeps answering,
refuses new work with a clear error while full, reports `degraded` with the reason,
and recovers by itself when space returns."""

from __future__ import annotations

import contextlib
import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from frontends.qpi.orchestrator import LocalOrchestrator
from tests.circuits import BELL
from tests.conftest import daemon_env, heartbeats, run_job, start_connected, wait_for

BIG = {"circuits": [BELL], "shots": 20_000, "memory": True}  # ~60 KB of per-shot memory


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)],
                       check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {exc}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True)


def readyz(port: int) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def test_full_disk_keeps_answering_refuses_new_work_and_recovers(
    tmp_path: Path, small_fs: Path
) -> None:
    filler = small_fs / "filler"
    filler.write_bytes(b"\0" * 200 * 1024)  # deleted later: the space that "comes back"
    orch = LocalOrchestrator(port=0, driver_name="full")
    await orch.start()
    env = daemon_env(tmp_path, orch, QPI_DATA_DIR=str(small_fs / "data"),
                     QPI_METRICS_ADDR="127.0.0.1:0", QPI_HEARTBEAT_INTERVAL="0.5")
    d = await start_connected(tmp_path, orch, env)
    try:
        port = int(d.output().split('"port": ')[1].split(",")[0])
        answered = []
        for _ in range(30):  # fill it: every job still gets its answer
            res = await run_job(orch, BIG, timeout=60)
            answered.append(res)
            if heartbeats(orch) and heartbeats(orch)[-1]["status"] == "degraded":
                break
        assert any(r.get("success") for r in answered)
        assert all(r.get("success") or r.get("error_code") == "QUOTA_EXCEEDED"
                   for r in answered), answered
        await wait_for(lambda: "results cannot be written" in str(
            heartbeats(orch)[-1]["degraded_reason"]), timeout=30, what="a degraded heartbeat")
        assert "results cannot be made durable" in d.output()
        refused = await run_job(orch, {"circuits": [BELL], "shots": 10}, timeout=30)
        assert refused["error_code"] == "QUOTA_EXCEEDED"
        assert "cannot store results" in str(refused["error"])
        code, body = readyz(port)
        assert code == 503 and "results cannot be written" in json.dumps(body)

        filler.unlink()  # space comes back: the node recovers by itself
        await wait_for(lambda: heartbeats(orch)[-1]["degraded_reason"] is None, timeout=30,
                       what="the store to accept writes again")
        ok = await run_job(orch, {"circuits": [BELL], "shots": 10}, timeout=60)
        assert ok["success"] is True
        assert "the result store accepts writes again" in d.output()
    finally:
        code = d.stop()
        with contextlib.suppress(Exception):
            await orch.stop()
    assert code == 0, d.output()
    assert "Traceback" not in d.output()
