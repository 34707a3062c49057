"""The alerting rules and the dashboard against the real thing: promtool's checks and rule
unit tests, every metric they use found in a live daemon's /metrics, and Debian's
Prometheus scraping a daemon in local mode with the rules loaded."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import types
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Daemon, daemon_env, start_daemon, wait_until

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy/prometheus/qpi-driver-rules.yml"
RULE_TESTS = ROOT / "deploy/prometheus/qpi-driver-rules.test.yml"
DASHBOARD = ROOT / "deploy/grafana/qpi-driver.json"
BELL = ROOT / "examples/bell.qasm"
JOB = "qpi-driver"  # the scrape job name the rules select on


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:  # not listening yet
        return 0, str(exc)


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (Debian: apt-get install prometheus; .ci/run "
                    "installs it where apt-get can)")
    return path


# -- a daemon in local mode, as an operator starts one ---------------------------------


@dataclass
class LocalDaemon:
    daemon: Daemon
    local_port: int
    metrics_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.local_port}"

    @property
    def metrics_target(self) -> str:
        return f"127.0.0.1:{self.metrics_port}"

    def exposition(self) -> str:
        status, text = get(f"http://{self.metrics_target}/metrics")
        assert status == 200, f"/metrics answered {status}: {text}"
        return text

    def submit_bell(self) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "driver", "submit", str(BELL), "--shots", "100",
             "--url", self.url],
            env=daemon_env(self.daemon.log_path.parent, None), capture_output=True,
            text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr + self.daemon.output()


@pytest.fixture(scope="module")
def local_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalDaemon]:
    tmp = tmp_path_factory.mktemp("local-daemon")
    local_port, metrics_port = free_port(), free_port()
    env = daemon_env(tmp, None, QPI_METRICS_ADDR=f"127.0.0.1:{metrics_port}")
    daemon = start_daemon(tmp, env, "--executor", "aer", "--local-port", str(local_port))
    node = LocalDaemon(daemon, local_port, metrics_port)
    try:
        def ready() -> bool:
            assert daemon.proc.poll() is None, f"the daemon exited:\n{daemon.output()}"
            return get(f"http://{node.metrics_target}/readyz", timeout=2)[0] == 200
        wait_until(ready, 120, "the local daemon's /readyz")
        yield node
    finally:
        code = daemon.stop()
        assert code == 0, f"the daemon exited {code}:\n{daemon.output()}"


# -- the metrics that rules and dashboard use ------------------------------------------

_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
             "group_left", "group_right", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions
    (those are followed by `(`), keywords, label names or parts of strings."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings: label values, templates
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for match in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?", expr):
        if match.group(2) is None and match.group(1).lower() not in _KEYWORDS:
            names.add(match.group(1))
    return names


def rule_expressions() -> dict[str, str]:
    rules = yaml.safe_load(RULES.read_text())
    return {rule["alert"]: rule["expr"] for group in rules["groups"] for rule in group["rules"]}


def dashboard_expressions() -> dict[str, str]:
    board = json.loads(DASHBOARD.read_text())
    out = {}
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            out[f"{panel['title']} / {target['refId']}"] = target["expr"]
    for variable in board["templating"]["list"]:
        query = variable.get("query", "")
        if variable["type"] == "query":
            # label_values(METRIC, label) names a metric too
            out[f"variable {variable['name']}"] = re.sub(r"label_values\((\w+),.*", r"\1", query)
    return out


def test_metric_name_extraction() -> None:
    assert metric_names(
        'histogram_quantile(0.95, sum by (le) (rate(qpi_x_bucket{instance=~"$i"}[5m])))'
    ) == {"qpi_x_bucket"}
    assert metric_names("increase(a_total[5m]) == 0 and b == 1") == {"a_total", "b"}
    assert metric_names('max by (instance) (up{job="x"} == 0) * on (instance) c') == {"up", "c"}


def exported_sample_names(exposition: str) -> set[str]:
    """Every sample name the exposition's families give, whether set yet or not: a
    labelled family with no child yet shows only its HELP and TYPE lines."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum",
                "_created"), "summary": ("", "_count", "_sum", "_created"), "info": ("_info",)}
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def gpu_metric_names(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """The GPU families NvmlCollector exports, scraped from the collector itself over a
    stand-in NVML with one device (NVML is there only where a GPU is)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from driver.metrics import NvmlCollector

    nvml = types.ModuleType("pynvml")
    memory = types.SimpleNamespace(used=1 << 30, total=80 << 30)
    nvml.nvmlInit = lambda: None  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetCount = lambda: 1  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetMemoryInfo = lambda handle: memory  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    registry = CollectorRegistry()
    registry.register(NvmlCollector())
    return exported_sample_names(generate_latest(registry).decode())


def test_every_metric_used_is_exported(local_daemon: LocalDaemon,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    exported = exported_sample_names(local_daemon.exposition())
    assert {"qpi_jobs_total", "qpi_queue_depth", "qpi_job_queue_wait_seconds_bucket"} <= exported
    gpu = gpu_metric_names(monkeypatch)
    assert gpu == {"qpi_gpu_memory_used_bytes", "qpi_gpu_memory_total_bytes"}, gpu
    synthesized = {"up"}  # Prometheus adds it to every target
    used = {**{f"rule {k}": v for k, v in rule_expressions().items()},
            **{f"dashboard {k}": v for k, v in dashboard_expressions().items()}}
    missing = {where: sorted(metric_names(expr) - exported - gpu - synthesized)
               for where, expr in used.items()}
    missing = {where: names for where, names in missing.items() if names}
    assert not missing, f"not exported by the daemon: {missing}"
    # Every panel and rule selects at least one metric (no typo'd expression that reads as
    # a keyword), and between them they use each family the issue asks to watch.
    assert all(metric_names(expr) for expr in used.values())
    everything = set().union(*(metric_names(expr) for expr in used.values()))
    for name in ("qpi_jobs_total", "qpi_queue_depth", "qpi_job_queue_wait_seconds_bucket",
                 "qpi_job_execution_seconds_bucket", "qpi_results_pending_delivery",
                 "qpi_reconnects_total", "qpi_worker_restarts_total", "qpi_node_status",
                 "qpi_node_ready", "qpi_orchestrator_connected", "qpi_heartbeats_sent_total",
                 "qpi_gpu_memory_used_bytes", "qpi_gpu_memory_total_bytes"):
        assert name in everything, f"neither the dashboard nor the rules use {name}"


# -- promtool ---------------------------------------------------------------------------


def test_rules_check_and_unit_tests_pass() -> None:
    promtool = tool("promtool")
    check = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(rule_expressions())} rules found" in check.stdout
    unit = subprocess.run([promtool, "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent,
                          capture_output=True, text=True, timeout=120)
    assert unit.returncode == 0, unit.stdout + unit.stderr
    # Each alert has a unit test in which it fires.
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert tested == set(rule_expressions()), set(rule_expressions()) ^ tested


def test_example_scrape_config_is_valid_and_uses_the_rules_job() -> None:
    promtool = tool("promtool")
    example = RULES.with_name("prometheus.example.yml")
    done = subprocess.run([promtool, "check", "config", example.name], cwd=example.parent,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    config = yaml.safe_load(example.read_text())
    assert [job["job_name"] for job in config["scrape_configs"]] == [JOB]
    assert config["rule_files"] == [RULES.name]


def test_exposition_passes_promtool_check_metrics(local_daemon: LocalDaemon) -> None:
    promtool = tool("promtool")
    local_daemon.submit_bell()  # labelled families get their first samples
    done = subprocess.run([promtool, "check", "metrics"], input=local_daemon.exposition(),
                          capture_output=True, text=True, timeout=60)
    # promtool prints one line per lint problem (names, units, help text) and exits 0
    # on some of them, so silence is the pass.
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), (
        done.stdout + done.stderr)


# -- a real Prometheus ------------------------------------------------------------------


@dataclass
class Prometheus:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        status, text = get(f"http://127.0.0.1:{self.port}/api/v1/{path}{query}")
        assert status == 200, f"/api/v1/{path} answered {status}: {text}"
        body = json.loads(text)
        assert body["status"] == "success", body
        return body["data"]

    def value(self, expr: str) -> float | None:
        result = self.api("query", query=expr)["result"]
        return float(result[0]["value"][1]) if result else None


@pytest.fixture
def prometheus(local_daemon: LocalDaemon, tmp_path: Path) -> Iterator[Prometheus]:
    binary = tool("prometheus")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    # Scrape and evaluate every second, so the test sees changes within seconds.
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                   "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": JOB,
                            "static_configs": [{"targets": [local_daemon.metrics_target]}]}],
    }))
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    server = Prometheus(proc, port, log)
    try:
        def ready() -> bool:
            assert proc.poll() is None, f"prometheus exited:\n{log.read_text()}"
            return get(f"http://127.0.0.1:{port}/-/ready", timeout=2)[0] == 200
        wait_until(ready, 60, "prometheus to be ready")
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_prometheus_scrapes_the_daemon_with_the_rules_loaded(
        local_daemon: LocalDaemon, prometheus: Prometheus) -> None:
    def target_up() -> bool:
        targets = prometheus.api("targets")["activeTargets"]
        return any(t["labels"]["job"] == JOB and t["health"] == "up" for t in targets)
    wait_until(target_up, 30, f"the {JOB} target to be up")
    assert prometheus.value(f'up{{job="{JOB}"}}') == 1.0

    ok_jobs = f'sum(qpi_jobs_total{{job="{JOB}", outcome="ok"}})'
    before = prometheus.value(ok_jobs) or 0.0
    shots_before = prometheus.value(f'sum(qpi_shots_executed_total{{job="{JOB}"}})') or 0.0
    for _ in range(3):
        local_daemon.submit_bell()
    wait_until(lambda: (prometheus.value(ok_jobs) or 0.0) >= before + 3, 30,
         f"Prometheus to see 3 more ok jobs than {before}")
    shots = prometheus.value(f'sum(qpi_shots_executed_total{{job="{JOB}"}})')
    assert shots is not None and shots >= shots_before + 300
    # The histograms are scraped too: the queue-wait quantile the dashboard draws exists.
    wait_p95 = prometheus.value(
        f'histogram_quantile(0.95, sum by (le) (rate(qpi_job_queue_wait_seconds_bucket'
        f'{{job="{JOB}"}}[1m])))')
    assert wait_p95 is not None
    # Every dashboard query is valid PromQL that this Prometheus runs (Grafana's
    # variables filled in as Grafana would).
    for where, expr in dashboard_expressions().items():
        if where.startswith("variable"):
            continue
        concrete = expr.replace("$instance", ".*").replace("$__rate_interval", "1m")
        prometheus.api("query", query=concrete)  # a parse error answers 400
    # The status panel reads this node as idle (1) or busy (2), and the node as ready.
    status = dashboard_expressions()["Node status / A"]
    assert prometheus.value(status.replace("$instance", ".*")) in (1.0, 2.0)
    assert prometheus.value(f'qpi_node_ready{{job="{JOB}"}}') == 1.0
    assert prometheus.value(f'qpi_result_store_writable{{job="{JOB}"}}') == 1.0

    # The rules loaded as one group, every one evaluated without an error.
    expected = set(rule_expressions())

    def evaluated() -> list[dict[str, Any]] | None:
        groups = prometheus.api("rules")["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return rules if rules and all(r.get("lastEvaluation", "").startswith("2")
                                      and r["health"] != "unknown" for r in rules) else None
    rules = wait_until(evaluated, 30, "every rule to be evaluated once")
    assert {r["name"] for r in rules} == expected
    errors = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
    assert not errors, f"rules that failed to evaluate: {errors}"
    # The node is up, connected and heartbeating, so these alerts are not even pending.
    alerts = {a["labels"]["alertname"] for a in prometheus.api("alerts")["alerts"]}
    quiet = {"QpiDriverDown", "QpiDriverDisconnected", "QpiDriverNotReady", "QpiNoHeartbeat",
             "QpiQueueGrowing", "QpiWorkerRestartingRepeatedly", "QpiResultsPendingDelivery",
             "QpiResultStoreNotWritable"}
    assert not alerts & quiet, f"alerts pending or firing on a healthy node: {alerts & quiet}"
