#!/usr/bin/env bash
# `make test`'s tests. The two lanes of tests/conftest.py's server layer run as two
# pytest processes at once, so both cores work (each lane is mostly one process
# waiting on another); the shared-servers lane reports as it goes, the others' reports
# follow. The soak is the shared lane's last test, on the servers that lane already
# runs (it measures each server's own resident memory, which the other lane's
# processes do not change). `make check`'s tests (no server) run beside them at nice
# 10, on the CPU time the lanes leave while they wait: after them, they added 1.5-1.9
# minutes to the suite. Fails if any fails; extra arguments go to all three.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
own_log=$(mktemp)
unit_log=$(mktemp)
trap 'rm -f "$own_log" "$unit_log"' EXIT

nice -n 10 "$PY" -m pytest -m "not server" "$@" >"$unit_log" 2>&1 &
unit=$!
"$PY" -m pytest -m server --lane own-processes "$@" >"$own_log" 2>&1 &
own=$!
"$PY" -m pytest -m server --lane shared-servers "$@"
shared=$?
wait "$own"
own_status=$?
wait "$unit"
unit_status=$?
echo
echo "=== lane own-processes (ran alongside) ==="
cat "$own_log"
echo
echo "=== make check's tests, no server (ran alongside, at nice 10) ==="
cat "$unit_log"
# pytest exits 5 when a run has no test (a -k that selects from one lane only, say).
for status in "$shared" "$own_status" "$unit_status"; do
    [ "$status" -eq 0 ] || [ "$status" -eq 5 ] || exit "$status"
done
