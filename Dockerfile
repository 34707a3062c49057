# qpi-driver images. Two targets, both on the same Python base image:
#   docker build --target cpu -t qpi-driver:cpu .   Qiskit Aer (the default target)
#   docker build --target gpu -t qpi-driver:gpu .   cuStateVec; the CUDA libraries come as
#                                                   pip wheels, the driver from the host
# PYTHON_IMAGE may be any image with python >= 3.12, venv and pip (scripts/docker-smoke.sh
# builds one with debootstrap where no image can be pulled). No `# syntax=` line: BuildKit's
# built-in frontend reads this file, so a build needs no pull beyond the base image.
#
# Configuration is by environment, set at `docker run`:
#   QPI_ADDR            orchestrator URL (unset: local mode, embedded orchestrator on
#                       127.0.0.1:8090 inside the container)
#   QPI_CA_FINGERPRINT  SHA-256 of the orchestrator's root CA
#   QPI_ACCESS_TOKEN_FILE, or a secret named qpi-access-token: the daemon reads
#                       $CREDENTIALS_DIRECTORY/qpi-access-token when it exists, and the
#                       images point that at /run/secrets, where Docker and Compose
#                       secrets appear
#   QPI_EXECUTOR, QPI_DRIVER_NAME, QPI_MAX_QUBITS, ... any field of driver/settings.py
#   QPI_FRONTENDS=qcos (or qpi,qcos) serves SoftQuantus QCOS too: QPI_QCOS_ENDPOINT and
#                       QPI_QCOS_EVENTS (ports 7610/7611) must then name an address QCOS
#                       reaches, e.g. tcp://0.0.0.0:7610 on a private network only: the
#                       sockets have no authentication (README: Putting a node under QCOS)
# Metrics (/metrics, /healthz, /readyz) listen on all interfaces, since the container's
# loopback is unreachable from a scraper. The embedded orchestrator of local mode does
# not: its client API has no authentication, so it stays on the container's loopback
# (reach it with `docker exec`); set QPI_LOCAL_HOST=0.0.0.0 only on a network you trust.
# SIGTERM (docker stop) drains: give a running job time with `docker stop -t SECONDS`.

ARG PYTHON_IMAGE=python:3.12-slim

# --- requirements: the dependency lists, apart from the code ------------------------
# The venvs install these first, in layers keyed on the lists' text alone: an edit to the
# code, or to another part of pyproject.toml, then rebuilds only the project's own wheel
# instead of downloading Qiskit (and, for gpu, 2 GB of CUDA wheels) again.
FROM ${PYTHON_IMAGE} AS requirements
COPY pyproject.toml /src/
RUN python -c "import tomllib; p = tomllib.load(open('/src/pyproject.toml', 'rb'))['project']; \
x = p['optional-dependencies']; \
open('/cpu.txt', 'w').write('\n'.join(p['dependencies'] + x['qcos']) + '\n'); \
open('/gpu.txt', 'w').write('\n'.join(p['dependencies'] + x['gpu'] + x['qcos']) + '\n')"

# --- builder: the project's own wheel, built once for both targets ------------------
FROM ${PYTHON_IMAGE} AS builder
WORKDIR /src
# Only what the wheel is built from, so an edit to tests or docs reuses the cache. The
# image needs no long description, so README.md stays out of the build.
COPY pyproject.toml ./
COPY driver ./driver
COPY executors ./executors
COPY frontends ./frontends
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- cpu: a venv on the same base image the runtime uses (its python path is baked in) --
# The lists and the wheel are bind-mounted, not copied: fewer layers, which matters where
# the engine stores each layer as a full copy (the vfs storage driver).
FROM ${PYTHON_IMAGE} AS cpu-venv
RUN --mount=type=bind,from=requirements,source=/cpu.txt,target=/tmp/requirements.txt \
    python -m venv /opt/qpi-driver/venv \
    && /opt/qpi-driver/venv/bin/pip install --no-cache-dir -r /tmp/requirements.txt
# pip check: every dependency the wheel declares is installed, at a version it accepts.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    /opt/qpi-driver/venv/bin/pip install --no-cache-dir --no-deps /wheels/*.whl \
    && /opt/qpi-driver/venv/bin/pip check

# --- gpu: the same base, a venv with the gpu extra --------------------------------------
# cupy, cuQuantum and the CUDA runtime libraries (cuBLAS, NVRTC, cudart) all come as
# wheels, so no CUDA base image is needed; libcuda comes from the host at run time.
FROM ${PYTHON_IMAGE} AS gpu-venv
RUN --mount=type=bind,from=requirements,source=/gpu.txt,target=/tmp/requirements.txt \
    python -m venv /opt/qpi-driver/venv \
    && /opt/qpi-driver/venv/bin/pip install --no-cache-dir -r /tmp/requirements.txt
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    /opt/qpi-driver/venv/bin/pip install --no-cache-dir --no-deps /wheels/*.whl \
    && /opt/qpi-driver/venv/bin/pip check

FROM ${PYTHON_IMAGE} AS gpu
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/qpi-driver \
    --create-home --shell /usr/sbin/nologin qpi-driver
WORKDIR /var/lib/qpi-driver
# Last of the layers that change files, so none after it copies the venv again (vfs).
COPY --from=gpu-venv /opt/qpi-driver/venv /opt/qpi-driver/venv
# The NVIDIA container runtime reads NVIDIA_*: which GPUs to pass through, and that the
# container needs libcuda and NVML (compute) plus nvidia-smi (utility), nothing more. The
# JIT caches go to the volume so compiled kernels survive restarts.
ENV PATH=/opt/qpi-driver/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    QPI_EXECUTOR=gpu \
    QPI_DATA_DIR=/var/lib/qpi-driver \
    QPI_METRICS_ADDR=0.0.0.0:9464 \
    QPI_LOG_FORMAT=json \
    CREDENTIALS_DIRECTORY=/run/secrets \
    CUDA_CACHE_PATH=/var/lib/qpi-driver/.cache/cuda \
    CUPY_CACHE_DIR=/var/lib/qpi-driver/.cache/cupy
# Undelivered results are spooled here and must outlive the container.
VOLUME ["/var/lib/qpi-driver"]
# Numeric, so a runtime (Kubernetes runAsNonRoot) can tell it is not root.
USER 10001:10001
EXPOSE 9464 8090 7610 7611
# No curl in the image; python checks the daemon's own /healthz on the metrics port.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('QPI_METRICS_ADDR', ':9464').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4)"]
ENTRYPOINT ["qpi-driver"]
CMD ["run"]

# --- cpu: last, so a plain `docker build .` gives the small image --------------------
FROM ${PYTHON_IMAGE} AS cpu
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/qpi-driver \
    --create-home --shell /usr/sbin/nologin qpi-driver
WORKDIR /var/lib/qpi-driver
COPY --from=cpu-venv /opt/qpi-driver/venv /opt/qpi-driver/venv
ENV PATH=/opt/qpi-driver/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    QPI_EXECUTOR=aer \
    QPI_DATA_DIR=/var/lib/qpi-driver \
    QPI_METRICS_ADDR=0.0.0.0:9464 \
    QPI_LOG_FORMAT=json \
    CREDENTIALS_DIRECTORY=/run/secrets
VOLUME ["/var/lib/qpi-driver"]
# Numeric, so a runtime (Kubernetes runAsNonRoot) can tell it is not root.
USER 10001:10001
EXPOSE 9464 8090 7610 7611
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('QPI_METRICS_ADDR', ':9464').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4)"]
ENTRYPOINT ["qpi-driver"]
CMD ["run"]
