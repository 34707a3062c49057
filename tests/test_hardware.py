"""The `qibolab` executor through the real daemon: qibolab's random dummy platform
(shape, shot counts, bit order), the project's emulated two-transmon device (Bell
correlations from a pulse-level simulation), calibration in heartbeats that follows
the files, and an instrument link that drops and comes back."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip(
    "qibolab", reason="the hardware extra is not installed: pip install 'qpi-driver[hardware]'"
)

import executors
from executors.aer import AerExecutor
from executors.base import ErrorCode, Experiment, Job, JobError, OptionError
from executors.circuits import parse_qasm
from executors.qibolab import QibolabExecutor
from executors.qibolab.executor import BUNDLED_PLATFORMS
from frontends.qpi.orchestrator import LocalOrchestrator
from tests.circuits import BELL
from tests.conftest import Daemon, daemon_env, heartbeats, run_job, start_connected, wait_for

X_QASM3 = 'OPENQASM 3.0;\ninclude "stdgates.inc";\nqubit[2] q;\nbit[2] c;\nx q[0];\n' \
    "c = measure q;\n"
# Clbit 1 is never written, so its column must be all zeros wherever it sits.
SPARSE = 'OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[2];\ncreg c[3];\nh q[0];\nh q[1];\n' \
    "measure q[0] -> c[2];\nmeasure q[1] -> c[0];\n"
REGISTERS = 'OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[3];\ncreg a[1];\ncreg b[2];\n' \
    "measure q[0] -> a[0];\nmeasure q[1] -> b[0];\nmeasure q[2] -> b[1];\n"


async def start_node(tmp_path: Path, orch: LocalOrchestrator, options: dict[str, Any],
                     **env: str) -> Daemon:
    return await start_connected(tmp_path, orch, daemon_env(
        tmp_path, orch, QPI_EXECUTOR="qibolab", QPI_EXECUTOR_OPTIONS=json.dumps(options), **env),
        timeout=120)


def run_direct(executor: QibolabExecutor, qasm: str, shots: int = 100) -> Any:
    return executor.run(Job("j", (Experiment(parse_qasm(qasm), shots, source=qasm),)))


def test_qibolab_is_a_builtin_executor() -> None:
    assert executors.available()["qibolab"] == "executors.qibolab:QibolabExecutor"
    assert executors.load("qibolab") is QibolabExecutor


async def test_dummy_platform_shape_shots_and_bit_order(tmp_path: Path) -> None:
    orch = LocalOrchestrator(port=0, heartbeat_interval_s=0.5)
    await orch.start()
    d = await start_node(tmp_path, orch, {"platform": "dummy"})
    try:
        res = await run_job(orch, {"circuits": [
            {"circuit": BELL, "shots": 1000, "memory": True},
            {"circuit": SPARSE, "shots": 1000},
            {"circuit": REGISTERS, "shots": 7},
        ]})
        assert res["success"] is True and res["backend"] == "qibolab", res
        bell, sparse, registers = res["circuit_results"]
        # The dummy reads out random bits: every outcome, each shot counted once.
        assert set(bell["counts"]) == {"00", "01", "10", "11"}
        assert sum(bell["counts"].values()) == 1000 == bell["shots"]
        assert len(bell["memory"]) == 1000 and Counter(bell["memory"]) == bell["counts"]
        assert bell["header"]["memory_slots"] == 2
        # Highest clbit left: c[2] (from q[0]) first, the unwritten c[1] in the middle.
        assert {bits[1] for bits in sparse["counts"]} == {"0"}
        assert {bits[0] for bits in sparse["counts"]} == {"0", "1"}
        assert {bits[2] for bits in sparse["counts"]} == {"0", "1"}
        assert sum(sparse["counts"].values()) == 1000 and "memory" not in sparse
        assert set(sparse["physical_qubits"]) == {"0", "2"}
        assert registers["header"]["creg_sizes"] == [["a", 1], ["b", 2]]
        assert all(len(bits) == 3 for bits in registers["counts"])

        iq = await run_job(orch, {"circuits": [BELL], "shots": 50, "meas_level": 1})
        single = iq["circuit_results"][0]
        assert single["meas_level"] == 1 and len(single["memory"]) == 50
        assert all(len(shot) == 2 and all(len(p) == 2 for p in shot) for shot in single["memory"])
        avg = await run_job(orch, {"circuits": [BELL], "shots": 50, "meas_level": 1,
                                   "meas_return": "avg"})
        assert len(avg["circuit_results"][0]["memory"]) == 2

        too_big = await run_job(orch, {"circuits": [
            'OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[6];\ncreg c[6];\nmeasure q -> c;\n']})
        assert too_big["error_code"] == "QUOTA_EXCEEDED" and too_big["max_qubits"] == 5

        beat = heartbeats(orch)[-1]
        caps = beat["capabilities"]
        assert caps["device"] == "qpu" and caps["max_qubits"] == 5 and caps["platform"] == "dummy"
        assert caps["meas_levels"] == [1, 2]  # bits and IQ points; no raw traces
        assert [0, 2] in caps["coupling_map"] and [0, 1] not in caps["coupling_map"]
        assert "CZ" in caps["native_gates"]["two_qubit"]["0-2"]
        assert caps["timing"]["gate_durations_ns"]["1"]["measure"] == 2000.0
        cal = beat["calibration"]
        assert cal["timestamp"] and cal["qubits"]["0"]["drive_frequency_hz"] == 4e9
        assert cal["qubits"]["0"]["pulses"]["MZ"]["duration_ns"] == 2000.0
    finally:
        assert d.stop() == 0, d.output()
        await orch.stop()


async def test_emulated_device_shows_bell_correlations(tmp_path: Path) -> None:
    orch = LocalOrchestrator(port=0)
    await orch.start()
    d = await start_node(tmp_path, orch, {"platform": "emulated_2q"})
    try:
        res = await run_job(orch, {"circuits": [BELL, X_QASM3], "shots": 2000})
        assert res["success"] is True, res
        bell, flipped = res["circuit_results"]
        counts = bell["counts"]
        assert sum(counts.values()) == 2000
        correlated = counts.get("00", 0) + counts.get("11", 0)
        assert correlated > 0.85 * 2000, counts
        # Both halves of the pair are populated, not one classical outcome.
        assert counts.get("00", 0) > 0.35 * 2000 and counts.get("11", 0) > 0.35 * 2000
        # x on q[0] only: c[0] is the rightmost bit.
        assert flipped["counts"].get("01", 0) > 0.95 * 2000, flipped["counts"]
        assert bell["sequence_duration_ns"] > 0
    finally:
        assert d.stop() == 0, d.output()
        await orch.stop()


def rewrite(path: Path, data: dict[str, Any]) -> None:
    """Write and move the mtime on, so even a coarse-clock filesystem sees a change."""
    stat = path.stat() if path.exists() else None
    path.write_text(json.dumps(data, indent=2))
    if stat is not None:
        os.utime(path, ns=(stat.st_atime_ns, max(stat.st_mtime_ns, path.stat().st_mtime_ns)
                           + 10**9))


async def test_calibration_in_heartbeats_follows_the_files(tmp_path: Path) -> None:
    folder = tmp_path / "chip"
    shutil.copytree(BUNDLED_PLATFORMS / "emulated_2q", folder)
    orch = LocalOrchestrator(port=0, heartbeat_interval_s=0.3)
    await orch.start()
    d = await start_node(tmp_path, orch, {"platform": str(folder)},
                         QPI_CALIBRATION_INTERVAL_S="0.5")
    try:
        def qubit(beat: dict[str, Any], name: str) -> dict[str, Any]:
            return dict(beat["calibration"]["qubits"][name])

        await wait_for(lambda: bool(heartbeats(orch)), what="a heartbeat")
        first = heartbeats(orch)[-1]
        assert qubit(first, "0")["t1_ns"] == 30_000.0 and qubit(first, "1")["t2_ns"] == 18_000.0
        assert qubit(first, "0")["assignment_fidelity"] == 1.0
        assert first["calibration"]["pairs"]["0-1"]["natives"] == ["CZ"]
        assert first["calibration"]["sources"]["calibration"] == str(folder / "calibration.json")

        measured = json.loads((folder / "calibration.json").read_text())
        measured["single_qubits"]["0"]["t1"] = [12_345.0, 150.0]
        measured["single_qubits"]["0"]["readout"]["fidelity"] = 0.9
        measured["two_qubits"]["0-1"]["cz_fidelity"] = [0.97, 0.01]
        rewrite(folder / "calibration.json", measured)
        await wait_for(lambda: qubit(heartbeats(orch)[-1], "0")["t1_ns"] == 12_345.0,
                       timeout=30, what="the new T1 in a heartbeat")
        second = heartbeats(orch)[-1]
        assert qubit(second, "0")["assignment_fidelity"] == pytest.approx(0.95)
        assert second["calibration"]["pairs"]["0-1"]["fidelity"] == 0.97
        assert second["calibration"]["timestamp"] > first["calibration"]["timestamp"]

        # A new parameters.json reaches the live platform too (qibocal writes both).
        parameters = json.loads((folder / "parameters.json").read_text())
        parameters["configs"]["0/drive"]["frequency"] = 5.01e9
        rewrite(folder / "parameters.json", parameters)
        await wait_for(lambda: qubit(heartbeats(orch)[-1], "0")["drive_frequency_hz"] == 5.01e9,
                       timeout=30, what="the new drive frequency in a heartbeat")
    finally:
        assert d.stop() == 0, d.output()
        await orch.stop()


class InstrumentLink:
    """A TCP service standing in for an instrument's control port: answers `ping`
    with `pong`. `stop()` drops the listener and every open connection."""

    def __init__(self) -> None:
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._listener: socket.socket | None = None
        self._clients: list[socket.socket] = []

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen()
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            self._clients.append(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    @staticmethod
    def _serve(client: socket.socket) -> None:
        with client:
            while True:
                try:
                    if client.recv(5) != b"ping\n":
                        return
                    client.sendall(b"pong\n")
                except OSError:
                    return

    def stop(self) -> None:
        if self._listener is not None:
            # close() alone leaves a socket blocked in accept() listening on Linux.
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        for client in self._clients:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
            client.close()
        self._clients.clear()


# A qibolab platform whose controller talks to its instrument over TCP, as real ones
# do: qibolab's dummy platform with the controller swapped for one that pings the link.
LINKED_PLATFORM = '''
import dataclasses
import socket
from typing import Any

from pydantic import PrivateAttr
from qibolab import create_platform
from qibolab.instruments.dummy import DummyInstrument

ADDRESS = "127.0.0.1:{port}"


class LinkedInstrument(DummyInstrument):
    _link: Any = PrivateAttr(default=None)

    def connect(self):
        host, port = self.address.rsplit(":", 1)
        self._link = socket.create_connection((host, int(port)), timeout=2)

    def disconnect(self):
        if self._link is not None:
            self._link.close()
            self._link = None

    def play(self, *args, **kwargs):
        if self._link is None:
            raise ConnectionError("not connected to the instrument")
        self._link.sendall(b"ping\\n")
        if self._link.recv(5) != b"pong\\n":
            raise ConnectionResetError("the instrument closed the connection")
        return super().play(*args, **kwargs)


def create():
    base = create_platform("dummy")
    linked = LinkedInstrument(address=ADDRESS, channels=base.instruments["dummy"].channels)
    return dataclasses.replace(base, name="linked_dummy",
                               instruments={{**base.instruments, "dummy": linked}})
'''


def linked_platform(tmp_path: Path, link: InstrumentLink) -> Path:
    folder = tmp_path / "linked_dummy"
    folder.mkdir()
    (folder / "platform.py").write_text(LINKED_PLATFORM.format(port=link.port))
    return folder


async def test_lost_instrument_link_degrades_the_node_and_recovers(tmp_path: Path) -> None:
    link = InstrumentLink()
    link.start()
    folder = linked_platform(tmp_path, link)
    orch = LocalOrchestrator(port=0, heartbeat_interval_s=0.3)
    await orch.start()
    d = await start_node(tmp_path, orch, {"platform": str(folder)},
                         QPI_CALIBRATION_INTERVAL_S="1")
    try:
        ok = await run_job(orch, {"circuits": [BELL], "shots": 20})
        assert ok["success"] is True, ok
        await wait_for(lambda: heartbeats(orch)[-1]["status"] == "idle", what="idle")

        link.stop()
        lost = await run_job(orch, {"circuits": [BELL], "shots": 20})
        assert lost["error_code"] == "JOB_FAILED"
        assert "lost the connection" in lost["error"] and "resubmit" in lost["error"]
        await wait_for(lambda: heartbeats(orch)[-1]["status"] == "degraded",
                       what="a degraded heartbeat")
        assert "linked_dummy" in str(heartbeats(orch)[-1]["degraded_reason"])
        while_down = await run_job(orch, {"circuits": [BELL], "shots": 20})
        assert while_down["error_code"] == "JOB_FAILED" and "not run" in while_down["error"]

        link.start()
        await wait_for(lambda: heartbeats(orch)[-1]["status"] == "idle", timeout=30,
                       what="the node to reconnect and turn idle")
        again = await run_job(orch, {"circuits": [BELL], "shots": 20})
        assert again["success"] is True, again
        assert sum(again["counts"].values()) == 20
    finally:
        link.stop()
        assert d.stop() == 0, d.output()
        await orch.stop()


# -- the executor alone ------------------------------------------------------------------


def test_unreachable_instruments_at_start_mean_degraded_not_dead(tmp_path: Path) -> None:
    link = InstrumentLink()  # not listening yet
    executor = QibolabExecutor({"platform": str(linked_platform(tmp_path, link))})
    try:
        assert "linked_dummy" in (executor.health() or "")  # tried again, still down
        with pytest.raises(JobError) as down:
            run_direct(executor, BELL)
        assert down.value.code == ErrorCode.JOB_FAILED and "not run" in str(down.value)
        link.start()
        assert executor.health() is None
        assert sum(run_direct(executor, BELL, 30).experiments[0].counts.values()) == 30
    finally:
        link.stop()
        executor.close()


def test_mid_circuit_measurement_and_limits_are_refused() -> None:
    executor = QibolabExecutor({"platform": "dummy", "max_sequence_ns": 1500})
    with pytest.raises(JobError) as mid:
        run_direct(executor, 'OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[1];\ncreg c[1];\n'
                   "measure q[0] -> c[0];\nx q[0];\nmeasure q[0] -> c[0];\n")
    assert mid.value.code == ErrorCode.CIRCUIT_INVALID and "after it was measured" in str(mid.value)
    with pytest.raises(JobError) as long:
        run_direct(executor, BELL)  # the dummy's readout alone lasts 2000 ns
    assert long.value.code == ErrorCode.QUOTA_EXCEEDED and "1500 ns" in str(long.value)
    executor.close()


def test_a_delay_lengthens_the_pulse_sequence() -> None:
    executor = QibolabExecutor({"platform": "dummy"})
    plain = 'OPENQASM 3.0;\ninclude "stdgates.inc";\nqubit[1] q;\nbit[1] c;\nx q[0];\n' \
        "c[0] = measure q[0];\n"
    delayed = plain.replace("x q[0];\n", "x q[0];\ndelay[300ns] q[0];\n")
    lengths = [run_direct(executor, src).experiments[0].extra["sequence_duration_ns"]
               for src in (plain, delayed)]
    assert lengths[1] - lengths[0] == pytest.approx(300.0)
    executor.close()


def test_unknown_platform_names_the_places_searched() -> None:
    with pytest.raises(ValueError, match="emulated_2q"):
        QibolabExecutor({"platform": "no_such_chip"})
    with pytest.raises(ValueError, match="needs the option 'platform'"):
        QibolabExecutor({})
    # The same refusal as every executor's (executors.base), naming what it knows.
    with pytest.raises(OptionError, match=r"unknown option\(s\) 'max_shot' for executor "
                       r"'qibolab'; it knows: .*max_shots"):
        QibolabExecutor({"platform": "dummy", "max_shot": 10})


def test_platform_leaves_the_signal_handlers_alone() -> None:
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    executor = QibolabExecutor({"platform": "dummy"})
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    executor.close()


def test_heartbeat_calibration_drives_an_aer_twin(tmp_path: Path) -> None:
    """What a QPU node reports is what an Aer node needs to mimic it."""
    snapshot = QibolabExecutor({"platform": "emulated_2q"}).calibration()
    assert snapshot is not None
    (tmp_path / "snapshot.json").write_text(json.dumps(snapshot))
    twin = AerExecutor({"seed": 1, "noise_calibration": str(tmp_path / "snapshot.json")})
    assert twin.capabilities().max_qubits == 2
    figures = twin.calibration()
    assert figures is not None and figures["timestamp"] == snapshot["timestamp"]
    assert figures["qubits"]["1"]["t1_ns"] == 25_000.0
    assert figures["pairs"]["0-1"]["duration_ns"] == 44.0
    job = Job("j", (Experiment(parse_qasm(BELL), 4000),))
    counts = twin.run(job).experiments[0].counts
    assert counts.get("00", 0) + counts.get("11", 0) > 0.97 * 4000


@pytest.mark.parametrize("platform", ["emulated_2q", "dummy"])
def test_emulator_and_dummy_platforms_say_they_simulate(platform: str) -> None:
    """QCOS's `simulated` (and anything else that asks) must not call an emulator
    hardware: the capabilities say which instruments play the pulses, and what that is."""
    executor = QibolabExecutor({"platform": platform})
    try:
        extra = executor.capabilities().extra
        assert extra["simulated"] is True, extra["instruments"]
    finally:
        executor.close()
