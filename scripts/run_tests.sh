#!/usr/bin/env bash
# Lint, then the whole test suite. pytest's exit code 5 ("no tests collected") is turned into a
# loud failure: an empty selection must never pass silently.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
$PY -m ruff check . || exit 1
$PY -m ruff format --check . || { echo "run 'make format' to fix formatting" >&2; exit 1; }
$PY -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "ERROR: pytest collected no tests; refusing to pass an empty test run." >&2
  exit 1
fi
exit "$rc"
