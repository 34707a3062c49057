#!/usr/bin/env bash
# The gpu executor's first check on a GPU, in one command that fits a short window
# (within 8 minutes, installation included): installs the carried wheels in a venv,
# runs the device tests, the bench, the daemon end to end with --executor gpu through the
# embedded orchestrator, and the admission check at the largest size that fits, then
# writes one JSON report and a readable summary (format: executors/gpu/README.md).
#
#   scripts/fetch_gpu_wheels.sh --device-check     # where PyPI is reachable, beforehand
#   scripts/gpu-check.sh [OUT_DIR]                 # on the GPU node; default $OUT, else
#                                                  # ./gpu-check-out
#
# Wheels: $QPI_GPU_WHEELS (default .whl/gpu-check), every *.whl in its subfolders, installed
# offline without dependency resolution into a venv that also sees the machine's own
# CuPy/NumPy/CUDA packages (python3's site-packages, through a .pth file). Exit status: 0 every step passed; 1 a step failed
# (the report says which); 66 the wheels are missing; 69 no NVIDIA GPU is visible (at once,
# nothing run).
#
# QPI_GPU_CHECK_REHEARSAL=1 runs the same steps on a CPU, in the current environment, with
# the NumPy backend at small sizes: a rehearsal of the script itself, not a GPU check.
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT_DIR="${1:-${OUT:-$ROOT/gpu-check-out}}"
WHEELS="${QPI_GPU_WHEELS:-$ROOT/.whl/gpu-check}"
VENV="${QPI_GPU_VENV:-/tmp/qpi-gpu-check-venv}"
PY="${PYTHON:-python3}"
PORT="${QPI_GPU_CHECK_PORT:-18090}"
TOTAL_S=480
STARTED=$EPOCHREALTIME
REHEARSAL="${QPI_GPU_CHECK_REHEARSAL:-}"
BACKEND=custatevec GHZ_N=24 FIT_CAP=64
if [ -n "$REHEARSAL" ]; then
    BACKEND=numpy GHZ_N=12 FIT_CAP=16
    VENV="$(dirname "$(dirname "$(command -v "$PY")")")"
elif ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    echo "gpu-check: no NVIDIA GPU is visible on $(hostname) (nvidia-smi is missing or lists" \
        "no device), so nothing was run; run this on a GPU node, with the wheels from" \
        "scripts/fetch_gpu_wheels.sh --device-check in $WHEELS" >&2
    exit 69
fi
mkdir -p "$OUT_DIR"
WORK="$(mktemp -d /tmp/qpi-gpu-check.XXXXXX)"  # step results, the daemon's data dir
trap 'rm -rf "$WORK"' EXIT
LOG="$OUT_DIR/gpu-check.log"
: >"$LOG"
export PYTHONPATH="$ROOT" PYTHONUNBUFFERED=1 OUT_DIR WORK ROOT PORT WHEELS VENV PY
export REHEARSAL BACKEND GHZ_N FIT_CAP

elapsed() { echo $(( ${EPOCHREALTIME%.*} - ${STARTED%.*} )); }

# step NAME LIMIT_S FUNCTION: run the (exported) function in a child bash with a hard
# limit, log its output, record name/rc/seconds. A step that would start after the overall
# budget is skipped (rc "skipped").
step() {
    local name=$1 limit=$2 fn=$3 t0 rc
    if (( $(elapsed) + 5 > TOTAL_S )); then
        printf '%s\tskipped\t0\t%s\n' "$name" "$limit" >>"$WORK/steps.tsv"
        return 1
    fi
    printf '\n=== %s (limit %ss, at %ss)\n' "$name" "$limit" "$(elapsed)" | tee -a "$LOG"
    t0=$EPOCHREALTIME
    timeout --kill-after=10 "$limit" bash -c "$fn" >>"$LOG" 2>&1
    rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(echo "$EPOCHREALTIME $t0" | awk '{printf "%.1f", $1 - $2}')" \
        "$limit" >>"$WORK/steps.tsv"
    echo "    -> rc $rc" | tee -a "$LOG"
    return $rc
}

install() {
    local wheels=("$WHEELS"/*/*.whl)
    if [ -n "$REHEARSAL" ]; then
        echo "rehearsal: using $VENV as it is"
        return 0
    fi
    if [ ! -e "${wheels[0]}" ]; then
        echo "no wheels under $WHEELS: run scripts/fetch_gpu_wheels.sh --device-check where" \
            "PyPI is reachable and bring .whl/gpu-check along (its parts a and b)"
        return 66
    fi
    if ! ls "$WHEELS"/*/custatevec_cu13-*.whl >/dev/null 2>&1; then
        echo "the cuStateVec wheel (part a) is missing under $WHEELS: bring .whl/gpu-check/a"
        return 66
    fi
    # A venv whose own packages come first, then everything the machine's python sees
    # (its CuPy, NumPy, CUDA wheels): a .pth file, because on an image whose python3 is
    # itself a venv, --system-site-packages would expose the base interpreter's only.
    "$PY" -m venv --clear "$VENV" || return 1
    "$PY" -c 'import site, sys; print("\n".join(site.getsitepackages() + [site.getusersitepackages()]))' \
        >"$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/qpi-image.pth"
    "$VENV/bin/python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        "${wheels[@]}" || return 1
    # Every dependency of the project and the gpu extra must now resolve.
    "$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
import json, os, sys, tomllib

try:
    from packaging.requirements import Requirement
except ImportError:  # not in every image; pip always carries it
    from pip._vendor.packaging.requirements import Requirement

project = tomllib.load(open(os.path.join(os.environ["ROOT"], "pyproject.toml"), "rb"))["project"]
found, problems = {}, []
for text in project["dependencies"] + project["optional-dependencies"]["gpu"]:
    req = Requirement(text)
    try:
        version = md.version(req.name)
    except md.PackageNotFoundError:
        problems.append(f"{req.name} is not installed")
        continue
    found[req.name] = version
    if not req.specifier.contains(version, prereleases=True):
        problems.append(f"{req.name} {version} does not satisfy {req.specifier}")
try:
    import cupy  # noqa: F401
    from cuquantum.bindings import custatevec

    found["libcustatevec"] = str(custatevec.get_version())
except Exception as exc:  # the report says what did not load
    problems.append(f"CuPy/cuStateVec do not load: {type(exc).__name__}: {exc}")
json.dump({"versions": found, "problems": problems},
          open(os.path.join(os.environ["WORK"], "install.json"), "w"), indent=1)
print("\n".join(f"{k} {v}" for k, v in found.items()))
if problems:
    print("dependency problems:", *problems, sep="\n  ")
    sys.exit(1)
EOF
}

device_info() {
    if [ -n "$REHEARSAL" ]; then
        echo "rehearsal: no GPU" >"$WORK/nvidia-smi.txt"
    else
        nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version \
            --format=csv,noheader | tee "$WORK/nvidia-smi.txt"
    fi
    "$VENV/bin/python" - <<'EOF'
import json, os

from executors.gpu.executor import GpuExecutor

info = {"nvidia_smi": open(os.path.join(os.environ["WORK"], "nvidia-smi.txt")).read().strip()}
for precision in ("single", "double"):
    ex = GpuExecutor({"backend": os.environ["BACKEND"], "precision": precision})
    caps = ex.capabilities()
    info[precision] = {"device": caps.device, "memory_bytes": caps.memory_bytes,
                       "free_memory_bytes": caps.extra["free_memory_bytes"],
                       "max_qubits": caps.max_qubits}
    ex.close()
json.dump(info, open(os.path.join(os.environ["WORK"], "device.json"), "w"), indent=1)
print(json.dumps(info, indent=1))
EOF
}

device_tests() {
    "$VENV/bin/python" -m pytest -q -p no:cacheprovider -rs --timeout 120 \
        --junitxml="$OUT_DIR/device-tests.xml" \
        tests/test_gpu_device.py tests/test_gpu_custatevec.py
}

bench() {
    # The 20-28 qubit rows finish first; 30 qubits runs while the budget lasts. The JSON
    # is rewritten after each size, so a cut-short run keeps what it measured.
    local sizes=(--qubits 20,24,28,30)
    [ -n "$REHEARSAL" ] && sizes=(--cpu-reference --qubits 8,10)
    "$VENV/bin/python" bench/gpu.py "${sizes[@]}" --circuits qv,qft \
        --precision single,double --fusion-sweep 2,3,4,5,6 --repeats 2 --budget-s 100 \
        --json "$OUT_DIR/bench.json"
}

daemon_e2e() {
    "$VENV/bin/python" - <<'EOF'
"""The daemon with --executor gpu and its embedded orchestrator: a Bell job, a 24-qubit
GHZ job and one over max_qubits, submitted as `qpi-driver submit` does."""
import json, os, signal, subprocess, sys, time, urllib.request

from qiskit import QuantumCircuit, qasm3

work, port = os.environ["WORK"], os.environ["PORT"]
url = f"http://127.0.0.1:{port}"
py = sys.executable
daemon = subprocess.Popen(
    [py, "-m", "driver", "--executor", "gpu", "--local-port", port,
     "--data-dir", os.path.join(work, "data"), "--metrics-addr", "",
     "--executor-option", "seed=1", "--executor-option", f"backend={os.environ['BACKEND']}"],
    stdout=sys.stdout, stderr=sys.stderr,
)
out = {"ok": False, "jobs": {}}
try:
    deadline = time.monotonic() + 40
    qpus = None
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise SystemExit(f"the daemon exited with {daemon.returncode} while starting")
        try:
            qpus = json.load(urllib.request.urlopen(f"{url}/api/qpus", timeout=1))
            if qpus:
                break
        except OSError:
            pass
        time.sleep(0.2)
    out["qpus"] = qpus
    print("orchestrator sees:", json.dumps(qpus)[:2000])

    def ghz(n):
        qc = QuantumCircuit(n, n)
        qc.h(0)
        for q in range(n - 1):
            qc.cx(q, q + 1)
        qc.measure(range(n), range(n))
        return qasm3.dumps(qc)

    max_qubits = qpus[0]["num_qubits"] if qpus else None
    jobs = {"bell": open(os.path.join(os.environ["ROOT"], "examples", "bell.qasm")).read(),
            f"ghz{os.environ['GHZ_N']}": ghz(int(os.environ["GHZ_N"]))}
    if max_qubits:
        jobs[f"over_max_{max_qubits + 1}"] = ghz(max_qubits + 1)
    for name, source in jobs.items():
        path = os.path.join(work, f"{name}.qasm")
        open(path, "w").write(source)
        t0 = time.monotonic()
        res = subprocess.run([py, "-m", "driver", "submit", path, "--shots", "1000",
                              "--url", url, "--timeout", "60"],
                             capture_output=True, text=True, timeout=90)
        out["jobs"][name] = {"rc": res.returncode, "seconds": round(time.monotonic() - t0, 3),
                             "stdout": res.stdout[-1500:], "stderr": res.stderr[-1500:]}
        print(f"--- {name}: rc {res.returncode}\n{res.stdout[-800:]}{res.stderr[-800:]}")
    over = [v for k, v in out["jobs"].items() if k.startswith("over_max")]
    out["ok"] = (all(v["rc"] == 0 for k, v in out["jobs"].items() if not k.startswith("over"))
                 and all(v["rc"] != 0 and "QUOTA_EXCEEDED" in v["stdout"] + v["stderr"]
                         for v in over) and bool(over))
finally:
    daemon.send_signal(signal.SIGTERM)
    try:
        daemon.wait(20)
    except subprocess.TimeoutExpired:
        daemon.kill()
    out["daemon_rc"] = daemon.returncode
    json.dump(out, open(os.path.join(work, "e2e.json"), "w"), indent=1)
sys.exit(0 if out["ok"] else 1)
EOF
}

admission() {
    "$VENV/bin/python" - <<'EOF'
"""max_qubits runs and max_qubits + 1 is refused, in both precisions, with the figures."""
import json, os, sys, time

from qiskit import QuantumCircuit

from executors.base import Experiment, Job, JobError
from executors.gpu.executor import GpuExecutor

def circuit(n):
    qc = QuantumCircuit(n, n)
    qc.h(range(n))
    qc.measure(range(n), range(n))
    return qc

out, ok = {}, True
for precision in ("single", "double"):
    ex = GpuExecutor({"backend": os.environ["BACKEND"], "precision": precision, "seed": 1})
    backend = ex._backend  # figures the report needs: requirement by part, sampler size
    top = ex.max_qubits()
    n = min(top, int(os.environ["FIT_CAP"]))  # a rehearsal on a CPU runs a smaller one
    plan, _, _ = ex.plan_for(circuit(n))
    fig = {"max_qubits": top, "ran_qubits": n, "memory": backend.memory(),
           "required_estimate": dict(backend.required_bytes(plan.footprint(1000)))}
    t0 = time.perf_counter()
    try:
        res = ex.run(Job("fits", (Experiment(circuit(n), 1000),)))
        fig["fits"] = {"ok": sum(res.experiments[0].counts.values()) == 1000,
                       "seconds": round(time.perf_counter() - t0, 3)}
    except JobError as exc:
        fig["fits"] = {"ok": False, "error": exc.to_result()}
    sampler = getattr(backend, "_sampler_ws", {})
    fig["sampler_workspace_bytes"] = {f"{k[0]}q/{k[1]}": v for k, v in sampler.items()}
    fig["held_bytes"] = backend.held_bytes()
    try:
        ex.run(Job("over", (Experiment(circuit(top + 1), 10),)))
        fig["over"] = {"ok": False, "error": "max_qubits + 1 was not refused"}
    except JobError as exc:
        fig["over"] = {"ok": exc.code == "QUOTA_EXCEEDED", "error": exc.to_result()}
    ex.close()
    ok = ok and fig["fits"]["ok"] and fig["over"]["ok"]
    out[precision] = fig
    print(precision, json.dumps(fig, indent=1, default=str))
json.dump(out, open(os.path.join(os.environ["WORK"], "admission.json"), "w"), indent=1,
          default=str)
sys.exit(0 if ok else 1)
EOF
}

report() {
    local py="$VENV/bin/python"
    [ -x "$py" ] || py="$PY"  # the install step may have failed
    "$py" - <<'EOF'
import json, os, sys
import xml.etree.ElementTree as ET

work, out_dir = os.environ["WORK"], os.environ["OUT_DIR"]

def load(name, folder=work):
    try:
        return json.load(open(os.path.join(folder, name)))
    except (OSError, ValueError):
        return None

steps = []
for line in open(os.path.join(work, "steps.tsv")):
    name, rc, seconds, limit = line.rstrip("\n").split("\t")
    steps.append({"name": name, "rc": rc if rc == "skipped" else int(rc),
                  "seconds": float(seconds), "limit_s": int(limit)})
tests = None
try:
    suite = ET.parse(os.path.join(out_dir, "device-tests.xml")).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    tests = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    tests["failed"] = failed
except (OSError, ET.ParseError):
    pass
bench = load("bench.json", out_dir)
best = {}
if bench:
    for row in bench["rows"]:
        if row["kind"] != "fused":
            continue
        key = f"{row['circuit']}{row['n']} {row['precision']}"
        if key not in best or row["ms"] < best[key]["ms"]:
            best[key] = {"k": row["k"], "ms": round(row["ms"], 3),
                         "x_bound": round(row["over_bound"], 2)}
report = {
    "ok": all(s["rc"] == 0 for s in steps),
    "seconds": round(sum(s["seconds"] for s in steps), 1),
    "steps": steps,
    "install": load("install.json"),
    "device": load("device.json"),
    "device_tests": tests,
    "bench": {"file": "bench.json", "copy_bandwidth_bytes_per_s":
              bench and bench["copy_bandwidth_bytes_per_s"], "best_fused": best,
              "skipped": bench and bench["skipped"]},
    "daemon_e2e": load("e2e.json"),
    "admission": load("admission.json"),
}
json.dump(report, open(os.path.join(out_dir, "gpu-check.json"), "w"), indent=1, default=str)
lines = [f"gpu-check: {'PASSED' if report['ok'] else 'FAILED'} in {report['seconds']} s", ""]
lines += [f"  {s['name']:<13} {str(s['rc']):>7}  {s['seconds']:>6.1f} s (limit {s['limit_s']} s)"
          for s in steps]
dev = report["device"] or {}
for p in ("single", "double"):
    if p in dev:
        d = dev[p]
        lines.append(f"  {p}: {d['device']}, {d['memory_bytes'] / 2**30:.1f} GiB, "
                     f"max_qubits {d['max_qubits']}")
if tests:
    lines.append(f"  device tests: {tests['tests']} run, {tests['failures']} failed, "
                 f"{tests['errors']} errors, {tests['skipped']} skipped")
    lines += [f"    FAILED {name}" for name in tests["failed"]]
for key, b in best.items():
    lines.append(f"  bench {key}: best k={b['k']} {b['ms']} ms, {b['x_bound']} x bound")
adm = report["admission"] or {}
for p, fig in adm.items():
    lines.append(f"  admission {p}: max_qubits {fig['max_qubits']}, ran {fig['ran_qubits']}: "
                 f"ok={fig['fits'].get('ok')} ({fig['fits'].get('seconds', '-')} s), "
                 f"max+1 refused={fig['over'].get('ok')}")
e2e = report["daemon_e2e"] or {}
for name, job in (e2e.get("jobs") or {}).items():
    lines.append(f"  daemon job {name}: rc {job['rc']} in {job['seconds']} s")
open(os.path.join(out_dir, "gpu-check.txt"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
}

export -f install device_info device_tests bench daemon_e2e admission
cd "$ROOT"
status=0
step install 60 install
rc=$(tail -1 "$WORK/steps.tsv" | cut -f2)
if [ "$rc" != 0 ]; then
    report
    [ "$rc" = 66 ] && exit 66
    exit 1
fi
step device-info 20 device_info || status=1
step device-tests 120 device_tests || status=1
step bench 150 bench || status=1
step daemon-e2e 60 daemon_e2e || status=1
step admission 50 admission || status=1
report
exit $status
