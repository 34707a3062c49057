"""The sd_notify client against a notify socket the test owns, and the real daemon
reporting READY, STATUS, watchdog pings and STOPPING to it as systemd would see them."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import struct
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from driver.sdnotify import Notifier
from tests.circuits import BELL
from tests.conftest import Daemon, daemon_env, start_daemon


@dataclass
class Message:
    fields: dict[str, str]
    pid: int  # the sender, as the kernel vouches for it (what NotifyAccess=main checks)
    received: float


class NotifySocket:
    """What systemd's end of $NOTIFY_SOCKET sees: datagrams with their sender's pid."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.messages: list[Message] = []

    def receive(self, timeout: float) -> Message | None:
        self.sock.settimeout(timeout)
        try:
            data, ancdata, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except TimeoutError:
            return None
        pid = 0
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("iII", payload[:12])[0]
        fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
        message = Message(fields, pid, time.monotonic())
        self.messages.append(message)
        return message

    def wait_for(self, key: str, timeout: float, what: str) -> Message:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            message = self.receive(left)
            if message is not None and key in message.fields:
                return message
        raise AssertionError(f"no {key} within {timeout}s ({what}); got {self.messages}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_path(tmp_path: Path) -> Iterator[Path]:
    # sun_path holds 107 bytes; a long pytest tmp path would not fit.
    path = tmp_path / "notify.sock"
    if len(os.fsencode(path)) < 100:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="qpi-") as short:
        yield Path(short) / "notify.sock"


@pytest.fixture
def listener(notify_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(str(notify_path))
    try:
        yield sock
    finally:
        sock.close()


# -- Notifier against a socket the test owns ------------------------------------------


def test_messages_arrive_as_systemd_reads_them(notify_path: Path,
                                               listener: NotifySocket) -> None:
    notifier = Notifier(str(notify_path))
    assert notifier.enabled
    assert notifier.ready("serving jobs on aer")
    assert notifier.status("reconnecting\nto orchestrator")
    assert notifier.watchdog()
    assert notifier.extend_timeout(2.5)
    assert notifier.stopping("draining 1 running job")
    got = [listener.receive(5) for _ in range(5)]
    assert [m.fields if m else None for m in got] == [
        {"READY": "1", "STATUS": "serving jobs on aer"},
        {"STATUS": "reconnecting to orchestrator"},  # a newline would start a bogus field
        {"WATCHDOG": "1"},
        {"EXTEND_TIMEOUT_USEC": "2500000"},
        {"STOPPING": "1", "STATUS": "draining 1 running job"},
    ]
    assert all(m is not None and m.pid == os.getpid() for m in got)
    notifier.close()


def test_reloading_carries_the_monotonic_clock(notify_path: Path,
                                               listener: NotifySocket) -> None:
    notifier = Notifier(str(notify_path))
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.ready()
    reloading, ready = listener.receive(5), listener.receive(5)
    assert reloading is not None and ready is not None
    assert reloading.fields["RELOADING"] == "1"
    assert before <= int(reloading.fields["MONOTONIC_USEC"]) <= after
    assert ready.fields == {"READY": "1"}


def test_abstract_namespace_socket() -> None:
    name = f"qpi-driver-test-{os.getpid()}-{time.monotonic_ns()}"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        receiver.bind("\0" + name)
        receiver.settimeout(5)
        assert Notifier.from_environ({"NOTIFY_SOCKET": "@" + name}).ready("up")
        assert receiver.recv(4096) == b"READY=1\nSTATUS=up"
    finally:
        receiver.close()


def test_unset_socket_is_a_silent_no_op() -> None:
    notifier = Notifier.from_environ({})
    assert not notifier.enabled
    assert notifier.ready("x") is False
    assert notifier.watchdog() is False
    assert notifier.watchdog_interval() is None
    asyncio.run(asyncio.wait_for(notifier.run_watchdog(), 5))  # returns at once


def test_nobody_listening_does_not_raise(tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "gone.sock"))
    assert notifier.enabled
    assert notifier.ready("x") is False


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({"WATCHDOG_USEC": "400000"}, 0.2),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_the_period_for_this_process(
    environ: dict[str, str], interval: float | None
) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": "/run/systemd/notify", **environ})
    assert notifier.watchdog_interval() == interval


def test_environment_is_read_once(monkeypatch: pytest.MonkeyPatch) -> None:
    environ = {"NOTIFY_SOCKET": "/nonexistent/notify", "WATCHDOG_USEC": "400000"}
    notifier = Notifier.from_environ(environ)
    environ.clear()
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert notifier.enabled and notifier.watchdog_interval() == 0.2


async def test_watchdog_pings_come_from_the_event_loop(notify_path: Path,
                                                       listener: NotifySocket) -> None:
    notifier = Notifier(str(notify_path), watchdog_usec=100_000)
    listener.sock.setblocking(False)
    task = asyncio.create_task(notifier.run_watchdog())
    try:
        # Not a thread: nothing is sent until the loop runs the task.
        with pytest.raises(BlockingIOError):
            listener.sock.recv(4096)
        loop = asyncio.get_running_loop()
        pings = [await asyncio.wait_for(loop.sock_recv(listener.sock, 4096), 10)
                 for _ in range(3)]
        assert pings == [b"WATCHDOG=1"] * 3
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# -- the real daemon ----------------------------------------------------------------


def _submit_and_wait(url: str, timeout: float = 60.0) -> dict[str, object]:
    body = json.dumps({"circuits": [{"circuit": BELL}], "shots": 100}).encode()
    req = urllib.request.Request(f"{url}/api/jobs", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        job = json.loads(resp.read())
    deadline = time.monotonic() + timeout
    while job["status"] not in ("completed", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"job not finished: {job}"
        time.sleep(0.05)
        with urllib.request.urlopen(f"{url}/api/jobs/{job['id']}", timeout=30) as resp:
            job = json.loads(resp.read())
    return job


def test_daemon_reports_its_life_to_systemd(tmp_path: Path, notify_path: Path,
                                             listener: NotifySocket) -> None:
    env = daemon_env(tmp_path, None, NOTIFY_SOCKET=str(notify_path), WATCHDOG_USEC="400000",
                     QPI_DATA_DIR=str(tmp_path / "data"))
    env.pop("WATCHDOG_PID", None)  # the runner's own, if pytest itself runs under systemd
    daemon: Daemon = start_daemon(tmp_path, env, "--executor", "aer", "--local-port", "0",
                                  "--metrics-addr", "")
    try:
        try:
            ready = listener.wait_for("READY", 60, "once registered and serving")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\ndaemon output:\n{daemon.output()}") from None
        assert daemon.proc.poll() is None, daemon.output()
        assert ready.pid == daemon.proc.pid, "NotifyAccess=main accepts only the main pid"
        assert any("STATUS" in m.fields for m in listener.messages), listener.messages

        # READY means serving: a job submitted now completes.
        found = re.search(r"embedded orchestrator .* on (http://[^\s,]+)", daemon.output())
        assert found, daemon.output()
        job = _submit_and_wait(found.group(1))
        assert job["status"] == "completed", job

        # Pings at WATCHDOG_USEC/2 = 0.2 s: about 10 in 2 s. The bounds only tell
        # "pinging at about that rate" from "not pinging" and "pinging in a busy loop".
        start = time.monotonic()
        while (left := start + 2.0 - time.monotonic()) > 0:
            listener.receive(left)
        pings = [m for m in listener.messages
                 if "WATCHDOG" in m.fields and m.received >= start]
        assert 4 <= len(pings) <= 40, [m.fields for m in listener.messages[-50:]]
        assert all(m.fields["WATCHDOG"] == "1" and m.pid == daemon.proc.pid for m in pings)

        sent_at = len(listener.messages)
        daemon.proc.send_signal(signal.SIGTERM)
        listener.wait_for("STOPPING", 60, "after SIGTERM")
        assert not any("STOPPING" in m.fields for m in listener.messages[:sent_at])
        assert daemon.proc.wait(60) == 0, daemon.output()
    finally:
        daemon.stop()
