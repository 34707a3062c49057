#!/usr/bin/env bash
# Sets up .venv, starts the daemon with its embedded orchestrator (local mode),
# runs a Bell circuit through it end to end, then keeps serving until Ctrl-C.
source "$(dirname "$0")/env.sh"
ensure_venv
EXECUTOR="${1:-aer}"
PORT="${QPI_LOCAL_PORT:-8090}"
"$VENV/bin/qpi-driver" --executor "$EXECUTOR" --local-port "$PORT" &
DAEMON=$!
trap 'kill -TERM $DAEMON 2>/dev/null; wait $DAEMON' EXIT INT TERM
for _ in $(seq 1 300); do
  if "$VENV/bin/python" -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$PORT/api/qpus', timeout=1)" 2>/dev/null; then break; fi
  kill -0 $DAEMON 2>/dev/null || { wait $DAEMON; exit $?; }
  sleep 0.2
done
"$VENV/bin/qpi-driver" submit "$ROOT/examples/bell.qasm" --shots 1024 --url "http://127.0.0.1:$PORT"
echo "daemon still serving on http://127.0.0.1:$PORT (Ctrl-C stops it)" >&2
wait $DAEMON
