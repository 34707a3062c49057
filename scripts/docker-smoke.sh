#!/usr/bin/env bash
# Builds the images and runs them for real: a Debian base made with debootstrap (no image
# can be pulled here), `docker build --target cpu`, local mode inside the container, a Bell
# job, HEALTHCHECK healthy, `docker stop` drains and exits 0; then, when asked, the gpu
# target on the same base (NumPy backend, and exit 69 without a device).
#
#   scripts/docker-smoke.sh            the cpu image (what CI runs)
#   QPI_SMOKE_GPU=1 scripts/...        also build and run the gpu image (2 GB of CUDA wheels)
#
# Exit 0: passed; 77: skipped (no engine can start, no way to make a base), reason on
# stderr; anything else: failed. Timings and image sizes go to stdout as `smoke: ...`
# lines, and as JSON to $QPI_SMOKE_REPORT when set.
# Other knobs: QPI_SMOKE_CACHE (base tarball, default /var/cache/qpi-driver-smoke),
# QPI_SMOKE_SUITE (Debian suite with python >= 3.12, default trixie), QPI_SMOKE_MIRROR
# (default: the machine's own Debian mirror), DOCKER (client, default Debian's).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

CACHE="${QPI_SMOKE_CACHE:-/var/cache/qpi-driver-smoke}"
SUITE="${QPI_SMOKE_SUITE:-trixie}"
BASE_IMAGE="qpi-smoke/debian-python:$SUITE"
CPU_IMAGE="qpi-driver:smoke-cpu"
GPU_IMAGE="qpi-driver:smoke-gpu"
SKIP=77
# Debian's client: its BuildKit is built in, where a newer client without the buildx
# plugin cannot build with BuildKit at all.
if [ -z "${DOCKER:-}" ]; then
  if [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker; else DOCKER=docker; fi
fi
export DOCKER_BUILDKIT=1

declare -A TIMES=()
declare -A SIZES=()
STARTED_DOCKERD=""
CONTAINERS=()

say() { echo "smoke: $*"; }
skip() { echo "docker-smoke: skipped: $*" >&2; exit "$SKIP"; }
fail() { echo "docker-smoke: FAILED: $*" >&2; exit 1; }

cleanup() {
  local c
  for c in "${CONTAINERS[@]}"; do
    "$DOCKER" rm -f -v "$c" >/dev/null 2>&1 || true  # -v: its anonymous data volume too
  done
  if "$DOCKER" info >/dev/null 2>&1; then
    # With vfs every layer is a full copy of the ones below: the build cache of one gpu
    # build takes about 15 GB, and each run would add as much. Keep only the images (the
    # base, and the latest cpu and gpu images: about 3.5 GB); the next build downloads the
    # dependencies again, which costs about 30 s more than a cached build.
    "$DOCKER" image prune -f >/dev/null 2>&1 || true
    "$DOCKER" builder prune -af >/dev/null 2>&1 || true
  fi
  if [ -n "$STARTED_DOCKERD" ]; then
    kill "$STARTED_DOCKERD" 2>/dev/null || true
    # dockerd stops its containerd on SIGTERM; wait for both, or the next start finds a
    # containerd still shutting down and times out waiting for it.
    for _ in $(seq 1 600); do kill -0 "$STARTED_DOCKERD" 2>/dev/null || break; sleep 0.1; done
  fi
}
trap cleanup EXIT

timed() {  # timed NAME command...: runs it, records seconds under NAME
  local name="$1" t0 ms rc=0
  shift
  t0=$(date +%s%N)
  "$@" || rc=$?
  ms=$((($(date +%s%N) - t0) / 1000000))
  TIMES[$name]=$((ms / 1000)).$((ms % 1000 / 100))
  say "timing $name ${TIMES[$name]} s"
  return "$rc"
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# --- the engine -------------------------------------------------------------------------

wait_for_old_containerd() {  # a previous run's managed containerd may still be stopping
  local pidfile=/var/run/docker/containerd/containerd.pid pid
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  for _ in $(seq 1 300); do
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = containerd ] || return 0
    sleep 0.1
  done
}

start_engine() {
  command -v "$DOCKER" >/dev/null 2>&1 || skip "no docker client (apt-get install docker.io)"
  if "$DOCKER" info >/dev/null 2>&1; then
    say "engine: already running"
    return
  fi
  command -v dockerd >/dev/null 2>&1 || skip "no engine runs and dockerd is not installed (apt-get install docker.io)"
  [ "$(id -u)" = 0 ] || skip "no engine runs and only root can start dockerd here"
  mkdir -p "$CACHE"
  wait_for_old_containerd
  # vfs works on any filesystem (no overlay in a container or odd kernel); no iptables and
  # no bridge, since builds and containers use the host's network.
  dockerd --storage-driver=vfs --iptables=false --ip6tables=false --bridge=none \
    --pidfile "$CACHE/dockerd.pid" >"$CACHE/dockerd.log" 2>&1 &
  STARTED_DOCKERD=$!
  for _ in $(seq 1 300); do
    "$DOCKER" info >/dev/null 2>&1 && { say "engine: started dockerd (vfs), log $CACHE/dockerd.log"; return; }
    kill -0 "$STARTED_DOCKERD" 2>/dev/null || break
    sleep 0.2
  done
  STARTED_DOCKERD=""
  skip "dockerd did not start; its last words: $(tail -n 3 "$CACHE/dockerd.log" | tr '\n' ' ')"
}

# --- the base image: Debian's python, made with debootstrap and cached --------------------

debian_mirror() {
  if [ -n "${QPI_SMOKE_MIRROR:-}" ]; then echo "$QPI_SMOKE_MIRROR"; return; fi
  # The mirror this machine's apt already uses, so the base needs no network it lacks.
  local uri
  uri=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  [ -n "$uri" ] || uri=$(awk '$1 == "deb" && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  [ -n "$uri" ] || skip "no Debian mirror in /etc/apt; set QPI_SMOKE_MIRROR"
  echo "$uri"
}

make_base_tarball() {
  local tarball="$1" rootfs
  command -v debootstrap >/dev/null 2>&1 || skip "no base image and no debootstrap to make one (apt-get install debootstrap)"
  rootfs=$(mktemp -d "$CACHE/rootfs.XXXXXX")
  chmod 755 "$rootfs"  # it becomes the image's /, which uid 10001 must traverse
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    "$SUITE" "$rootfs" "$(debian_mirror)" >"$CACHE/debootstrap.log" 2>&1 ||
    { rm -rf "$rootfs"; skip "no base image: debootstrap $SUITE failed (no mirror reachable?); its last words: $(tail -n 2 "$CACHE/debootstrap.log" | tr '\n' ' ')"; }
  # What python:3.x-slim gives and the Dockerfile relies on: `python`, pip allowed to
  # install system-wide (the builder runs pip as root), and this machine's CA bundle so
  # pip reaches the package registry through whatever this network inspects TLS with.
  ln -sf python3 "$rootfs/usr/bin/python"
  printf '[global]\nbreak-system-packages = true\nroot-user-action = ignore\n' >"$rootfs/etc/pip.conf"
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar --numeric-owner -C "$rootfs" -cf "$tarball.part" .
  mv "$tarball.part" "$tarball"
  rm -rf "$rootfs"
}

ensure_base() {
  local tarball="$CACHE/debian-$SUITE-python.tar"
  if "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    say "base: $BASE_IMAGE already imported"
    return
  fi
  mkdir -p "$CACHE"
  if [ -f "$tarball" ]; then
    say "base: cached $tarball"
  else
    timed debootstrap make_base_tarball "$tarball"
  fi
  timed import import_base "$tarball"
}

import_base() {
  "$DOCKER" import --change 'CMD ["python3"]' "$1" "$BASE_IMAGE" >/dev/null
}

# --- build and run ----------------------------------------------------------------------

build() {  # build TARGET TAG
  "$DOCKER" build --network host --target "$1" --build-arg "PYTHON_IMAGE=$BASE_IMAGE" \
    -t "$2" "$ROOT" >"$CACHE/build-$1.log" 2>&1 ||
    { tail -n 30 "$CACHE/build-$1.log" >&2; fail "docker build --target $1 failed; log $CACHE/build-$1.log"; }
  SIZES[$1]=$("$DOCKER" image inspect -f '{{.Size}}' "$2")
  say "image $2: $((SIZES[$1] / 1000000)) MB"
}

start_local() {  # start_local NAME IMAGE ARGS...: local mode, ports free on the host
  local name="$1" image="$2"
  shift 2
  "$DOCKER" rm -f -v "$name" >/dev/null 2>&1 || true
  CONTAINERS+=("$name")
  LOCAL_PORT=$(free_port)
  METRICS_PORT=$(free_port)
  # As a cluster would run it: read-only root, no capabilities, only the volume and /tmp
  # writable. The health check is the image's command, checked every 2 s instead of 30 s.
  "$DOCKER" run -d --name "$name" --network host --read-only --tmpfs /tmp \
    --cap-drop ALL --security-opt no-new-privileges \
    --health-interval 2s --health-start-period 120s \
    -e QPI_LOCAL_PORT="$LOCAL_PORT" -e QPI_METRICS_ADDR="127.0.0.1:$METRICS_PORT" \
    -e QPI_DRAIN_TIMEOUT_S=120 \
    "$image" "$@" >/dev/null
}

wait_ready() {  # wait_ready NAME: /readyz answers 200 (the node registered)
  local name="$1"
  for _ in $(seq 1 600); do
    if python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$METRICS_PORT/readyz', timeout=1)" 2>/dev/null; then
      return
    fi
    [ "$("$DOCKER" inspect -f '{{.State.Running}}' "$name")" = true ] ||
      { "$DOCKER" logs "$name" 2>&1 | tail -n 20 >&2; fail "$name exited before it was ready"; }
    sleep 0.2
  done
  "$DOCKER" logs "$name" 2>&1 | tail -n 20 >&2
  fail "$name not ready after 120 s"
}

bell_job() {  # bell_job NAME: a Bell circuit through the embedded orchestrator, in the container
  local name="$1" out
  out=$("$DOCKER" exec -i "$name" qpi-driver submit /dev/stdin --shots 1000 \
    --url "http://127.0.0.1:$LOCAL_PORT" <"$ROOT/examples/bell.qasm") ||
    { echo "$out" >&2; fail "the Bell job in $name failed"; }
  echo "$out" | sed 's/^/  | /'
  # Counts lines read "  KEY  COUNT  PCT%  ###": a Bell pair gives 00 and 11 only, about
  # half each (1000 shots: 0.5 +- 0.05 is more than three standard deviations).
  echo "$out" | awk '
    $1 ~ /^[01]+$/ && $3 ~ /%$/ { n[$1] = $2; total += $2 }
    END {
      if (total != 1000) { print "counts add up to " total ", not 1000"; exit 1 }
      for (k in n) if (k != "00" && k != "11") { print "outcome " k " is not 00 or 11"; exit 1 }
      if (n["00"] < 450 || n["00"] > 550) { print "00 came " n["00"] " times in 1000"; exit 1 }
    }' >&2 || fail "the Bell counts from $name are wrong"
}

wait_healthy() {
  local name="$1" status=""
  for _ in $(seq 1 300); do
    status=$("$DOCKER" inspect -f '{{.State.Health.Status}}' "$name")
    [ "$status" = healthy ] && return
    [ "$status" = unhealthy ] && break
    sleep 0.2
  done
  "$DOCKER" inspect -f '{{json .State.Health}}' "$name" >&2
  fail "$name health is '$status', not healthy"
}

# Measurement in the middle makes Aer simulate shot by shot: 100,000 shots take seconds
# (4 s on a loaded 2-core machine), so the job is still running when `docker stop` comes.
SLOW_QASM='OPENQASM 2.0;
include "qelib1.inc";
qreg q[8];
creg c[8];
h q;
measure q -> c;
h q;
cx q[0], q[1];
cx q[2], q[3];
cx q[4], q[5];
cx q[6], q[7];
measure q -> c;'
SLOW_SHOTS="${QPI_SMOKE_SLOW_SHOTS:-100000}"

jobs_dispatched() {  # JobDispatch frames the daemon has received, from its /metrics
  python3 - "$METRICS_PORT" <<'PY'
import re, sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode()
m = re.search(r'^qpi_frames_received_total\{type="JobDispatch"\} (\S+)', text, re.M)
print(int(float(m.group(1))) if m else 0)
PY
}

stop_during_a_job() {  # stop_during_a_job NAME: SIGTERM while a job runs; it must finish
  local name="$1" before
  before=$(jobs_dispatched)
  echo "$SLOW_QASM" | "$DOCKER" exec -i "$name" sh -c 'cat > /tmp/slow.qasm'
  "$DOCKER" exec -d "$name" qpi-driver submit /tmp/slow.qasm --shots "$SLOW_SHOTS" \
    --timeout 300 --url "http://127.0.0.1:$LOCAL_PORT"
  for _ in $(seq 1 300); do
    [ "$(jobs_dispatched)" -gt "$before" ] && break
    sleep 0.1
  done
  [ "$(jobs_dispatched)" -gt "$before" ] || fail "the slow job never reached $name"
  sleep 0.5  # from the dispatch frame into the executor
  stop_and_check_drain "$name" running
}

stop_and_check_drain() {  # stop_and_check_drain NAME [running]
  local name="$1" code logs
  "$DOCKER" stop -t 150 "$name" >/dev/null
  code=$("$DOCKER" inspect -f '{{.State.ExitCode}}' "$name")
  logs=$("$DOCKER" logs "$name" 2>&1)
  [ "$code" = 0 ] || { echo "$logs" | tail -n 20 >&2; fail "$name exited $code after docker stop, not 0"; }
  # The JSON log: a drain on SIGTERM, then (with a job running) that job finished ok, then
  # "stopped" with no result still owed to the orchestrator.
  echo "$logs" | python3 -c '
import json, sys
running = sys.argv[1] == "running"
events = [json.loads(line) for line in sys.stdin if line.startswith("{")]
names = [e.get("event", "") for e in events]
drain = next((i for i, n in enumerate(names) if "draining" in n), None)
if drain is None:
    sys.exit("no drain logged on SIGTERM")
after = events[drain + 1:]
if running and not any(e.get("event") == "job finished" and e.get("ok") for e in after):
    sys.exit("no job finished after the drain began: the slow job ended before docker stop"
             " (raise QPI_SMOKE_SLOW_SHOTS) or was cut off")
stopped = [e for e in after if e.get("event") == "stopped"]
if not stopped:
    sys.exit("no \"stopped\" logged after the drain")
owed = stopped[-1].get("results_owed", 0)
if owed:
    sys.exit(f"stopped with {owed} results owed")
' "${2:-idle}" || { echo "$logs" | tail -n 20 >&2; fail "$name did not drain cleanly"; }
}

smoke_cpu() {
  timed build_cpu build cpu "$CPU_IMAGE"
  [ "$("$DOCKER" image inspect -f '{{.Config.User}}' "$CPU_IMAGE")" = 10001:10001 ] ||
    fail "$CPU_IMAGE does not run as 10001:10001"
  timed start_cpu start_and_wait qpi-smoke-cpu "$CPU_IMAGE"
  [ "$("$DOCKER" exec qpi-smoke-cpu id -u)" = 10001 ] || fail "the daemon in qpi-smoke-cpu is not uid 10001"
  timed bell_cpu bell_job qpi-smoke-cpu
  timed healthy_cpu wait_healthy qpi-smoke-cpu
  timed stop_cpu stop_during_a_job qpi-smoke-cpu
}

start_and_wait() {
  start_local "$@"
  wait_ready "$1"
}

smoke_gpu() {
  timed build_gpu build gpu "$GPU_IMAGE"
  # The gpu executor's whole pipeline (lowering, fusion, branching measurement) on its
  # NumPy backend: everything but the CUDA kernels, which need a device.
  timed start_gpu start_and_wait qpi-smoke-gpu "$GPU_IMAGE" run --executor gpu \
    --executor-option backend=numpy
  timed bell_gpu bell_job qpi-smoke-gpu
  timed stop_gpu stop_and_check_drain qpi-smoke-gpu
  timed no_device_gpu no_device
}

no_device() {  # without a device the default (cuStateVec) backend cannot start: exit 69
  local out code=0
  out=$("$DOCKER" run --rm --network host -e QPI_LOCAL_PORT="$(free_port)" \
    -e QPI_METRICS_ADDR= "$GPU_IMAGE" run --executor gpu 2>&1) || code=$?
  [ "$code" = 69 ] || { echo "$out" | tail -n 20 >&2; fail "--executor gpu without a device exited $code, not 69"; }
  echo "$out" | grep -qi 'no CUDA device' || { echo "$out" >&2; fail "the exit 69 does not say that no CUDA device is visible"; }
  say "gpu without a device: exit 69: $(echo "$out" | grep -i 'no CUDA device' | head -n 1 | cut -c1-240)"
}

report() {
  local key json="{" sep=""
  for key in "${!TIMES[@]}"; do json+="$sep\"time_$key\": ${TIMES[$key]}"; sep=", "; done
  for key in "${!SIZES[@]}"; do json+="$sep\"size_$key\": ${SIZES[$key]}"; sep=", "; done
  json+="}"
  say "summary $json"
  if [ -n "${QPI_SMOKE_REPORT:-}" ]; then echo "$json" >"$QPI_SMOKE_REPORT"; fi
}

T0=$(date +%s)
timed engine start_engine
ensure_base
smoke_cpu
if [ "${QPI_SMOKE_GPU:-0}" = 1 ]; then
  smoke_gpu
else
  say "gpu image: not asked (QPI_SMOKE_GPU=1 builds and runs it: about 3 more minutes)"
fi
TIMES[total]=$(($(date +%s) - T0))
report
say "passed"
