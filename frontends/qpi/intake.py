"""Intake: one inbound frame in, one decision out — admit the job, answer it (from the
store, or with a refusal), cancel, acknowledge, or nothing. No sockets here; the rule
that a job is validated and admitted before it is queued lives here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from driver import logs
from driver.core import Core
from driver.jobs import JobSpec, read_spec
from driver.outcome import Outcome
from driver.store import QPI
from executors.base import ErrorCode, JobError
from frontends.qpi.wire import EventType, FrameError, decode

_INBOUND = frozenset({EventType.JOB_DISPATCH, EventType.JOB_CANCEL, EventType.QPU_STATE,
                      EventType.RESULT_ACK})
MAX_JOB_ID = 256

log = logs.get("qpi.intake")


@dataclass(frozen=True, slots=True)
class Admit:
    """Queue the job: parse it ahead, then run it."""

    job_id: str
    spec: JobSpec


@dataclass(frozen=True, slots=True)
class Answer:
    """Answer without running; `durable` answers are stored, transient ones are not
    (a later dispatch of the same job may then run)."""

    outcome: Outcome
    durable: bool


@dataclass(frozen=True, slots=True)
class Resend:
    """A duplicate of a job already answered: send the stored answer again."""

    outcome: Outcome


@dataclass(frozen=True, slots=True)
class Cancel:
    job_id: str


@dataclass(frozen=True, slots=True)
class Acknowledge:
    job_id: str


Decision = Admit | Answer | Resend | Cancel | Acknowledge | None


class Intake:
    def __init__(self, core: Core) -> None:
        self._core = core
        self._metrics = core.metrics
        self._store = core.store
        self.disabled = False
        # Whether the orchestrator takes a transient refusal as an answer it can act on
        # (Registration.accepts_refusals). Where it does not, a result with `error` is
        # final there, so nothing is refused for a reason that passes: the daemon holds
        # off reading (`full`), and a disabled node keeps what it was sent queued.
        self.accepts_refusals = True

    def decide(self, frame: bytes) -> Decision:
        try:
            env = decode(frame)
        except FrameError as exc:
            self._metrics.malformed.inc()
            log.warning("malformed frame dropped", reason=str(exc), size=len(frame))
            if exc.job_id is None:
                return None
            # protocol §6: answer when a job_id can be read
            return self._dispatch({"job_id": exc.job_id},
                                  JobError(ErrorCode.CIRCUIT_INVALID, f"job rejected: {exc}"))
        self._metrics.frames.labels(env.type if env.type in _INBOUND else "unknown").inc()
        payload = env.payload
        if env.type == EventType.JOB_DISPATCH:
            return self._dispatch(payload)
        job_id = payload.get("job_id")
        if env.type == EventType.JOB_CANCEL:
            return Cancel(job_id) if isinstance(job_id, str) else None
        if env.type == EventType.RESULT_ACK:
            return Acknowledge(job_id) if isinstance(job_id, str) else None
        if env.type == EventType.QPU_STATE:
            state = payload.get("state")
            self.disabled = state == "disabled"
            log.info("qpu state", state=str(state)[:40])
            return None
        log.info("unknown event type dropped", type=env.type[:80], id=env.id[:80])
        return None

    def _dispatch(self, payload: dict[str, Any], rejected: JobError | None = None) -> Decision:
        job_id = payload.get("job_id")
        if not _usable(job_id):
            log.warning("JobDispatch without a usable job_id dropped", job_id=repr(job_id)[:80])
            return None
        assert isinstance(job_id, str)
        if self._core.in_hand(QPI, job_id):
            self._metrics.duplicates.inc()
            log.info("duplicate dispatch absorbed", job_id=job_id)
            return None
        known = self._store.state(job_id)
        if known is not None:
            self._metrics.duplicates.inc()
            if known[1] is None:
                return None
            log.info("duplicate dispatch answered from the store", job_id=job_id)
            return Resend(known[1])
        if rejected is not None:
            return Answer(Outcome.failed(job_id, rejected), durable=True)
        refusal = self._refusal()
        if refusal is not None:
            return Answer(Outcome.failed(job_id, refusal), durable=False)
        try:
            spec = read_spec(payload.get("payload"), self._core.limits)
            self._check_meas_level(spec)
        except JobError as exc:
            return Answer(Outcome.failed(job_id, exc), durable=True)
        return Admit(job_id, spec)

    def _refusal(self) -> JobError | None:
        """Why the node cannot take any job now, if it cannot; all of these pass."""
        if not self.accepts_refusals:
            return None
        if self.disabled:
            return JobError(ErrorCode.QPU_DISABLED, "this QPU is disabled by the "
                            "orchestrator; the job was not run")
        return self.full()

    def full(self) -> JobError | None:
        """Why the node cannot take another job now (its store or queue is full), if so:
        refused with it, or (no refusals) read no further until it passes."""
        return self._core.full(QPI)

    def _check_meas_level(self, spec: JobSpec) -> None:
        meas_levels = self._core.meas_levels
        if spec.meas_level not in meas_levels:
            levels = " or ".join(str(level) for level in meas_levels)
            raise JobError(ErrorCode.CIRCUIT_INVALID,
                           f"this node returns meas_level {levels}; the job asked for "
                           f"meas_level {spec.meas_level}", meas_levels=list(meas_levels))


def _usable(job_id: Any) -> bool:
    if not isinstance(job_id, str) or not job_id or len(job_id) > MAX_JOB_ID:
        return False
    try:
        job_id.encode()
    except UnicodeEncodeError:  # lone surrogates: cannot be stored or answered
        return False
    return True
