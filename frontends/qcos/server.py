"""The QCOS front end: the node as a qcos-mc/1 measurement-and-control device
(../shared/qcos-mc.md). QCOS's driver (frontends/qcos/qcos_driver.py, on the QCOS host)
connects a DEALER to the ROUTER bound at `qcos_endpoint` and subscribes to the PUB at
`qcos_events`. Requests are JSON objects; each gets exactly one reply `[identity, body]`
with its `seq` echoed, whatever it holds: a malformed request is answered
`malformed_request`, never a crash.

Programs (RPHI, CZ, IDLE, ECHO, MEASURE) are lowered once to OpenQASM
(frontends/qcos/program.py) and run through the core like any job, on any executor.
Tasks are keyed by our own task id, derived from QCOS's: a resend of the same submit
(QCOS resends the same bytes after a timeout, from a new socket) finds the task in hand
or in the store and never runs twice. Results are stored when terminal and kept for the
node's result retention; `task_status` and `task_result` read them back.

These sockets carry no authentication or encryption (nor does QCOS's side): bind them
to a private interface."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from driver import __version__, logs
from driver.core import Core, JobView
from driver.exits import EX_CONFIG
from driver.jobs import read_spec
from driver.outcome import Outcome
from driver.store import StoreUnavailable
from executors.base import ErrorCode, JobError, iso_utc
from frontends.qcos.program import ProgramError, ProgramTooLarge, lower, qcos_counts

PROTOCOL = "qcos-mc/1"
ORIGIN = "qcos"
OPERATIONS = ("submit_task", "task_status", "task_result", "cancel_task", "heartbeat",
              "device_state", "calibration_status", "trigger_calibration", "device_config")
NATIVE_GATES = ("rphi", "cz", "idle", "echo", "measure")
EVENT_TOPICS = ("task_state", "task_result_ready", "calibration_started",
                "calibration_completed", "maintenance", "resource_state", "heartbeat")
TERMINAL = ("completed", "failed", "cancelled")
MAX_INSTRUCTIONS = 100_000  # per program (QCOS's max_circuit_depth)
MAX_REQUEST_BYTES = 16 * 1024 * 1024
MAX_TASK_ID = 256
DEFAULT_SHOTS = 1024
CANCEL_WAIT_S = 10.0  # a running task's cancel waits this long for the executor to stop
HEARTBEAT_S = 5.0
# Our task ids: the same for every resend of one QCOS task_id to this device.
_TASK_IDS = uuid.UUID("6f1d5c62-3b8e-4b9a-9d0e-51c0a3e7d2b4")

log = logs.get("qpi.qcos")


class Refused(Exception):
    """A request answered with a non-ok code and a message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(slots=True)
class Task:
    """What a task is beside its job, while this run knows it."""

    task_id: str
    readout: tuple[int, ...]
    shots: int
    submitted: float  # monotonic
    done: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


@dataclass(slots=True)
class Calibration:
    phase: str = "idle"
    qubits: list[int] = dataclasses.field(default_factory=list)  # [] = every qubit
    routine: str | None = None
    started_at: float | None = None  # wall time
    completed_at: float | None = None
    error: str | None = None


class QcosFrontend:
    name = ORIGIN

    def __init__(self, core: Core) -> None:
        self._core = core
        s = core.settings
        self.endpoint, self.events = s.qcos_endpoint, s.qcos_events
        self.device_id = s.qcos_device_id
        self._metrics = core.metrics
        self._tasks: dict[str, Task] = {}  # submitted in this run, until a while after done
        self._unstored: dict[str, Outcome] = {}  # terminal, the store refused the write
        self._calibration = Calibration()
        self._ctx: zmq.asyncio.Context | None = None
        self._router: zmq.asyncio.Socket | None = None
        self._pub: zmq.asyncio.Socket | None = None
        self._event_seq: dict[str, int] = {}
        self._replies: set[asyncio.Task[None]] = set()
        self._bound = False
        self._draining = False

    # -- what the core asks -----------------------------------------------------------------

    async def preflight(self) -> int:
        return 0

    def background(self) -> dict[str, Callable[[], Coroutine[Any, Any, None]]]:
        return {"qcos-heartbeat": self._heartbeats}

    def may_run(self) -> bool:
        return True

    def unready(self) -> list[str]:
        return [] if self._bound else ["QCOS front end not listening"]

    def describe(self) -> str:
        return f"QCOS device {self.device_id} on {self.endpoint}" if self._bound else \
            "QCOS front end not listening"

    def close(self) -> int:
        return 0  # nothing is owed: QCOS polls for its results

    def finished(self, outcomes: list[Outcome]) -> None:
        """Terminal tasks: stored (kept for the retention period, read back by polls),
        then announced."""
        outcomes = [self._annotated(o) for o in outcomes]
        try:
            outcomes = self._core.store.finish(outcomes, origin=ORIGIN, all_delivered=True)
        except StoreUnavailable as exc:
            log.error("task results cannot be made durable; kept in memory until the "
                      "daemon stops", reason=exc.reason, tasks=[o.job_id for o in outcomes])
            for outcome in outcomes:
                self._unstored[outcome.job_id] = outcome
        for outcome in outcomes:
            state = _terminal_state(outcome)
            self._publish("task_state", task_id=outcome.job_id, state=state)
            self._publish("task_result_ready", task_id=outcome.job_id, state=state)
            task = self._tasks.pop(outcome.job_id, None)
            if task is not None:
                task.done.set()
        self._resource_state()

    def started(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            self._publish("task_state", task_id=job_id, state="running")
        self._resource_state()

    def changed(self) -> None:
        self._calibration_progress()

    def draining(self) -> None:
        self._draining = True
        self._publish("maintenance", active=True, reason="the node is stopping",
                      expected_duration_s=None)

    # -- serving ------------------------------------------------------------------------------

    async def serve(self) -> int:
        self._ctx = zmq.asyncio.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._pub = self._ctx.socket(zmq.PUB)
        for sock in (self._router, self._pub):
            sock.setsockopt(zmq.LINGER, 1000)
        self._router.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
        try:
            self._router.bind(self.endpoint)
            self._pub.bind(self.events)
        except zmq.ZMQError as exc:
            log.error("cannot bind the QCOS sockets", endpoint=self.endpoint,
                      events=self.events, reason=str(exc))
            self._close()
            return EX_CONFIG
        self._bound = True
        self._metrics.frontend_up.labels(ORIGIN).set(1)
        log.info("qcos front end listening", endpoint=self.endpoint, events=self.events,
                 device_id=self.device_id)
        self._core.notifier.ready(self._core.status.describe())
        # A stop that announced maintenance left QCOS holding submissions: lift it.
        self._publish("maintenance", active=False, reason="the node is serving",
                      expected_duration_s=None)
        try:
            await self._serve_requests()
        finally:
            self._bound = False
            self._metrics.frontend_up.labels(ORIGIN).set(0)
            self._close()
        return 0

    async def _serve_requests(self) -> None:
        assert self._router is not None
        stop = asyncio.create_task(self._core.drained.wait())
        try:
            while True:
                recv = asyncio.ensure_future(self._router.recv_multipart(copy=True))
                done, _ = await asyncio.wait([recv, stop], return_when=asyncio.FIRST_COMPLETED)
                if recv not in done:
                    recv.cancel()
                    with contextlib.suppress(asyncio.CancelledError, zmq.ZMQError):
                        await recv
                    break
                frames = recv.result()
                if len(frames) < 2:
                    continue  # no identity or no body: nothing to answer to
                reply = asyncio.create_task(self._answer(frames[0], frames[-1]))
                self._replies.add(reply)
                reply.add_done_callback(self._replies.discard)
            # The runner has drained: answer what is in flight, then close.
            if self._replies:
                await asyncio.wait(self._replies, timeout=CANCEL_WAIT_S)
        finally:
            stop.cancel()

    def _close(self) -> None:
        for sock in (self._router, self._pub):
            if sock is not None:
                sock.close()
        if self._ctx is not None:
            self._ctx.term()
        self._router = self._pub = None
        self._ctx = None

    async def _answer(self, identity: bytes, body: bytes) -> None:
        reply = await self.handle(body)
        self._metrics.frontend_requests.labels(ORIGIN, _label(reply.get("operation")),
                                               reply["code"]).inc()
        if self._router is not None:
            with contextlib.suppress(zmq.ZMQError):  # the peer is gone: QCOS resends
                await self._router.send_multipart([identity, json.dumps(reply).encode()])

    async def handle(self, body: bytes) -> dict[str, Any]:
        """One request's reply: never raises."""
        try:
            request = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            return self._reply({}, "malformed_request", f"the request is not JSON: {exc!s:.200}")
        if not isinstance(request, dict):
            return self._reply({}, "malformed_request",
                               f"the request must be a JSON object, got {type(request).__name__}")
        operation = request.get("operation")
        try:
            if not isinstance(operation, str) or not operation:
                raise Refused("malformed_request", "the request has no operation")
            wanted = request.get("device_id")
            if wanted not in (None, "", self.device_id):
                raise Refused("malformed_request", f"this is device {self.device_id!r}, "
                              f"not {str(wanted)[:80]!r}")
            handler = getattr(self, f"_op_{operation}", None)
            if operation not in OPERATIONS or handler is None:
                raise Refused("unsupported_operation",
                              f"operation {operation[:80]!r} is not served; this device "
                              f"serves {', '.join(OPERATIONS)}")
            fields = await handler(request)
        except Refused as exc:
            return self._reply(request, exc.code, exc.message, task_id=_task_field(request))
        except Exception as exc:  # a bug answers internal_error, and the node serves on
            log.exception("a QCOS request failed", operation=str(operation)[:80])
            return self._reply(request, "internal_error",
                               f"the node failed on this request: {type(exc).__name__}")
        return self._reply(request, "ok", None, **fields)

    def _reply(self, request: dict[str, Any], code: str, message: str | None,
               **fields: Any) -> dict[str, Any]:
        seq = request.get("seq")
        operation = request.get("operation")
        reply: dict[str, Any] = {
            "protocol": PROTOCOL,
            "seq": seq if isinstance(seq, int) and not isinstance(seq, bool) else 0,
            "timestamp": iso_utc(),
            "device_id": self.device_id,
            "code": code,
        }
        if isinstance(operation, str) and operation in OPERATIONS:
            reply["operation"] = operation
        if message is not None:
            reply["message"] = message
        reply.update({k: v for k, v in fields.items() if v is not None})
        return reply

    # -- tasks --------------------------------------------------------------------------------

    async def _op_submit_task(self, request: dict[str, Any]) -> dict[str, Any]:
        task_id = self._our_task_id(request.get("task_id"))
        known = self._lookup(task_id)
        if known is not None:  # a resend: the task it names, never a second run
            log.info("resent submit answered with the task in hand", task_id=task_id)
            return self._task_fields(task_id, known)
        if self._draining:
            raise Refused("device_maintenance", "the node is stopping; submit to it again "
                          "once it serves")
        config, shots, timeout = self._config(request)
        limits = self._core.limits
        try:
            lowered = lower(request.get("program"), qubit_subset=config.get("qubit_subset"),
                            max_qubits=limits.max_qubits, max_instructions=MAX_INSTRUCTIONS)
        except ProgramTooLarge as exc:
            raise Refused("limit_exceeded", str(exc)) from None
        except ProgramError as exc:
            raise Refused("malformed_request", f"program: {exc}") from None
        job = {"circuits": [lowered.qasm], "shots": shots, "timeout_s": timeout}
        try:
            spec = read_spec(job, limits)
        except JobError as exc:
            raise Refused("limit_exceeded" if exc.code == ErrorCode.QUOTA_EXCEEDED
                          else "malformed_request", exc.message) from None
        full = self._core.full(ORIGIN)
        if full is not None:
            raise Refused("queue_full", full.message)
        self._tasks[task_id] = Task(task_id, lowered.readout, shots, time.monotonic())
        self._core.admit(ORIGIN, task_id, spec)
        log.info("task submitted", task_id=task_id, qubits=lowered.num_qubits, shots=shots,
                 instructions=lowered.instructions)
        self._publish("task_state", task_id=task_id, state="queued")
        self._resource_state()
        return {"task_id": task_id, "state": "queued"}

    def _config(self, request: dict[str, Any]) -> tuple[dict[str, Any], int, float | None]:
        """A submit's config, checked: itself, its shots and its max_duration_s."""
        config = request.get("config") or {}
        if not isinstance(config, dict):
            raise Refused("malformed_request", "config must be an object")
        shots = config.get("shots", DEFAULT_SHOTS)
        if isinstance(shots, bool) or not isinstance(shots, int) or shots <= 0:
            raise Refused("malformed_request", f"config.shots must be a positive integer, "
                          f"got {str(shots)[:40]!r}")
        if shots > self._core.limits.max_shots:
            raise Refused("limit_exceeded", f"{shots} shots asked; this device allows "
                          f"{self._core.limits.max_shots}")
        timeout = config.get("max_duration_s")
        if timeout is not None and (isinstance(timeout, bool) or
                                    not isinstance(timeout, int | float) or timeout <= 0):
            raise Refused("malformed_request", "config.max_duration_s must be a positive "
                          "number")
        return config, shots, timeout

    async def _op_task_status(self, request: dict[str, Any]) -> dict[str, Any]:
        task_id = _task_field(request)
        view = self._lookup(task_id) if task_id else None
        if view is None:
            return {"task_id": task_id, "state": "unknown"}
        return self._task_fields(task_id, view)

    async def _op_task_result(self, request: dict[str, Any]) -> dict[str, Any]:
        return self._task_fields(*self._known(request))

    def _known(self, request: dict[str, Any]) -> tuple[str, JobView]:
        """The task a request names, or `task_not_found`."""
        task_id = _task_field(request)
        view = self._lookup(task_id) if task_id else None
        if view is None:
            raise Refused("task_not_found", f"no task {str(task_id)[:80]!r} on this device")
        return task_id, view

    async def _op_cancel_task(self, request: dict[str, Any]) -> dict[str, Any]:
        task_id, view = self._known(request)
        if view.state == "done":
            raise Refused("malformed_request", f"task {task_id} is already "
                          f"{_terminal_state(view.outcome)}; nothing to cancel")
        task = self._tasks.get(task_id)
        self._core.cancel(ORIGIN, task_id)
        if task is not None:  # a running one ends once the executor has stopped
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(task.done.wait(), CANCEL_WAIT_S)
        view = self._lookup(task_id) or view
        if view.state != "done":
            return {"task_id": task_id, "state": "running",
                    "payload": {"cancelling": True}}
        if _terminal_state(view.outcome) != "cancelled":  # it finished first
            raise Refused("malformed_request", f"task {task_id} "
                          f"{_terminal_state(view.outcome)} before it could be cancelled")
        return self._task_fields(task_id, view)

    def _our_task_id(self, theirs: Any) -> str:
        if theirs is None or theirs == "":
            return f"qpi-{uuid.uuid4().hex}"
        if not isinstance(theirs, str) or len(theirs) > MAX_TASK_ID:
            raise Refused("malformed_request", f"task_id must be a string of at most "
                          f"{MAX_TASK_ID} characters")
        return f"qpi-{uuid.uuid5(_TASK_IDS, f'{self.device_id}/{theirs}').hex}"

    def _lookup(self, task_id: str) -> JobView | None:
        kept = self._unstored.get(task_id)
        if kept is not None:
            return JobView("done", kept)
        return self._core.lookup(ORIGIN, task_id)

    def _task_fields(self, task_id: str, view: JobView) -> dict[str, Any]:
        if view.state != "done" or view.outcome is None:
            return {"task_id": task_id, "state": view.state}
        state = _terminal_state(view.outcome)
        return {"task_id": task_id, "state": state, "result": self._result(view.outcome)}

    def _annotated(self, outcome: Outcome) -> Outcome:
        """What QCOS's answer needs later, kept with the stored result: the readout
        order and how long the task took from submit to its end."""
        task = self._tasks.get(outcome.job_id)
        if task is None:
            return outcome
        meta = {"readout": list(task.readout), "shots": task.shots,
                "total_ms": round((time.monotonic() - task.submitted) * 1000, 3)}
        if outcome.result is not None:
            return Outcome.succeeded(outcome.job_id, {**outcome.result, "qcos": meta})
        assert outcome.error is not None
        error = JobError(outcome.error.code, outcome.error.message,
                         **{**outcome.error.details, "qcos": meta})
        return Outcome.failed(outcome.job_id, error)

    def _result(self, outcome: Outcome) -> dict[str, Any]:
        """QCOS's TaskResult from the stored outcome."""
        wire = outcome.to_wire()
        kept = wire.get("qcos")
        meta: dict[str, Any] = kept if isinstance(kept, dict) else {}
        readout = meta.get("readout")
        result: dict[str, Any] = {
            "task_id": outcome.job_id,
            "state": _terminal_state(outcome),
            "simulated": self._simulated(),
            "qubits_used": readout,
            "metadata": {"executor": self._core.settings.executor, "driver_version":
                         __version__},
        }
        total_ms = meta.get("total_ms")
        if outcome.ok:
            experiment = outcome.experiments()[0]
            header = experiment.get("header") or {}
            width = int(header.get("memory_slots") or len(readout or ()) or 1)
            result["counts"] = qcos_counts(experiment.get("counts") or {}, width)
            result["shots"] = int(experiment.get("shots", 0))
            execution_ms = round(float(wire.get("execution_time_seconds") or 0) * 1000, 3)
            result["timing"] = {
                "compile_ms": None,
                "queue_ms": (round(max(0.0, total_ms - execution_ms), 3)
                             if total_ms is not None else None),
                "execution_ms": execution_ms,
                "post_process_ms": None,
            }
        else:
            assert outcome.error is not None
            result["counts"] = {}
            result["shots"] = int(meta.get("shots") or 0)
            result["error"] = outcome.error.message
            result["metadata"]["error_code"] = str(outcome.error.code)
            if outcome.error.details.get("interrupted"):
                result["metadata"]["interrupted"] = True
        return result

    # -- the device ---------------------------------------------------------------------------

    def _capabilities(self) -> Any:
        return self._core.runner.executor.capabilities

    def _simulated(self) -> bool:
        caps = self._capabilities()
        if caps is None:
            return True
        return bool(caps.extra.get("simulated", caps.device != "qpu"))

    async def _op_heartbeat(self, request: dict[str, Any]) -> dict[str, Any]:
        status = self._core.status
        return {"payload": {"status": status.status(), "uptime_s": round(
            time.monotonic() - status.started, 3), "version": __version__,
            "queue_depth": self._core.runner.waiting_of(ORIGIN)}}

    async def _op_device_config(self, request: dict[str, Any]) -> dict[str, Any]:
        caps = self._capabilities()
        limits = self._core.limits
        qubits = limits.max_qubits
        coupling = caps.extra.get("coupling_map") if caps is not None else None
        if not coupling:  # a simulator couples every pair
            coupling = [[a, b] for a in range(qubits) for b in range(qubits) if a != b]
        return {"payload": {
            "num_qubits": qubits,
            "modality": "superconducting",
            "native_gates": list(NATIVE_GATES),
            "coupling_map": coupling,
            "limits": {"max_shots": limits.max_shots, "max_qubits_per_circuit": qubits,
                       "max_circuit_depth": MAX_INSTRUCTIONS,
                       "max_queued_tasks": self._core.settings.max_queued_jobs},
            "simulated": self._simulated(),
            "executor": self._core.settings.executor,
            "operations": list(OPERATIONS),
            "event_topics": list(EVENT_TOPICS),
            "heartbeat_interval_s": HEARTBEAT_S,
            "job_cancellation": True,
            "calibration": True,
            "protocol": PROTOCOL,
            "version": __version__,
        }}

    async def _op_device_state(self, request: dict[str, Any]) -> dict[str, Any]:
        runner = self._core.runner
        calibration = self._core.status.calibration()
        simulated = self._simulated()
        qubit_metrics, gate_metrics = _metrics_of(calibration)
        # What the metrics are: a simulator's, measured figures, or none to report.
        source = "simulated" if simulated else "measured" if calibration else "unavailable"
        waiting = runner.waiting
        per_job = runner.seconds_per_job
        return {"payload": {
            "source": source,
            "num_qubits": self._core.limits.max_qubits,
            "qubit_metrics": qubit_metrics,
            "gate_metrics": gate_metrics,
            "unavailable_qubits": [],
            "calibration_timestamp": (calibration or {}).get("timestamp"),
            "queue_depth": waiting,
            "queue_wait_estimate_s": round(waiting * per_job, 3) if per_job else None,
            "status": self._core.status.status(),
        }}

    async def _op_calibration_status(self, request: dict[str, Any]) -> dict[str, Any]:
        self._calibration_progress()
        return {"payload": self._calibration_payload()}

    async def _op_trigger_calibration(self, request: dict[str, Any]) -> dict[str, Any]:
        params = request.get("params") or {}
        if not isinstance(params, dict):
            raise Refused("malformed_request", "params must be an object")
        qubits, routine = params.get("qubits"), params.get("routine")
        if qubits is not None and (not isinstance(qubits, list) or not all(
                isinstance(q, int) and not isinstance(q, bool) and q >= 0 for q in qubits)):
            raise Refused("malformed_request", "params.qubits must be a list of qubit indices")
        if routine is not None and not isinstance(routine, str):
            raise Refused("malformed_request", "params.routine must be a string")
        if self._calibration.phase == "running":
            raise Refused("device_calibrating", "a calibration is already running")
        # The executor's refresh: a QPU re-reads its calibration (qibolab), a noisy twin
        # reloads its figures, a plain simulator has nothing to measure and ends at once.
        self._calibration = Calibration("running", qubits or [], routine or "refresh",
                                        time.time())
        self._publish("calibration_started", phase="running", qubits=qubits or [],
                      routine=self._calibration.routine)
        self._core.request_calibration()
        return {"payload": self._calibration_payload()}

    def _calibration_progress(self) -> None:
        cal = self._calibration
        if cal.phase != "running" or cal.started_at is None:
            return
        runner = self._core.runner
        failed = runner.calibration_failed
        if runner.calibrated_at >= cal.started_at:
            cal.phase, cal.completed_at = "completed", runner.calibrated_at
        elif failed is not None and failed[0] >= cal.started_at:
            cal.phase, cal.completed_at, cal.error = "failed", failed[0], failed[1]
        else:
            return
        self._publish("calibration_completed", phase=cal.phase, qubits=cal.qubits,
                      routine=cal.routine, error=cal.error)

    def _calibration_payload(self) -> dict[str, Any]:
        cal = self._calibration
        return {"phase": cal.phase, "qubits": cal.qubits, "routine": cal.routine,
                "started_at": iso_utc(cal.started_at) if cal.started_at else None,
                "completed_at": iso_utc(cal.completed_at) if cal.completed_at else None,
                "error": cal.error}

    # -- events -------------------------------------------------------------------------------

    def _publish(self, topic: str, **fields: Any) -> None:
        """An event on the PUB socket (advisory: everything in it can be polled)."""
        if self._pub is None:
            return
        seq = self._event_seq[topic] = self._event_seq.get(topic, 0) + 1
        body = {"protocol": PROTOCOL, "topic": topic, "device_id": self.device_id,
                "timestamp": iso_utc(), "seq": seq, **fields}
        with contextlib.suppress(zmq.ZMQError):  # no subscriber, or a full queue: dropped
            self._pub.send_multipart([topic.encode(), json.dumps(body).encode()],
                                     flags=zmq.NOBLOCK)

    def _resource_state(self) -> None:
        runner = self._core.runner
        self._publish("resource_state", queue_depth=runner.waiting,
                      slots_busy=min(1, len(runner.running)), slots_total=1)

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            self._publish("heartbeat", status=self._core.status.status(),
                          queue_depth=self._core.runner.waiting)


def _task_field(request: dict[str, Any]) -> str:
    task_id = request.get("task_id")
    return task_id if isinstance(task_id, str) and len(task_id) <= MAX_TASK_ID else ""


def _terminal_state(outcome: Outcome | None) -> str:
    if outcome is None:
        return "failed"
    if outcome.ok:
        return "completed"
    assert outcome.error is not None
    return "cancelled" if outcome.error.code == ErrorCode.JOB_CANCELLED else "failed"


def _label(operation: Any) -> str:
    return operation if isinstance(operation, str) and operation in OPERATIONS else "other"


def _metrics_of(calibration: dict[str, Any] | None) -> tuple[list[Any], list[Any]]:
    """QCOS's qubit and gate metrics from the executor's calibration snapshot
    (executors/calibration.py); figures it does not have stay out, none is made up."""
    if not calibration:
        return [], []
    stamp = calibration.get("timestamp")
    qubits = []
    for name, q in (calibration.get("qubits") or {}).items():
        if not isinstance(q, dict):
            continue
        durations = q.get("gate_durations_ns") or {}
        assumed = set(q.get("assumed_durations") or ())
        fidelity = q.get("assignment_fidelity")
        index = q.get("index")
        qubits.append({
            "qubit_id": index if isinstance(index, int) else name,
            "t1_us": _us(q.get("t1_ns")),
            "t2_us": _us(q.get("t2_ns")),
            "readout_error": None if fidelity is None else round(1 - float(fidelity), 6),
            "readout_length_ns": (durations.get("measure") if "measure" not in assumed
                                  else None),
            "frequency_ghz": None,
            "operational": True,
            "last_calibrated": stamp,
        })
    gates = []
    for pair in (calibration.get("pairs") or {}).values():
        if not isinstance(pair, dict):
            continue
        fidelity = pair.get("fidelity")
        for native in pair.get("natives") or ["CZ"]:
            gates.append({
                "gate_name": str(native).lower(),
                "qubits": list(pair.get("qubits") or []),
                "gate_error": None if fidelity is None else round(1 - float(fidelity), 6),
                "gate_length_ns": (None if pair.get("duration_assumed")
                                   else pair.get("duration_ns")),
            })
    return qubits, gates


def _us(ns: Any) -> float | None:
    return None if ns is None else round(float(ns) / 1000, 6)
