"""The node's QCOS front end (qcos-mc/1) against QCOS's own client code: the driver class
QCOS loads (an hal.mc MCDriver), its ZMQTransport and MCEventListener, and raw ZeroMQ for
what that client never sends (resent bytes, garbage). Bit order, provenance, idempotent
resubmission, cancel, unknown ids, limits, malformed input, events, device state and
calibration; and the node serving QPI jobs beside QCOS tasks, each front end getting only
its own answers."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip(
    "hal.mc", reason="needs QCOS's SDK: pip install 'qcos-driver-sdk[conformance,mc]==1.2.0'")
pytest.importorskip("zmq", reason="needs pyzmq (the qcos extra)")

import zmq
from hal.driver import DriverError
from hal.mc import (
    DeviceEvent,
    EventTopic,
    MCErrorCode,
    MCEventListener,
    MCReply,
    MCRequest,
    Operation,
    ResourceStateEvent,
    TaskConfig,
    TaskResult,
    TaskState,
    TaskStateEvent,
    ZMQTransport,
)
from hal.state import CalibrationPhase, MetricSource
from prometheus_client.parser import text_string_to_metric_families
from qiskit import QuantumCircuit

from frontends.qcos.qcos_driver import QpiNodeDriver
from tests.circuits import BELL
from tests.conftest import (
    COUNTING,
    Daemon,
    EventType,
    LocalOrchestrator,
    daemon_env,
    executions,
    run_job,
    start_daemon,
    wait_for,
    wait_until,
)

DEVICE_ID = "qpi-node"
OPERATIONS = {"submit_task", "task_status", "task_result", "cancel_task", "heartbeat",
              "device_state", "calibration_status", "trigger_calibration", "device_config"}
EXECUTIONS_LOG = "executions.log"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Node:
    """A node serving QCOS, and the ways a test talks to it."""

    daemon: Daemon
    endpoint: str
    events: str
    metrics: str
    device_id: str = DEVICE_ID
    transport: Any = field(init=False)

    def __post_init__(self) -> None:
        # One try, a short wait: a node that does not answer fails the test in seconds
        # (QCOS itself would wait 30 s and resend twice).
        self.transport = ZMQTransport(self.device_id, self.endpoint, timeout_s=15, retries=0)

    def client_env(self) -> dict[str, str]:
        """Where the QCOS-side driver finds this node."""
        return {"QPI_QCOS_ENDPOINT": self.endpoint, "QPI_QCOS_EVENTS": self.events,
                "QPI_QCOS_DEVICE_ID": self.device_id}

    def driver(self) -> QpiNodeDriver:
        return QpiNodeDriver(endpoint=self.endpoint, events=self.events,
                             device_id=self.device_id)

    def request(self, operation: Operation, **fields: Any) -> MCReply:
        """One request through QCOS's transport: its reply passed QCOS's schema and
        correlation checks (seq, operation, device_id)."""
        return self.transport.request(MCRequest.build(operation, self.device_id, **fields))

    def submit(self, program: Any, shots: int = 1000, task_id: str | None = None,
               **config: Any) -> MCReply:
        return self.request(Operation.SUBMIT_TASK, task_id=task_id or new_task_id(),
                            program=program, config=TaskConfig(shots=shots, **config))

    def status(self, task_id: str) -> MCReply:
        return self.request(Operation.TASK_STATUS, task_id=task_id).raise_for_status()

    def wait_state(self, task_id: str, *states: TaskState, timeout: float = 120) -> MCReply:
        """task_status, polled until the task is in one of `states` (or terminal)."""
        def reached() -> MCReply | None:
            reply = self.status(task_id)
            assert reply.state is not None, reply
            return reply if reply.state in states or reply.state.is_terminal else None
        reply: MCReply = wait_until(reached, timeout, f"task {task_id} to reach {states}",
                                    every=0.02)
        return reply

    def result(self, task_id: str, timeout: float = 120) -> TaskResult:
        """The task's result, once terminal, as task_status attaches it."""
        reply = self.wait_state(task_id, TaskState.COMPLETED, timeout=timeout)
        assert reply.result is not None, f"terminal task_status without a result: {reply}"
        result: TaskResult = reply.result
        return result

    def raw(self, *frames: bytes) -> list[bytes]:
        """Send `frames` from a fresh DEALER (a new identity) and return the reply's."""
        dealer: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        try:
            dealer.connect(self.endpoint)
            dealer.send_multipart(list(frames))
            assert dealer.poll(15_000), f"no reply to {frames!r}"
            return list(dealer.recv_multipart())
        finally:
            dealer.close()

    def raw_json(self, body: bytes) -> dict[str, Any]:
        """The reply to one raw body: exactly one frame, a JSON object."""
        frames = self.raw(body)
        assert len(frames) == 1, f"reply frames {frames!r}: a DEALER must get the body alone"
        reply = json.loads(frames[0])
        assert isinstance(reply, dict), reply
        return reply

    def alive(self) -> None:
        """The node still answers, and its process still runs."""
        assert self.daemon.proc.poll() is None, self.daemon.output()
        assert self.request(Operation.HEARTBEAT).ok

    def jobs_total(self) -> float:
        """qpi_jobs_total summed over outcomes: every job the node finished."""
        with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        return sum(sample.value for family in text_string_to_metric_families(text)
                   for sample in family.samples if sample.name == "qpi_jobs_total")

    def stop(self) -> None:
        self.transport.close()
        code = self.daemon.stop()
        assert code == 0, f"daemon exited {code}:\n{self.daemon.output()}"


def start_qcos_node(tmp_path: Path, *args: str, orch: LocalOrchestrator | None = None,
                    frontends: str = "qcos", **env: str) -> Node:
    """A daemon serving QCOS (and QPI with `orch`), once its sockets are bound."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    events = f"tcp://127.0.0.1:{free_port()}"
    metrics = f"127.0.0.1:{free_port()}"
    d = start_daemon(tmp_path, daemon_env(
        tmp_path, orch, QPI_FRONTENDS=frontends, QPI_QCOS_ENDPOINT=endpoint,
        QPI_QCOS_EVENTS=events, QPI_QCOS_DEVICE_ID=DEVICE_ID, QPI_METRICS_ADDR=metrics,
        **env), *args)
    try:
        wait_until(lambda: d.logged("qcos front end listening") or d.proc.poll() is not None,
                   120, "the qcos front end to listen")
        assert d.proc.poll() is None, d.output()
        [listening] = d.logged("qcos front end listening")
        assert (listening["endpoint"], listening["events"], listening["device_id"]) == (
            endpoint, events, DEVICE_ID), listening
        return Node(d, endpoint, events, metrics)
    except BaseException:
        d.stop()
        raise


def new_task_id() -> str:
    return f"qcos-{uuid.uuid4().hex[:16]}"


# -- programs ------------------------------------------------------------------------------

def rphi(qubit: int, angle: float = math.pi, axis: float = 0.0) -> dict[str, Any]:
    return {"op": "RPHI", "qubit": qubit, "axis": axis, "angle": angle}


def cz(ctrl: int, qubit: int) -> dict[str, Any]:
    return {"op": "CZ", "ctrl": ctrl, "qubit": qubit}


def measure(*qubits: int) -> dict[str, Any]:
    return {"op": "MEASURE", "qubits": list(qubits)}


def layers(width: int, depth: int) -> list[dict[str, Any]]:
    """A program that keeps a statevector simulator busy: `depth` layers of rotations on
    every qubit and CZs on alternate pairs (22 qubits x 30 layers: seconds on Aer)."""
    program: list[dict[str, Any]] = []
    for layer in range(depth):
        program += [rphi(q, 0.3 + 0.01 * layer, 0.2 * q) for q in range(width)]
        program += [cz(q, q + 1) for q in range(layer % 2, width - 1, 2)]
    return [*program, measure(*range(width))]


def long_program(config: dict[str, Any]) -> list[dict[str, Any]]:
    width = min(22, config["limits"]["max_qubits_per_circuit"])
    depth = min(30, (config["limits"]["max_circuit_depth"] - 1) // (width + width // 2))
    return layers(width, depth)


def bell() -> QuantumCircuit:
    qc = QuantumCircuit(2, 2)
    qc.h(0)
    qc.cx(0, 1)
    qc.measure([0, 1], [0, 1])
    return qc


def ghz(n: int) -> QuantumCircuit:
    qc = QuantumCircuit(n, n)
    qc.h(0)
    for q in range(n - 1):
        qc.cx(q, q + 1)
    qc.measure(range(n), range(n))
    return qc


# -- fixtures ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = start_qcos_node(tmp_path_factory.mktemp("qcos"), "--executor", "aer")
    try:
        yield n
    finally:
        n.stop()


@pytest.fixture(scope="module")
def driver(node: Node) -> Iterator[QpiNodeDriver]:
    d = node.driver()
    try:
        yield d
    finally:
        d.disconnect()


@pytest.fixture(scope="module")
def config(node: Node) -> dict[str, Any]:
    reply = node.request(Operation.DEVICE_CONFIG).raise_for_status()
    return dict(reply.payload)


class Events:
    """What the node publishes, parsed by QCOS's listener, and the raw frames beside it."""

    def __init__(self, node: Node) -> None:
        self.typed: list[DeviceEvent] = []
        self.listener = MCEventListener(node.device_id, node.events, self.typed.append)
        self.listener.start()
        self.sub: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(node.events)
        self.frames: list[list[bytes]] = []
        # A SUB hears only what is published after it joined: wait for a first event (the
        # node's periodic heartbeat) on both, so nothing a test causes goes unheard.
        wait_until(lambda: self.typed and self.read_raw(), 60,
                   "a first event (a heartbeat) on the node's PUB socket")

    def read_raw(self) -> list[list[bytes]]:
        while self.sub.poll(0):
            self.frames.append(self.sub.recv_multipart())
        return self.frames

    def task_states(self, task_id: str) -> list[TaskState]:
        return [e.state for e in list(self.typed)
                if isinstance(e, TaskStateEvent) and e.task_id == task_id]

    def of(self, topic: EventTopic) -> list[DeviceEvent]:
        return [e for e in list(self.typed) if e.topic is topic]

    def close(self) -> None:
        self.listener.stop()
        self.sub.close()


@pytest.fixture
def events(node: Node) -> Iterator[Events]:
    e = Events(node)
    try:
        yield e
    finally:
        e.close()


# -- what the node is ----------------------------------------------------------------------

def test_device_config_is_what_qcos_declares(
    node: Node, config: dict[str, Any], driver: QpiNodeDriver
) -> None:
    assert config["protocol"] == "qcos-mc/1"
    assert config["modality"] == "superconducting"
    assert {"rphi", "cz"} <= set(config["native_gates"])
    assert config["simulated"] is True and config["executor"] == "aer"
    assert set(config["operations"]) >= OPERATIONS
    assert config["job_cancellation"] is True
    n = config["num_qubits"]
    limits = config["limits"]
    assert n >= 5 and 5 <= limits["max_qubits_per_circuit"] <= n
    # What the certification needs: 8192 shots on 5 qubits (ACOS-ISA-007)
    assert limits["max_shots"] >= 8192
    assert limits["max_circuit_depth"] >= 1000 and limits["max_queued_tasks"] >= 1
    assert sorted(map(tuple, config["coupling_map"])) == [
        (a, b) for a in range(n) for b in range(n) if a != b]

    caps = driver.capabilities
    assert caps.backend.id == DEVICE_ID and driver.device_id == DEVICE_ID
    assert caps.hardware.is_simulator is True
    assert caps.hardware.num_qubits == n
    assert caps.hardware.connectivity.value == "all_to_all"
    assert caps.mc.modality.value == "superconducting" and caps.mc.enabled
    assert set(caps.mc.operations) == set(config["operations"])
    assert (caps.limits.max_shots, caps.limits.max_qubits_per_circuit,
            caps.limits.max_circuit_depth) == (limits["max_shots"],
                                               limits["max_qubits_per_circuit"],
                                               limits["max_circuit_depth"])
    assert caps.operations.job_cancellation is True
    assert driver.connect() is True
    # A node serving QCOS alone starts no embedded QPI stand-in (and opens no QPI port).
    assert "embedded orchestrator" not in node.daemon.output()
    assert not node.daemon.logged("connected")


def test_a_node_that_does_not_answer_is_a_clear_error() -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(DriverError) as err:
        QpiNodeDriver(endpoint=endpoint, config_timeout_s=0.5)
    assert endpoint in str(err.value) and "device_config" in str(err.value)
    assert "QPI_QCOS_ENDPOINT" in str(err.value)


# -- results -------------------------------------------------------------------------------

@pytest.mark.parametrize(("readout", "expected"), [
    ((0, 1), "10"), ((1, 0), "01"), ((0, 1, 2), "100"), ((2, 0, 1), "010"),
    ((2, 1, 0), "001"),
])
def test_count_keys_are_in_readout_order(
    node: Node, readout: tuple[int, ...], expected: str
) -> None:
    """Character j of a key is qubit MEASURE.qubits[j]: X on qubit 0 only."""
    shots = 200
    reply = node.submit([rphi(0), measure(*readout)], shots=shots,
                        qubit_subset=list(readout)).raise_for_status()
    assert reply.task_id and reply.state in (TaskState.QUEUED, TaskState.RUNNING,
                                             TaskState.COMPLETED)
    result = node.result(reply.task_id)
    assert result.state is TaskState.COMPLETED, result
    assert result.counts == {expected: shots}
    assert result.shots == shots and result.simulated is True
    assert result.task_id == reply.task_id


def test_readout_order_through_qcos_translation(driver: QpiNodeDriver) -> None:
    """The same through QCOS's own QASM -> RPHI/CZ translation and count normalization."""
    qc = QuantumCircuit(2, 2)
    qc.x(0)
    qc.measure([0, 1], [0, 1])
    assert driver.execute(qc, 100)["counts"] == {"10": 100}
    flipped = QuantumCircuit(2, 2)
    flipped.x(0)
    flipped.measure([1, 0], [0, 1])
    assert driver.execute(flipped, 100)["counts"] == {"01": 100}


def test_bell_and_ghz_are_correlated_and_simulated(driver: QpiNodeDriver) -> None:
    shots = 4096
    for circuit, outcomes in ((bell(), {"00", "11"}), (ghz(4), {"0000", "1111"})):
        result = driver.execute(circuit, shots)
        counts = result["counts"]
        assert set(counts) == outcomes, counts
        assert sum(counts.values()) == shots == result["shots"]
        assert min(counts.values()) > shots / 4, counts  # both halves, roughly even
        assert result["simulated"] is True and result["status"] == "completed"
        assert result["backend_id"] == DEVICE_ID


def test_result_carries_timing_and_placement(node: Node) -> None:
    reply = node.submit([rphi(1), measure(0, 1, 2)], shots=64).raise_for_status()
    assert reply.task_id is not None
    result = node.result(reply.task_id)
    assert result.counts == {"010": 64} and result.error is None
    assert result.timing is not None and result.timing.execution_ms is not None
    assert result.timing.execution_ms >= 0
    if result.qubits_used is not None:
        assert set(result.qubits_used) >= {0, 1, 2}
    # task_result answers the same once terminal
    fetched = node.request(Operation.TASK_RESULT, task_id=reply.task_id).raise_for_status()
    assert fetched.result is not None and fetched.result.counts == result.counts


# -- resubmission --------------------------------------------------------------------------

def test_resent_submit_runs_once(node: Node) -> None:
    """QCOS resends the same bytes from a new identity after a timeout: the node answers
    with the same task and runs it once."""
    request = MCRequest.build(Operation.SUBMIT_TASK, DEVICE_ID, task_id=new_task_id(),
                              program=[rphi(0), measure(0, 1)], config=TaskConfig(shots=300))
    body = json.dumps(request.to_wire()).encode()
    jobs_before = node.jobs_total()

    first = node.raw_json(body)
    again = node.raw_json(body)  # a fresh DEALER: another identity
    assert first["code"] == again["code"] == "ok", (first, again)
    assert first["seq"] == again["seq"] == request.seq
    assert first["task_id"] == again["task_id"]
    task_id = first["task_id"]
    result = node.result(task_id)
    assert result.counts == {"10": 300}
    wait_until(lambda: node.jobs_total() == jobs_before + 1, 30, "the task to be counted")

    late = node.raw_json(body)  # after it finished: the finished task, not a new one
    assert late["code"] == "ok" and late["task_id"] == task_id
    assert late["state"] == "completed"
    if late.get("result") is not None:
        assert late["result"]["counts"] == {"10": 300}

    # Nothing else ran: a task submitted after the resends is the only other job counted.
    other = node.submit([rphi(1), measure(0, 1)], shots=10).raise_for_status()
    assert other.task_id is not None and other.task_id != task_id
    node.result(other.task_id)
    wait_until(lambda: node.jobs_total() >= jobs_before + 2, 30, "the other task's count")
    assert node.jobs_total() == jobs_before + 2
    assert node.status(task_id).state is TaskState.COMPLETED


# -- cancel --------------------------------------------------------------------------------

def test_cancel_a_queued_and_a_running_task(tmp_path: Path) -> None:
    with ExitStack() as stack:
        n = start_qcos_node(tmp_path, "--executor", "aer")
        stack.callback(n.stop)
        events = Events(n)
        stack.callback(events.close)
        driver = n.driver()
        stack.callback(driver.disconnect)
        config = dict(n.request(Operation.DEVICE_CONFIG).raise_for_status().payload)
        running = n.submit(long_program(config), shots=1000).raise_for_status()
        assert running.task_id is not None
        state = n.wait_state(running.task_id, TaskState.RUNNING).state
        assert state is TaskState.RUNNING, (
            f"the long task was {state} before it could be cancelled running")

        queued = n.submit([rphi(0), measure(0)], shots=10).raise_for_status()
        assert queued.task_id is not None
        assert queued.state is TaskState.QUEUED, queued
        assert n.status(queued.task_id).state is TaskState.QUEUED

        cancelled = n.request(Operation.CANCEL_TASK, task_id=queued.task_id)
        assert cancelled.ok and cancelled.state is TaskState.CANCELLED, cancelled
        assert n.status(queued.task_id).state is TaskState.CANCELLED

        # QCOS's own cancel of a device task, then its own status call
        assert driver.cancel_job(running.task_id) is True
        assert driver.get_job_status(running.task_id)["status"] == "cancelled"
        final = n.status(running.task_id)
        assert final.state is TaskState.CANCELLED
        assert final.result is None or final.result.state is TaskState.CANCELLED

        # Cancelling what is already over is an error, with a message
        for task_id in (running.task_id, queued.task_id):
            again = n.request(Operation.CANCEL_TASK, task_id=task_id)
            assert not again.ok and again.message, again

        # The node goes on: the next task runs
        after = n.submit([rphi(0), measure(0, 1)], shots=50).raise_for_status()
        assert after.task_id is not None
        assert n.result(after.task_id).counts == {"10": 50}

        wait_until(lambda: TaskState.CANCELLED in events.task_states(running.task_id), 30,
                   "the cancelled event of the running task")
        assert events.task_states(running.task_id) == [
            TaskState.QUEUED, TaskState.RUNNING, TaskState.CANCELLED]
        assert events.task_states(queued.task_id) == [TaskState.QUEUED, TaskState.CANCELLED]


# -- errors --------------------------------------------------------------------------------

def test_unknown_task_ids(node: Node, driver: QpiNodeDriver) -> None:
    unknown = "qcos-no-such-task"
    status = node.request(Operation.TASK_STATUS, task_id=unknown)
    assert status.ok and status.state is TaskState.UNKNOWN and status.result is None
    for operation in (Operation.TASK_RESULT, Operation.CANCEL_TASK):
        reply = node.request(operation, task_id=unknown)
        assert reply.code is MCErrorCode.TASK_NOT_FOUND and reply.message, reply
    assert driver.get_job_status(unknown)["status"] == "unknown"
    assert driver.cancel_job(unknown) is False


def test_limits_are_refused_with_a_message(node: Node, config: dict[str, Any]) -> None:
    limits = config["limits"]
    too_many_shots = node.submit([rphi(0), measure(0)], shots=limits["max_shots"] + 1)
    assert too_many_shots.code is MCErrorCode.LIMIT_EXCEEDED, too_many_shots
    assert too_many_shots.message and "shot" in too_many_shots.message.lower()

    beyond = limits["max_qubits_per_circuit"]  # qubits are 0 .. max - 1
    too_wide = node.submit([rphi(beyond), measure(0, beyond)], shots=10)
    assert too_wide.code is MCErrorCode.LIMIT_EXCEEDED, too_wide
    assert too_wide.message and "qubit" in too_wide.message.lower()

    too_long = node.submit([rphi(0)] * limits["max_circuit_depth"] + [measure(0)], shots=10)
    assert too_long.code is MCErrorCode.LIMIT_EXCEEDED, too_long
    assert too_long.message
    node.alive()


@pytest.mark.parametrize(("body", "code"), [
    (b"not json", "malformed_request"),
    (b"\xff\xfe{", "malformed_request"),
    (b"", "malformed_request"),
    (b"[1, 2]", "malformed_request"),
    (b'"submit_task"', "malformed_request"),
    (b'{"seq": 7, "device_id": "qpi-node"}', "malformed_request"),
    (b'{"seq": 8, "device_id": "qpi-node", "operation": 3}', "malformed_request"),
    (b'{"seq": 9, "device_id": "qpi-node", "operation": "frobnicate"}',
     "unsupported_operation"),
    (b'{"seq": 10, "device_id": "qpi-node", "operation": "reserve_device"}',
     "unsupported_operation"),
])
def test_malformed_requests_are_answered_never_fatal(
    node: Node, body: bytes, code: str
) -> None:
    reply = node.raw_json(body)
    assert reply["code"] == code and reply.get("message"), reply
    sent = json.loads(body) if body.startswith(b"{") else None
    if isinstance(sent, dict) and "seq" in sent:
        assert reply["seq"] == sent["seq"]
    assert reply.get("device_id") in (None, DEVICE_ID)
    node.alive()


MALFORMED_PROGRAMS: dict[str, Any] = {
    "not a list": "RPHI 0",
    "an object": {"op": "MEASURE", "qubits": [0]},
    "empty": [],
    "no measure": [rphi(0)],
    "measure not last": [measure(0), rphi(0)],
    "two measures": [rphi(0), measure(0), measure(0)],
    "measure repeats a qubit": [rphi(0), measure(0, 0)],
    "measure of nothing": [rphi(0), measure()],
    "unknown op": [{"op": "FOO", "qubit": 0}, measure(0)],
    "no op": [{"qubit": 0}, measure(0)],
    "not an instruction": [1, measure(0)],
    "rphi without angle": [{"op": "RPHI", "qubit": 0, "axis": 0.0}, measure(0)],
    "angle as text": [{"op": "RPHI", "qubit": 0, "axis": 0.0, "angle": "pi"}, measure(0)],
    "negative qubit": [rphi(-1), measure(0)],
    "qubit as text": [{"op": "RPHI", "qubit": "0", "axis": 0.0, "angle": 1.0}, measure(0)],
    "cz on one qubit": [cz(1, 1), measure(0, 1)],
}


@pytest.mark.parametrize("program", MALFORMED_PROGRAMS.values(), ids=MALFORMED_PROGRAMS.keys())
def test_malformed_programs_are_refused_with_a_message(node: Node, program: Any) -> None:
    reply = node.request(Operation.SUBMIT_TASK, task_id=new_task_id(), program=program,
                         config=TaskConfig(shots=10))
    assert reply.code is MCErrorCode.MALFORMED_REQUEST and reply.message, reply
    node.alive()


def test_malformed_config_is_refused(node: Node) -> None:
    request = MCRequest.build(Operation.SUBMIT_TASK, DEVICE_ID, task_id=new_task_id(),
                              program=[rphi(0), measure(0)]).to_wire()
    for config in ({"shots": "many"}, {"shots": 10, "qubit_subset": [1]}, "shots=10"):
        reply = node.raw_json(json.dumps({**request, "config": config}).encode())
        assert reply["code"] == "malformed_request" and reply.get("message"), (config, reply)
        assert reply["seq"] == request["seq"]
    node.alive()


# -- events, state, calibration ------------------------------------------------------------

def test_events_follow_a_task(node: Node, events: Events) -> None:
    reply = node.submit(layers(20, 30), shots=500).raise_for_status()
    task_id = reply.task_id
    assert task_id is not None
    node.result(task_id)
    wait_until(lambda: TaskState.COMPLETED in events.task_states(task_id), 30,
               "the completed event")
    assert events.task_states(task_id) == [
        TaskState.QUEUED, TaskState.RUNNING, TaskState.COMPLETED]
    wait_until(lambda: [e for e in events.of(EventTopic.TASK_RESULT_READY)
                        if getattr(e, "task_id", None) == task_id], 30,
               "task_result_ready for the task")

    resources = [e for e in events.typed if isinstance(e, ResourceStateEvent)]
    assert resources, [e.topic for e in events.typed]
    for e in resources:
        assert e.queue_depth is not None and e.queue_depth >= 0
        assert e.slots_total is not None and e.slots_total >= 1
        assert e.slots_busy is not None and 0 <= e.slots_busy <= e.slots_total
    assert events.of(EventTopic.HEARTBEAT)

    # On the wire: [topic, body], the body naming its own topic and device; seq per topic
    seqs: dict[str, list[int]] = {}
    for frames in events.read_raw():
        assert len(frames) == 2, frames
        body = json.loads(frames[1])
        assert body["topic"] == frames[0].decode() and body["device_id"] == DEVICE_ID, body
        assert body["protocol"] == "qcos-mc/1" and "timestamp" in body
        seqs.setdefault(body["topic"], []).append(body["seq"])
    for topic, numbers in seqs.items():
        assert numbers == sorted(set(numbers)), (topic, numbers)


def test_device_state_invents_no_metrics(
    node: Node, config: dict[str, Any], driver: QpiNodeDriver
) -> None:
    payload = node.request(Operation.DEVICE_STATE).raise_for_status().payload
    assert payload["source"] == "simulated"
    assert payload["qubit_metrics"] == [] and payload["gate_metrics"] == []
    assert payload["num_qubits"] == config["num_qubits"]
    assert isinstance(payload["queue_depth"], int)
    # QCOS reads "no metrics" as nothing measured, never as device truth
    snapshot = driver.device_state()
    assert snapshot is not None and not snapshot.is_device_truth
    assert snapshot.source is MetricSource.UNAVAILABLE


def test_calibration_status_and_trigger(
    node: Node, config: dict[str, Any], events: Events
) -> None:
    driver = node.driver()  # its own: a trigger leaves the driver's cached phase behind
    try:
        status = driver.calibration_status()
        assert status is not None and status.phase is CalibrationPhase.IDLE
        assert config["calibration"] is True  # every executor has a refresh to trigger
        started = driver.trigger_calibration([0], "refresh")
        assert started.phase in (CalibrationPhase.RUNNING, CalibrationPhase.COMPLETED)
        wait_until(lambda: events.of(EventTopic.CALIBRATION_COMPLETED), 120,
                   "calibration_completed")
        assert events.of(EventTopic.CALIBRATION_STARTED)
        phase = node.request(Operation.CALIBRATION_STATUS).raise_for_status().payload["phase"]
        assert phase in ("idle", "completed")
        assert driver.execute(bell(), 100)["status"] == "completed"
    finally:
        driver.disconnect()


# -- QPI and QCOS on one node --------------------------------------------------------------

def held_qpi_job(release: Path) -> dict[str, Any]:
    """A Bell job the counting executor holds until `release` exists."""
    text = ('OPENQASM 3.0;\ninclude "stdgates.inc";\n// until ' + str(release) + "\n"
            "bit[2] c;\nqubit[2] q;\nh q[0];\ncx q[0], q[1];\nc = measure q;\n")
    return {"circuits": [{"circuit": text}], "shots": 500}


async def test_qpi_jobs_and_qcos_tasks_share_the_node(
    orch: LocalOrchestrator, tmp_path: Path
) -> None:
    options = json.dumps({"count_file": str(tmp_path / EXECUTIONS_LOG)})
    n = await asyncio.to_thread(start_qcos_node, tmp_path, orch=orch, frontends="qpi,qcos",
                                QPI_EXECUTOR=COUNTING, QPI_EXECUTOR_OPTIONS=options)
    try:
        await wait_for(lambda: orch.online, 90, "the QPI front end to connect")
        release = tmp_path / "release"
        held = orch.submit(held_qpi_job(release))
        await wait_for(lambda: held.id in executions(tmp_path), 60, "the held QPI job to run")

        # While QPI's job holds the executor, QCOS tasks queue behind it; one is cancelled.
        x_task = await asyncio.to_thread(n.submit, [rphi(0), measure(0, 1)], 400)
        dropped = await asyncio.to_thread(n.submit, [rphi(1), measure(0, 1)], 400)
        assert x_task.ok and dropped.ok and x_task.task_id and dropped.task_id
        assert (await asyncio.to_thread(n.status, x_task.task_id)).state is TaskState.QUEUED
        cancel = await asyncio.to_thread(n.request, Operation.CANCEL_TASK,
                                         task_id=dropped.task_id)
        assert cancel.ok and cancel.state is TaskState.CANCELLED, cancel
        bell_job = orch.submit({"circuits": [BELL], "shots": 300})
        # A QPI job named exactly like a QCOS task in hand: two jobs, each its own answer.
        twin = orch.submit({"circuits": [BELL], "shots": 200}, job_id=x_task.task_id)
        release.touch()

        held_done = await orch.result(held.id, timeout=120)
        assert held_done.status == "completed" and held_done.results is not None
        assert set(held_done.results["counts"]) <= {"00", "11"}
        bell_counts = (await orch.result(bell_job.id, timeout=120)).results
        assert bell_counts is not None and set(bell_counts["counts"]) <= {"00", "11"}
        twin_done = (await orch.result(twin.id, timeout=120)).results
        assert twin_done is not None and set(twin_done["counts"]) <= {"00", "11"}
        assert sum(twin_done["counts"].values()) == 200
        result = await asyncio.to_thread(n.result, x_task.task_id)
        assert result.counts == {"10": 400}
        assert (await asyncio.to_thread(n.status, dropped.task_id)).state is (
            TaskState.CANCELLED)

        # A QCOS task named like a QPI job is a task of its own
        namesake = await asyncio.to_thread(n.submit, [rphi(0), measure(0)], 20,
                                           bell_job.id)
        assert namesake.ok and namesake.task_id
        assert (await asyncio.to_thread(n.result, namesake.task_id)).counts == {"1": 20}
        assert (await run_job(orch, {"circuits": [BELL], "shots": 100}))["success"] is True

        # Each front end heard only its own: QPI results for QPI jobs, none for QCOS
        # tasks; QCOS knows no QPI job; the cancelled task never ran, nothing ran twice.
        results = [str(e.payload.get("job_id")) for e in orch.events
                   if e.type == EventType.JOB_RESULT]
        assert sorted(results) == sorted(orch.jobs), results
        for job_id in (held.id, bell_job.id):
            unknown = await asyncio.to_thread(n.request, Operation.TASK_STATUS,
                                              task_id=job_id)
            assert unknown.ok and unknown.state is TaskState.UNKNOWN, unknown
        ran = executions(tmp_path)
        assert len(ran) == len(orch.jobs) + 2 and ran.count(held.id) == 1, ran
    finally:
        await asyncio.to_thread(n.stop)
