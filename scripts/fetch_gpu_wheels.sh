#!/usr/bin/env bash
# Download the CUDA 13 wheels the gpu executor needs (CPython 3.12, manylinux x86_64) into
# .whl/ (or the folder given as $1), for an offline install on a GPU node:
#   pip install --no-index --find-links .whl 'qpi-driver[gpu]' nvidia-cublas nvidia-cuda-nvrtc \
#       nvidia-cuda-runtime
# .whl/ is git-ignored: never commit the binaries.
set -euo pipefail

cd "$(dirname "$0")/.."
dest="${1:-.whl}"
python="${PYTHON:-python3}"

packages=(
    # cuQuantum Python bindings (cuquantum.bindings.custatevec) and the cuStateVec library
    "cuquantum-python-cu13>=25.9"
    "custatevec-cu13>=1.10,<2"
    # the other libraries cuquantum-python declares (loaded lazily, but pip needs them)
    "cutensornet-cu13" "cutensor-cu13" "cudensitymat-cu13" "cupauliprop-cu13" "custabilizer-cu13"
    "nvmath-python>=1.0,<2"
    "cuda-bindings>=13,<14" "cuda-core" "cuda-pathfinder>=1.6,<2"
    # CuPy and its one compiled dependency
    "cupy-cuda13x>=13.6" "fastrlock"
    # CUDA 13 runtime libraries: cuBLAS(Lt) for libcustatevec, NVRTC and cudart for CuPy
    "nvidia-cublas==13.*" "nvidia-cuda-nvrtc==13.*" "nvidia-cuda-runtime==13.*"
)

mkdir -p "$dest"
"$python" -m pip download \
    --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    --dest "$dest" \
    "${packages[@]}"

echo "wheels in $dest:"
ls -1 "$dest"
