"""A third-party executor, installed with pip as a package with an entry point in
`qpi_driver.executors`, is found by name and runs jobs through the real daemon.
The package is the complete minimal adapter of docs/executors.md, built here."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from frontends.qpi.orchestrator import LocalOrchestrator
from tests.circuits import BELL, REGISTERS
from tests.conftest import ROOT, daemon_env, heartbeats, start_connected, start_daemon

GUIDE = ROOT / "docs" / "executors.md"


def guide_block(language: str, first_line: str) -> str:
    """The fenced block of the guide that starts with `first_line`."""
    pattern = rf"```{language}\n({re.escape(first_line)}\n.*?)```"
    match = re.search(pattern, GUIDE.read_text(), re.S)
    assert match, f"docs/executors.md lost its {first_line!r} block"
    return match.group(1)


def build_wheel(out: Path) -> tuple[Path, str]:
    """A wheel of the guide's adapter, its metadata and entry points taken from the
    guide's pyproject.toml; returns the wheel and the executor name it declares."""
    source = guide_block("python", "# qpi_statevector.py")
    project = tomllib.loads(guide_block("toml", "[project]"))["project"]
    (group, entries), = project["entry-points"].items()
    assert group == "qpi_driver.executors"
    (name, target), = entries.items()
    module = target.partition(":")[0]
    dist = f"{project['name'].replace('-', '_')}-{project['version']}"
    files = {
        f"{module}.py": source,
        f"{dist}.dist-info/METADATA": (f"Metadata-Version: 2.1\nName: {project['name']}\n"
                                       f"Version: {project['version']}\n"),
        f"{dist}.dist-info/WHEEL": ("Wheel-Version: 1.0\nGenerator: qpi-driver-tests\n"
                                    "Root-Is-Purelib: true\nTag: py3-none-any\n"),
        f"{dist}.dist-info/entry_points.txt": f"[{group}]\n{name} = {target}\n",
    }
    record = []
    for path, text in files.items():
        data = text.encode()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}.dist-info/RECORD,,")
    files[f"{dist}.dist-info/RECORD"] = "\n".join(record) + "\n"
    wheel = out / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return wheel, name


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The adapter pip-installed into its own site folder (no index, no build backend)."""
    work = tmp_path_factory.mktemp("plugin")
    wheel, name = build_wheel(work)
    site = work / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
         "--disable-pip-version-check", "--target", str(site), str(wheel)],
        check=True, timeout=120,
    )
    assert (site / "qpi_statevector.py").is_file()
    return site, name


async def test_installed_plugin_is_found_by_name_and_runs_jobs(
    tmp_path: Path, plugin_site: tuple[Path, str]
) -> None:
    site, name = plugin_site
    orch = LocalOrchestrator(port=0, heartbeat_interval_s=0.5)
    await orch.start()
    env = daemon_env(tmp_path, orch, PYTHONPATH=f"{ROOT}{os.pathsep}{site}",
                     QPI_EXECUTOR_OPTIONS='{"seed": 5, "max_qubits": 6}')
    d = await start_connected(tmp_path, orch, env, "--executor", name)
    try:
        record = orch.submit({"circuits": [BELL, REGISTERS], "shots": 500})
        res = (await orch.result(record.id, timeout=60)).results
        assert res is not None and res["success"] is True, res
        assert res["backend"] == name == "statevector"
        bell, registers = res["circuit_results"]
        assert set(bell["counts"]) == {"00", "11"} and sum(bell["counts"].values()) == 500
        assert registers["counts"] == {"101": 500}
        assert registers["header"]["creg_sizes"] == [["a", 1], ["b", 2]]

        too_big = (await orch.result(orch.submit({"circuits": [
            'OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[7];\ncreg c[7];\nmeasure q -> c;\n'
        ]}).id, timeout=60)).results
        assert too_big is not None and too_big["error_code"] == "QUOTA_EXCEEDED"

        beats = heartbeats(orch)
        assert beats and beats[-1]["executor"] == name
        assert beats[-1]["capabilities"]["max_qubits"] == 6
        assert beats[-1]["capabilities"]["meas_levels"] == [2]
        assert beats[-1]["calibration"] is None  # the plugin has none: nothing made up
    finally:
        assert d.stop() == 0, d.output()
        await orch.stop()


def test_the_guides_adapter_refuses_an_option_it_does_not_declare(
    plugin_site: tuple[Path, str],
) -> None:
    site, _ = plugin_site
    probe = ("from qpi_statevector import StatevectorExecutor as E\n"
             "E({'seed': 1, 'max_qubits': 3})\n"
             "try:\n    E({'max_qbits': 3})\n"
             "except ValueError as exc:\n    print(type(exc).__name__, exc)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=120, check=True,
                         env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{site}"})
    assert out.stdout.startswith("OptionError unknown option(s) 'max_qbits'"), out
    assert "it knows: max_qubits, seed" in out.stdout


async def test_without_the_package_the_name_is_unknown(
    tmp_path: Path, plugin_site: tuple[Path, str]
) -> None:
    _, name = plugin_site
    orch = LocalOrchestrator(port=0)
    await orch.start()
    try:
        d = start_daemon(tmp_path, daemon_env(tmp_path, orch), "--executor", name)
        code = d.proc.wait(60)
        assert code == 69, d.output()  # EX_UNAVAILABLE
        assert f"unknown executor '{name}'" in d.output() and "aer" in d.output()
    finally:
        await orch.stop()
