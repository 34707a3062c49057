#!/usr/bin/env bash
# Sets up .venv, starts the daemon with its embedded orchestrator (local mode),
# runs a Bell circuit through it end to end, then keeps serving until Ctrl-C.
source "$(dirname "$0")/env.sh"
ensure_venv
EXECUTOR="${1:-aer}"
PORT="${QPI_LOCAL_PORT:-8090}"
# The daemon runs in a process group of its own (job control on for this one start), so
# the terminal's Ctrl-C reaches only this script, and the trap passes it on exactly once:
# the daemon drains. A second signal would make it exit at once.
set -m
"$VENV/bin/qpi-driver" --executor "$EXECUTOR" --local-port "$PORT" &
DAEMON=$!
set +m
stop() {  # $1: the signal to pass on
  trap - EXIT INT TERM
  kill -"$1" "$DAEMON" 2>/dev/null || true
  local code=0
  wait "$DAEMON" || code=$?
  exit "$code"
}
trap 'stop INT' INT
trap 'stop TERM' TERM EXIT
for _ in $(seq 1 300); do
  if "$VENV/bin/python" -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$PORT/api/qpus', timeout=1)" 2>/dev/null; then break; fi
  kill -0 "$DAEMON" 2>/dev/null || { trap - EXIT; code=0; wait "$DAEMON" || code=$?; exit "$code"; }
  sleep 0.2
done
"$VENV/bin/qpi-driver" submit "$ROOT/examples/bell.qasm" --shots 1024 --url "http://127.0.0.1:$PORT"
echo "daemon still serving on http://127.0.0.1:$PORT (Ctrl-C stops it)" >&2
code=0
wait "$DAEMON" || code=$?
# A signal interrupts the wait and runs its trap; here the daemon ended by itself.
trap - EXIT
exit "$code"
