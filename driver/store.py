"""The durable result store: sqlite in WAL mode in the data directory, keyed by the
front end a job came from (`origin`: "qpi", "qcos") and its job_id there, so two
orchestrators' jobs never collide. Results are written before they are sent and kept
until delivered (or acknowledged), then for a retention period, so duplicates are
answered without re-running and nothing owed is lost to a crash or a restart."""

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
COLUMNS = ("job_id", "state", "result", "started", "finished", "delivered", "acked", "origin")
QPI = "qpi"  # the origin of every job in a store written before there were front ends
_TABLE = """
CREATE TABLE IF NOT EXISTS {name} (
    job_id    TEXT NOT NULL,
    state     TEXT NOT NULL,          -- running | done
    result    BLOB,                   -- msgpack of the result map, when done
    started   REAL NOT NULL,
    finished  REAL,
    delivered INTEGER NOT NULL DEFAULT 0,  -- handed to a live pipe (or, polled: kept)
    acked     INTEGER NOT NULL DEFAULT 0,  -- ResultAck received
    origin    TEXT NOT NULL DEFAULT 'qpi', -- the front end the job came from
    PRIMARY KEY (origin, job_id)
);
"""
_SCHEMA = _TABLE.format(name="jobs") + """
CREATE INDEX IF NOT EXISTS jobs_pending ON jobs (origin, state, delivered, acked);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished);
CREATE TABLE IF NOT EXISTS probe (filler BLOB);
-- What an executor recorded of a running job's remote work (the tasks it created at a
-- cloud QPU), kept until the job is answered: after a restart the job is resumed from it.
CREATE TABLE IF NOT EXISTS records (
    origin   TEXT NOT NULL,
    job_id   TEXT NOT NULL,
    executor TEXT NOT NULL,
    state    BLOB NOT NULL,           -- msgpack of what the executor recorded
    PRIMARY KEY (origin, job_id)
);
"""
# A store from before front ends (no `origin`, keyed by job_id alone): its rows are QPI's.
_OLD = ", ".join(COLUMNS[:-1])
_MIGRATE = _TABLE.format(name="jobs_v2") + f"""
INSERT INTO jobs_v2 ({_OLD}) SELECT {_OLD} FROM jobs;
DROP TABLE jobs;
ALTER TABLE jobs_v2 RENAME TO jobs;
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
        columns = [row[1] for row in self._db.execute("PRAGMA table_info(jobs)")]
        if columns and "origin" not in columns:
            self._db.executescript(f"BEGIN; DROP INDEX IF EXISTS jobs_pending; {_MIGRATE} "
                                   "COMMIT;")
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

    def recover_interrupted(self, resumes: str | None = None) -> list[str]:
        """Jobs left `running` by a crash (of any front end): answer them with an error,
        never re-run. Those the executor `resumes` recorded remote work for are left
        running, to be resumed (`resumable`)."""
        rows = [(r[0], r[1]) for r in self._db.execute(
            "SELECT origin, job_id FROM jobs WHERE state='running' AND NOT EXISTS (SELECT 1 "
            "FROM records r WHERE r.origin=jobs.origin AND r.job_id=jobs.job_id "
            "AND r.executor IS ?)", (resumes,))]
        if rows:
            blob = msgpack.packb(INTERRUPTED)
            self._write([("UPDATE jobs SET state='done', result=?, finished=? "
                          "WHERE origin=? AND job_id=?",
                          [(blob, time.time(), *key) for key in rows]),
                         ("DELETE FROM records WHERE origin=? AND job_id=?", rows)])
        return [job_id for _, job_id in rows]

    def resumable(self, executor: str) -> list[tuple[str, str, dict[str, Any]]]:
        """Running jobs with remote work `executor` recorded: (origin, job_id, record)."""
        rows = self._db.execute(
            "SELECT r.origin, r.job_id, r.state FROM records r JOIN jobs j ON "
            "j.origin=r.origin AND j.job_id=r.job_id WHERE j.state='running' AND "
            "r.executor=? ORDER BY j.started", (executor,))
        return [(origin, job_id, msgpack.unpackb(blob)) for origin, job_id, blob in rows]

    def record(self, origin: str, job_id: str, executor: str, state: dict[str, Any]) -> None:
        """Keep what `executor` is about to start remotely for a running job (the task
        ids it created): StoreUnavailable if it is not durable, and then it must not."""
        self._write([("INSERT OR REPLACE INTO records (origin, job_id, executor, state) "
                      "VALUES (?, ?, ?, ?)", [(origin, job_id, executor,
                                                msgpack.packb(state))])])

    def mark_running(self, job_ids: Iterable[str], origin: str = QPI) -> None:
        now = time.time()
        self._write([("INSERT OR IGNORE INTO jobs (origin, job_id, state, started) "
                      "VALUES (?, ?, 'running', ?)",
                      [(origin, job_id, now) for job_id in job_ids])])

    def unmark_running(self, job_ids: Iterable[str], origin: str = QPI) -> None:
        """Jobs marked running that never reached the executor (it stopped first): a
        later dispatch of them may run."""
        keys = [(origin, job_id) for job_id in job_ids]
        self._write([("DELETE FROM jobs WHERE origin=? AND job_id=? AND state='running'", keys),
                     ("DELETE FROM records WHERE origin=? AND job_id=?", keys)])

    def finish(self, outcomes: Iterable[Outcome], delivered: Iterable[str] = (),
               origin: str = QPI, *, all_delivered: bool = False) -> list[Outcome]:
        """Store outcomes (and, in the same transaction, earlier deliveries); returns them
        as stored, made encodable where they were not. StoreUnavailable if not written.
        `all_delivered`: a front end that is polled for results stores them delivered."""
        now = time.time()
        stored, rows = [], []
        for outcome in outcomes:
            outcome, blob = packed(outcome)
            stored.append(outcome)
            rows.append((origin, outcome.job_id, blob, now, now, int(all_delivered)))
        self._write([
            ("INSERT INTO jobs (origin, job_id, state, result, started, finished, delivered) "
             "VALUES (?, ?, 'done', ?, ?, ?, ?) ON CONFLICT(origin, job_id) DO UPDATE SET "
             "state='done', result=excluded.result, finished=excluded.finished, "
             "delivered=MAX(delivered, excluded.delivered)", rows),
            ("UPDATE jobs SET delivered=1 WHERE origin=? AND job_id=?",
             [(origin, j) for j in delivered]),
            ("DELETE FROM records WHERE origin=? AND job_id=?",
             [(origin, o.job_id) for o in stored]),
        ])
        return stored

    def state(self, job_id: str, origin: str = QPI) -> tuple[str, Outcome | None] | None:
        row = self._db.execute(
            "SELECT state, result FROM jobs WHERE origin=? AND job_id=?", (origin, job_id)
        ).fetchone()
        if row is None:
            return None
        answer = (Outcome.from_wire(job_id, msgpack.unpackb(row[1]))
                  if row[1] is not None else None)
        return row[0], answer

    def undelivered(self, acks: bool, origin: str = QPI) -> list[Outcome]:
        """Results still owed to `origin`: never handed over, or (with acks) never
        acknowledged."""
        column = "acked" if acks else "delivered"
        rows = self._db.execute(
            f"SELECT job_id, result FROM jobs WHERE origin=? AND state='done' AND {column}=0 "
            "ORDER BY finished", (origin,)
        )
        return [Outcome.from_wire(job_id, msgpack.unpackb(blob)) for job_id, blob in rows]

    def mark_delivered(self, job_ids: Iterable[str], origin: str = QPI) -> None:
        self._write([("UPDATE jobs SET delivered=1 WHERE origin=? AND job_id=?",
                      [(origin, j) for j in job_ids])])

    def mark_acked(self, job_id: str, origin: str = QPI) -> None:
        self._write([("UPDATE jobs SET acked=1, delivered=1 WHERE origin=? AND job_id=?",
                      [(origin, job_id)])])

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
                    "DELETE FROM jobs WHERE rowid IN (SELECT rowid FROM jobs WHERE "
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
