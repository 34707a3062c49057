"""Prometheus metrics and the health endpoints (/metrics, /healthz, /readyz),
served by one small aiohttp app on `metrics_addr`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    gc_collector,
    generate_latest,
    platform_collector,
    process_collector,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, float("inf"))


class Metrics:
    """Every metric the daemon exports, on a registry of its own."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        process_collector.ProcessCollector(registry=r)
        platform_collector.PlatformCollector(registry=r)
        gc_collector.GCCollector(registry=r)
        self.jobs = Counter("qpi_jobs", "Jobs finished, by outcome (ok or error code)",
                            ["outcome", "executor"], registry=r)
        self.circuits = Counter("qpi_circuits_executed", "Experiments executed",
                                ["executor"], registry=r)
        self.shots = Counter("qpi_shots_executed", "Shots executed", ["executor"], registry=r)
        self.queue_wait = Histogram("qpi_job_queue_wait_seconds",
                                    "Time from receipt to the start of execution (or to "
                                    "the refusal of a circuit that does not parse)",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.execution = Histogram("qpi_job_execution_seconds",
                                   "Time in the executor per batch of jobs",
                                   buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("qpi_queue_depth", "Jobs waiting to run", registry=r)
        self.connected = Gauge("qpi_orchestrator_connected",
                               "1 while registered with pipes attached", registry=r)
        self.reconnects = Counter("qpi_reconnects", "Registrations after the first",
                                  registry=r)
        self.frames = Counter("qpi_frames_received", "Inbound frames by event type",
                              ["type"], registry=r)
        self.malformed = Counter("qpi_frames_malformed", "Inbound frames that were dropped",
                                 registry=r)
        self.pending = Gauge("qpi_results_pending_delivery", "Results owed to the orchestrator",
                             registry=r)
        self.pending_age = Gauge("qpi_results_pending_oldest_seconds",
                                 "How long the oldest result owed has waited to go out "
                                 "(0 when none): a backlog behind the orchestrator's rate "
                                 "limit or a lost connection", registry=r)
        self.intake_held = Gauge("qpi_intake_held",
                                 "1 while the node holds off reading dispatches (its queue "
                                 "or store is full and the orchestrator takes no refusals)",
                                 registry=r)
        self.duplicates = Counter("qpi_duplicate_dispatches",
                                  "Dispatches of a job already in hand or answered",
                                  registry=r)
        self.heartbeats = Counter("qpi_heartbeats_sent", "Heartbeat events sent", registry=r)
        self.worker_restarts = Counter("qpi_worker_restarts", "Executor process restarts",
                                       registry=r)
        self.executor_info = Info("qpi_executor", "The executor and its device", registry=r)
        self.node_status = Gauge("qpi_node_status",
                                 "1 for the node's current status (idle, busy, draining, "
                                 "degraded), 0 for the others", ["status"], registry=r)
        self.ready = Gauge("qpi_node_ready", "1 while /readyz answers ready", registry=r)
        self.parse = Histogram("qpi_job_parse_seconds",
                               "Time to parse and check every circuit of a job",
                               buckets=_LATENCY_BUCKETS, registry=r)
        self.store_writable = Gauge("qpi_result_store_writable",
                                    "1 while results can be made durable, 0 while the "
                                    "store refuses writes (e.g. disk full)", registry=r)
        # Per front end (the orchestrators the node serves: qpi, qcos)
        self.frontend_jobs = Counter("qpi_frontend_jobs", "Jobs finished, by the front end "
                                     "they came from and outcome", ["frontend", "outcome"],
                                     registry=r)
        self.frontend_queue = Gauge("qpi_frontend_queue_depth", "Jobs waiting to run, by "
                                    "front end", ["frontend"], registry=r)
        self.frontend_up = Gauge("qpi_frontend_up", "1 while the front end serves (QPI: "
                                 "connected; QCOS: sockets bound)", ["frontend"], registry=r)
        self.frontend_requests = Counter("qpi_frontend_requests", "Requests a front end "
                                         "answered, by operation and reply code",
                                         ["frontend", "operation", "code"], registry=r)

    def add_collector(self, collector: Collector) -> None:
        self.registry.register(collector)

    def counters(self) -> dict[str, int]:
        """The heartbeat's counters, read from the metrics (counted nowhere else)."""
        ok = failed = 0
        for sample in _samples(self.jobs):
            if sample.labels["outcome"] == "ok":
                ok += int(sample.value)
            else:
                failed += int(sample.value)
        return {"jobs_ok": ok, "jobs_failed": failed,
                "duplicates": _total(self.duplicates),
                "malformed_frames": _total(self.malformed),
                "worker_restarts": _total(self.worker_restarts),
                "reconnects": _total(self.reconnects)}


def _samples(counter: Counter) -> list[Any]:
    return [s for metric in counter.collect() for s in metric.samples
            if s.name.endswith("_total")]


def _total(counter: Counter) -> int:
    return int(sum(s.value for s in _samples(counter)))


class NvmlCollector(Collector):
    """GPU memory through NVML, when a GPU and pynvml are present."""

    def __init__(self) -> None:
        import pynvml  # optional: comes with the gpu extra's CUDA stack

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._count = pynvml.nvmlDeviceGetCount()

    def collect(self) -> Any:
        used = GaugeMetricFamily("qpi_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu"])
        total = GaugeMetricFamily("qpi_gpu_memory_total_bytes", "GPU memory", labels=["gpu"])
        for i in range(self._count):
            mem = self._nvml.nvmlDeviceGetMemoryInfo(self._nvml.nvmlDeviceGetHandleByIndex(i))
            used.add_metric([str(i)], float(mem.used))
            total.add_metric([str(i)], float(mem.total))
        yield used
        yield total


def try_nvml() -> Collector | None:
    try:
        return NvmlCollector()
    except Exception:  # no pynvml, no driver, no GPU: nothing to export
        return None


class HealthServer:
    """/metrics, /healthz (the loop turns), /readyz (`ready()` gives the reasons it is not)."""

    def __init__(self, metrics: Metrics, ready: Callable[[], list[str]],
                 stall_after_s: float = 10.0) -> None:
        self._metrics = metrics
        self._ready = ready
        self._stall_after_s = stall_after_s
        self._tick = time.monotonic()
        self._runner: web.AppRunner | None = None
        self._ticker: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self, addr: str) -> None:
        host, _, port = addr.rpartition(":")
        app = web.Application()
        app.add_routes([web.get("/metrics", self._scrape), web.get("/healthz", self._healthz),
                        web.get("/readyz", self._readyz)])
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host.strip("[]") or "127.0.0.1", int(port))
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._ticker = asyncio.create_task(self._tick_forever())

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _tick_forever(self) -> None:
        while True:
            self._tick = time.monotonic()
            await asyncio.sleep(1.0)

    async def _scrape(self, _: web.Request) -> web.Response:
        body = await asyncio.to_thread(generate_latest, self._metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _: web.Request) -> web.Response:
        lag = time.monotonic() - self._tick
        if lag > self._stall_after_s:
            return web.json_response({"status": "stalled", "loop_lag_s": round(lag, 3)},
                                     status=503)
        return web.json_response({"status": "ok", "loop_lag_s": round(lag, 3)})

    async def _readyz(self, _: web.Request) -> web.Response:
        reasons = self._ready()
        if reasons:
            return web.json_response({"status": "unready", "reasons": reasons}, status=503)
        return web.json_response({"status": "ready"})
