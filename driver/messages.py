"""The typed messages that cross the pipes between the daemon and its child
processes (the executor process and the circuit parser)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from driver.jobs import JobSpec, Limits
from driver.outcome import Outcome
from executors.base import JobError


@dataclass(frozen=True, slots=True)
class PreparedJob:
    """A job whose every circuit was parsed and checked; `payload` is the executor
    `Job` as driver.payload writes it, passed through the daemon as bytes and read
    only where it runs."""

    job_id: str
    payload: bytes


# daemon -> parser
@dataclass(frozen=True, slots=True)
class ParseJob:
    job_id: str
    spec: JobSpec
    limits: Limits


# parser -> daemon
@dataclass(frozen=True, slots=True)
class Parsed:
    job_id: str
    prepared: PreparedJob | None
    error: JobError | None
    seconds: float


# daemon -> executor process
@dataclass(frozen=True, slots=True)
class RunBatch:
    """Jobs to run together. `parse` are jobs not yet parsed: parsed here first (one
    job at a time, small, with nothing behind it: the round trip through the parser
    process would cost more than the parse)."""

    jobs: list[PreparedJob]
    parse: list[ParseJob] = field(default_factory=list)
    # Jobs a stop of the node left running remotely: (job_id, what the executor recorded)
    resume: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Abandon:
    """Jobs that stopped here (cancelled, timed out, their executor crashed) while work the
    executor recorded for them went on remotely: release it (cancel the remote tasks)."""

    jobs: list[tuple[str, dict[str, Any]]]


@dataclass(frozen=True, slots=True)
class Skip:
    """Jobs cancelled while their batch waited in the executor's pipe: left out of it if
    it has not started yet (answered JOB_CANCELLED in its BatchDone)."""

    job_ids: list[str]


@dataclass(frozen=True, slots=True)
class RefreshCalibration:
    pass


@dataclass(frozen=True, slots=True)
class Stop:
    pass


# executor process -> daemon
@dataclass(frozen=True, slots=True)
class Ready:
    capabilities: Any
    calibration: dict[str, Any] | None
    fault: str | None


@dataclass(frozen=True, slots=True)
class Record:
    """Mid-batch: the executor is about to start remote work for a job (e.g. submit the
    tasks it created at a cloud QPU); it waits for Recorded before it does."""

    job_id: str
    state: dict[str, Any]


# daemon -> executor process, the answer to Record
@dataclass(frozen=True, slots=True)
class Recorded:
    job_id: str
    problem: str | None  # None: durable; else why not (then the work must not start)


@dataclass(frozen=True, slots=True)
class StartFailed:
    reason: str
    unavailable: bool  # the executor cannot be loaded here (exit 69)
    misconfigured: bool = False  # its options are wrong (exit 78)


@dataclass(frozen=True, slots=True)
class BatchDone:
    outcomes: list[Outcome]
    fault: str | None
    parse_seconds: list[float] = field(default_factory=list)  # of the batch's `parse` jobs


@dataclass(frozen=True, slots=True)
class CalibrationReport:
    calibration: dict[str, Any] | None
    fault: str | None
    capabilities: Any = None  # refreshed with it (a GPU's free memory changes)
    extra: dict[str, Any] = field(default_factory=dict)
