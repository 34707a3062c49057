# Sourced by the other scripts: finds Python >= 3.12 and makes .venv with the project in it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${QPI_VENV:-$ROOT/.venv}"

find_python() {
  local cand v
  for cand in python3.12 python3.13 python3.14 python3; do
    if command -v "$cand" >/dev/null 2>&1 &&
       "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; then
      command -v "$cand"; return
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then  # pyenv installs that are not the global one
    for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.1[2-9]' | sort -V); do
      echo "$(pyenv root)/versions/$v/bin/python3"; return
    done
  fi
  echo "qpi-driver needs Python >= 3.12 (qpi-client requires it); install one and retry" >&2
  exit 1
}

ensure_venv() {  # $1: pip extras, e.g. "test"
  local extras="${1:-}" stamp="$VENV/.qpi-installed${1:+-$1}"
  if [ ! -x "$VENV/bin/python" ]; then
    "$(find_python)" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
  fi
  if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
    "$VENV/bin/python" -m pip install -q -e "$ROOT${extras:+[$extras]}"
    touch "$stamp"
  fi
}
