"""Two replicas behind HAProxy under steady load (devtools/replica_drill.py, ``make
drill``): a rolling restart loses nothing; a killed replica fails only the requests
it held (none where the balancer retries them), each answered by the balancer at once,
and the other replica serves the rest."""

from __future__ import annotations

import pytest
from conftest import ModelStore

from devtools.replica_drill import ROUTES, Drill, haproxy_path, run_drill

pytestmark = [
    pytest.mark.server,
    pytest.mark.skipif(
        haproxy_path() is None,
        reason="needs Debian's haproxy (make balancer)",
    ),
]


@pytest.fixture(scope="module")
def drill(model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Drill:
    done = run_drill({**model_store.env, "OMP_NUM_THREADS": "1"}, tmp_path_factory.mktemp("drill"))
    print("\n" + done.report())
    return done


def test_a_rolling_restart_under_load_fails_no_request(drill: Drill):
    *before_the_kill, _ = drill.phases
    for phase in before_the_kill:
        answered = drill.during(phase)
        assert {o.route for o in answered} == set(ROUTES), phase.name
        assert {o.status for o in answered} == {"200"}, phase.name
    steady, *_, steady_again = before_the_kill
    assert {o.replica for o in drill.during(steady)} == {"r0", "r1"}
    assert {o.replica for o in drill.during(steady_again)} == {"r0", "r1"}  # both back


def test_a_killed_replica_fails_only_requests_it_held_and_none_hangs(drill: Drill):
    killed = drill.phases[-1]
    ended = drill.during(killed)
    failed = [o for o in ended if o.status != "200"]
    # The retrying route lost none; if it did, HAProxy's termination state says why.
    assert {o.route for o in failed} <= {"plain"}, drill.report()
    # HAProxy's 502, or on a kept-alive client connection its close without a response.
    assert {o.status for o in failed} <= {"502", "RemoteProtocolError"}
    assert all(o.start < drill.out_of_balancer for o in failed)  # sent to r0 before it was out
    assert all(o.end - killed.start < 5 for o in failed)  # each told at once: none hung
    after = [o for o in ended if o.start > drill.out_of_balancer]
    assert {o.route for o in after} == set(ROUTES)
    assert {(o.status, o.replica) for o in after} == {("200", "r1")}
