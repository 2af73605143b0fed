#!/usr/bin/env bash
# Runs the whole suite (lint included) in ./.venv; `make test` installs the venv first.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
.venv/bin/ruff check . || exit 1
"$PY" -m pytest -q -ra --durations=10 "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: treating as failure, the suite must not be empty" >&2
  exit 1
fi
exit "$rc"
