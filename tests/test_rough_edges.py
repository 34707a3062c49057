"""What a new user hit first (issue 13): qpi-client racing the daemon's start, Ctrl-C in
run-local.sh, `config check` without the unit's credential, a token in clear text, a
broken pipe, and the embedded orchestrator off loopback."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from qiskit import QuantumCircuit
from qpi_client import QPIClient

from driver.exits import EX_CONFIG
from driver.settings import CREDENTIAL_NAME, load_settings
from frontends.qpi import orchestrator as orchestrator_module
from frontends.qpi.orchestrator import LocalOrchestrator
from tests.conftest import ROOT, aer_max_qubits, daemon_env, start_daemon, wait_for
from tests.test_deploy_files import clean_env

FINGERPRINT = "ab" * 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- qpi-client at once after start ------------------------------------------------------


async def test_get_backend_right_after_start_gets_a_usable_record(tmp_path: Path) -> None:
    """A script starts the daemon, sees the API answer, and asks for its backend at once:
    it gets one with the executor's qubits (never num_qubits null), and runs on it."""
    env = daemon_env(tmp_path, None, QPI_LOG_FORMAT="console")
    d = start_daemon(tmp_path, env, "--executor", "aer", "--local-port", "0")
    try:
        found: list[str] = []

        def banner() -> bool:
            found[:] = re.findall(r"QPIClient\('(http://127\.0\.0\.1:\d+)'\)", d.output())
            return bool(found) or d.proc.poll() is not None

        await wait_for(banner, what="the local daemon's banner")
        assert found, d.output()
        base = found[0]
        seen: list[list[dict[str, Any]]] = []
        stop = threading.Event()

        def poll() -> None:  # what a script polling /api/qpus sees meanwhile
            while not stop.is_set():
                with urllib.request.urlopen(f"{base}/api/qpus", timeout=10) as resp:
                    seen.append(json.loads(resp.read()))
                time.sleep(0.01)

        def use_client() -> tuple[int, dict[str, int]]:
            backend = QPIClient(base).get_backend("test-node")
            qc = QuantumCircuit(2, 2)
            qc.h(0)
            qc.cx(0, 1)
            qc.measure([0, 1], [0, 1])
            return backend.num_qubits, backend.run(qc, shots=200).result(
                timeout=60, wait=0.05).get_counts()

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        try:
            num_qubits, counts = await asyncio.to_thread(use_client)
        finally:
            stop.set()
            poller.join(15)
        assert num_qubits == aer_max_qubits()  # what the aer executor registered
        assert set(counts) <= {"00", "11"} and sum(counts.values()) == 200
        # The race was run: the API answered before the driver had registered.
        assert [] in seen, "the poller never saw the window before registration"
        records = [qpu for listing in seen for qpu in listing]
        assert records, "the poller saw the QPU listed by the time it ran"
        assert all(isinstance(q["num_qubits"], int) for q in records), records[:3]
    finally:
        assert d.stop() == 0, d.output()


async def test_a_qpu_not_yet_registered_is_not_listed_and_says_so(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(orchestrator_module, "QPU_WAIT_S", 0.5)
    orch = LocalOrchestrator(port=0, driver_name="aer")
    await orch.start()
    try:
        def ask() -> tuple[Any, str]:
            listing = requests.get(f"{orch.url}/api/qpus", timeout=10).json()
            try:
                QPIClient(orch.url).get_backend("aer")
            except requests.HTTPError as exc:
                return listing, str(exc)
            return listing, "no error"

        listing, error = await asyncio.to_thread(ask)
        assert listing == []
        assert "503" in error and "has not registered yet" in error, error
    finally:
        await orch.stop()


# -- Ctrl-C in scripts/run-local.sh ------------------------------------------------------


@pytest.fixture
def venv_shim(tmp_path: Path) -> Path:
    """A stand-in for .venv (so the script installs nothing): its python and qpi-driver
    run this checkout with the test's interpreter."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    for name, command in (("python", ""), ("qpi-driver", "-m driver")):
        shim = venv / "bin" / name
        shim.write_text(f'#!/bin/sh\nexec {sys.executable} {command} "$@"\n')
        shim.chmod(0o755)
    (venv / ".qpi-installed").touch()  # newer than pyproject.toml: ensure_venv is done
    return venv


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_in_run_local_drains_once(tmp_path: Path, venv_shim: Path) -> None:
    """The terminal sends SIGINT to the foreground process group: the daemon must hear
    it once (drain), not once from the terminal and again from the script's trap."""
    port = free_port()
    env = clean_env(QPI_VENV=str(venv_shim), QPI_LOCAL_PORT=str(port),
                    QPI_DATA_DIR=str(tmp_path / "data"), QPI_METRICS_ADDR="",
                    QPI_LOG_FORMAT="json", QPI_DRIVER_NAME="local-test", PYTHONUNBUFFERED="1")
    log = tmp_path / "run-local.log"
    with log.open("wb") as out:
        # A session of its own: its process group is what a terminal's Ctrl-C signals. With
        # SIGINT as a terminal's shell leaves it: a suite run in the background (`cmd &`
        # in a script, nohup) inherits SIGINT ignored, and bash cannot trap a signal it
        # was started ignoring, so the script would never hear the Ctrl-C.
        script = subprocess.Popen(["bash", str(ROOT / "scripts/run-local.sh")], env=env,
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                  preexec_fn=_default_sigint)
    try:
        deadline = time.monotonic() + 120
        while "daemon still serving" not in log.read_text(errors="replace"):
            assert script.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.1)
        text = log.read_text(errors="replace")
        assert "completed on aer" in text, text
        os.killpg(script.pid, signal.SIGINT)  # Ctrl-C
        try:
            code = script.wait(60)
        except subprocess.TimeoutExpired:  # say where it hung: the daemon's own log
            pytest.fail("run-local.sh still running 60 s after Ctrl-C:\n"
                        + log.read_text(errors="replace")[-6000:])
    finally:
        if script.poll() is None:
            os.killpg(script.pid, signal.SIGKILL)
            script.wait()
    text = log.read_text(errors="replace")
    assert code == 0, text
    assert "stop requested: draining" in text, text
    assert "second signal" not in text, text
    assert '"event": "stopped"' in text, text
    with socket.socket() as probe:  # the daemon is gone, its port free again
        assert probe.connect_ex(("127.0.0.1", port)) != 0


# -- config check without the unit's credential ------------------------------------------


def _check(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "driver", "config", "check", *args],
                          env=clean_env(**env), capture_output=True, text=True, timeout=120,
                          check=False)


def test_config_check_passes_without_the_units_credential(tmp_path: Path) -> None:
    config = tmp_path / "driver.toml"
    config.write_text('orchestrator_url = "https://qpi.example.org"\n'
                      f'ca_fingerprint = "{FINGERPRINT}"\nexecutor = "aer"\n')
    done = _check(str(config))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["access_token"] is None
    report = done.stderr
    assert f"{config} is valid" in report
    assert re.search(rf"from config file {re.escape(str(config))}: .*orchestrator_url", report)
    assert "provided at start, not checked here" in report
    assert "access_token: not in this shell" in report and CREDENTIAL_NAME in report
    assert "LoadCredential=" in report and "data_dir: not set" in report
    # Outside systemd the token is required, and --strict says so.
    strict = _check("--strict", str(config))
    assert strict.returncode == EX_CONFIG and "access_token is required" in strict.stderr
    # With the credential present (as under systemd), it is named as the token's source.
    (tmp_path / CREDENTIAL_NAME).write_text("a-token\n")
    with_cred = _check(str(config), CREDENTIALS_DIRECTORY=str(tmp_path))
    assert with_cred.returncode == 0, with_cred.stderr
    assert f"from credential {CREDENTIAL_NAME}" in with_cred.stderr
    assert json.loads(with_cred.stdout)["access_token"] == "********"
    assert "a-token" not in with_cred.stdout + with_cred.stderr
    # What is invalid still fails, naming the key and the file.
    config.write_text(config.read_text() + "max_shots = -1\n")
    bad = _check(str(config))
    assert bad.returncode == EX_CONFIG and "max_shots" in bad.stderr and str(config) in bad.stderr


# -- the token in clear text -------------------------------------------------------------


@pytest.mark.parametrize(("url", "warns"), [
    ("http://qpi.example.org:8080", True), ("http://10.1.2.3", True),
    ("https://qpi.example.org", False), ("http://127.0.0.1:8090", False),
    ("http://localhost:8090", False), ("http://[::1]:8090", False),
])
def test_cleartext_token_warning(url: str, warns: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("QPI_") or key == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(key)
    settings = load_settings({"orchestrator_url": url, "ca_fingerprint": FINGERPRINT},
                             token_elsewhere=True)
    warning = settings.cleartext_token_warning()
    assert (warning is not None) == warns
    if warning:
        assert "clear text" in warning and url in warning and "https://" in warning


async def test_daemon_warns_once_about_a_cleartext_token(tmp_path: Path) -> None:
    # A network namespace of its own with no interface up: TEST-NET-1 is unreachable at
    # once, and no packet leaves this machine, while the daemon keeps retrying.
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -n (a network namespace, as root) is not available here")
    env = daemon_env(tmp_path, None, QPI_ADDR="http://192.0.2.1:9", QPI_ACCESS_TOKEN="t0k3n",
                     QPI_CA_FINGERPRINT=FINGERPRINT, QPI_CONNECT_TIMEOUT_S="0.5")
    d = start_daemon(tmp_path, env, prefix=["unshare", "-n"])
    try:
        # Several registration attempts: a warning per attempt would show by then.
        await wait_for(lambda: len(d.logged("orchestrator not reachable")) >= 3
                       or d.proc.poll() is not None, what="three registration attempts")
        assert d.proc.poll() is None, d.output()
        lines = [json.loads(line) for line in d.output().splitlines() if "clear text" in line]
        assert len(lines) == 1, d.output()
        assert lines[0]["level"] == "warning" and "192.0.2.1" in lines[0]["event"]
        assert "t0k3n" not in d.output()
    finally:
        d.stop()


# -- a reader that goes away (`| head`) --------------------------------------------------


class _Qpus(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps([{"name": f"qpu{i}", "status": "online", "num_qubits": 5}
                           for i in range(50)]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def qpus_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Qpus)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


@pytest.mark.parametrize("unbuffered", ["1", ""], ids=["unbuffered", "buffered"])
@pytest.mark.parametrize("command", ["--version", "--help", "config check", "store check",
                                     "status"])
def test_printing_commands_end_quietly_on_a_broken_pipe(command: str, unbuffered: str,
                                                        tmp_path: Path, qpus_server: str) -> None:
    args = command.split()
    if command == "config check":
        config = tmp_path / "driver.toml"
        config.write_text('executor = "aer"\n')
        args.append(str(config))
    elif command == "store check":
        args += ["--data-dir", str(tmp_path)]
        (tmp_path / "results.sqlite3").write_bytes(b"")  # an empty, healthy store
    elif command == "status":
        args += ["--url", qpus_server]
    read, write = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "driver", *args], stdout=write,
                            stderr=subprocess.PIPE, env=clean_env(PYTHONUNBUFFERED=unbuffered),
                            text=True)
    os.close(write)
    os.close(read)  # the reader is gone before the command prints anything
    _, err = proc.communicate(timeout=120)
    # argparse itself swallows a failed write of --help/--version; a buffered one fails
    # at our flush. Either way: quiet, and 141 wherever the failure reaches us.
    swallowed = command.startswith("--") and unbuffered
    assert proc.returncode == (0 if swallowed else 141), err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert "Exception ignored" not in err, err


# -- the embedded orchestrator off loopback ----------------------------------------------


@pytest.mark.parametrize(("host", "loud"), [("127.0.0.1", False), ("0.0.0.0", True)])
def test_embedded_orchestrator_off_loopback_says_so(host: str, loud: bool) -> None:
    assert load_settings({}, token_elsewhere=True).local_host == "127.0.0.1"  # unless asked
    proc = subprocess.Popen([sys.executable, "-m", "driver", "orchestrator", "--host", host,
                             "--port", "0"], env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed once it listens
        assert "QPI_ADDR" in line, line
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    warned = "no authentication" in err and "submit jobs" in err
    assert warned == loud, err
