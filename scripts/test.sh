#!/usr/bin/env bash
# Sets up .venv with the test and hardware extras and runs the test suite (extra args go to pytest).
source "$(dirname "$0")/env.sh"
ensure_venv test,hardware
cd "$ROOT"
"$VENV/bin/python" -m pytest -q "$@"
