#!/usr/bin/env bash
# `make test`'s server layer. The two lanes of tests/conftest.py run as two pytest
# processes at once, so both cores work (each lane is mostly one process waiting on
# another); the shared-servers lane reports as it goes, the own-processes lane's report
# follows. Then the soak runs alone, both families at once: it measures the servers'
# memory, which the lanes' own servers and builds would disturb. Fails if any part
# fails; extra arguments go to every part.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
log=$(mktemp)
trap 'rm -f "$log"' EXIT

"$PY" -m pytest -m "server and not soak" --lane own-processes "$@" >"$log" 2>&1 &
own=$!
"$PY" -m pytest -m "server and not soak" --lane shared-servers "$@"
shared=$?
wait "$own"
own_status=$?
echo
echo "=== lane own-processes (ran alongside) ==="
cat "$log"
"$PY" -m pytest -m soak "$@"
soak=$?
# pytest exits 5 when a part has no test (a -k that selects from one part only, say).
for status in "$shared" "$own_status" "$soak"; do
    [ "$status" -eq 0 ] || [ "$status" -eq 5 ] || exit "$status"
done
