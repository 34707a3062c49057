# syntax=docker/dockerfile:1
# qpi-driver images. Two targets:
#   docker build --target cpu -t qpi-driver:cpu .   Qiskit Aer on python:3.12-slim (default)
#   docker build --target gpu -t qpi-driver:gpu .   cuStateVec on the CUDA 13 runtime
#
# Configuration is by environment, set at `docker run`:
#   QPI_ADDR            orchestrator URL (unset: local mode, embedded orchestrator on :8090)
#   QPI_CA_FINGERPRINT  SHA-256 of the orchestrator's root CA
#   QPI_ACCESS_TOKEN_FILE, or a secret named qpi-access-token: the daemon reads
#                       $CREDENTIALS_DIRECTORY/qpi-access-token when it exists, and the
#                       images point that at /run/secrets, where Docker and Compose
#                       secrets appear
#   QPI_EXECUTOR, QPI_DRIVER_NAME, QPI_MAX_QUBITS, ... any field of driver/settings.py
# Metrics (/metrics, /healthz) listen on all interfaces, since the container's loopback is
# unreachable from a scraper; so does the embedded orchestrator, for local mode behind
# -p 8090:8090. SIGTERM (docker stop) drains: give a running job time with
# `docker stop -t SECONDS`.

ARG PYTHON_IMAGE=python:3.12-slim
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04

# --- builder: the project's own wheel, built once for both targets ------------------
FROM ${PYTHON_IMAGE} AS builder
WORKDIR /src
# Only what the wheel is built from, so an edit to tests or docs reuses the cache. The
# image needs no long description, so README.md stays out of the build.
COPY pyproject.toml ./
COPY driver ./driver
COPY executors ./executors
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- cpu: a venv on the same base image the runtime uses (its python path is baked in) --
FROM ${PYTHON_IMAGE} AS cpu-venv
COPY --from=builder /wheels /wheels
RUN python -m venv /opt/qpi-driver/venv \
    && /opt/qpi-driver/venv/bin/pip install --no-cache-dir /wheels/*.whl

# --- gpu: the distro's python 3.12 on the CUDA runtime, venv with the gpu extra ------
FROM ${CUDA_IMAGE} AS gpu-venv
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder /wheels /wheels
# cupy and cuQuantum come as wheels that use the CUDA libraries of the base image.
RUN python3.12 -m venv /opt/qpi-driver/venv \
    && set -- /wheels/qpi_driver-*.whl \
    && /opt/qpi-driver/venv/bin/pip install --no-cache-dir "$1[gpu]"

FROM ${CUDA_IMAGE} AS gpu
# Only the interpreter at run time; the venv links to /usr/bin/python3.12.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --home-dir /var/lib/qpi-driver \
       --create-home --shell /usr/sbin/nologin qpi-driver
COPY --from=gpu-venv /opt/qpi-driver/venv /opt/qpi-driver/venv
# NVIDIA_VISIBLE_DEVICES and NVIDIA_DRIVER_CAPABILITIES=compute,utility come from the
# CUDA base image; the JIT caches go to the volume so compiled kernels survive restarts.
ENV PATH=/opt/qpi-driver/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    QPI_EXECUTOR=gpu \
    QPI_DATA_DIR=/var/lib/qpi-driver \
    QPI_METRICS_ADDR=0.0.0.0:9464 \
    QPI_LOCAL_HOST=0.0.0.0 \
    QPI_LOG_FORMAT=json \
    CREDENTIALS_DIRECTORY=/run/secrets \
    CUDA_CACHE_PATH=/var/lib/qpi-driver/.cache/cuda \
    CUPY_CACHE_DIR=/var/lib/qpi-driver/.cache/cupy
# Undelivered results are spooled here and must outlive the container.
VOLUME ["/var/lib/qpi-driver"]
# Numeric, so a runtime (Kubernetes runAsNonRoot) can tell it is not root.
USER 10001:10001
WORKDIR /var/lib/qpi-driver
EXPOSE 9464 8090
# No curl in the image; python checks the daemon's own /healthz on the metrics port.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('QPI_METRICS_ADDR', ':9464').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4)"]
ENTRYPOINT ["qpi-driver"]
CMD ["run"]

# --- cpu: last, so a plain `docker build .` gives the small image --------------------
FROM ${PYTHON_IMAGE} AS cpu
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/qpi-driver \
    --create-home --shell /usr/sbin/nologin qpi-driver
COPY --from=cpu-venv /opt/qpi-driver/venv /opt/qpi-driver/venv
ENV PATH=/opt/qpi-driver/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    QPI_EXECUTOR=aer \
    QPI_DATA_DIR=/var/lib/qpi-driver \
    QPI_METRICS_ADDR=0.0.0.0:9464 \
    QPI_LOCAL_HOST=0.0.0.0 \
    QPI_LOG_FORMAT=json \
    CREDENTIALS_DIRECTORY=/run/secrets
VOLUME ["/var/lib/qpi-driver"]
# Numeric, so a runtime (Kubernetes runAsNonRoot) can tell it is not root.
USER 10001:10001
WORKDIR /var/lib/qpi-driver
EXPOSE 9464 8090
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('QPI_METRICS_ADDR', ':9464').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4)"]
ENTRYPOINT ["qpi-driver"]
CMD ["run"]
