"""Checks and repairs the result store (`qpi-driver store check|recover`): tells a damaged
file from a healthy one, names the damage for the operator, salvages readable rows."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sqlite3
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import quote

import msgpack

from driver.store import COLUMNS, QPI

STORE_NAME = "results.sqlite3"
SQLITE_HEADER = b"SQLite format 3\x00"
_COLUMNS = ", ".join(COLUMNS)  # the store's own schema (driver.store)
_PLACES = ", ".join("?" * len(COLUMNS))
# What a store from before front ends (no `origin` column: every job QPI's) is read by.
_OLD_COLUMNS = ", ".join(COLUMNS[:-1]) + f", '{QPI}'"
_MAX_PROBES = 5_000_000  # rowids probed one by one behind a damaged page
# In WAL mode every open connection holds a read lock on this byte of the -shm file
# (SQLite's "dead man switch", WALINDEX_LOCK_OFFSET + SQLITE_SHM_NLOCK).
_SHM_DMS_BYTE = 128
LOST_RESULT = {
    "error": "the driver's result store was damaged and this job's result could not be "
    "read back; resubmit the job",
    "error_code": "JOB_FAILED",
}

Damage = Literal["not a database", "malformed"]
StoreState = Literal["ok", "missing", "unreadable", "not a database", "malformed"]
Row = tuple[str, str, bytes | None, float, float | None, int, int, str]


@dataclass(frozen=True, slots=True)
class StoreReport:
    """What `check` found; counts are None where the file could not be read that far."""

    path: Path
    state: StoreState
    detail: str = ""  # sqlite's own words: the error, or integrity_check's first lines
    rows: int | None = None  # every row: results owed plus the duplicate-dispatch memory
    owed: int | None = None  # finished, never handed to a pipe
    unacked: int | None = None  # handed over, never acknowledged (owed where acks are on)
    running: int | None = None  # interrupted: answered as failed at the next start

    @property
    def damaged(self) -> bool:
        return self.state in ("not a database", "malformed")

    def summary(self) -> str:
        words = {
            "ok": "healthy",
            "missing": "no result store here (the daemon creates one at its first start)",
            "unreadable": "cannot be read",
            "not a database": "damaged: not an SQLite database (its header is overwritten; "
            "nothing in it can be read)",
            "malformed": "damaged: malformed pages (sqlite cannot read all of it)",
        }
        lines = [f"{self.path}: {words[self.state]}"]
        if self.detail and self.state != "ok":
            lines.append(f"  sqlite: {self.detail}")
        if self.rows is not None:
            lines.append(f"  rows: {self.rows} (results owed: {self.owed}, delivered but not "
                         f"acknowledged: {self.unacked}, interrupted jobs: {self.running})")
        elif self.damaged:
            lines.append("  rows: cannot be counted")
        if self.damaged:
            lines.append(f"  stop the daemon, then run: qpi-driver store recover --data-dir "
                         f"{self.path.parent}")
        return "\n".join(lines)


@dataclass(slots=True)
class RecoverReport:
    """What `recover` did. `saved*` count rows in the fresh store; `lost_known` are job ids
    an index still names whose rows could not be read."""

    path: Path
    before: StoreReport
    method: str = ""
    set_aside: list[Path] = field(default_factory=list)
    saved: int = 0
    saved_owed: int = 0
    saved_running: int = 0
    replaced: int = 0  # rows kept, but whose result could not be decoded: now an error
    lost_known: list[str] = field(default_factory=list)
    unreadable: int = 0  # rowids whose lookup hit a damaged page: lost rows (or pruned ones)
    notes: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.set_aside)

    def summary(self) -> str:
        if not self.changed:
            return self.before.summary() + "\n  nothing changed"
        lines = [
            f"{self.path}: recovered ({self.method})",
            f"  the damaged file is kept as {self.set_aside[0]}"
            + (f" (with its {' and '.join(p.name.rsplit('-', 1)[1] for p in self.set_aside[1:])}"
               " files beside it)" if len(self.set_aside) > 1 else ""),
            f"  saved {self.saved} rows: {self.saved_owed} results still owed (sent at the "
            f"next connection), {self.saved_running} interrupted jobs (answered as failed "
            f"at the next start), the rest remembered to answer duplicate dispatches",
        ]
        if self.replaced:
            lines.append(f"  {self.replaced} rows had an unreadable result: those jobs are "
                         "answered with an error asking to resubmit")
        if self.lost_known:
            shown = ", ".join(self.lost_known[:10])
            more = f" and {len(self.lost_known) - 10} more" if len(self.lost_known) > 10 else ""
            lines.append(f"  lost {len(self.lost_known)} rows an index still names: {shown}"
                         f"{more}")
        if self.unreadable:
            lines.append(f"  {self.unreadable} rowids could not be read: up to that many rows "
                         "lost (some may have been pruned before)")
        lines.append("  lost: rows on damaged pages. A result lost before it was delivered is "
                     "never sent; the orchestrator's own timeout or a re-dispatch covers it "
                     "(a re-dispatched job whose row was lost runs again)")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


class StoreInUse(Exception):
    """A process has the store open: recovering under it would lose its writes."""


class RecoverFailed(Exception):
    """The fresh store could not be written or put in place; nothing was changed."""


# -- check ----------------------------------------------------------------------------


def _open_ro(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True)


def damage_of(exc: BaseException) -> Damage | None:
    """The kind of damage an sqlite error (or one it caused) reports, None if not damage."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, sqlite3.DatabaseError):
            code = getattr(seen, "sqlite_errorcode", None)
            if code is not None:
                primary = code & 0xFF  # extended codes carry the primary one in the low byte
                if primary == sqlite3.SQLITE_NOTADB:
                    return "not a database"
                if primary == sqlite3.SQLITE_CORRUPT:
                    return "malformed"
            text = str(seen)
            if "file is not a database" in text:
                return "not a database"
            if "malformed" in text:
                return "malformed"
        seen = seen.__cause__ or seen.__context__
    return None


def _counts(db: sqlite3.Connection) -> tuple[int, int, int, int]:
    try:
        row = db.execute(
            "SELECT COUNT(*), "
            "COALESCE(SUM(state='done' AND delivered=0), 0), "
            "COALESCE(SUM(state='done' AND delivered=1 AND acked=0), 0), "
            "COALESCE(SUM(state='running'), 0) FROM jobs"
        ).fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):  # created, schema not written yet
            return 0, 0, 0, 0
        raise
    return int(row[0]), int(row[1]), int(row[2]), int(row[3])


def check(path: Path, quick: bool = False) -> StoreReport:
    """Open `path` read-only and run sqlite's integrity_check (quick_check with `quick`:
    linear time, for a check at start)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(len(SQLITE_HEADER))
    except FileNotFoundError:
        return StoreReport(path, "missing")
    except OSError as exc:
        return StoreReport(path, "unreadable", exc.strerror or str(exc))
    if size and head != SQLITE_HEADER:
        return StoreReport(path, "not a database",
                           "file is not a database (the first 16 bytes are not SQLite's header)")
    try:
        db = _open_ro(path)
    except sqlite3.Error as exc:
        return StoreReport(path, damage_of(exc) or "unreadable", str(exc))
    try:
        try:
            pragma = "quick_check" if quick else "integrity_check"
            problems = [str(r[0]) for r in db.execute(f"PRAGMA {pragma}(20)")]
        except sqlite3.DatabaseError as exc:
            return StoreReport(path, damage_of(exc) or "unreadable", str(exc))
        try:
            counts: tuple[int, ...] | None = _counts(db)
        except sqlite3.DatabaseError:
            counts = None
        rows, owed, unacked, running = counts or (None, None, None, None)
        if problems != ["ok"]:
            return StoreReport(path, "malformed", "; ".join(problems[:3]), rows, owed, unacked,
                               running)
        return StoreReport(path, "ok", "", rows, owed, unacked, running)
    finally:
        db.close()


def describe_open_failure(path: Path, exc: BaseException) -> str | None:
    """The operator's sentence for an error raised opening or first reading the store at
    `path`: the file, the damage, what to run. None when the error is not damage."""
    kind = damage_of(exc)
    if kind is None:
        return None
    what = ("is not an SQLite database any more (its header is overwritten, so nothing in it "
            "can be read)" if kind == "not a database"
            else "is damaged: sqlite finds malformed pages in it")
    return (f"the result store {path} {what} (sqlite: {exc}). The data directory itself is "
            f"fine. Run `qpi-driver store recover --data-dir {path.parent}`: it saves the rows "
            "that can still be read into a fresh store and keeps the damaged file beside it; "
            "results owed in the lost rows cannot be delivered")


# -- recover --------------------------------------------------------------------------


def _in_use(path: Path) -> bool:
    shm = path.with_name(path.name + "-shm")
    try:
        fd = os.open(shm, os.O_RDWR)
    except OSError:
        return False  # no shared-memory file: no WAL connection is open
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, _SHM_DMS_BYTE, os.SEEK_SET)
    except OSError:
        return True
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN, 1, _SHM_DMS_BYTE, os.SEEK_SET)
        return False
    finally:
        os.close(fd)


def _companions(path: Path) -> list[Path]:
    return [path.with_name(path.name + suffix) for suffix in ("", "-wal", "-shm")]


@contextlib.contextmanager
def _copy_of(path: Path) -> Iterator[Path]:
    """The damaged file and its WAL copied aside: sqlite may write to what it opens
    (WAL recovery, a checkpoint at close), and the original stays as it was found."""
    with tempfile.TemporaryDirectory(prefix=".recover-", dir=path.parent) as scratch:
        copy = Path(scratch) / path.name
        for src, dst in zip(_companions(path)[:2], _companions(copy)[:2], strict=True):
            if src.exists():
                shutil.copyfile(src, dst)
        yield copy


def _with_cli(copy: Path, sqlite3_bin: str) -> tuple[dict[tuple[str, str], Row], str | None]:
    """sqlite's own recovery (`.recover` of the sqlite3 shell) into a scratch database."""
    probe = subprocess.run([sqlite3_bin, ":memory:", "SELECT 1 FROM sqlite_dbpage LIMIT 0"],
                           capture_output=True, timeout=60, check=False)
    if probe.returncode != 0:
        return {}, (f"{sqlite3_bin} cannot run .recover: it is built without the "
                    "sqlite_dbpage table (as Debian 12's is), so rows were read one by one")
    dump = subprocess.run([sqlite3_bin, str(copy), ".recover --ignore-freelist"],
                          capture_output=True, timeout=3600, check=False)
    if dump.returncode != 0:
        lines = dump.stderr.decode(errors="replace").strip().splitlines() or [
            f"exit status {dump.returncode}"]
        return {}, f"{sqlite3_bin} .recover failed ({'; '.join(lines)[:200]})"
    scratch = copy.with_name("recovered.sqlite3")
    load = subprocess.run([sqlite3_bin, str(scratch)], input=dump.stdout, capture_output=True,
                          timeout=3600, check=False)
    if load.returncode != 0 and not scratch.exists():
        return {}, "the SQL .recover wrote could not be loaded"
    rows: dict[tuple[str, str], Row] = {}
    db = sqlite3.connect(scratch)
    try:
        with contextlib.suppress(sqlite3.Error):
            for raw in db.execute(f"SELECT {_columns(db)} FROM jobs"):
                _keep(rows, raw)
        # Rows .recover could not place in a table: the jobs table's have its columns.
        for width, tail in ((len(COLUMNS), ""), (len(COLUMNS) - 1, f", '{QPI}'")):
            fields = ", ".join(f"c{i}" for i in range(width)) + tail
            with contextlib.suppress(sqlite3.Error):
                for raw in db.execute(f"SELECT {fields} FROM lost_and_found "
                                      f"WHERE nfield = {width}"):
                    _keep(rows, raw)
    finally:
        db.close()
    return rows, None


def _row_by_row(copy: Path) -> tuple[dict[tuple[str, str], Row], int]:
    """Fallback: scan the table forwards and backwards until a damaged page stops each
    scan, then look up every rowid in between one by one; rows on damaged pages are lost.
    Also returns how many lookups hit damage."""
    rows: dict[tuple[str, str], Row] = {}
    failed = 0
    seen: set[int] = set()
    db = _open_ro(copy)
    try:
        columns = _columns(db)
        for order in ("ASC", "DESC"):
            with contextlib.suppress(sqlite3.DatabaseError):
                for rowid, *raw in db.execute(
                        f"SELECT rowid, {columns} FROM jobs ORDER BY rowid {order}"):
                    seen.add(rowid)
                    _keep(rows, tuple(raw))
        top = max(seen, default=0)
        for index in _indexes(db):  # an index may still list rowids the scans missed
            with contextlib.suppress(sqlite3.DatabaseError):
                for (rowid,) in db.execute(f'SELECT rowid FROM jobs INDEXED BY "{index}"'):
                    top = max(top, int(rowid))
        for rowid in range(1, min(top, _MAX_PROBES) + 1):
            if rowid in seen:
                continue
            try:
                raw = db.execute(f"SELECT {columns} FROM jobs WHERE rowid=?",
                                 (rowid,)).fetchone()
            except sqlite3.DatabaseError:
                failed += 1
                continue
            if raw is not None:
                _keep(rows, tuple(raw))
    finally:
        db.close()
    return rows, failed


def _indexes(db: sqlite3.Connection) -> list[str]:
    try:
        return [str(r[0]) for r in db.execute(
            "SELECT name FROM sqlite_master WHERE type='index' AND tbl_name='jobs'")]
    except sqlite3.DatabaseError:
        return []


def _indexed_ids(copy: Path) -> set[tuple[str, str]]:
    """(origin, job_id) of the jobs the primary-key index still names (read without
    touching the table)."""
    ids: set[tuple[str, str]] = set()
    try:
        db = _open_ro(copy)
    except sqlite3.Error:
        return ids
    try:
        key = "job_id" if _columns(db) == _OLD_COLUMNS else "origin, job_id"
        for index in _indexes(db):
            if not index.startswith("sqlite_autoindex_jobs"):
                continue
            for order in ("ASC", "DESC"):
                with contextlib.suppress(sqlite3.DatabaseError):
                    for found in db.execute(f'SELECT {key} FROM jobs INDEXED BY "{index}" '
                                            f"ORDER BY {key.replace(',', f' {order},')} "
                                            f"{order}"):
                        origin, job_id = found if len(found) == 2 else (QPI, found[0])
                        ids.add((str(origin), str(job_id)))
    finally:
        db.close()
    return ids


def _columns(db: sqlite3.Connection) -> str:
    """The columns to read a store by: this version's, or a pre-front-end store's."""
    try:
        names = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
    except sqlite3.DatabaseError:
        return _COLUMNS
    return _OLD_COLUMNS if names and "origin" not in names else _COLUMNS


def _keep(rows: dict[tuple[str, str], Row], raw: tuple[object, ...]) -> None:
    """Add a salvaged row if it is one the store can use; a finished row wins over a
    running one for the same job (a later state of it)."""
    job_id, state, result, started, finished, delivered, acked, origin = raw
    if not isinstance(job_id, str) or not job_id or state not in ("running", "done"):
        return
    if not isinstance(origin, str) or not origin:
        origin = QPI
    if not isinstance(started, int | float):
        started = finished if isinstance(finished, int | float) else time.time()
    row: Row = (
        job_id, str(state), result if isinstance(result, bytes) else None, float(started),
        float(finished) if isinstance(finished, int | float) else None,
        1 if delivered == 1 else 0, 1 if acked == 1 else 0, origin,
    )
    known = rows.get((origin, job_id))
    if known is None or (known[1] == "running" and row[1] == "done"):
        rows[(origin, job_id)] = row


def _same_owner(fresh: Path, damaged: Path) -> None:
    """The fresh store gets the damaged one's owner and mode: recovery runs as root, but
    the daemon (systemd's DynamicUser=, say) must be able to write what it finds."""
    st = damaged.stat()
    if os.geteuid() == 0:
        os.chown(fresh, st.st_uid, st.st_gid)
    os.chmod(fresh, stat.S_IMODE(st.st_mode))


def _readable(result: bytes | None) -> bool:
    if result is None:
        return False
    try:
        return isinstance(msgpack.unpackb(result), dict)
    except Exception:  # msgpack raises several types for garbage; all mean unreadable
        return False


def recover(path: Path, sqlite3_bin: str | None = None) -> RecoverReport:
    """Salvage what can be read from a damaged store at `path` into a fresh one, keeping
    the damaged file (and its WAL) beside it under a timestamped name. A healthy or
    missing store is left alone. StoreInUse if a process has it open."""
    from driver.store import ResultStore  # the one place that knows the schema

    before = check(path)
    report = RecoverReport(path, before)
    if before.state in ("ok", "missing"):
        return report
    if before.state == "unreadable":
        raise RecoverFailed(f"cannot read {path}: {before.detail}")
    if _in_use(path):
        raise StoreInUse(f"{path} is open in another process (is the daemon running?); stop "
                         "it, then recover")
    rows: dict[tuple[str, str], Row] = {}
    lost_ids: set[tuple[str, str]] = set()
    if before.state == "malformed":
        with _copy_of(path) as copy:
            binary = sqlite3_bin if sqlite3_bin is not None else shutil.which("sqlite3")
            methods = []
            if binary:
                rows, failure = _with_cli(copy, binary)
                if failure:
                    report.notes.append(failure)
                else:
                    methods.append("sqlite3 .recover")
            # Row by row also fills in what .recover missed (or does all the work).
            by_row, report.unreadable = _row_by_row(copy)
            for row in by_row.values():
                _keep(rows, row)
            methods.append("row by row")
            report.method = " + ".join(methods)
            lost_ids = _indexed_ids(copy) - set(rows)
    else:
        report.method = "nothing readable: a fresh, empty store"
    report.lost_known = sorted(job_id if origin == QPI else f"{origin}:{job_id}"
                               for origin, job_id in lost_ids)
    _replace(path, rows, report, ResultStore)
    return report


def _replace(path: Path, rows: dict[tuple[str, str], Row], report: RecoverReport,
             store_cls: type) -> None:
    fresh = path.with_name(path.name + ".recovering")
    for leftover in _companions(fresh):
        leftover.unlink(missing_ok=True)
    saved: list[Row] = []
    for row in rows.values():
        if row[1] == "done" and not _readable(row[2]):
            row = (*row[:2], msgpack.packb(LOST_RESULT), *row[3:])
            report.replaced += 1
        saved.append(row)
    try:
        store_cls(fresh).close()  # the store's own schema, WAL mode
        db = sqlite3.connect(fresh, isolation_level=None)
        try:
            db.execute("BEGIN")
            db.executemany(f"INSERT OR IGNORE INTO jobs ({_COLUMNS}) VALUES ({_PLACES})",
                           saved)
            db.execute("COMMIT")
        finally:
            db.close()
        _same_owner(fresh, path)
        with fresh.open("rb") as fh:
            os.fsync(fh.fileno())
    except (OSError, sqlite3.Error) as exc:
        for leftover in _companions(fresh):
            leftover.unlink(missing_ok=True)
        raise RecoverFailed(f"cannot write a fresh store beside {path}: {exc}; nothing was "
                            "changed") from None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = path.with_name(f"{path.name}.damaged-{stamp}")
    for src, dst in zip(_companions(path), _companions(aside), strict=True):
        if src.exists():
            os.replace(src, dst)
            report.set_aside.append(dst)
    os.replace(fresh, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the renames survive a power cut
    finally:
        os.close(dir_fd)
    report.saved = len(saved)
    report.saved_owed = sum(1 for r in saved if r[1] == "done" and r[5] == 0)
    report.saved_running = sum(1 for r in saved if r[1] == "running")
