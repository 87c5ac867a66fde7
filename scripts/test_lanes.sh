#!/usr/bin/env bash
# `make test`'s server layer: the two lanes of tests/conftest.py as two pytest processes
# at once, so both cores work (each lane is mostly one process waiting on another).
# The shared-servers lane reports as it goes; the own-processes lane's report follows
# when both are done. Fails if either lane fails. Extra arguments go to both.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
log=$(mktemp)
trap 'rm -f "$log"' EXIT

"$PY" -m pytest -m server --lane own-processes "$@" >"$log" 2>&1 &
own=$!
"$PY" -m pytest -m server --lane shared-servers "$@"
shared=$?
wait "$own"
own_status=$?
echo
echo "=== lane own-processes (ran alongside) ==="
cat "$log"
# pytest exits 5 when a lane has no test (e.g. a -k that selects from one lane only).
for status in "$shared" "$own_status"; do
    [ "$status" -eq 0 ] || [ "$status" -eq 5 ] || exit "$status"
done
