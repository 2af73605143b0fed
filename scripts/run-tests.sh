#!/usr/bin/env bash
# Runs the whole suite (lint included) in ./.venv (sglang 0.5.23), then the plugin's tests (tests/integration and
# tests/e2e) in ./.venv-sglang0516 (sglang 0.5.16, the oldest supported release); `make test` installs both venvs.
# Arguments go to both pytest runs (default: everything in .venv, the plugin's tests in .venv-sglang0516).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
PY_0516=.venv-sglang0516/bin/python
.venv/bin/ruff check . || exit 1

run_pytest() {  # label python args...: pytest's exit status, with 5 (no test collected) as a failure
  local label=$1 py=$2
  shift 2
  echo "=== pytest on $label"
  "$py" -m pytest -q -ra --durations=10 "$@"
  local rc=$?
  if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests on $label: treating as failure, the suite must not be empty" >&2
    return 1
  fi
  return "$rc"
}

if [ ! -x "$PY_0516" ]; then
  echo "$PY_0516 is missing: run 'make test' (it builds the sglang 0.5.16 venv)" >&2
  exit 1
fi
# The second venv must really run 0.5.16's code and its pins, with .venv's torch and this checkout's plugin.
"$PY_0516" - <<'PYEOF' || exit 1
import os, sys, sglang, torch, transformers, mm_scheduler_sglang
from mm_scheduler_sglang import sglang_compat
own = sys.prefix
checks = {"sglang 0.5.16 from .venv-sglang0516": sglang.__version__ == "0.5.16" and sglang.__file__.startswith(own),
          "transformers 5.12.1 from .venv-sglang0516": transformers.__version__ == "5.12.1"
          and transformers.__file__.startswith(own),
          "torch from .venv": not torch.__file__.startswith(own),
          "plugin from this checkout": mm_scheduler_sglang.__file__.startswith(os.getcwd()),
          "layer sees 0.5.16": sglang_compat.current().version == (0, 5, 16)}
bad = [name for name, ok in checks.items() if not ok]
print("sglang 0.5.16 venv:", "ok" if not bad else f"WRONG: {bad}")
sys.exit(1 if bad else 0)
PYEOF

status=0
run_pytest "sglang 0.5.23 (.venv)" "$PY" "$@" || status=1
if [ "$#" -eq 0 ]; then set -- tests/integration tests/e2e; fi
run_pytest "sglang 0.5.16 (.venv-sglang0516)" "$PY_0516" "$@" || status=1
exit "$status"
