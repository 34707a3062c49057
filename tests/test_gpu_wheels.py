"""The offline wheel sets for the gpu extra are complete and pinned: the full set is the
project's dependencies plus `.[gpu]` (nvidia-ml-py included), and the gpu-check set adds
to the CUDA image exactly what it lacks, at the versions pyproject.toml pins."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "fetch_gpu_wheels.sh"
# Python packages the lent H200's image already has (executors/gpu/README.md, "Running on
# a GPU node"): gpu-check.sh makes its venv with --system-site-packages on top of them.
IMAGE_PACKAGES = {
    "aiohttp", "cupy-cuda13x", "cuda-bindings", "msgpack", "numpy", "nvidia-cublas",
    "nvidia-cuda-nvrtc", "nvidia-cuda-runtime", "prometheus-client", "psutil",
    "python-dateutil", "scipy", "typing-extensions", "hypothesis", "pytest", "pytest-timeout",
}  # fmt: skip


def project() -> dict[str, list[str]]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {"dependencies": data["dependencies"], "gpu": data["optional-dependencies"]["gpu"]}


def device_check_pins() -> dict[str, str]:
    text = SCRIPT.read_text()
    arrays = re.findall(r"device_check_[ab]=\((.*?)\)", text, flags=re.S)
    pins: dict[str, str] = {}
    for body in arrays:
        for name, version in re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', body):
            pins[canonicalize_name(name)] = version
    return pins


def test_full_set_is_the_dependencies_and_the_gpu_extra() -> None:
    out = subprocess.run(
        ["bash", str(SCRIPT), "--print-requirements"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    listed = out.stdout.split("\n")
    reqs = project()
    assert set(filter(None, listed)) == set(reqs["dependencies"] + reqs["gpu"])
    assert any(line.startswith("nvidia-ml-py") for line in listed)


def test_device_check_set_adds_what_the_image_lacks_at_the_pinned_versions() -> None:
    pins = device_check_pins()
    reqs = project()
    for text in reqs["dependencies"] + reqs["gpu"]:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        if name in IMAGE_PACKAGES:
            continue
        assert name in pins, f"{name} is neither in the image nor in the gpu-check set"
        assert Version(pins[name]) in req.specifier, (name, pins[name], str(req.specifier))


def test_gpu_extra_pins_the_tested_cuda_set() -> None:
    """The extra pins what the gpu executor's README says the code was tested against."""
    gpu = {canonicalize_name(Requirement(r).name): Requirement(r) for r in project()["gpu"]}
    readme = (REPO / "executors" / "gpu" / "README.md").read_text()
    section = readme[readme.index("## Running on a GPU node"):]
    tested = dict(re.findall(r"`([a-z0-9-]+)==([0-9.]+)`", section.split("```")[0]))
    for name in ("cuquantum-python-cu13", "custatevec-cu13", "cupy-cuda13x"):
        assert name in tested, f"the README names no tested version of {name}"
    for name, version in tested.items():
        assert str(gpu[canonicalize_name(name)].specifier) == f"=={version}", name
    # cupy-cuda13x 14.2.0 declares numpy<2.6; the extra must not let pip pick a newer one.
    numpy = gpu[canonicalize_name("numpy")].specifier
    assert Version("2.6.0") not in numpy and Version("2.5.5") in numpy
    assert canonicalize_name("nvidia-ml-py") in gpu
