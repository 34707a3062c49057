"""A damaged result store, both ways it happens (random bytes over the file; data pages
overwritten under an intact header and schema): check, recover, the CLI, and the
daemon's start on it."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import shutil
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest

from driver import store_repair
from driver.exits import EX_DATAERR
from driver.store import ResultStore
from tests.conftest import ROOT, daemon_env, start_daemon

PAGE = 4096
ROWS = 400
Row = tuple[str, str, bytes | None, float, float | None, int, int]


def _rows() -> list[Row]:
    rows: list[Row] = [("job-bad", "done", b"\xc1 not msgpack", 1.0, 2.0, 0, 0)]
    for i in range(ROWS - 1):
        state = "running" if i % 50 == 7 else "done"
        result = msgpack.packb({"circuit_results": [
            {"counts": {"00": 500 + i, "11": 524 - i}, "shots": 1024, "memory": ["00"] * 40}
        ]}) if state == "done" else None
        rows.append((f"job-{i:05d}", state, result, 1000.0 + i,
                     1001.0 + i if state == "done" else None, int(i % 3 == 0), int(i % 9 == 0)))
    return rows


def healthy_store(data_dir: Path) -> Path:
    """A store made by the daemon's own class, filled with rows, checkpointed so every
    row is in the main file (as after a clean stop)."""
    path = data_dir / store_repair.STORE_NAME
    ResultStore(path).close()
    db = sqlite3.connect(path)
    db.executemany("INSERT INTO jobs (job_id, state, result, started, finished, delivered, "
                   "acked) VALUES (?, ?, ?, ?, ?, ?, ?)", _rows())
    db.commit()
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return path


def random_bytes(data_dir: Path) -> Path:
    path = healthy_store(data_dir)
    size = path.stat().st_size
    path.write_bytes(random.Random(13).randbytes(size))
    return path


def malformed(data_dir: Path) -> Path:
    """Header and schema page intact; four pages a third of the way in overwritten."""
    path = healthy_store(data_dir)
    pages = path.stat().st_size // PAGE
    assert pages > 20, "the store should span many pages"
    garbage = random.Random(14)
    with path.open("r+b") as fh:
        for page in range(pages // 3, pages // 3 + 4):  # 0-based: page 0 is the schema
            fh.seek(page * PAGE)
            fh.write(garbage.randbytes(PAGE))
    with path.open("rb") as fh:
        assert fh.read(16) == store_repair.SQLITE_HEADER
    return path


DAMAGE: dict[str, Callable[[Path], Path]] = {"random bytes": random_bytes,
                                               "malformed pages": malformed}


def _contents(path: Path) -> dict[str, tuple[object, ...]]:
    db = sqlite3.connect(path)
    try:
        return {r[0]: tuple(r) for r in db.execute(
            "SELECT job_id, state, result, started, finished, delivered, acked FROM jobs")}
    finally:
        db.close()


def _first_read_error(path: Path) -> sqlite3.DatabaseError:
    """What the daemon meets when it opens the store and reads it."""
    db = sqlite3.connect(path)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        list(db.execute("SELECT job_id, result FROM jobs ORDER BY finished"))
    except sqlite3.DatabaseError as exc:
        return exc
    finally:
        db.close()
    raise AssertionError("the damaged store read without an error")


def test_check_counts_a_healthy_store(tmp_path: Path) -> None:
    report = store_repair.check(healthy_store(tmp_path))
    rows = _rows()
    assert report.state == "ok" and not report.damaged
    assert report.rows == ROWS
    assert report.owed == sum(1 for r in rows if r[1] == "done" and r[5] == 0)
    assert report.unacked == sum(1 for r in rows if r[1] == "done" and r[5] == 1 and r[6] == 0)
    assert report.running == sum(1 for r in rows if r[1] == "running")
    assert store_repair.check(tmp_path / "nothing.sqlite3").state == "missing"


@pytest.mark.parametrize(("damage", "state"), [("random bytes", "not a database"),
                                               ("malformed pages", "malformed")])
def test_check_names_the_damage(tmp_path: Path, damage: str, state: str) -> None:
    path = DAMAGE[damage](tmp_path)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    for quick in (False, True):
        report = store_repair.check(path, quick=quick)
        assert report.state == state and report.damaged, report
        assert str(path) in report.summary() and "store recover" in report.summary()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before  # read-only


@pytest.mark.parametrize(("damage", "words"), [("random bytes", "not an SQLite database"),
                                               ("malformed pages", "malformed pages")])
def test_describe_open_failure_names_file_and_damage(tmp_path: Path, damage: str,
                                                     words: str) -> None:
    path = DAMAGE[damage](tmp_path)
    sentence = store_repair.describe_open_failure(path, _first_read_error(path))
    assert sentence is not None
    assert str(path) in sentence and words in sentence
    assert f"qpi-driver store recover --data-dir {tmp_path}" in sentence
    # Errors that are not damage get no such sentence: the caller reports them as they are.
    for other in (sqlite3.OperationalError("unable to open database file"),
                  sqlite3.OperationalError("database or disk is full"),
                  PermissionError(13, "Permission denied")):
        assert store_repair.describe_open_failure(path, other) is None


def test_recover_random_bytes_sets_the_file_aside(tmp_path: Path) -> None:
    path = random_bytes(tmp_path)
    original = path.read_bytes()
    report = store_repair.recover(path)
    assert report.changed and report.saved == 0
    assert report.set_aside[0].read_bytes() == original  # kept as found
    assert ".damaged-" in report.set_aside[0].name
    assert store_repair.check(path).state == "ok" and store_repair.check(path).rows == 0
    assert "saved 0 rows" in report.summary() and str(report.set_aside[0]) in report.summary()


def test_recover_malformed_saves_the_readable_rows(tmp_path: Path) -> None:
    path = malformed(tmp_path)
    original = {r[0]: r for r in _rows()}
    report = store_repair.recover(path, sqlite3_bin="")  # the fallback, whatever is installed
    assert report.method == "row by row"
    saved = _contents(path)
    assert 0 < len(saved) < ROWS, report.summary()
    assert report.saved == len(saved)
    for job_id, row in saved.items():
        if job_id == "job-bad":  # unreadable result: now an error that asks to resubmit
            assert msgpack.unpackb(row[2]) == store_repair.LOST_RESULT
            continue
        assert row == original[job_id]
    assert report.replaced == (1 if "job-bad" in saved else 0)
    # The primary-key index was not damaged: it names every row the table lost.
    assert set(report.lost_known) == set(original) - set(saved)
    assert report.unreadable == ROWS - len(saved)  # no gaps here: every lost row is counted
    assert report.saved_running == sum(1 for r in saved.values() if r[1] == "running")
    assert report.saved_owed == sum(1 for r in saved.values() if r[1] == "done" and r[5] == 0)
    assert store_repair.check(path).state == "ok"
    assert store_repair.check(report.set_aside[0]).state == "malformed"
    text = report.summary()
    assert f"saved {len(saved)} rows" in text and f"lost {len(report.lost_known)}" in text


def test_recover_with_sqlite3_shell_when_it_can(tmp_path: Path) -> None:
    shell = shutil.which("sqlite3")
    if shell is None:
        pytest.skip("no sqlite3 shell (Debian package sqlite3)")
    probe = subprocess.run([shell, str(healthy_store(tmp_path / "probe")), ".recover"],
                           capture_output=True, text=True, check=False)
    path = malformed(tmp_path)
    report = store_repair.recover(path)
    saved = _contents(path)
    assert 0 < len(saved) < ROWS
    if probe.returncode != 0:
        # Debian 12's shell lacks sqlite_dbpage: the report says so, row by row did it.
        assert report.method == "row by row", report.summary()
        assert any("sqlite_dbpage" in note for note in report.notes), report.notes
        pytest.skip(f"{shell} cannot run .recover here: {probe.stderr.strip()[:120]}")
    assert report.method == "sqlite3 .recover + row by row"


def test_recover_keeps_the_owner_and_mode_for_the_daemon(tmp_path: Path) -> None:
    path = malformed(tmp_path)
    path.chmod(0o600)
    owner = (os.getuid(), os.getgid())
    if os.geteuid() == 0:  # as root (the usual way): a DynamicUser's uid must stay
        owner = (54321, 54321)
        os.chown(path, *owner)
    store_repair.recover(path, sqlite3_bin="")
    st = path.stat()
    assert (st.st_uid, st.st_gid) == owner and stat.S_IMODE(st.st_mode) == 0o600


def test_recover_leaves_a_healthy_or_missing_store_alone(tmp_path: Path) -> None:
    path = healthy_store(tmp_path)
    before = _contents(path)
    report = store_repair.recover(path)
    assert not report.changed and _contents(path) == before
    assert list(tmp_path.glob("*.damaged-*")) == []
    assert not store_repair.recover(tmp_path / "none.sqlite3").changed


def test_recover_refuses_a_store_in_use(tmp_path: Path) -> None:
    path = malformed(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sqlite3, sys, time\n"
         f"db = sqlite3.connect({str(path)!r})\n"
         "db.execute('SELECT name FROM sqlite_master').fetchall()\n"
         "print('open', flush=True)\ntime.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "open\n"
        with pytest.raises(store_repair.StoreInUse, match="daemon running"):
            store_repair.recover(path)
        done = _cli("store", "recover", "--data-dir", str(tmp_path))
        assert done.returncode == 75, done.stderr
    finally:
        holder.kill()
        holder.wait()
    assert list(tmp_path.glob("*.damaged-*")) == []  # nothing was touched


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "driver", *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, check=False)


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_store_commands_exit_statuses(tmp_path: Path, damage: str) -> None:
    data = tmp_path / "data"
    assert _cli("store", "check", "--data-dir", str(data)).returncode == 66  # none yet
    path = DAMAGE[damage](data)
    checked = _cli("store", "check", "--data-dir", str(data))
    assert checked.returncode == 65, checked.stdout + checked.stderr
    assert str(path) in checked.stdout and "store recover" in checked.stdout
    recovered = _cli("store", "recover", "--data-dir", str(data))
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    assert "recovered" in recovered.stdout and ".damaged-" in recovered.stdout
    assert "Traceback" not in recovered.stdout + recovered.stderr
    again = _cli("store", "check", "--data-dir", str(data))
    assert again.returncode == 0 and "healthy" in again.stdout
    assert _cli("store", "recover", "--data-dir", str(data)).returncode == 0  # nothing to do


# -- the daemon on a damaged store (wired by the daemon's start-up) ----------------------


@pytest.mark.parametrize("damage", sorted(DAMAGE))
async def test_daemon_on_damaged_store_exits_65(tmp_path: Path, damage: str) -> None:
    """The daemon must not start on a damaged store, nor loop under systemd: exit 65
    (EX_DATAERR, in RestartPreventExitStatus) after one line naming the file and the
    damage and saying to run `qpi-driver store recover`; never a traceback."""
    path = DAMAGE[damage](tmp_path / "data")
    d = start_daemon(tmp_path, daemon_env(tmp_path, None), "--local-port", "0")
    deadline = time.monotonic() + 60
    while d.proc.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    code = d.stop()
    out = d.output()
    assert code == EX_DATAERR, f"exit {code}:\n{out}"
    assert str(path) in out and "store recover" in out, out
    assert ("not an SQLite database" if damage == "random bytes" else "malformed") in out, out
    assert "Traceback" not in out, out
