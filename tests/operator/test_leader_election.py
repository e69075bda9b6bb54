"""Leader election's pure rules (operator/main.py): expiry judged on our own clock, never the holder's
(issue 12, item 9). The stalled connection and the skewed holder run against a real API server in
tests/e2e/test_hardening.py."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from aiaas.operator.main import LeaseObservation, lease_is_free, lease_spec, observe_lease

T0 = datetime(2026, 5, 1, 12, 0, 0, tzinfo=timezone.utc)


def lease(holder: str | None, renew: datetime, rv: str = "1") -> dict:
    return {"metadata": {"resourceVersion": rv},
            "spec": {"holderIdentity": holder, "renewTime": renew.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                     "leaseDurationSeconds": 15}}


def test_a_held_lease_expires_after_its_duration_on_our_clock_since_we_first_saw_it():
    seen = observe_lease(None, lease("a", T0), now=100.0)
    assert lease_is_free(lease("a", T0)["spec"], "a", seen, 100.0), "ours"
    assert not lease_is_free(lease("a", T0)["spec"], "b", seen, 114.9)
    again = observe_lease(seen, lease("a", T0), now=114.9)  # unchanged: the clock keeps running
    assert again == seen and lease_is_free(lease("a", T0)["spec"], "b", again, 115.0)
    assert lease_is_free({"holderIdentity": None}, "b", seen, 100.0)


def test_a_holder_whose_clock_is_an_hour_behind_keeps_its_lease_while_it_renews():
    stale_looking = lease("a", T0 - timedelta(hours=1))
    seen = observe_lease(None, stale_looking, now=0.0)
    for t in range(2, 60, 2):  # it renews every 2 s: resourceVersion and renewTime move
        seen = observe_lease(seen, lease("a", T0 - timedelta(hours=1, seconds=-t), rv=str(t)), now=float(t))
        assert not lease_is_free(stale_looking["spec"], "b", seen, float(t))


def test_a_dead_holder_whose_clock_was_an_hour_ahead_loses_its_lease_after_the_duration():
    future = lease("ghost", T0 + timedelta(hours=1))
    seen = observe_lease(None, future, now=50.0)
    assert not lease_is_free(future["spec"], "b", seen, 60.0)
    assert lease_is_free(future["spec"], "b", observe_lease(seen, future, 65.0), 65.0)


def test_lease_spec_keeps_acquire_time_and_counts_transitions():
    fresh = {"holderIdentity": "a", "renewTime": "2026-05-01T11:59:55.000000Z", "leaseDurationSeconds": 15}
    took = lease_spec(fresh, "b", T0, 15)
    assert took["holderIdentity"] == "b" and took["leaseTransitions"] == 1 and took["acquireTime"] == took["renewTime"]
    kept = lease_spec(took, "b", T0 + timedelta(seconds=2), 15)
    assert kept["leaseTransitions"] == 1 and kept["acquireTime"] == took["acquireTime"]
    assert isinstance(observe_lease(None, {"spec": took}, 0.0), LeaseObservation)
