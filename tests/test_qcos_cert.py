"""QCOS's own certification of the node: `qcos-driver-cert` (the SDK's CLI, ACOS-ISA v1,
ten tests) loads our driver by its `qcos.drivers` entry point, as QCOS does, and runs its
suite through it against a real node. It checks little of the device itself (the bit
order, retries, cancel and errors are tests/test_qcos_conformance.py's), but a node it
does not certify 10/10 is one QCOS will not take."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

pytest.importorskip(
    "hal.mc", reason="needs QCOS's SDK: pip install 'qcos-driver-sdk[conformance,mc]==1.2.0'")

from tests.conftest import ROOT
from tests.test_qcos_conformance import start_qcos_node

ENTRY_POINT = "qpi-node"
TESTS = 10  # ACOS-ISA v1


def cert_command() -> list[str]:
    """The SDK's console script beside this interpreter (a venv's bin/), else on PATH."""
    found = shutil.which("qcos-driver-cert", path=str(Path(sys.executable).parent))
    found = found or shutil.which("qcos-driver-cert")
    assert found, "qcos-driver-sdk is importable but its qcos-driver-cert script is missing"
    return [found]


def test_qcos_certifies_the_node_10_of_10(tmp_path: Path) -> None:
    installed = metadata.entry_points(group="qcos.drivers")
    assert ENTRY_POINT in installed.names, (
        f"no 'qcos.drivers' entry point {ENTRY_POINT!r} is installed (found "
        f"{sorted(installed.names)}): reinstall the project (pip install -e .) so that "
        f"pyproject.toml's entry points are registered")

    node = start_qcos_node(tmp_path, "--executor", "aer")
    try:
        report_path = tmp_path / "certification.json"
        env = {**os.environ, **node.client_env(), "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(
            [*cert_command(), "--entry-point", ENTRY_POINT, "--output", str(report_path)],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
        node.alive()
    finally:
        node.stop()

    output = f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert report_path.exists(), f"the certification wrote no report:\n{output}"
    report = json.loads(report_path.read_text())
    summary = report["summary"]
    failed = [f"{r['test_id']} {r['status']}: {r['message']}"
              for r in report["results"] if not r["passed"]]
    # The CLI's own closing line says the same as its report.
    printed = re.search(r"^(\d+)/(\d+) passed", proc.stdout, re.MULTILINE)
    assert printed, output
    assert (int(printed[1]), int(printed[2])) == (summary["passed"], summary["total_tests"])
    assert proc.returncode == 0 and report["certified"] is True and failed == [] and (
        summary["passed"] == summary["total_tests"] == TESTS), (
        f"{summary['passed']}/{summary['total_tests']} certified; failed: {failed}\n{output}")
    assert report["backend_id"] == node.device_id
