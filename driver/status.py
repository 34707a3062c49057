"""Node status: idle, busy, draining or degraded; readiness; the heartbeat payload
(protocol §4) and its schedule — on a timer, and at once on a change of status."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from driver import __version__
from driver.metrics import Metrics
from driver.outbox import Outbox
from driver.runner import JobRunner
from driver.sdnotify import Notifier
from driver.session import OrchestratorSession
from driver.store import ResultStore
from driver.wire import Envelope, EventType
from executors.base import iso_utc

HEARTBEAT_SPACING_S = 0.25  # at most four status-change heartbeats a second
STATUSES = ("idle", "busy", "draining", "degraded")


class NodeStatus:
    """Reads the other parts; writes only the status metrics and the heartbeat. Parts
    report trouble in `problems` (by key: "executor", "tls"), cleared when over; the
    store reports its own (`ResultStore.problem`)."""

    def __init__(self, executor_name: str, metrics: Metrics, runner: JobRunner,
                 outbox: Outbox, store: ResultStore, notifier: Notifier,
                 problems: dict[str, str]) -> None:
        self._executor_name = executor_name
        self._metrics = metrics
        self._runner = runner
        self._outbox = outbox
        self._store = store
        self._notifier = notifier
        self.problems = problems
        self.session: OrchestratorSession | None = None
        self.draining = False
        self.started = time.monotonic()
        self._beat_now = asyncio.Event()
        self._last = ""
        for name in STATUSES:
            metrics.node_status.labels(name).set_function(self._is(name))
        metrics.ready.set_function(lambda: float(not self.unready_reasons()))
        metrics.store_writable.set_function(lambda: float(self._store.problem is None))

    def _is(self, name: str) -> Callable[[], float]:
        return lambda: float(self.status() == name)

    def _degraded(self) -> str | None:
        reasons = [*self.problems.values()]
        if self._store.problem is not None:
            reasons.append(self._store.problem)
        if self._runner.executor.fault:
            reasons.append(f"device fault: {self._runner.executor.fault}")
        return "; ".join(reasons) or None

    def status(self) -> str:
        if self.draining:
            return "draining"
        if self._degraded():
            return "degraded"
        # Busy while any job is in hand: between two batches of a steady load the node
        # is not idle, and flipping would send a heartbeat at every batch boundary.
        return "busy" if self._runner.running or self._runner.waiting else "idle"

    def unready_reasons(self) -> list[str]:
        reasons = []
        if self.session is None or self.session.detached.is_set():
            reasons.append("not connected to the orchestrator")
        if not self._runner.executor.alive:
            reasons.append("executor not running")
        reasons.extend(self.problems.values())
        if self._store.problem is not None:
            reasons.append(self._store.problem)
        if self._runner.executor.fault:
            reasons.append(f"device fault: {self._runner.executor.fault}")
        if self.draining:
            reasons.append("draining")
        return reasons

    def describe(self) -> str:
        where = f"connected to {self.session.host}" if self.session else "not connected"
        counts = self._metrics.counters()
        return (f"{self.status()}, {where}, executor {self._executor_name}, "
                f"{self._runner.waiting} queued, {counts['jobs_ok']} ok / "
                f"{counts['jobs_failed']} failed")

    def changed(self, beat: bool = False) -> None:
        """Heartbeat at once when the status changes (or `beat`), not just on the timer."""
        current = self.status()
        if beat or current != self._last:
            self._last = current
            self._beat_now.set()
            self._notifier.status(self.describe())

    def capabilities(self) -> dict[str, Any]:
        """The executor's capabilities as it last reported them: at its (re)start and at
        each calibration refresh, never a copy taken once."""
        caps = self._runner.executor.capabilities
        return caps.to_wire() if caps is not None else {}

    def heartbeat(self) -> dict[str, Any]:
        running = self._runner.running
        executor = self._runner.executor
        # None where the executor has no calibration (Aer without noise, most plugins):
        # no figures and no timestamp made up for it. One without a timestamp of its own
        # is stamped with when the node read it.
        calibration: dict[str, Any] | None = None
        if executor.calibration:
            calibration = dict(executor.calibration)
            calibration.setdefault("timestamp", iso_utc(self._runner.calibrated_at or None))
        return {
            "status": self.status(),
            "executor": self._executor_name,
            "queue_depth": self._runner.waiting,
            "running_job": None if not running else {
                "job_id": running[0],
                "elapsed_s": round(time.monotonic() - self._runner.batch_started, 3),
                "batch_size": len(running),
            },
            "counters": {**self._metrics.counters(), "results_pending": self._outbox.owed},
            "uptime_s": round(time.monotonic() - self.started, 3),
            "version": __version__,
            "capabilities": self.capabilities(),
            "calibration": calibration,
            "degraded_reason": self._degraded(),
        }

    def beat(self) -> None:
        if self.session is None or not self._outbox.takes(EventType.HEARTBEAT):
            return
        self._last = self.status()
        self._outbox.event(Envelope(EventType.HEARTBEAT, self.heartbeat()))
        self._metrics.heartbeats.inc()

    async def heartbeats(self, interval: float) -> None:
        """One at once on connect, then every `interval`, and soon after each change."""
        self._beat_now.set()
        last = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._beat_now.wait(), interval)
            # Back-to-back short jobs flip busy/idle every few ms: coalesce those beats.
            wait = last + HEARTBEAT_SPACING_S - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            last = time.monotonic()
            self._beat_now.clear()
            self.beat()


def announcer(outbox: Outbox) -> Callable[[list[str]], None]:
    """JobStatus "running" for jobs that are still running after a moment."""
    def announce(job_ids: list[str]) -> None:
        for job_id in job_ids:
            outbox.event(Envelope(EventType.JOB_STATUS, {"job_id": job_id, "state": "running"}))
    return announce


