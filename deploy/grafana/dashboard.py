"""Generates the qpi-driver Grafana dashboard (qpi-driver.json beside this file) with
grafana-foundation-sdk. Edit this file, never the JSON: `python deploy/grafana/dashboard.py`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard as gd
from grafana_foundation_sdk.builders import prometheus, stat, statetimeline, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as dm

OUTPUT = Path(__file__).with_name("qpi-driver.json")
UID = "qpi-driver"
DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
# Every query is narrowed to the instances picked at the top of the dashboard.
SEL = 'instance=~"$instance"'
RATE = "$__rate_interval"

# qpi_node_status is one series per status, 1 for the current one; the status panel turns
# them into one number per node (idle 1, busy 2, draining 3, degraded 4) that value
# mappings name again: the largest of status * code. `or`, not `+`, so a status with no
# series yet does not blank the panel. A node Prometheus cannot scrape shows as "down".
NODE_STATUS = {"idle": ("1", "green"), "busy": ("2", "blue"), "draining": ("3", "orange"),
               "degraded": ("4", "red")}
NODE_STATUS_EXPR = "max by (instance) (" + " or ".join(
    f'qpi_node_status{{{SEL}, status="{name}"}} * {code}'
    for name, (code, _) in NODE_STATUS.items()
) + f') or max by (instance) (up{{job="qpi-driver", {SEL}}} == 0)'


def query(expr: str, legend: str, ref: str = "A") -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref)


def mapping(values: dict[str, tuple[str, str]]) -> dm.ValueMap:
    return dm.ValueMap({code: dm.ValueMappingResult(text=text, color=color)
                        for text, (code, color) in values.items()})


def series(title: str, description: str, unit: str, *targets: prometheus.Dataquery,
           width: int = 12) -> timeseries.Panel:
    panel = (timeseries.Panel().title(title).description(description).unit(unit)
             .datasource(DATASOURCE).height(8).span(width).min(0))
    for target in targets:
        panel = panel.with_target(target)
    return panel


def quantiles(metric: str) -> list[prometheus.Dataquery]:
    return [query(f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{{{SEL}}}[{RATE}])))",
                  f"p{round(q * 100)}", ref)
            for q, ref in ((0.5, "A"), (0.95, "B"), (0.99, "C"))]


def build() -> gd.Dashboard:
    status_timeline = (
        statetimeline.Panel().title("Node status")
        .description("idle, busy, draining or degraded, as the node reports it in its "
                     "heartbeats; down while Prometheus cannot scrape it")
        .datasource(DATASOURCE).height(6).span(24)
        .with_target(query(NODE_STATUS_EXPR, "{{instance}}"))
        .mappings([mapping({**NODE_STATUS, "down": ("0", "dark-red")})])
    )
    ready = (
        stat.Panel().title("Ready and connected")
        .description("/readyz answers ready; registered with the orchestrator")
        .datasource(DATASOURCE).height(6).span(12)
        .with_target(query(f"qpi_node_ready{{{SEL}}}", "{{instance}} ready", "A"))
        .with_target(query(f"qpi_orchestrator_connected{{{SEL}}}", "{{instance}} connected", "B"))
        .mappings([mapping({"no": ("0", "red"), "yes": ("1", "green")})])
    )
    executor = (
        stat.Panel().title("Executor")
        .description("the executor, its device and its qubit limit")
        .datasource(DATASOURCE).height(6).span(12)
        .with_target(query(f"qpi_executor_info{{{SEL}}}",
                           "{{instance}}: {{executor}} on {{device}}, {{max_qubits}} qubits"))
    )
    return (
        gd.Dashboard("qpi-driver").uid(UID)
        .description("QPU driver nodes: jobs, latency, delivery, the executor and the GPU")
        .tags(["qpi-driver", "qpu"]).editable().refresh("30s").time("now-6h", "now")
        .timezone("browser")
        .with_variable(gd.DatasourceVariable("datasource").label("Data source")
                       .type("prometheus"))
        .with_variable(gd.QueryVariable("instance").label("Node")
                       .datasource(DATASOURCE)
                       .query("label_values(qpi_executor_info, instance)")
                       .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
                       .sort(dm.VariableSort.ALPHABETICAL_ASC)
                       .multi(True).include_all(True))
        .with_row(gd.Row("Status"))
        .with_panel(status_timeline)
        .with_panel(ready)
        .with_panel(executor)
        .with_row(gd.Row("Jobs"))
        .with_panel(series(
            "Jobs per second by outcome",
            "Finished jobs; any outcome but ok is the error code the job failed with",
            "reqps",
            query(f"sum by (outcome) (rate(qpi_jobs_total{{{SEL}}}[{RATE}]))", "{{outcome}}")))
        .with_panel(series(
            "Queue depth", "Jobs received and waiting to run, per node", "short",
            query(f"qpi_queue_depth{{{SEL}}}", "{{instance}}")))
        .with_panel(series(
            "Queue wait", "From receipt to the start of execution", "s",
            *quantiles("qpi_job_queue_wait_seconds")))
        .with_panel(series(
            "Run time", "Time in the executor per batch of jobs", "s",
            *quantiles("qpi_job_execution_seconds")))
        .with_panel(series(
            "Parse time", "Parsing and checking every circuit of a job", "s",
            *quantiles("qpi_job_parse_seconds")))
        .with_panel(series(
            "Circuits and shots per second", "Work done by the executors", "short",
            query(f"sum(rate(qpi_circuits_executed_total{{{SEL}}}[{RATE}]))", "circuits", "A"),
            query(f"sum(rate(qpi_shots_executed_total{{{SEL}}}[{RATE}]))", "shots", "B")))
        .with_row(gd.Row("Delivery and connection"))
        .with_panel(series(
            "Results pending delivery",
            "Finished results owed to the orchestrator; kept in the result store meanwhile",
            "short", query(f"qpi_results_pending_delivery{{{SEL}}}", "{{instance}}"), width=8))
        .with_panel(series(
            "Reconnects", "Registrations after the first, per interval", "short",
            query(f"increase(qpi_reconnects_total{{{SEL}}}[{RATE}])", "{{instance}}"), width=8))
        .with_panel(series(
            "Heartbeats and frames per second", "Heartbeats sent, frames received and dropped",
            "short",
            query(f"sum by (instance) (rate(qpi_heartbeats_sent_total{{{SEL}}}[{RATE}]))",
                  "{{instance}} heartbeats", "A"),
            query(f"sum by (type) (rate(qpi_frames_received_total{{{SEL}}}[{RATE}]))",
                  "{{type}} received", "B"),
            query(f"sum(rate(qpi_frames_malformed_total{{{SEL}}}[{RATE}]))", "malformed", "C"),
            width=8))
        .with_panel(series(
            "Oldest result owed",
            "How long the oldest undelivered result has waited: a backlog behind the "
            "orchestrator's event rate limit, or a lost connection", "s",
            query(f"qpi_results_pending_oldest_seconds{{{SEL}}}", "{{instance}}")))
        .with_panel(series(
            "Dispatches held off",
            "1 while the node reads no dispatches (queue or store full, to an orchestrator "
            "that takes no refusals)", "short",
            query(f"qpi_intake_held{{{SEL}}}", "{{instance}}")))
        .with_row(gd.Row("Front ends"))
        .with_panel(series(
            "Jobs per second by front end",
            "Finished jobs by the orchestrator front end they came from (qpi, qcos) and "
            "outcome", "short",
            query(f"sum by (frontend, outcome) "
                  f"(rate(qpi_frontend_jobs_total{{{SEL}}}[{RATE}]))",
                  "{{frontend}} {{outcome}}"), width=8))
        .with_panel(series(
            "Queue depth by front end",
            "Jobs waiting to run per front end; each is sure of its share of the queue",
            "short", query(f"qpi_frontend_queue_depth{{{SEL}}}",
                           "{{instance}} {{frontend}}"), width=8))
        .with_panel(series(
            "QCOS requests by reply code",
            "qcos-mc/1 requests answered, by operation and code (anything but ok is a "
            "refusal or an error QCOS sees)", "short",
            query(f"sum by (operation, code) "
                  f"(rate(qpi_frontend_requests_total{{{SEL}}}[{RATE}]))",
                  "{{operation}} {{code}}"), width=8))
        .with_row(gd.Row("Executor and GPU"))
        .with_panel(series(
            "Worker restarts", "Executor process restarts (a crash, a hang or a cancel)",
            "short",
            query(f"increase(qpi_worker_restarts_total{{{SEL}}}[{RATE}])", "{{instance}}"),
            width=8))
        .with_panel(series(
            "GPU memory", "Used and total memory per GPU (nodes with a GPU only)", "bytes",
            query(f"qpi_gpu_memory_used_bytes{{{SEL}}}", "{{instance}} gpu {{gpu}} used", "A"),
            query(f"qpi_gpu_memory_total_bytes{{{SEL}}}", "{{instance}} gpu {{gpu}} total",
                  "B"),
            width=8))
        .with_panel(series(
            "Daemon CPU and memory", "The daemon's own process (the executor runs in a child)",
            "short",
            query(f"rate(process_cpu_seconds_total{{{SEL}}}[{RATE}])", "{{instance}} cpu", "A"),
            query(f"process_resident_memory_bytes{{{SEL}}} / 2^30", "{{instance}} GiB", "B"),
            width=8))
    )


def render() -> str:
    """The dashboard as Grafana imports it: stable key order, so a diff shows real changes."""
    board = build().build()
    # Unique ids in layout order: Grafana links to a panel by its id (viewPanel=N).
    for number, panel in enumerate(board.panels or [], 1):
        panel.id_val = number
    return JSONEncoder(sort_keys=True, indent=2).encode(board) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        sys.exit(0 if OUTPUT.read_text() == render() else 1)
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT}", file=sys.stderr)
    json.loads(OUTPUT.read_text())  # it reads back as JSON
