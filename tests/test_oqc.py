"""The `oqc` executor, driven through the real, unmodified `oqc-qcaas-sdk` against an
emulated QCaaS server (tests/oqc_server.py): exact counts, per-circuit shots, failures,
cancel, tasks queued past the job's timeout, lost submit answers, an expired token, and
a daemon SIGKILLed with tasks in flight. All offline: the SDK's check of OQC's public
status page goes to a closed local port."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("oqc_qcaas_sdk", reason="the oqc extra (oqc-qcaas-sdk) is not installed")

from qiskit import QuantumCircuit
from qpi_client import QPIClient

from driver.jobs import JobSpec, Limits, prepare
from executors.base import ErrorCode, Job, JobError, JobResult, OptionError
from executors.oqc import OqcExecutor, qiskit_counts
from frontends.qpi.orchestrator import LocalOrchestrator
from frontends.qpi.wire import EventType
from tests.conftest import daemon_env, local_url, start_connected, start_daemon, wait_for
from tests.oqc_server import QPU_ID, TOKEN, QcaasEmulator

OFFLINE = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
LIMITS = Limits(8, 10_000, 20)

BELL = ('OPENQASM 3.0; include "stdgates.inc"; qubit[2] q; bit[2] c; h q[0]; '
        "cx q[0], q[1]; c = measure q;")
X_ON_THREE = 'OPENQASM 3.0; include "stdgates.inc"; qubit[3] q; bit[3] c; x q[0]; c = measure q;'
# a[0] and b[1] read the same entangled pair, b[0] a qubit left at 0: joint keys "00 0"
# and "10 1" only; counted register by register, the link between a and b would be lost.
TWO_REGISTERS = ('OPENQASM 3.0; include "stdgates.inc"; qubit[3] q; bit[1] a; bit[2] b; '
                 "h q[0]; cx q[0], q[1]; a[0] = measure q[0]; b[1] = measure q[1]; "
                 "b[0] = measure q[2];")


@pytest.fixture
def qcaas() -> Iterator[QcaasEmulator]:
    server = QcaasEmulator().start()
    yield server
    server.stop()


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("OQC_QCAAS_TOKEN", TOKEN)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)


@pytest.fixture
def executor(qcaas: QcaasEmulator, offline: None) -> Iterator[tuple[OqcExecutor, dict]]:
    ex = OqcExecutor({"url": qcaas.url, "qpu_id": QPU_ID})
    records: dict[str, dict[str, Any]] = {}
    ex.recorder = records.__setitem__
    yield ex, records
    ex.close()


def job(job_id: str, *circuits: Any, shots: int = 400, **spec: Any) -> Job:
    return prepare(job_id, JobSpec.model_validate({"circuits": list(circuits),
                                                   "shots": shots, **spec}), LIMITS)


def ok(result: JobResult | JobError) -> JobResult:
    assert isinstance(result, JobResult), result
    return result


# -- the executor, in this process ------------------------------------------------------------


def test_counts_come_back_in_qiskit_keys_with_their_shots(
        executor: tuple[OqcExecutor, dict], qcaas: QcaasEmulator) -> None:
    ex, records = executor
    result = ok(ex.run_many([job("j", BELL, {"circuit": X_ON_THREE, "shots": 77},
                                 TWO_REGISTERS)])[0])
    bell, x, two = result.experiments
    assert set(bell.counts) <= {"00", "11"} and sum(bell.counts.values()) == 400
    assert x.counts == {"001": 77} and x.shots == 77  # c[0] set; keys 3 wide
    assert set(two.counts) == {"000", "101"}  # "b a" read as "00 0" / "10 1"
    assert two.header["creg_sizes"] == [["a", 1], ["b", 2]]
    # one composite job: three tasks, each submitted once, all recorded before
    assert sorted(qcaas.submits.values()) == [1, 1, 1]
    assert sorted(t["id"] for t in records["j"]["tasks"]) == sorted(qcaas.submits)


def test_short_keys_are_padded_and_reversed() -> None:
    # QCaaS: c[0] first, leading zeros dropped ("1" is c[0]=0, c[1]=0, c[2]=1 read
    # c[0]-first as "001" and stripped)
    assert qiskit_counts({"c": {"1": 3, "001": 2, "0": 5}}, 3) == {"100": 5, "000": 5}
    with pytest.raises(JobError):
        qiskit_counts({"c": {"1111": 1}}, 3)


def test_a_failed_task_fails_its_job_with_oqcs_message(
        executor: tuple[OqcExecutor, dict], qcaas: QcaasEmulator) -> None:
    ex, _ = executor
    failing = BELL + " rz(0.111) q[0];"  # the emulated QPU fails this one
    good, bad = ex.run_many([job("good", BELL), job("bad", BELL, failing)])
    assert ok(good).experiments[0].counts
    assert isinstance(bad, JobError) and bad.code == ErrorCode.JOB_FAILED
    assert "qubit 0 lost calibration" in bad.message and bad.details["oqc_error_code"] == 1107
    assert bad.details["circuit_index"] == 1


def test_a_refused_circuit_costs_only_its_own_job(
        executor: tuple[OqcExecutor, dict], qcaas: QcaasEmulator) -> None:
    ex, _ = executor
    good, bad = ex.run_many([job("good", BELL), job("bad", BELL + " rz(0.222) q[1];")])
    assert ok(good).experiments[0].counts
    assert isinstance(bad, JobError) and bad.code == ErrorCode.CIRCUIT_INVALID
    assert "rejected by the compiler" in bad.message
    assert all(n == 1 for n in qcaas.submits.values())


def test_a_lost_submit_answer_never_submits_twice(
        executor: tuple[OqcExecutor, dict], qcaas: QcaasEmulator) -> None:
    ex, _ = executor
    qcaas.lose_submit_answers = 1  # accepted, then answered 502 (the SDK never retries POST)
    result = ok(ex.run_many([job("j", BELL, X_ON_THREE)])[0])
    assert result.experiments[1].counts == {"001": 400}
    assert list(qcaas.submits.values()) == [1, 1]


def test_a_task_queued_past_the_jobs_timeout_is_cancelled(
        executor: tuple[OqcExecutor, dict], qcaas: QcaasEmulator) -> None:
    ex, _ = executor
    qcaas.hold = True  # the QPU's window is closed: queued is not an error, until the timeout
    (answer,) = ex.run_many([job("slow", BELL, X_ON_THREE, timeout_s=1.5)])
    assert isinstance(answer, JobError) and answer.code == ErrorCode.JOB_TIMEOUT
    assert "still SUBMITTED" in answer.message
    assert qcaas.statuses() == {"CANCELLED": 2} and len(qcaas.cancels) == 2


def test_an_expired_token_rebuilds_the_client_with_the_token_read_again(
        qcaas: QcaasEmulator, offline: None, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    ex = OqcExecutor({"url": qcaas.url, "qpu_id": QPU_ID, "token_file": str(token_file)})
    try:
        qcaas.expire_token("rotated")
        token_file.write_text("rotated")  # what the operator's rotation leaves
        assert ok(ex.run_many([job("j", X_ON_THREE)])[0]).experiments[0].counts == {
            "001": 400}
        qcaas.expire_token("revoked")
        (refused,) = ex.run_many([job("k", X_ON_THREE)])
        assert isinstance(refused, JobError) and refused.code == ErrorCode.QPU_DISABLED
        assert ex.health() is not None  # the node reports degraded
    finally:
        ex.close()


def test_resume_submits_only_what_was_never_submitted_and_polls_the_rest(
        executor: tuple[OqcExecutor, dict], qcaas: QcaasEmulator) -> None:
    ex, records = executor

    def stop_after_recording(job_id: str, state: dict[str, Any]) -> None:
        records[job_id] = state  # durable; then the node dies before it submits
        raise JobError(ErrorCode.JOB_FAILED, "the node stopped")

    ex.recorder = stop_after_recording
    (stopped,) = ex.run_many([job("cut", X_ON_THREE, BELL)])
    assert isinstance(stopped, JobError) and qcaas.submits == {}
    assert qcaas.statuses() == {"CREATED": 2}  # created at OQC, never submitted
    state = records["cut"]
    result = ex.resume("cut", state)
    assert result.experiments[0].counts == {"001": 400}
    assert sorted(qcaas.submits.values()) == [1, 1]
    again = ex.resume("cut", state)  # a second restart: the ended tasks are only read
    assert again.experiments[0].counts == {"001": 400}
    assert sorted(qcaas.submits.values()) == [1, 1] and len(qcaas.tasks) == 2


def test_abandon_cancels_only_the_tasks_still_active(
        executor: tuple[OqcExecutor, dict], qcaas: QcaasEmulator) -> None:
    ex, records = executor
    ok(ex.run_many([job("done", BELL)])[0])
    done = records["done"]["tasks"][0]["id"]
    qcaas.hold = True
    ex.run_many([job("held", BELL, timeout_s=0.3)])
    qcaas.cancels.clear()
    ex.abandon("done", records["done"])
    assert qcaas.cancels == [] and qcaas.tasks[done].status == "COMPLETED"


def test_what_qcaas_cannot_give_is_refused_clearly(
        executor: tuple[OqcExecutor, dict], qcaas: QcaasEmulator) -> None:
    ex, _ = executor
    (memory,) = ex.run_many([job("m", BELL, memory=True)])
    assert isinstance(memory, JobError) and "per-shot memory" in memory.message
    caps = ex.capabilities()
    assert (caps.max_qubits, caps.max_shots, caps.meas_levels) == (8, 10_000, (2,))
    assert caps.extra["memory"] is False
    assert qcaas.submits == {}


def test_the_token_is_never_an_option_and_never_missing(
        qcaas: QcaasEmulator, offline: None, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(OptionError, match="never an option"):
        OqcExecutor({"url": qcaas.url, "qpu_id": QPU_ID, "token": TOKEN})
    monkeypatch.delenv("OQC_QCAAS_TOKEN")
    with pytest.raises(OptionError, match="OQC_QCAAS_TOKEN"):
        OqcExecutor({"url": qcaas.url, "qpu_id": QPU_ID})


def test_a_token_qcaas_refuses_stops_the_start_clearly(
        qcaas: QcaasEmulator, offline: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from executors.oqc import OqcUnavailable

    monkeypatch.setenv("OQC_QCAAS_TOKEN", "wrong")
    with pytest.raises(OqcUnavailable, match="did not initialise"):
        OqcExecutor({"url": qcaas.url, "qpu_id": QPU_ID})
    monkeypatch.setenv("OQC_QCAAS_TOKEN", TOKEN)
    with pytest.raises(OqcUnavailable, match="refused QPU 'qpu:uk:9:nowhere'"):
        OqcExecutor({"url": qcaas.url, "qpu_id": "qpu:uk:9:nowhere"})


# -- the node ------------------------------------------------------------------------------


def _env(tmp_path: Path, orch: LocalOrchestrator | None, qcaas: QcaasEmulator,
         **extra: str) -> dict[str, str]:
    options = json.dumps({"url": qcaas.url, "qpu_id": QPU_ID})
    return daemon_env(tmp_path, orch, **{"QPI_EXECUTOR": "oqc", "OQC_QCAAS_TOKEN": TOKEN,
                                         "QPI_EXECUTOR_OPTIONS": options, **OFFLINE, **extra})


async def test_qpi_client_reads_oqc_results_in_local_mode(
        tmp_path: Path, qcaas: QcaasEmulator) -> None:
    """`qpi-driver --executor oqc` with its embedded stand-in, and the real qpi-client."""
    d = start_daemon(tmp_path, _env(tmp_path, None, qcaas, QPI_LOG_FORMAT="console"),
                     "--local-port", "0")
    try:
        url = await local_url(d)

        def use_client() -> list[dict[str, int]]:
            backend = QPIClient(url).get_backend("test-node")
            bell = QuantumCircuit(2, 2)
            bell.h(0)
            bell.cx(0, 1)
            bell.measure([0, 1], [0, 1])
            x = QuantumCircuit(3, 3)
            x.x(0)
            x.measure([0, 1, 2], [0, 1, 2])
            two = QuantumCircuit.from_qasm_str(  # via OpenQASM 2: two named registers
                'OPENQASM 2.0; include "qelib1.inc"; qreg q[3]; creg a[1]; creg b[2]; '
                "h q[0]; cx q[0], q[1]; measure q[0] -> a[0]; measure q[1] -> b[1]; "
                "measure q[2] -> b[0];")
            out = [backend.run(c, shots=300).result(timeout=60, wait=0.05).get_counts()
                   for c in (bell, x, two)]
            out.append(backend.run(x, shots=123).result(timeout=60, wait=0.05).get_counts())
            return out

        bell, x, two, shots = await asyncio.to_thread(use_client)
        assert set(bell) == {"00", "11"} and sum(bell.values()) == 300
        assert x == {"001": 300}
        assert set(two) == {"00 0", "10 1"} and sum(two.values()) == 300
        assert shots == {"001": 123}
        assert all(n == 1 for n in qcaas.submits.values()) and len(qcaas.submits) == 4
    finally:
        assert d.stop() == 0, d.output()


async def test_a_sigkilled_node_answers_from_the_tasks_it_had_created(
        tmp_path: Path, qcaas: QcaasEmulator, orch: LocalOrchestrator) -> None:
    qcaas.hold = True  # the tasks wait for the QPU's window
    env = _env(tmp_path, orch, qcaas)
    d = await start_connected(tmp_path, orch, env)
    try:
        first = orch.submit({"circuits": [X_ON_THREE, BELL], "shots": 200})
        await wait_for(lambda: sum(qcaas.submits.values()) == 2, what="two tasks submitted")
        # behind it, in the executor's pipe (marked running: the next start answers them)
        behind = [orch.submit({"circuits": [X_ON_THREE], "shots": 50}) for _ in range(2)]
        await wait_for(lambda: all(orch.jobs[r.id].dispatches for r in behind),
                       what="both dispatched")
    finally:
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(30)
    qcaas.release()  # the window opens while the node is down
    d = await start_connected(tmp_path, orch, env)
    try:
        done = await orch.result(first.id, timeout=60)
        assert done.results is not None and done.results.get("success"), done.results
        assert done.results["circuit_results"][0]["counts"] == {"001": 200}
        assert set(done.results["circuit_results"][1]["counts"]) <= {"00", "11"}
        assert d.logged("resuming jobs left running remotely by the last stop", jobs=1)
        for record in behind:  # never run, or run once: never twice
            other = await orch.result(record.id, timeout=60)
            assert other.results is not None
            assert other.results.get("success") or other.results.get("interrupted")
        assert all(n == 1 for n in qcaas.submits.values())  # nothing submitted twice
        ran = sum(1 for r in behind if orch.jobs[r.id].results.get("success"))
        assert len(qcaas.tasks) == 2 + ran  # no task created anew for the first
    finally:
        assert d.stop() == 0, d.output()


async def test_cancel_of_a_running_job_reaches_oqc(
        tmp_path: Path, qcaas: QcaasEmulator, orch: LocalOrchestrator) -> None:
    qcaas.hold = True
    d = await start_connected(tmp_path, orch, _env(tmp_path, orch, qcaas))
    try:
        record = orch.submit({"circuits": [BELL, X_ON_THREE], "shots": 100})
        await wait_for(lambda: sum(qcaas.submits.values()) == 2, what="two tasks submitted")
        await orch.send_event(EventType.JOB_CANCEL, {"job_id": record.id})
        done = await orch.result(record.id, timeout=60)
        assert done.results is not None and done.results["error_code"] == "JOB_CANCELLED"
        await wait_for(lambda: qcaas.statuses() == {"CANCELLED": 2},
                       what="both tasks cancelled at OQC")
    finally:
        assert d.stop() == 0, d.output()


def test_a_token_given_as_an_option_stops_the_daemon_with_exit_78(
        tmp_path: Path, qcaas: QcaasEmulator) -> None:
    env = _env(tmp_path, None, qcaas, QPI_EXECUTOR_OPTIONS=json.dumps(
        {"url": qcaas.url, "qpu_id": QPU_ID, "token": "s3cr3t-token-value"}))
    d = start_daemon(tmp_path, env, "--local-port", "0")
    try:
        assert d.proc.wait(120) == 78, d.output()
    except subprocess.TimeoutExpired:
        d.stop()
        raise
    assert "never an option" in d.output()
    assert "s3cr3t-token-value" not in d.output()


async def test_a_drain_that_runs_out_of_time_leaves_the_tasks_to_the_next_start(
        tmp_path: Path, qcaas: QcaasEmulator, orch: LocalOrchestrator) -> None:
    qcaas.hold = True
    env = _env(tmp_path, orch, qcaas, QPI_DRAIN_TIMEOUT_S="0.5")
    d = await start_connected(tmp_path, orch, env)
    record = orch.submit({"circuits": [X_ON_THREE], "shots": 64})
    await wait_for(lambda: sum(qcaas.submits.values()) == 1, what="the task submitted")
    assert d.stop() == 0, d.output()  # SIGTERM: the drain gives up on the queued task
    assert d.logged("jobs left running remotely; the next start resumes them")
    assert qcaas.cancels == [] and orch.jobs[record.id].results is None  # nothing answered
    qcaas.release()
    d = await start_connected(tmp_path, orch, env)
    try:
        done = await orch.result(record.id, timeout=60)
        assert done.results is not None
        assert done.results["circuit_results"][0]["counts"] == {"001": 64}
        assert list(qcaas.submits.values()) == [1]
    finally:
        assert d.stop() == 0, d.output()
