"""The executor contract: the job and result types that cross from the daemon
to an executor, and the small base class every executor implements."""

from __future__ import annotations

import abc
import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from executors.flat import FlatCircuit

if TYPE_CHECKING:
    from qiskit.circuit import QuantumCircuit


def iso_utc(epoch: float | None = None) -> str:
    """An instant (now by default) as ISO 8601 UTC with milliseconds, as the wire and
    every timestamp of this project write it: `2026-11-21T10:04:05.123Z`."""
    moment = dt.datetime.now(dt.UTC) if epoch is None else dt.datetime.fromtimestamp(epoch, dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class ErrorCode:
    """Error codes of protocol §5, as executors and the daemon report them."""

    CIRCUIT_INVALID = "CIRCUIT_INVALID"
    QUOTA_EXCEEDED = "QUOTA_EXCEEDED"
    JOB_TIMEOUT = "JOB_TIMEOUT"
    JOB_CANCELLED = "JOB_CANCELLED"
    EXECUTOR_CRASHED = "EXECUTOR_CRASHED"
    JOB_FAILED = "JOB_FAILED"
    QPU_DISABLED = "QPU_DISABLED"


class JobError(Exception):
    """A job failed in a way a person can act on; becomes an error result."""

    def __init__(self, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details

    def to_result(self) -> dict[str, Any]:
        return {"error": self.message, "error_code": self.code, **self.details}

    def __reduce__(self) -> Any:  # crosses process pipes; Exception's default drops `code`
        return (_job_error, (self.code, self.message, self.details))


def _job_error(code: str, message: str, details: dict[str, Any]) -> JobError:
    return JobError(code, message, **details)


class Experiment:
    """One circuit with its parameters bound: the unit an executor runs.

    `circuit` is the parsed, bound Qiskit circuit; `source` the OpenQASM text it
    came from (for executors that compile from text themselves). An executor with
    `takes_flat_circuits` receives plain circuits as `flat` (executors.flat) and may
    run them from there; `circuit` is then built on first use.
    """

    __slots__ = ("_form", "memory", "parameter_values", "shots", "source")

    def __init__(self, circuit: QuantumCircuit | FlatCircuit, shots: int, memory: bool = False,
                 source: str = "", parameter_values: tuple[float, ...] = ()) -> None:
        self._form = circuit
        self.shots = shots
        self.memory = memory
        self.source = source
        self.parameter_values = parameter_values

    @property
    def circuit(self) -> QuantumCircuit:
        form = self._form
        if isinstance(form, FlatCircuit):
            form = self._form = form.to_circuit()
        return form

    @property
    def flat(self) -> FlatCircuit | None:
        """The circuit as it crossed, where it crossed flat and was not built since."""
        return self._form if isinstance(self._form, FlatCircuit) else None

    def __reduce__(self) -> Any:
        return Experiment, (self._form, self.shots, self.memory, self.source,
                            self.parameter_values)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Experiment):
            return NotImplemented
        return ((self.circuit, self.shots, self.memory, self.source, self.parameter_values)
                == (other.circuit, other.shots, other.memory, other.source,
                    other.parameter_values))

    __hash__ = None  # type: ignore[assignment]  # equal circuits need not hash alike

    def __repr__(self) -> str:
        return (f"Experiment(circuit={self._form!r}, shots={self.shots}, memory={self.memory}, "
                f"source={self.source[:40]!r}, parameter_values={self.parameter_values})")


@dataclass(frozen=True, slots=True)
class Job:
    """A validated job: every circuit parsed, every binding its own experiment."""

    job_id: str
    experiments: tuple[Experiment, ...]
    meas_level: int = 2
    meas_return: str = "single"
    # How long the job may take, from when its batch starts (the node stops it then): an
    # executor that waits on remote work bounds its wait by this.
    timeout_s: float | None = None


@dataclass(slots=True)
class ExperimentResult:
    """Counts (and optional per-shot memory) of one experiment.

    Bitstrings are Qiskit's memory format: one character per classical bit,
    highest bit on the left, `memory_slots` wide, no spaces.
    """

    counts: dict[str, int]
    shots: int
    header: dict[str, Any]
    memory: list[str] | None = None
    time_taken: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"counts": self.counts, "shots": self.shots, "header": self.header}
        if self.memory is not None:
            out["memory"] = self.memory
        if self.time_taken is not None:
            out["time_taken"] = self.time_taken
        out.update(self.extra)
        return out


@dataclass(slots=True)
class JobResult:
    """A finished job: one result per experiment, in order."""

    experiments: list[ExperimentResult]
    execution_time_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What an executor can run; reported in heartbeats and used for admission."""

    max_qubits: int
    max_shots: int
    basis_gates: tuple[str, ...] = ()
    precision: str = "double"
    device: str = "cpu"
    memory_bytes: int | None = None
    # Which `meas_level`s (protocol §5) this executor returns; the daemon refuses any
    # other at admission, so `run` never sees one.
    meas_levels: tuple[int, ...] = (2,)
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {
            "max_qubits": self.max_qubits,
            "max_shots": self.max_shots,
            "basis_gates": list(self.basis_gates),
            "precision": self.precision,
            "device": self.device,
            "memory": self.memory_bytes,
            "meas_levels": list(self.meas_levels),
            **self.extra,
        }


def circuit_header(circuit: QuantumCircuit | FlatCircuit) -> dict[str, Any]:
    """The Qiskit result header a `Result` reader needs to split bitstrings."""
    return {
        "name": circuit.name,
        "creg_sizes": [[creg.name, creg.size] for creg in circuit.cregs],
        "memory_slots": circuit.num_clbits,
        "num_qubits": circuit.num_qubits,
        "n_qubits": circuit.num_qubits,
        "clbit_labels": [[creg.name, i] for creg in circuit.cregs for i in range(creg.size)],
        "qubit_labels": [[qreg.name, i] for qreg in circuit.qregs for i in range(qreg.size)],
        "metadata": dict(circuit.metadata or {}),
    }


class OptionError(ValueError):
    """An executor option is unknown or has a value the executor cannot use."""


class Executor(abc.ABC):
    """Runs validated jobs. `run(job) -> JobResult` is the whole contract.

    Executors are constructed once per daemon (or worker process) with their
    options and reused across jobs; they raise `JobError` for failures a person
    can act on. `run` is called from the executor process, never concurrently.
    """

    name: ClassVar[str] = "base"
    # Every option the executor reads; any other name is refused here, the same way for
    # every executor, so a misspelt option is an error instead of silently ignored.
    OPTIONS: ClassVar[frozenset[str]] = frozenset()
    # True: the daemon hands over plain circuits flat (Experiment.flat) instead of
    # building a QuantumCircuit for each; Experiment.circuit still builds one on demand.
    takes_flat_circuits: ClassVar[bool] = False

    # The type of each option's value (int, float, str, a Literal of the values allowed,
    # pydantic's PositiveInt, ...): checked strictly here (True is no integer, "5" no
    # number: options arrive as JSON or TOML values), before the executor reads it, so a
    # bad value is an OptionError that names the option (exit 78) instead of a
    # ValueError deep in the executor and a restart loop.
    OPTION_TYPES: ClassVar[Mapping[str, Any]] = {}

    # Set by the executor process (driver.processes): makes a record durable in the node's
    # store, or raises JobError. Outside a node (a test, a script) records go nowhere.
    recorder: Callable[[str, dict[str, Any]], None] | None = None

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        self.options: dict[str, Any] = dict(options or {})
        names = self.OPTIONS | set(self.OPTION_TYPES)  # a typed option is declared too
        unknown = sorted(set(self.options) - names)
        if unknown:
            known = ", ".join(sorted(names)) or "none"
            raise OptionError(
                f"unknown option(s) {', '.join(map(repr, unknown))} for executor "
                f"{self.name!r}; it knows: {known}"
            )
        if self.OPTION_TYPES:
            self._check_option_types()

    def _check_option_types(self) -> None:
        from pydantic import TypeAdapter, ValidationError

        for key, kind in self.OPTION_TYPES.items():
            value = self.options.get(key)
            if value is None:
                continue
            try:
                self.options[key] = TypeAdapter(kind).validate_python(value, strict=True)
            except ValidationError as exc:
                reason = "; ".join(error["msg"] for error in exc.errors())
                raise OptionError(
                    f"option {key!r} of executor {self.name!r} cannot be {value!r}: {reason}"
                ) from None

    @abc.abstractmethod
    def run(self, job: Job) -> JobResult:
        """Run every experiment of `job`, in order."""

    def run_many(self, jobs: Sequence[Job]) -> list[JobResult | JobError]:
        """Run several queued jobs; executors that can batch override this."""
        out: list[JobResult | JobError] = []
        for job in jobs:
            try:
                out.append(self.run(job))
            except JobError as exc:
                out.append(exc)
        return out

    # -- remote work: for executors whose jobs run elsewhere (a cloud QPU) -------------------

    def record(self, job_id: str, state: dict[str, Any]) -> None:
        """Make `state` (plain data: what was created remotely for the job, e.g. task ids)
        durable with the job before doing what must not be done twice, such as submitting
        paid tasks; returns once it is, or raises JobError (then do not go on). Should the
        node stop while the job runs, it is handed to `resume(job_id, state)` after the
        restart instead of being answered as interrupted; should it be cancelled, time out
        or its executor crash, a fresh executor gets `abandon(job_id, state)`."""
        if self.recorder is not None:
            self.recorder(job_id, state)

    def resume(self, job_id: str, state: dict[str, Any]) -> JobResult:
        """Finish a job from its record after the node restarted (poll the tasks it had
        created, never submit them again)."""
        raise JobError(ErrorCode.JOB_FAILED, f"executor {self.name!r} cannot resume a job; "
                       "it was not re-run, to avoid executing it twice. Resubmit it.")

    def abandon(self, job_id: str, state: dict[str, Any]) -> None:  # noqa: B027
        """Release the remote work a job recorded: it was cancelled, timed out, or its
        executor crashed (cancel the tasks still active). Best effort: report, never raise."""

    @abc.abstractmethod
    def capabilities(self) -> Capabilities:
        """Limits and properties of this executor and the device behind it."""

    def calibration(self) -> dict[str, Any] | None:
        """Latest calibration snapshot (with a `timestamp`), if the device has one."""
        return None

    def health(self) -> str | None:
        """None when the device is usable, else what is wrong (the node turns `degraded`).

        Called between jobs and on the calibration schedule; an executor whose
        instrument connection dropped should try to reconnect here."""
        return None

    def close(self) -> None:  # noqa: B027 - most executors hold nothing to release
        """Release devices and connections; called once at shutdown."""
