"""Node status, the same for every front end: idle, busy, draining or degraded;
readiness; the status snapshot that QPI's heartbeat (protocol §4) and QCOS's
device_state are made of. When each is sent is the front end's business."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from driver import __version__
from driver.metrics import Metrics
from driver.runner import JobRunner
from driver.sdnotify import Notifier
from driver.store import ResultStore
from executors.base import iso_utc

STATUSES = ("idle", "busy", "draining", "degraded")


class NodeStatus:
    """Reads the other parts; writes only the status metrics. Parts report trouble in
    `problems` (by key: "executor", "tls"), cleared when over; the store reports its own
    (`ResultStore.problem`); front ends say why they cannot serve (`frontend_reasons`)."""

    def __init__(self, executor_name: str, metrics: Metrics, runner: JobRunner,
                 store: ResultStore, notifier: Notifier, problems: dict[str, str]) -> None:
        self._executor_name = executor_name
        self._metrics = metrics
        self._runner = runner
        self._store = store
        self._notifier = notifier
        self.problems = problems
        self.frontend_reasons: Callable[[], list[str]] = list
        self.frontend_summary: Callable[[], str] = lambda: "not connected"
        self.draining = False
        self.started = time.monotonic()
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
        reasons = self.frontend_reasons()
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
        counts = self._metrics.counters()
        return (f"{self.status()}, {self.frontend_summary()}, executor {self._executor_name}, "
                f"{self._runner.waiting} queued, {counts['jobs_ok']} ok / "
                f"{counts['jobs_failed']} failed")

    def changed(self, beat: bool = False) -> bool:
        """Whether the status changed since the last call (or `beat`: report it anyway);
        systemd hears of it at once."""
        current = self.status()
        if beat or current != self._last:
            self._last = current
            if self._notifier.enabled:  # one job at a time flips busy/idle at every job
                self._notifier.status(self.describe())
            return True
        return False

    def capabilities(self) -> dict[str, Any]:
        """The executor's capabilities as it last reported them: at its (re)start and at
        each calibration refresh, never a copy taken once."""
        caps = self._runner.executor.capabilities
        return caps.to_wire() if caps is not None else {}

    def calibration(self) -> dict[str, Any] | None:
        """The executor's calibration, None where it has none (Aer without noise, most
        plugins): no figures and no timestamp made up for it. One without a timestamp of
        its own is stamped with when the node read it."""
        executor = self._runner.executor
        if not executor.calibration:
            return None
        calibration = dict(executor.calibration)
        calibration.setdefault("timestamp", iso_utc(self._runner.calibrated_at or None))
        return calibration

    def heartbeat(self, results_pending: int = 0) -> dict[str, Any]:
        """The status snapshot (QPI's heartbeat payload)."""
        running = self._runner.running
        return {
            "status": self.status(),
            "executor": self._executor_name,
            "queue_depth": self._runner.waiting,
            "running_job": None if not running else {
                "job_id": running[0],
                "elapsed_s": round(time.monotonic() - self._runner.batch_started, 3),
                "batch_size": len(running),
            },
            "counters": {**self._metrics.counters(), "results_pending": results_pending},
            "uptime_s": round(time.monotonic() - self.started, 3),
            "version": __version__,
            "capabilities": self.capabilities(),
            "calibration": self.calibration(),
            "degraded_reason": self._degraded(),
        }
