"""OQC's QPUs through its cloud, QCaaS, with OQC's own async SDK (`oqc-qcaas-sdk`, extra
`oqc`). One event loop and one `OqcSdk` live as long as the executor process; a batch of
our circuits goes as one composite job, polled until done or until the job's time is up.

Nothing runs twice, nothing paid for is lost: the task ids are created first (the SDK's
`create_task_ids`, which its own batch submit uses) and recorded in the node's store with
the job (Executor.record) before anything is submitted. A submit that times out or gets a
5xx may have gone through: the tasks are then looked at, and only those the server still
holds unsubmitted are submitted again, under the same ids. After a restart the node hands
the job back (`resume`), and its tasks are polled, never submitted anew.

Results: QCaaS counts each classical register on its own, `c[0]` first. Every circuit is
sent with all its bits in one register `c`, so the joint distribution survives, and the
counts come back in Qiskit's keys (highest bit on the left, every register's bits)."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import PositiveInt

from executors import ExecutorUnavailable
from executors.base import (
    Capabilities,
    ErrorCode,
    Executor,
    ExperimentResult,
    Job,
    JobError,
    JobResult,
    OptionError,
    circuit_header,
)

if TYPE_CHECKING:
    from oqc_qcaas_sdk import CompositeJob, OqcSdk
    from qiskit.circuit import QuantumCircuit

TOKEN_ENV = "OQC_QCAAS_TOKEN"
CREDENTIAL = "oqc_qcaas_token"  # systemd: LoadCredential=oqc_qcaas_token:/etc/qpi-driver/...
REGISTER = "c"
# What is kept back from a job's timeout for cancelling what is still queued and
# answering, before the node stops the executor: a tenth, at most this many seconds.
MARGIN_S = 5.0
ACTIVE = ("CREATED", "SUBMITTED", "RUNNING", "UNKNOWN")

T = TypeVar("T")


class OqcUnavailable(ExecutorUnavailable):
    """QCaaS cannot be used with these settings (unreachable, token refused, no such QPU):
    the node does not start (exit 69)."""


def read_token(token_file: str | None) -> str:
    """The QCaaS token: the `token_file` option, else the systemd credential, else
    $OQC_QCAAS_TOKEN. Never an option value: those end up in configs and process lists."""
    sources: list[tuple[str, Path]] = []
    if token_file:
        sources.append(("token_file", Path(token_file)))
    if creds := os.environ.get("CREDENTIALS_DIRECTORY"):
        sources.append(("the systemd credential", Path(creds) / CREDENTIAL))
    for what, path in sources:
        try:
            token = path.read_text().strip()
        except OSError as exc:
            if what == "token_file":
                raise OptionError(f"option 'token_file' of executor 'oqc': cannot read "
                                  f"{path}: {exc.strerror}") from None
            continue
        if token:
            return token
        raise OptionError(f"{what} {path} is empty; it must hold the QCaaS token")
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise OptionError(f"executor 'oqc' needs a QCaaS token: set {TOKEN_ENV}, the option "
                          f"token_file, or the systemd credential {CREDENTIAL!r}")
    return token


def oqc_program(circuit: QuantumCircuit) -> str:
    """The circuit as OpenQASM 2 with one quantum and one classical register, bit for bit
    in Qiskit's order (clbit j of the circuit is c[j])."""
    from qiskit import qasm2
    from qiskit.circuit import ClassicalRegister, QuantumCircuit, QuantumRegister

    if circuit.num_clbits == 0:
        raise JobError(ErrorCode.CIRCUIT_INVALID, "the circuit measures nothing; OQC returns "
                       "counts of classical bits only")
    for instruction in circuit.data:
        operation = instruction.operation
        if operation.name in ("if_else", "while_loop", "for_loop", "switch_case") or getattr(
                operation, "condition", None) is not None:
            raise JobError(ErrorCode.CIRCUIT_INVALID, f"the oqc executor does not send "
                           f"classically controlled operations ({operation.name!r})")
    flat = QuantumCircuit(QuantumRegister(circuit.num_qubits, "q"),
                          ClassicalRegister(circuit.num_clbits, REGISTER))
    flat.compose(circuit, qubits=range(circuit.num_qubits), clbits=range(circuit.num_clbits),
                 inplace=True)
    try:
        return qasm2.dumps(flat)
    except Exception as exc:  # a gate OpenQASM 2 cannot write
        raise JobError(ErrorCode.CIRCUIT_INVALID,
                       f"the circuit cannot be written as OpenQASM 2 for OQC: {exc}") from None


def qiskit_counts(data: dict[str, Any], width: int) -> dict[str, int]:
    """OQC's counts of register `c` (c[0] first; short keys lack their leading zeros, as
    the SDK's own padding has it) as Qiskit's keys: `width` bits, highest on the left."""
    counts: dict[str, int] = {}
    for key, count in (data.get(REGISTER) or {}).items():
        bits = key.replace(" ", "")
        if len(bits) > width or bits.strip("01"):
            raise JobError(ErrorCode.JOB_FAILED, f"OQC returned a key {key!r} that is not "
                           f"{width} classical bits")
        qiskit = bits.zfill(width)[::-1]
        counts[qiskit] = counts.get(qiskit, 0) + int(count)
    return counts


def _task(task_id: str, program: str, shots: int, header: dict[str, Any]) -> dict[str, Any]:
    return {"id": task_id, "program": program, "shots": shots, "header": header}


class OqcExecutor(Executor):
    name = "oqc"
    OPTION_TYPES = {"url": str, "qpu_id": str, "token_file": str, "max_qubits": PositiveInt}

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        if "token" in (options or {}):
            raise OptionError(f"the QCaaS token is never an option of executor 'oqc' (options "
                              f"show in configs and process lists): set {TOKEN_ENV}, "
                              f"token_file, or the systemd credential {CREDENTIAL!r}")
        super().__init__(options)
        for key in ("url", "qpu_id"):
            if not self.options.get(key):
                raise OptionError(f"executor 'oqc' needs the option {key!r}")
        self.url: str = self.options["url"]
        self.qpu_id: str = self.options["qpu_id"]
        read_token(self.options.get("token_file"))  # a missing token is a config error
        self._loop = asyncio.new_event_loop()
        self._sdk: OqcSdk | None = None
        self._qpu: dict[str, Any] = {}
        self._features: dict[str, Any] = {}
        self._fault: str | None = None
        try:
            self._run(self._connect())
        except OqcUnavailable:
            self.close()
            raise

    # -- the SDK ------------------------------------------------------------------------------

    def _run(self, coro: Awaitable[T]) -> T:
        return self._loop.run_until_complete(coro)

    async def _connect(self) -> None:
        """Open the SDK and check that it initialised: `open()` logs a failure and goes on,
        and every call after it then answers None."""
        from oqc_qcaas_sdk import OqcSdk
        from oqc_qcaas_sdk.exceptions import ServerException

        if self._sdk is not None:
            await self._sdk.close()
            self._sdk = None
        token = read_token(self.options.get("token_file"))  # re-read: it may have rotated
        sdk = await OqcSdk(url=self.url, authentication_token=token,
                           default_qpu_id=self.qpu_id).open()
        try:
            features = await sdk.get_features(self.qpu_id)
            if features is None:
                raise OqcUnavailable(f"the QCaaS SDK did not initialise against {self.url} "
                                     "(unreachable, token refused, or no active QPU; its log "
                                     "says which)")
            qpus = await sdk.list_qpus()
        except ServerException as exc:
            await sdk.close()
            raise OqcUnavailable(f"QCaaS at {self.url} refused QPU {self.qpu_id!r}: "
                                 f"{_message(exc)}") from None
        except OqcUnavailable:
            await sdk.close()
            raise
        self._qpu = next((q for q in qpus or [] if q.get("id") == self.qpu_id), {})
        if not self._qpu:
            await sdk.close()
            raise OqcUnavailable(f"QPU {self.qpu_id!r} is not among the active QPUs at "
                                 f"{self.url}: {[q.get('id') for q in qpus or []]}")
        self._sdk, self._features, self._fault = sdk, dict(features), None

    async def _authorised(self, call: Callable[[OqcSdk], Awaitable[T]]) -> T:
        """`call` with the SDK; a token that expired (401) gets the client rebuilt, with
        the token read again, and the call made once more."""
        from oqc_qcaas_sdk.exceptions import ServerException

        assert self._sdk is not None
        try:
            return await call(self._sdk)
        except ServerException as exc:
            if exc.server_error_code != 401:
                raise
        await self._rebuild()
        assert self._sdk is not None
        return await call(self._sdk)

    async def _rebuild(self) -> None:
        refusals: tuple[type[Exception], ...] = (OqcUnavailable, OptionError, *_transient())
        try:
            await self._connect()
        except refusals as exc:
            self._fault = f"QCaaS: {exc}"
            raise JobError(ErrorCode.QPU_DISABLED, f"OQC refused the token (401) and a fresh "
                           f"client could not be built: {exc}") from None

    # -- the contract -------------------------------------------------------------------------

    def capabilities(self) -> Capabilities:
        features = self._features
        shots = features.get("Maximum Shots")
        qubits = self.options.get("max_qubits") or features.get("Qubit Count")
        if not isinstance(shots, int) or not isinstance(qubits, int):
            raise OqcUnavailable(
                f"the feature set of QPU {self.qpu_id!r} does not give "
                f"{'Maximum Shots' if not isinstance(shots, int) else 'Qubit Count'} as a "
                f"number (keys: {sorted(features)}); set the option max_qubits")
        name = str(self._qpu.get("name", ""))
        return Capabilities(
            max_qubits=qubits, max_shots=shots, device="qpu", precision="n/a",
            meas_levels=(2,),
            extra={"qpu_id": self.qpu_id, "qpu_name": name, "memory": False,
                   "simulated": "simulator" in name.lower()})

    def health(self) -> str | None:
        if self._fault is not None:  # asked between jobs: try again
            try:
                self._run(self._connect())
            except (OqcUnavailable, OptionError) as exc:
                self._fault = f"QCaaS: {exc}"
            except _transient() as exc:
                self._fault = f"QCaaS unreachable: {_message(exc)}"
        return self._fault

    def run(self, job: Job) -> JobResult:
        result = self.run_many([job])[0]
        if isinstance(result, JobError):
            raise result
        return result

    def run_many(self, jobs: Sequence[Job]) -> list[JobResult | JobError]:
        return self._run(self._run_jobs(list(jobs)))

    def resume(self, job_id: str, state: dict[str, Any]) -> JobResult:
        left = float(state["deadline"]) - time.time()
        result = self._run(self._finish({job_id: state}, max(left, 0.0)))[job_id]
        if isinstance(result, JobError):
            raise result
        return result

    def abandon(self, job_id: str, state: dict[str, Any]) -> None:
        self._run(self._cancel_active(state["tasks"]))

    def close(self) -> None:
        if self._sdk is not None:
            self._run(self._sdk.close())
            self._sdk = None
        self._loop.close()

    # -- a batch ------------------------------------------------------------------------------

    async def _run_jobs(self, jobs: list[Job]) -> list[JobResult | JobError]:
        out: dict[str, JobResult | JobError] = {}
        plans: dict[str, list[tuple[str, int, dict[str, Any]]]] = {}
        for job in jobs:
            try:
                plans[job.job_id] = self._plan(job)
            except JobError as exc:
                out[job.job_id] = exc
        budget = min((j.timeout_s or 3600.0 for j in jobs), default=3600.0)
        budget -= min(MARGIN_S, budget / 10)
        if plans:
            try:
                if self._sdk is None:  # a rebuild that failed: try once more
                    await self._rebuild()
                out.update(await self._submit_and_finish(plans, budget))
            except JobError as exc:  # e.g. the token was refused, even read afresh
                for job_id in plans:
                    out.setdefault(job_id, exc)
        return [out[job.job_id] for job in jobs]

    def _plan(self, job: Job) -> list[tuple[str, int, dict[str, Any]]]:
        """Each experiment as (program, shots, header); what cannot go to OQC refused."""
        plan = []
        for index, exp in enumerate(job.experiments):
            if exp.memory:
                raise JobError(ErrorCode.CIRCUIT_INVALID, "per-shot memory is not offered by "
                               "OQC's QCaaS; ask for counts (memory: false)",
                               circuit_index=index)
            circuit = exp.circuit
            plan.append((oqc_program(circuit), exp.shots, circuit_header(circuit)))
        return plan

    async def _submit_and_finish(self, plans: dict[str, list[tuple[str, int, dict[str, Any]]]],
                                 budget: float) -> dict[str, JobResult | JobError]:
        from oqc_qcaas_sdk.exceptions import ServerException

        count = sum(len(p) for p in plans.values())
        deadline = time.time() + budget
        out: dict[str, JobResult | JobError] = {}
        try:
            ids = await self._authorised(
                lambda sdk: sdk._client.create_task_ids(count, self.qpu_id))
        except (ServerException, *_transient()) as exc:
            error = self._failure(exc, "creating tasks")
            return dict.fromkeys(plans, error)
        if not ids or len(ids) != count:
            error = JobError(ErrorCode.JOB_FAILED, f"QCaaS created {len(ids or [])} task ids "
                             f"for {count} circuits")
            return dict.fromkeys(plans, error)
        states: dict[str, dict[str, Any]] = {}
        it = iter(ids)
        for job_id, plan in plans.items():
            state = {"qpu_id": self.qpu_id, "deadline": deadline,
                     "tasks": [_task(str(next(it)), *entry) for entry in plan]}
            try:
                self.record(job_id, state)  # durable before anything is paid for
            except JobError as exc:
                out[job_id] = exc
                continue
            states[job_id] = state
        rejected = await self._submit(states)
        out.update(rejected)
        live = {job_id: s for job_id, s in states.items() if job_id not in rejected}
        out.update(await self._finish(live, max(0.0, deadline - time.time())))
        return out

    async def _submit(self, states: dict[str, dict[str, Any]]
                      ) -> dict[str, JobError]:
        """Submit every job's tasks as one batch; a batch the server refuses outright is
        split, so that a refused circuit costs only its own job. A submit whose answer
        was lost is settled by `_finish` (it looks before submitting again)."""
        from oqc_qcaas_sdk.exceptions import ServerException

        tasks = [t for s in states.values() for t in s["tasks"]]
        if not tasks:
            return {}
        try:
            await self._send(tasks)
        except _transient():
            return {}
        except ServerException as exc:
            if len(states) == 1 or exc.server_error_code == 401:
                return dict.fromkeys(states, self._failure(exc, "submitting"))
            refused: dict[str, JobError] = {}
            for job_id, state in states.items():
                refused.update(await self._submit({job_id: state}))
            return refused
        return {}

    async def _send(self, tasks: list[dict[str, Any]]) -> None:
        await self._authorised(lambda sdk: sdk._schedule_tasks(self._composite(sdk, tasks).jobs))

    def _composite(self, sdk: OqcSdk, tasks: list[dict[str, Any]]) -> CompositeJob:
        """The tasks as one composite job of the SDK, each child under its created id."""
        from compiler_config.config import CompilerConfig, QuantumResultsFormat
        from oqc_qcaas_sdk import CompositeJob

        configs = [CompilerConfig(repeats=t["shots"],
                                  results_format=QuantumResultsFormat().binary_count())
                   for t in tasks]
        composite = sdk.create_job(program=[t["program"] for t in tasks], qpu_id=self.qpu_id,
                                   config=configs)
        assert isinstance(composite, CompositeJob)
        for child, task in zip(composite.jobs, tasks, strict=True):
            child.task_id = uuid.UUID(task["id"])
        return composite

    async def _finish(self, states: dict[str, dict[str, Any]], budget: float
                      ) -> dict[str, JobResult | JobError]:
        """Poll the jobs' tasks until each ends or `budget` runs out (then cancel what is
        still active). Tasks the server still holds unsubmitted (a submit whose answer was
        lost, a node stopped between creating and submitting) are submitted first."""
        from oqc_qcaas_sdk import JobState
        from oqc_qcaas_sdk.exceptions import ServerException

        if not states:
            return {}
        tasks = [t for s in states.values() for t in s["tasks"]]
        started = time.monotonic()
        try:
            looked = await self._authorised(lambda sdk: _looked_at(self._composite(sdk, tasks)))
            unsent = [t for t, c in zip(tasks, looked.jobs, strict=True)
                      if c.state is JobState.CREATED]
            if unsent:
                await self._send(unsent)
            composite = await self._poll(tasks, budget - (time.monotonic() - started))
            if any(c.error is not None and c.error.error_code == 401 for c in composite.jobs):
                await self._rebuild()  # the token expired while polling: once more, fresh
                composite = await self._poll(tasks, budget - (time.monotonic() - started))
        except (ServerException, *_transient()) as exc:
            error = self._failure(exc, "polling")
            await self._cancel_active(tasks)
            return dict.fromkeys(states, error)
        self._fault = None
        out: dict[str, JobResult | JobError] = {}
        children = iter(composite.jobs)
        for job_id, state in states.items():
            mine = [next(children) for _ in state["tasks"]]
            out[job_id] = await self._answer(state, mine, budget)
        return out

    async def _answer(self, state: dict[str, Any], children: list[Any], budget: float
                      ) -> JobResult | JobError:
        """One job's answer from its tasks: every count, or the first failure (its other
        tasks still active are cancelled: one bad circuit fails the job)."""
        experiments = []
        for index, (task, child) in enumerate(zip(state["tasks"], children, strict=True)):
            if child.error is not None:
                await self._cancel_active(state["tasks"])
                return _task_error(child, index)
            if child.result is None:
                await self._cancel_active(state["tasks"])
                return JobError(ErrorCode.JOB_TIMEOUT, f"task {task['id']} was still "
                                f"{child.state.value} at OQC after {budget:.0f} s (hardware "
                                "runs in windows); its tasks were cancelled",
                                circuit_index=index, oqc_task_id=task["id"])
            header = task["header"]
            counts = qiskit_counts(child.result.data, int(header["memory_slots"]))
            experiments.append(ExperimentResult(counts=counts, shots=task["shots"],
                                                header=header,
                                                extra={"oqc_task_id": task["id"]}))
        return JobResult(experiments, extra={"oqc_qpu_id": state["qpu_id"]})

    async def _cancel_active(self, tasks: list[dict[str, Any]]) -> None:
        """Cancel those of `tasks` still active at OQC (looked at first: never a task
        that ended)."""
        if self._sdk is None:
            return
        try:
            looked = await _looked_at(self._composite(self._sdk, tasks))
            await looked.cancel_if_active()
        except Exception as exc:  # best effort: the job is answered either way
            from driver import logs

            logs.get("qpi.oqc").warning("could not cancel OQC tasks", reason=str(exc),
                                        tasks=[t["id"] for t in tasks])

    async def _poll(self, tasks: list[dict[str, Any]], budget: float) -> CompositeJob:
        """The SDK's composite poll of the tasks, for at most `budget` seconds. Its
        children are fresh (CREATED, with their ids): `execute` then only polls; it would
        submit anew a child that had ended."""
        assert self._sdk is not None
        composite = self._composite(self._sdk, tasks)
        budget = max(0.0, budget)
        try:  # the SDK's own bound may sleep past it (up to its 10 s between polls)
            async with asyncio.timeout(budget + 0.05):
                await composite.execute(timeout_s=budget)
        except TimeoutError:
            pass  # what is still queued is answered JOB_TIMEOUT and cancelled
        return composite

    def _failure(self, exc: Exception, doing: str) -> JobError:
        """An exception of the SDK as the node's error, with OQC's message."""
        code = getattr(exc, "server_error_code", None)
        message = f"OQC QCaaS failed {doing}: {_message(exc)}"
        if code in (401, 403):
            self._fault = f"QCaaS refused the token ({code})"
            return JobError(ErrorCode.QPU_DISABLED, message, oqc_status=code)
        if code in (400, 413, 422):
            return JobError(ErrorCode.CIRCUIT_INVALID, message, oqc_status=code)
        if isinstance(exc, _transient()):
            self._fault = f"QCaaS unreachable: {_message(exc)}"
        return JobError(ErrorCode.JOB_FAILED, message, oqc_status=code)


async def _looked_at(composite: CompositeJob) -> CompositeJob:
    """Each task looked at once (a refusal, such as an expired token, raises)."""
    await asyncio.gather(*(child.refresh() for child in composite.jobs))
    return composite


def _task_error(child: Any, index: int) -> JobError:
    error = child.error
    return JobError(ErrorCode.JOB_FAILED, f"OQC task {child.task_id} failed: "
                    f"{error.error_message} (OQC error {error.error_code})",
                    circuit_index=index, oqc_task_id=str(child.task_id),
                    oqc_error_code=error.error_code)


def _message(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


def _transient() -> tuple[type[Exception], ...]:
    from oqc_qcaas_sdk.client import OqcSdk

    return tuple(OqcSdk.RETRYABLE_POLL_EXCEPTIONS)
