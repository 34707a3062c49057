"""An emulated OQC QCaaS server (the legacy REST API the `oqc-qcaas-sdk` speaks), written
from the SDK's documented contract for the tests of the `oqc` executor: discovery
(/admin/version, /admin/qpu), task ids created ahead (POST /tasks), batch submit
(/tasks/submit), polling (/tasks/{id}/all_info), cancel (/tasks/cancel_many), and errors.

It runs circuits on Aer and answers as QCaaS does: counts per classical register, each
register counted on its own, `c[0]` first, leading zeros stripped. Tests steer it: hold
tasks in the queue, fail or refuse circuits, lose a submit's answer, expire the token.
It counts every submit of every task, so a test can show none was submitted twice."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

QPU_ID = "qpu:uk:3:emulated"
TOKEN = "emulated-qcaas-token"
FEATURES = {"Maximum Shots": 10_000, "Qubit Count": 8}


@dataclass
class Task:
    task_id: str
    status: str = "CREATED"
    program: str = ""
    shots: int = 0
    results: dict[str, dict[str, int]] | None = None
    error: dict[str, Any] | None = None


@dataclass
class QcaasEmulator:
    token: str = TOKEN
    tasks: dict[str, Task] = field(default_factory=dict)
    submits: Counter[str] = field(default_factory=Counter)  # task id -> times submitted
    cancels: list[str] = field(default_factory=list)
    hold: bool = False  # submitted tasks stay queued until `release()`
    fail_marker: str = "rz(0.111)"  # a program with this gate fails on the "QPU"
    reject_marker: str = "rz(0.222)"  # a submit with such a program gets a 400
    lose_submit_answers: int = 0  # the next N submits are accepted, then answered 502
    url: str = ""
    _loop: asyncio.AbstractEventLoop | None = None
    _runner: web.AppRunner | None = None
    _thread: threading.Thread | None = None

    # -- what tests call ----------------------------------------------------------------------

    def start(self) -> QcaasEmulator:
        ready = threading.Event()

        def serve() -> None:
            loop = self._loop = asyncio.new_event_loop()
            loop.run_until_complete(self._serve())
            ready.set()
            loop.run_forever()

        self._thread = threading.Thread(target=serve, name="qcaas-emulator", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None and self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def release(self) -> None:
        """The QPU's window opens: held tasks run."""
        self._call(self._release)

    def expire_token(self, fresh: str) -> None:
        """The old token now answers 401 "expired"; only `fresh` is accepted."""
        self.token = fresh

    def statuses(self) -> Counter[str]:
        return Counter(t.status for t in list(self.tasks.values()))

    def _call(self, fn: Any) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(fn)

    # -- the server ---------------------------------------------------------------------------

    async def _serve(self) -> None:
        app = web.Application(middlewares=[self._auth])
        app.add_routes([
            web.get("/admin/version", self._version),
            web.get("/admin/qpu", self._qpus),
            web.get("/admin/qpu/{qpu_id}", self._qpu),
            web.post("/tasks", self._create),
            web.post("/tasks/submit", self._submit),
            web.post("/tasks/cancel_many", self._cancel),
            web.get("/tasks/{task_id}/all_info", self._info),
        ])
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path != "/admin/version":
            given = request.headers.get("Authentication-Token")
            if given != self.token:
                detail = "token expired" if given else "no token"
                return web.json_response({"detail": detail}, status=401)
        return await handler(request)

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": "emulated-3.0"})

    async def _qpus(self, request: web.Request) -> web.Response:
        return web.json_response({"items": [{
            "id": QPU_ID, "name": "Emulated Toshiko", "url": self.url, "active": True,
            "feature_set": json.dumps(FEATURES)}]})

    async def _qpu(self, request: web.Request) -> web.Response:
        if request.match_info["qpu_id"] != QPU_ID:
            return web.json_response({"detail": "no such QPU"}, status=404)
        return web.json_response({"id": QPU_ID, "feature_set": json.dumps(FEATURES)})

    async def _create(self, request: web.Request) -> web.Response:
        body = await request.json()
        ids = [str(uuid.uuid4()) for _ in range(int(body["task_count"]))]
        for task_id in ids:
            self.tasks[task_id] = Task(task_id)
        return web.json_response(ids)

    async def _submit(self, request: web.Request) -> web.Response:
        from compiler_config.config import CompilerConfig

        body = await request.json()
        entries = body["tasks"]
        if any(self.reject_marker in e["program"] for e in entries):
            return web.json_response({"detail": "program rejected by the compiler"},
                                     status=400)
        for entry in entries:
            task = self.tasks.get(entry.get("task_id") or "")
            if task is None or task.status != "CREATED":
                return web.json_response({"detail": f"task {entry.get('task_id')} cannot be "
                                          "submitted again"}, status=409)
        for entry in entries:
            task = self.tasks[entry["task_id"]]
            self.submits[task.task_id] += 1
            task.program = entry["program"]
            task.shots = CompilerConfig.create_from_json(entry["config"]).repeats
            task.status = "SUBMITTED"
            if not self.hold:
                self._run(task)
        if self.lose_submit_answers > 0:
            self.lose_submit_answers -= 1
            return web.json_response({"detail": "bad gateway"}, status=502)
        return web.json_response([{"task_id": e["task_id"]} for e in entries])

    async def _cancel(self, request: web.Request) -> web.Response:
        for task_id in (await request.json())["tasks"]:
            self.cancels.append(task_id)
            task = self.tasks.get(task_id)
            if task is not None and task.status in ("CREATED", "SUBMITTED", "RUNNING"):
                task.status = "CANCELLED"
        return web.json_response("OK")

    async def _info(self, request: web.Request) -> web.Response:
        task = self.tasks.get(request.match_info["task_id"])
        if task is None:
            return web.json_response({"detail": "no such task"}, status=404)
        return web.json_response({"status": task.status, "results": task.results,
                                  "task_error": task.error, "metadata": {}})

    def _release(self) -> None:
        self.hold = False
        for task in self.tasks.values():
            if task.status == "SUBMITTED":
                self._run(task)

    def _run(self, task: Task) -> None:
        if self.fail_marker in task.program:
            task.status = "FAILED"
            task.error = {"error_code": 1107, "error_message": "qubit 0 lost calibration"}
            return
        task.results = _run_on_aer(task.program, task.shots)
        task.status = "COMPLETED"


def _run_on_aer(program: str, shots: int) -> dict[str, dict[str, int]]:
    """Counts as QCaaS gives them: per register, counted on its own, c[0] first, without
    leading zeros."""
    from qiskit import qasm2, transpile
    from qiskit_aer import AerSimulator

    circuit = qasm2.loads(program)
    sim = AerSimulator()
    counts = sim.run(transpile(circuit, sim), shots=shots, seed_simulator=7).result().get_counts()
    out: dict[str, dict[str, int]] = {}
    for key, count in counts.items():
        parts = key.split(" ")[::-1]  # Qiskit lists registers last first
        for creg, part in zip(circuit.cregs, parts, strict=True):
            oqc = part[::-1].lstrip("0") or "0"  # c[0] first, leading zeros stripped
            register = out.setdefault(creg.name, {})
            register[oqc] = register.get(oqc, 0) + count
    return out
