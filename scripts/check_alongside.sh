#!/usr/bin/env bash
# `make check`'s types and tests, side by side. The in-process tests run in two pytest
# workers (pytest-xdist; one compute thread each, tests/conftest.py), a module at a time
# wherever one is free, and mypy beside them: on a fresh clone, where mypy has no cache,
# it takes about 45 s of a core. Its report follows the tests'. Fails if either fails;
# extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
log=$(mktemp)
trap 'rm -f "$log"' EXIT

"$VENV/bin/mypy" >"$log" 2>&1 &
types=$!
"$VENV/bin/python" -m pytest -m "not server" --numprocesses 2 --dist loadfile "$@"
tests=$?
wait "$types"
typed=$?
echo
echo "=== mypy (ran alongside) ==="
cat "$log"
[ "$tests" -eq 0 ] && [ "$typed" -eq 0 ]
