"""The node's core, shared by every front end: admission limits and fair shares, the
queue and runner, the executor, the durable store and its answers, status and metrics.

A front end speaks one orchestrator's protocol (QPI's registration and NNG session, the
QCOS device sockets) and reaches the core only through `Core`: admit, cancel, look a job
up in hand or finished, what is owed to it, a status snapshot. The core calls it back
through `Frontend`: outcomes as its jobs finish, jobs as they start, status changes.
Front ends are chosen by name (`FRONTENDS`, the `frontends` setting), the way uvicorn
chooses its protocol class, and imported only when chosen. Each job belongs to the front
end it came from (its `origin`): the store and the runner key jobs by (origin, job_id), so
two front ends' jobs never collide and each hears only its own answers."""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from driver import logs
from driver.jobs import JobSpec, Limits
from driver.metrics import Metrics
from driver.outcome import Outcome
from driver.runner import JobRunner, State
from driver.store import ResultStore, StoreUnavailable
from executors.base import ErrorCode, JobError

if TYPE_CHECKING:
    from driver.sdnotify import Notifier
    from driver.settings import Settings
    from driver.status import NodeStatus

log = logs.get("qpi.core")

# name -> "module:Class": imported only when the setting names it.
FRONTENDS = {
    "qpi": "frontends.qpi.frontend:QpiFrontend",
    "qcos": "frontends.qcos.server:QcosFrontend",
}


class Frontend(Protocol):
    """What the core asks of a front end (see frontends/qpi, frontends/qcos)."""

    name: str  # its origin in the store and the runner

    async def preflight(self) -> int:
        """Checks worth making while the executor starts (0: none failed; else the exit
        code the node stops with)."""

    async def serve(self) -> int:
        """Serve until the node stops (`Core.stopping`); then, once the core has drained
        (`Core.drained`), hand over what is owed and return. Non-zero: the node exits
        with it."""

    def finished(self, outcomes: list[Outcome]) -> None:
        """Final answers to this front end's jobs: make them durable, then deliver."""

    def started(self, job_ids: list[str]) -> None:
        """Its jobs that began to run (and still run after a moment)."""

    def changed(self) -> None:
        """The node's status changed, or there is news to report at once (a fresh
        calibration)."""

    def may_run(self) -> bool:
        """Whether its ready jobs may be handed to the executor now (False while its
        results back up, or its orchestrator holds it)."""

    def draining(self) -> None:
        """The node stopped taking jobs: tell the orchestrator."""

    def unready(self) -> list[str]:
        """Why it cannot serve now (/readyz)."""

    def describe(self) -> str:
        """Where it stands, in a few words (systemd's status line)."""

    def background(self) -> dict[str, Callable[[], Coroutine[Any, Any, None]]]:
        """Parts of its own for the daemon to supervise beside `serve` (by name)."""

    def close(self) -> int:
        """The node stopped: write down what is kept in memory; return the results still
        owed (they go out after the next start)."""


@dataclass(frozen=True, slots=True)
class JobView:
    """A job as the core knows it: `queued` (waiting, parsing, ready, handed to the
    executor), `running`, or `done` with its stored outcome."""

    state: str
    outcome: Outcome | None = None


def load_frontend(name: str) -> type[Any]:
    """The front end class `name` names: a key of FRONTENDS or "module:Class"."""
    target = FRONTENDS.get(name, name)
    module, _, attr = target.partition(":")
    if not attr:
        raise ValueError(f"unknown front end {name!r}; known: {', '.join(FRONTENDS)} "
                         "(or module:Class)")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"front end {name!r} cannot be loaded ({exc}); is its extra "
                         f"installed? pip install 'qpi-driver[{name}]'") from exc


class Core:
    """The one object a front end holds."""

    def __init__(self, settings: Settings, metrics: Metrics, store: ResultStore,
                 runner: JobRunner, status: NodeStatus, notifier: Notifier,
                 should_exit: asyncio.Event) -> None:
        self.settings = settings
        self.metrics = metrics
        self.store = store
        self.runner = runner
        self.status = status
        self.notifier = notifier
        self.should_exit = should_exit  # set: the node is stopping
        self.drained = asyncio.Event()  # set: the runner finished (or gave up) its jobs
        self.frontends: dict[str, Frontend] = {}
        self.limits = Limits(1, 1, 1)
        self.meas_levels: tuple[int, ...] = (2,)

    def attach(self, frontend: Frontend) -> None:
        self.frontends[frontend.name] = frontend
        self.metrics.frontend_queue.labels(frontend.name).set_function(
            lambda: self.runner.waiting_of(frontend.name))

    # -- what front ends call ---------------------------------------------------------------

    def full(self, origin: str) -> JobError | None:
        """Why `origin` cannot queue another job now, if it cannot: the store refuses
        writes, or the queue is full and `origin` holds at least its fair share of it
        (with two front ends, neither can crowd the other out of the queue)."""
        if self.store.problem is not None:
            return JobError(ErrorCode.QUOTA_EXCEEDED, f"the driver cannot store results "
                            f"({self.store.problem}); the job was not run, retry later")
        limit = self.settings.max_queued_jobs
        waiting = self.runner.waiting
        if waiting < limit:
            return None
        share = limit / max(1, len(self.frontends))
        if len(self.frontends) > 1 and self.runner.waiting_of(origin) < share:
            return None
        return JobError(ErrorCode.QUOTA_EXCEEDED, f"the driver's queue is full "
                        f"({limit} jobs); retry later", queue_depth=waiting)

    def in_hand(self, origin: str, job_id: str) -> bool:
        return self.runner.in_hand(origin, job_id)

    def admit(self, origin: str, job_id: str, spec: JobSpec) -> None:
        self.runner.admit(job_id, spec, origin)

    def cancel(self, origin: str, job_id: str) -> bool:
        """Cancel a job in hand (answered through `finished`); False if not in hand."""
        return self.runner.cancel(job_id, origin)

    def lookup(self, origin: str, job_id: str) -> JobView | None:
        """The job in hand or in the store; None if the node does not know it."""
        state = self.runner.state_of(origin, job_id)
        if state is not None:
            return JobView("running" if state is State.RUNNING else "queued")
        known = self.store.state(job_id, origin)
        if known is None:
            return None
        if known[1] is None:  # marked running by a run that is no more: recovered at start
            return JobView("running")
        return JobView("done", known[1])

    def finish(self, origin: str, outcomes: list[Outcome]) -> None:
        """Final answers (from the runner, or a front end's own refusal to run): counted
        here, once, then handed to the front end they belong to."""
        if not outcomes:
            return
        self.count(origin, outcomes)
        frontend = self.frontends.get(origin)
        if frontend is None:  # none serves it in this run: kept for when one does
            try:
                self.store.finish(outcomes, origin=origin)
            except StoreUnavailable as exc:
                log.error("results of a front end not served cannot be stored; lost",
                          origin=origin, reason=exc.reason, jobs=[o.job_id for o in outcomes])
            return
        frontend.finished(outcomes)

    def count(self, origin: str, outcomes: list[Outcome]) -> None:
        """Count answers, once each: `finish` does; a front end's refusals that are
        never stored (a later dispatch may still run) come here alone."""
        executor = self.settings.executor
        for outcome in outcomes:
            self.metrics.jobs.labels(outcome.label, executor).inc()
            self.metrics.frontend_jobs.labels(origin, outcome.label).inc()
            if outcome.ok:
                experiments = outcome.experiments()
                self.metrics.circuits.labels(executor).inc(len(experiments))
                self.metrics.shots.labels(executor).inc(
                    sum(int(e.get("shots", 0)) for e in experiments))

    def request_calibration(self) -> None:
        self.runner.request_calibration()

    def wake(self) -> None:
        """A front end's `may_run` may have turned True."""
        self.runner.wake()

    # -- what the runner calls --------------------------------------------------------------

    def may_run(self, origin: str) -> bool:
        frontend = self.frontends.get(origin)
        return frontend is None or frontend.may_run()

    def started(self, origin: str, job_ids: list[str]) -> None:
        frontend = self.frontends.get(origin)
        if frontend is not None:
            frontend.started(job_ids)

    def changed(self, beat: bool = False) -> None:
        """Something that may move the node's status happened (`beat`: news to report
        even if the status stays, e.g. a fresh calibration)."""
        if self.status.changed(beat):
            for frontend in self.frontends.values():
                frontend.changed()
