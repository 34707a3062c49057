"""The durable result store: sqlite in WAL mode in the data directory, keyed by
job_id. Results are written before they are sent and kept until delivered (or
acknowledged), then for a retention period, so duplicates are answered without
re-running and nothing owed is lost to a crash or a restart."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgpack

from driver import logs
from driver.outcome import Outcome

# The jobs table's columns, in its order: what store_repair salvages and writes back.
COLUMNS = ("job_id", "state", "result", "started", "finished", "delivered", "acked")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id    TEXT PRIMARY KEY,
    state     TEXT NOT NULL,          -- running | done
    result    BLOB,                   -- msgpack of the result map, when done
    started   REAL NOT NULL,
    finished  REAL,
    delivered INTEGER NOT NULL DEFAULT 0,  -- handed to a live pipe
    acked     INTEGER NOT NULL DEFAULT 0   -- ResultAck received
);
CREATE INDEX IF NOT EXISTS jobs_pending ON jobs (state, delivered, acked);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished);
CREATE TABLE IF NOT EXISTS probe (filler BLOB);
"""

PROBE_BYTES = 64 * 1024  # room a write must find before the store counts as writable again

# Not EXECUTOR_CRASHED: nobody knows that the executor crashed, only that the daemon
# stopped (a SIGKILL, a power cut, an OOM kill of the daemon) with the job in hand.
INTERRUPTED = {
    "error": "the driver stopped while this job was running; it was not re-run, to avoid "
    "executing it twice. Resubmit it.",
    "error_code": "JOB_FAILED",
    "interrupted": True,
}


class StoreUnavailable(Exception):
    """A write did not reach the disk (full, read-only, I/O error); `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ResultStore:
    """`problem` is None while writes succeed, else why the last one failed: the daemon
    reads it to refuse new work and report `degraded` until a write succeeds again."""

    def __init__(self, path: Path, retention_s: float = 7 * 86400, max_rows: int = 200_000):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.retention_s = retention_s
        self.max_rows = max_rows
        self.problem: str | None = None
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL survives a process crash; only a power cut can lose the last commit.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def _write(self, statements: Iterable[tuple[str, list[tuple[Any, ...]]]]) -> None:
        """One transaction; a failure to write is StoreUnavailable, and sets `problem`."""
        try:
            with self._db:
                self._db.execute("BEGIN")
                for sql, rows in statements:
                    self._db.executemany(sql, rows)
        except sqlite3.OperationalError as exc:
            self.problem = f"results cannot be written to {self.path}: {exc}"
            raise StoreUnavailable(self.problem) from exc
        if self.problem is not None:
            logs.get("qpi.store").info("the result store accepts writes again",
                                       path=str(self.path))
        self.problem = None

    def probe(self) -> None:
        """A write that needs real room on disk, undone at once: StoreUnavailable if none."""
        self._write([("INSERT INTO probe VALUES (zeroblob(?))", [(PROBE_BYTES,)]),
                     ("DELETE FROM probe", [()])])

    def recover_interrupted(self) -> list[str]:
        """Jobs left `running` by a crash: answer them with an error, never re-run."""
        rows = [r[0] for r in self._db.execute("SELECT job_id FROM jobs WHERE state='running'")]
        if rows:
            blob = msgpack.packb(INTERRUPTED)
            self._write([("UPDATE jobs SET state='done', result=?, finished=? WHERE job_id=?",
                          [(blob, time.time(), job_id) for job_id in rows])])
        return rows

    def mark_running(self, job_ids: Iterable[str]) -> None:
        now = time.time()
        self._write([("INSERT OR IGNORE INTO jobs (job_id, state, started) "
                      "VALUES (?, 'running', ?)", [(job_id, now) for job_id in job_ids])])

    def unmark_running(self, job_ids: Iterable[str]) -> None:
        """Jobs marked running that never reached the executor (it stopped first): a
        later dispatch of them may run."""
        self._write([("DELETE FROM jobs WHERE job_id=? AND state='running'",
                      [(job_id,) for job_id in job_ids])])

    def finish(self, outcomes: Iterable[Outcome], delivered: Iterable[str] = ()) -> list[Outcome]:
        """Store outcomes (and, in the same transaction, earlier deliveries); returns them
        as stored, made encodable where they were not. StoreUnavailable if not written."""
        now = time.time()
        stored, rows = [], []
        for outcome in outcomes:
            outcome, blob = packed(outcome)
            stored.append(outcome)
            rows.append((outcome.job_id, blob, now, now))
        self._write([
            ("INSERT INTO jobs (job_id, state, result, started, finished) "
             "VALUES (?, 'done', ?, ?, ?) ON CONFLICT(job_id) DO UPDATE SET "
             "state='done', result=excluded.result, finished=excluded.finished", rows),
            ("UPDATE jobs SET delivered=1 WHERE job_id=?", [(j,) for j in delivered]),
        ])
        return stored

    def state(self, job_id: str) -> tuple[str, Outcome | None] | None:
        row = self._db.execute(
            "SELECT state, result FROM jobs WHERE job_id=?", (job_id,)
        ).fetchone()
        if row is None:
            return None
        answer = (Outcome.from_wire(job_id, msgpack.unpackb(row[1]))
                  if row[1] is not None else None)
        return row[0], answer

    def undelivered(self, acks: bool) -> list[Outcome]:
        """Results still owed: never handed over, or (with acks) never acknowledged."""
        column = "acked" if acks else "delivered"
        rows = self._db.execute(
            f"SELECT job_id, result FROM jobs WHERE state='done' AND {column}=0 "
            "ORDER BY finished"
        )
        return [Outcome.from_wire(job_id, msgpack.unpackb(blob)) for job_id, blob in rows]

    def mark_delivered(self, job_ids: Iterable[str]) -> None:
        self._write([("UPDATE jobs SET delivered=1 WHERE job_id=?", [(j,) for j in job_ids])])

    def mark_acked(self, job_id: str) -> None:
        self._write([("UPDATE jobs SET acked=1, delivered=1 WHERE job_id=?", [(job_id,)])])

    def prune(self) -> int:
        """Drop delivered results past retention, and the oldest beyond the row cap."""
        cutoff = time.time() - self.retention_s
        with self._db:
            self._db.execute("BEGIN")
            gone = self._db.execute(
                "DELETE FROM jobs WHERE state='done' AND delivered=1 AND finished < ?", (cutoff,)
            ).rowcount
            excess = self._db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] - self.max_rows
            if excess > 0:
                gone += self._db.execute(
                    "DELETE FROM jobs WHERE job_id IN (SELECT job_id FROM jobs WHERE "
                    "state='done' AND delivered=1 ORDER BY finished LIMIT ?)", (excess,)
                ).rowcount
        return gone

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0])


def packed(outcome: Outcome) -> tuple[Outcome, bytes]:
    """The outcome as msgpack, made encodable first where it is not (e.g. a 2**70 echoed
    back from a hostile job): what msgpack carries, the wire's JSON carries too."""
    wire = outcome.to_wire()
    try:
        return outcome, msgpack.packb(wire)
    except (OverflowError, TypeError, ValueError):
        outcome = Outcome.from_wire(outcome.job_id, _encodable(wire))
        return outcome, msgpack.packb(outcome.to_wire())


def _encodable(value: Any) -> Any:
    """What msgpack and JSON can both carry: huge ints and odd objects become text."""
    if value is None or isinstance(value, bool | float | str):
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**63 else str(value)
    if isinstance(value, dict):
        return {str(k): _encodable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encodable(v) for v in value]
    return str(value)
