"""The Grafana dashboard is generated, not hand-written: deploy/grafana/dashboard.py
(grafana-foundation-sdk) gives exactly the committed JSON, which reads back through the
SDK's Grafana schema types, and has the panels an operator needs, laid out without
overlaps. (That its queries name exported metrics and run on a real Prometheus is
tests/test_prometheus.py's part.)"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytest.importorskip("grafana_foundation_sdk",
                    reason="grafana-foundation-sdk not installed (the test extra has it)")

from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import Dashboard

ROOT = Path(__file__).resolve().parent.parent
GENERATOR = ROOT / "deploy/grafana/dashboard.py"
DASHBOARD = ROOT / "deploy/grafana/qpi-driver.json"


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("qpi_dashboard", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def board() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def test_committed_json_is_what_the_generator_gives() -> None:
    assert generator().render() == DASHBOARD.read_text(), (
        "deploy/grafana/qpi-driver.json is stale or was edited by hand: run "
        "`python deploy/grafana/dashboard.py` and commit the result")


def test_json_reads_back_through_the_grafana_schema_types() -> None:
    # from_json keeps only the fields Grafana's dashboard schema defines, so a field the
    # schema does not know (a hand edit, a misspelt key) changes the re-encoded text.
    text = DASHBOARD.read_text()
    again = JSONEncoder(sort_keys=True, indent=2).encode(Dashboard.from_json(json.loads(text)))
    assert again + "\n" == text


def test_dashboard_has_the_panels_an_operator_needs(board: dict[str, Any]) -> None:
    titles = {p["title"] for p in board["panels"]}
    needed = {"Jobs per second by outcome", "Queue depth", "Queue wait", "Run time",
              "Results pending delivery", "Reconnects", "Worker restarts", "GPU memory",
              "Node status"}
    assert needed <= titles, needed - titles
    by_title = {p["title"]: p for p in board["panels"]}
    # Latency panels show percentiles, not averages.
    for title in ("Queue wait", "Run time"):
        legends = {t["legendFormat"] for t in by_title[title]["targets"]}
        assert legends == {"p50", "p95", "p99"}, (title, legends)
        assert all("histogram_quantile" in t["expr"] for t in by_title[title]["targets"])
    assert "by (outcome)" in by_title["Jobs per second by outcome"]["targets"][0]["expr"]
    # The node status timeline names every status the daemon reports.
    mapped = {r["text"] for m in by_title["Node status"]["fieldConfig"]["defaults"]["mappings"]
              for r in m["options"].values()}
    assert {"idle", "busy", "draining", "degraded", "down"} <= mapped


def test_panels_use_the_datasource_variable_and_the_node_filter(board: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["multi"] and variables["instance"]["includeAll"]
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert 'instance=~"$instance"' in target["expr"], (panel["title"], target["expr"])
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids), panel["title"]


def test_layout_has_unique_ids_and_no_overlaps(board: dict[str, Any]) -> None:
    assert board["uid"] == "qpi-driver"
    ids = [p["id"] for p in board["panels"]]
    assert len(set(ids)) == len(ids)
    cells: dict[tuple[int, int], str] = {}
    for panel in board["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]
