#!/usr/bin/env bash
# `make check`'s types and tests, side by side. The in-process tests keep one core busy
# (one compute thread per process, tests/conftest.py) and mypy the other: on a fresh
# clone, where mypy has no cache, it takes about 45 s of a 2-core machine. Its report
# follows the tests'. Fails if either fails; extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
log=$(mktemp)
trap 'rm -f "$log"' EXIT

"$VENV/bin/mypy" >"$log" 2>&1 &
types=$!
"$VENV/bin/python" -m pytest -m "not server" "$@"
tests=$?
wait "$types"
typed=$?
echo
echo "=== mypy (ran alongside) ==="
cat "$log"
[ "$tests" -eq 0 ] && [ "$typed" -eq 0 ]
