"""The real QPI server (`../shared/qpi-server/qpi`, the public sopherapps/qpi orchestrator)
for integration tests and benchmarks: started in a loopback-only network namespace of
its own, provisioned through its HTTP API, and read back from its own records and log.

The server binds 0.0.0.0:8090 and its NNG ports whatever its flags say, so it runs in a
namespace held by a sleeping process (`unshare -n`); the server and the daemon enter it
with `nsenter`, and this process talks HTTP from threads that entered it (`os.setns`).
Nothing here waits on a fixed sleep: every wait polls something the server reports."""

from __future__ import annotations

import collections
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import requests

from tests.conftest import wait_until

ROOT = Path(__file__).resolve().parent.parent
ADMIN = ("admin@example.com", "supersecretpassword1234")
USER = ("user@example.com", "userpassword123456")
BASE = "http://127.0.0.1:8090"
USER_SECONDS = 1_000_000.0

T = TypeVar("T")


def server_binary() -> Path:
    return Path(os.environ.get("QPI_SERVER_BIN") or ROOT.parent / "shared/qpi-server/qpi")


def unavailable() -> str | None:
    """Why the real server cannot run here, or None."""
    binary = server_binary()
    if not os.access(binary, os.X_OK):
        return (f"the real QPI server is not at {binary} (it ships in ../shared beside the "
                "project's checkout; QPI_SERVER_BIN names another)")
    for tool in ("unshare", "nsenter", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed: the real server needs a network namespace"
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        return ("cannot create a network namespace for the real server (unshare -n: "
                f"{probe.stderr.decode(errors='replace').strip()}); it needs root")
    return None


class Namespace:
    """A loopback-only network namespace, held by a sleeping process until `close`."""

    def __init__(self) -> None:
        self._holder = subprocess.Popen(
            ["unshare", "-n", "sh", "-c", "ip link set lo up && echo up && exec sleep infinity"],
            stdout=subprocess.PIPE)
        assert self._holder.stdout is not None
        if self._holder.stdout.readline().strip() != b"up":
            raise RuntimeError("the network namespace did not come up")
        self.path = f"/proc/{self._holder.pid}/ns/net"
        self._pool = ThreadPoolExecutor(4, initializer=self._enter, thread_name_prefix="netns")

    def _enter(self) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.setns(fd, os.CLONE_NEWNET)
        finally:
            os.close(fd)

    def prefix(self) -> list[str]:
        """Prepended to a command line, runs it inside the namespace."""
        return ["nsenter", f"--net={self.path}", "--"]

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` on a thread inside the namespace (its sockets are made
        there)."""
        return self._pool.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._holder.kill()
        self._holder.wait()


@dataclass(frozen=True)
class Provisioned:
    qpu_id: str
    driver_id: str
    driver_token: str
    ca_fingerprint: str
    qpi_addr: str
    user_id: str
    api_token: str


class QpiServer:
    """One server process on `workdir` (its data and TLS files); `restart` keeps both."""

    def __init__(self, ns: Namespace, workdir: Path, **flags: str) -> None:
        self.ns = ns
        self.workdir = workdir
        self.flags = flags
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "qpi-server.log"
        self._admin: dict[str, str] = {}
        workdir.mkdir(parents=True, exist_ok=True)

    # -- process ------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        binary = str(server_binary())
        if not (self.workdir / "pb_data").exists():
            subprocess.run([binary, "superuser", "upsert", *ADMIN, "--dir", "./pb_data"],
                           cwd=self.workdir, check=True, capture_output=True)
        args = [f"--{name.replace('_', '-')}={value}" for name, value in self.flags.items()]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*self.ns.prefix(), binary, "serve", "--dir", "./pb_data", "--dev=false", *args],
                cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT)
        wait_until(self._healthy, timeout, "the QPI server to answer /api/health")
        self._admin = {}

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"the QPI server exited {self.proc.returncode}:\n{self.log()}")
        try:
            return self.ns.call(requests.get, f"{BASE}/api/health", timeout=2).ok
        except requests.ConnectionError:
            return False

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- HTTP ---------------------------------------------------------------------------

    def http(self, method: str, path: str, *, headers: dict[str, str] | None = None,
             **kwargs: Any) -> Any:
        """One request inside the namespace; the JSON reply (raises on an HTTP error)."""
        def go() -> Any:
            resp = requests.request(method, BASE + path, headers=headers, timeout=30, **kwargs)
            if not resp.ok:
                raise requests.HTTPError(f"{method} {path}: {resp.status_code} {resp.text}",
                                         response=resp)
            return resp.json() if resp.content else None
        return self.ns.call(go)

    def admin(self, method: str, path: str, **kwargs: Any) -> Any:
        if not self._admin:
            reply = self.http("POST", "/api/collections/_superusers/auth-with-password",
                              json={"identity": ADMIN[0], "password": ADMIN[1]})
            self._admin = {"Authorization": reply["token"]}
        return self.http(method, path, headers=self._admin, **kwargs)

    def provision(self, qubits: int = 8) -> Provisioned:
        """A QPU, its driver, and a user with QPU time and an API token."""
        qpu = self.admin("POST", "/api/op/qpus/create",
                         json={"name": f"qpu-{time.monotonic_ns()}", "num_qubits": qubits})
        driver = self.admin("POST", "/api/op/drivers/create", json={
            "name": "qpi-driver-under-test", "qpu": qpu["id"], "kind": "qiskit_aer",
            "language": "python"})
        user = self.http("POST", "/api/collections/users/records", json={
            "email": USER[0], "password": USER[1], "passwordConfirm": USER[1]})
        self.admin("PATCH", f"/api/collections/users/records/{user['id']}",
                   json={"qpu_seconds": USER_SECONDS})
        auth = self.http("POST", "/api/collections/users/auth-with-password",
                         json={"identity": USER[0], "password": USER[1]})
        token = self.http("POST", "/api/tokens", headers={"Authorization": auth["token"]},
                          json={"name": "tests"})
        return Provisioned(qpu["id"], driver["id"], driver["token"],
                           driver["ca_fingerprint"], driver["qpi_addr"], user["id"],
                           token["token"])

    def records(self, collection: str, filter_: str = "",
                fields: str = "") -> list[dict[str, Any]]:
        """Every record of a collection (as admin), page by page."""
        out: list[dict[str, Any]] = []
        page = 1
        while True:
            params: dict[str, Any] = {"page": page, "perPage": 500, "skipTotal": 1}
            if filter_:
                params["filter"] = filter_
            if fields:
                params["fields"] = fields
            items = self.admin("GET", f"/api/collections/{collection}/records",
                               params=params)["items"]
            out.extend(items)
            if len(items) < 500:
                return out
            page += 1

    def jobs(self, ids: set[str] | None = None) -> dict[str, dict[str, Any]]:
        jobs = {r["id"]: r for r in self.records("quantum_jobs")}
        return jobs if ids is None else {i: jobs[i] for i in ids if i in jobs}

    def unfinished(self) -> int:
        """Jobs still pending or running: a small query, cheap enough to poll under load
        (the server serves every record it lists out of the same CPU it runs jobs on)."""
        return len(self.records("quantum_jobs", "status = 'pending' || status = 'running'",
                                fields="id"))

    def user_seconds(self, user_id: str) -> float:
        return float(self.admin("GET", f"/api/collections/users/records/{user_id}")
                     ["qpu_seconds"])

    def toggle_driver(self, driver_id: str, enabled: bool) -> None:
        self.admin("POST", "/api/op/drivers/toggle", json={"id": driver_id, "enabled": enabled})

    def driver_record(self, driver_id: str) -> dict[str, Any]:
        return dict(self.admin("GET", f"/api/collections/drivers/records/{driver_id}"))

    # -- what its log says ----------------------------------------------------------------

    def log_counts(self) -> LogCounts:
        return LogCounts.of(self.log())


@dataclass(frozen=True)
class LogCounts:
    """What the server's log says it did with the driver's events."""

    rate_limited: int  # events dropped by --event-rate-limit
    no_handler: int  # events of a type it cannot handle
    recovered: int  # jobs reset to pending by its recovery (then dispatched again)
    dispatches: collections.Counter[str]  # per job
    accepted: collections.Counter[str]  # results stored, per job

    @classmethod
    def of(cls, text: str) -> LogCounts:
        return cls(
            rate_limited=text.count("rate limit exceeded, dropping event"),
            no_handler=len(re.findall(r"dropping event \S+: no handler", text)),
            recovered=text.count("reset stale job"),
            dispatches=collections.Counter(re.findall(r"dispatched job (\w+)", text)),
            accepted=collections.Counter(re.findall(r"\] job (\w+) (?:completed|failed)",
                                                    text)),
        )

    @property
    def accepted_twice(self) -> int:
        return sum(1 for n in self.accepted.values() if n > 1)


@dataclass
class Rig:
    ns: Namespace
    server: QpiServer
    creds: Provisioned

    def daemon_env(self, base: dict[str, str]) -> dict[str, str]:
        """The daemon's environment for this server: what provisioning returned."""
        return {**base, "QPI_ADDR": self.creds.qpi_addr,
                "QPI_ACCESS_TOKEN": self.creds.driver_token,
                "QPI_CA_FINGERPRINT": self.creds.ca_fingerprint}


def rig(workdir: Path, **flags: str) -> Iterator[Rig]:
    """A started, provisioned server in its own namespace; stopped and removed after."""
    ns = Namespace()
    server = QpiServer(ns, workdir, **flags)
    try:
        server.start()
        yield Rig(ns, server, server.provision())
    finally:
        server.stop()
        ns.close()
