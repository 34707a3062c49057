#!/usr/bin/env bash
# Download the wheels the gpu executor needs (CPython 3.12, manylinux x86_64, CUDA 13) for
# an install on a GPU node that cannot reach PyPI. Two sets:
#
#   scripts/fetch_gpu_wheels.sh [DEST]                 # default DEST .whl/gpu
#       everything `pip install --no-index --find-links DEST 'qpi-driver[gpu]'` needs: the
#       project's dependencies and the gpu extra with all they require, resolved by pip
#       for the target platform (several GB: cuBLAS alone is hundreds of MB).
#   scripts/fetch_gpu_wheels.sh --device-check [DEST]  # default DEST .whl/gpu-check
#       only what scripts/gpu-check.sh installs on top of a CUDA image that already has
#       CuPy, NumPy, SciPy and the CUDA runtime wheels (the lent H200's), pinned to the
#       tested set, split into DEST/a (cuStateVec, ~57 MiB) and DEST/b (the rest, ~50 MiB)
#       so each part fits a 64 MiB transfer.
#   scripts/fetch_gpu_wheels.sh --print-requirements   # the first set's requirements
#
# .whl/ is git-ignored: never commit the binaries.
set -euo pipefail

cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
platform_flags=(
    --only-binary=:all: --python-version 3.12 --implementation cp
    --abi cp312 --abi abi3 --abi none
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
    --platform manylinux_2_24_x86_64 --platform manylinux_2_26_x86_64
    --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64
    --platform any
)

# The set the gpu-check installs (versions of the tested CPU venv; the CUDA ones are the
# gpu extra's pins in pyproject.toml). Part a is cuStateVec's library alone.
device_check_a=("custatevec-cu13==1.15.0")
device_check_b=(
    "cuquantum-python-cu13==26.9.0" "nvmath-python==1.0.0" "cuda-pathfinder==1.9.1"
    "cuda-core==1.2.2" "nvidia-ml-py==13.615.71"
    "qiskit==2.6.2" "qiskit-aer==0.18.2" "rustworkx==0.18.1" "stevedore==5.10.0" "dill==0.4.1"
    "qiskit-qasm3-import==0.6.0" "openqasm3==1.0.1" "antlr4-python3-runtime==4.13.2"
    "pynng==0.9.0" "sniffio==1.3.1" "cffi==2.1.1" "pycparser==3.12"
    "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0"
    "typing-inspection==0.4.5" "pydantic-settings==2.16.3" "python-dotenv==1.2.4"
    "structlog==26.1.0" "cryptography==50.0.2" "pytest-asyncio==1.5.0" "aiolimiter==1.3.0"
)

requirements() {
    # The project's dependencies plus its gpu extra, read from pyproject.toml.
    "$python" - <<'EOF'
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for req in project["dependencies"] + project["optional-dependencies"]["gpu"]:
    print(req)
EOF
}

case "${1:-}" in
--print-requirements)
    requirements
    ;;
--device-check)
    dest="${2:-.whl/gpu-check}"
    mkdir -p "$dest/a" "$dest/b"
    "$python" -m pip download --no-deps "${platform_flags[@]}" --dest "$dest/a" "${device_check_a[@]}"
    "$python" -m pip download --no-deps "${platform_flags[@]}" --dest "$dest/b" "${device_check_b[@]}"
    du -sh "$dest/a" "$dest/b"
    ;;
*)
    dest="${1:-.whl/gpu}"
    mkdir -p "$dest"
    reqs="$(mktemp)"
    trap 'rm -f "$reqs"' EXIT
    requirements >"$reqs"
    # With dependencies: pip resolves the whole closure for the target platform.
    "$python" -m pip download "${platform_flags[@]}" --dest "$dest" -r "$reqs"
    echo "wheels in $dest (install with: pip install --no-index --find-links $dest '.[gpu]'):"
    ls -1 "$dest"
    ;;
esac
