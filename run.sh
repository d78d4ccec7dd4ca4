#!/usr/bin/env bash
# pallas_flash: set up and run.
#   bash run.sh            set up .venv (Python 3.12, pinned deps) and train GPT-2 on the embedded data
#   bash run.sh test       set up the same .venv if needed and run the test suite
#   bash run.sh setup      only set up
# Extra arguments after the command go to the training script or to pytest.
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv

find_python() {
  # The first interpreter that actually runs and is >= 3.12: PATH first, then pyenv.
  # (A pyenv shim may be on PATH and fail when run, so each candidate is executed.)
  local c
  for c in python3.12 python3.13 python3 python \
           "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*/bin/python3 \
           /root/.pyenv/versions/3.1[2-9]*/bin/python3; do
    [ -n "$c" ] || continue
    if "$c" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; then
      command -v "$c" 2>/dev/null || echo "$c"
      return 0
    fi
  done
  return 1
}

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

setup() {
  local stamp="$VENV/.installed" want
  want="$(cat pyproject.toml; if has_gpu; then echo cuda; fi)"
  if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  local py
  if ! py=$(find_python); then
    echo "error: pallas_flash needs Python >= 3.12 (JAX 0.11.2 requires it); none found on PATH or under pyenv." >&2
    echo "Install one (e.g. 'pyenv install 3.12') and run this again." >&2
    exit 1
  fi
  echo "Setting up $VENV with $py ($("$py" --version))"
  "$py" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  local extras="dev"
  if has_gpu; then extras="dev,cuda"; fi
  "$VENV/bin/python" -m pip install -q -e ".[$extras]"
  echo "$want" > "$stamp"
}

cmd="${1:-train}"
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup ;;
  train) setup; exec "$VENV/bin/python" -m train "$@" ;;
  test)
    setup
    # pytest exits 5 when it collects nothing; that is a failure here too, never a pass.
    exec "$VENV/bin/python" -m pytest -q "$@" ;;
  *) echo "usage: bash run.sh [train|test|setup] [args...]" >&2; exit 2 ;;
esac
