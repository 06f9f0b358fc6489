"""The Kubernetes Lease path of leader election, against the API's recorded request and response
shapes. No API server can be installed on these machines, so the ``kubernetes`` client talks to a
loopback HTTP server (``tests/support/k8s_api.py``) that answers GET/POST/PUT of
``/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{name}`` as kube-apiserver does (404, then
201 on create, 409 AlreadyExists, 409 Conflict on a stale resourceVersion), from the bodies in
``tests/fixtures/k8s/`` (see its README for where they come from). Each candidate reaches the
store through a server of its own, so the test can cut one off the API as a partition would."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from kubernetes import client
from kubernetes.leaderelection.leaderelectionrecord import LeaderElectionRecord

from services.core.leader import Leadership, LeaseCampaign, Outcome
from tests.support.k8s_api import MICRO_TIME, FakeApiServer, LeaseStore, Request

pytestmark = [pytest.mark.slow]

NAMESPACE = "cdp"
NAME = "tessera-ingest"
LEASE = 2.0
RENEW = 0.25
PATH = f"/apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases/{NAME}"


@dataclass
class Candidate:
    name: str
    server: FakeApiServer
    campaign: LeaseCampaign
    leadership: Leadership


@pytest.fixture
def store() -> LeaseStore:
    return LeaseStore()


@pytest.fixture
def candidates(store: LeaseStore) -> Iterator[Callable[[str], Candidate]]:
    made: list[Candidate] = []

    def make(name: str) -> Candidate:
        server = FakeApiServer(store, name).start()
        api = client.ApiClient(client.Configuration(host=server.host))
        campaign = LeaseCampaign(api, namespace=NAMESPACE, name=NAME, identity=name, lease_seconds=LEASE, timeout=RENEW)
        leadership = Leadership("ingest", campaign, lease_seconds=LEASE, renew_seconds=RENEW, identity=name)
        made.append(Candidate(name, server, campaign, leadership))
        return made[-1]

    yield make
    for c in made:
        c.leadership.stop(5)
        c.server.stop()


def wait_until(fn: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fn():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Watch:
    """Samples both candidates every few milliseconds: were they ever leaders at the same time?"""

    def __init__(self, *candidates: Candidate) -> None:
        self.candidates = candidates
        self.overlaps = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            if sum(c.leadership.is_leader() for c in self.candidates) > 1:
                self.overlaps += 1

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.overlaps


def spec(r: Request) -> dict[str, Any]:
    assert r.body is not None
    found: dict[str, Any] = r.body["spec"]
    return found


def micro(value: str) -> dt.datetime:
    assert MICRO_TIME.match(value), value
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def test_one_leads_a_follower_takes_over_only_when_the_lease_expires_and_a_release_hands_over_at_once(
    store: LeaseStore, candidates: Callable[[str], Candidate]
) -> None:
    a, b = candidates("pod-a"), candidates("pod-b")
    a.leadership.start()
    wait_until(a.leadership.is_leader, 5, "pod-a to acquire the new Lease")
    created = store.writes()[0]
    assert (created.method, created.path, created.status) == ("POST", PATH.rsplit("/", 1)[0], 201)
    assert created.body is not None and created.body["metadata"]["name"] == NAME
    first = spec(created)
    assert first["holderIdentity"] == "pod-a"
    assert first["leaseDurationSeconds"] == 2
    assert first["leaseTransitions"] == 0
    assert micro(first["acquireTime"]) == micro(first["renewTime"])

    # While pod-a renews, pod-b campaigns and never leads.
    b.leadership.start()
    watch = Watch(a, b)
    renewals_at_start = len(store.writes(200))
    wait_until(lambda: len(store.writes(200)) >= renewals_at_start + int(2 * LEASE / RENEW), 10, "renewals")
    assert a.leadership.is_leader() and not b.leadership.is_leader()
    renewals = [r for r in store.writes(200) if r.via == "pod-a"]
    assert {spec(r)["holderIdentity"] for r in renewals} == {"pod-a"}
    assert {spec(r)["acquireTime"] for r in renewals} == {first["acquireTime"]}, "a renew keeps acquireTime"
    times = [micro(spec(r)["renewTime"]) for r in renewals]
    assert times == sorted(times) and len(set(times)) == len(times), "each renew moves renewTime on"
    assert {spec(r)["leaseTransitions"] for r in renewals} == {0}
    assert all(r.body and r.body["metadata"]["resourceVersion"] for r in renewals), "every replace is conditional"
    assert not [r for r in store.writes() if r.via == "pod-b"], "pod-b never wrote a Lease it saw held"

    # pod-a is cut off from the API (a partition, or a killed pod): it stops renewing. It steps
    # down after lease - renew; pod-b takes over once the lease has expired, and never before.
    cut_at = time.monotonic()
    a.server.stop()
    wait_until(b.leadership.is_leader, LEASE + 3, "pod-b to take over")
    took = time.monotonic() - cut_at
    print(f"Lease taken over {took:.2f}s after the leader was cut off (lease {LEASE}s, renew {RENEW}s)")
    assert took >= LEASE - RENEW, f"pod-b took over {took:.2f}s after the last renew: before the lease expired"
    assert not a.leadership.is_leader()
    (takeover,) = [r for r in store.writes() if r.via == "pod-b"]
    taken = spec(takeover)
    assert (takeover.method, takeover.status, taken["holderIdentity"]) == ("PUT", 200, "pod-b")
    assert taken["leaseTransitions"] == 1
    assert micro(taken["acquireTime"]) > micro(first["acquireTime"])
    assert taken["leaseDurationSeconds"] == 2

    # pod-a can reach the API again and campaigns as a follower; pod-b stops and releases the
    # Lease (holder cleared, one second), so pod-a takes it on its next attempt, not a lease later.
    a.server.start()
    reads = len(store.requests)
    wait_until(lambda: any(r.via == "pod-a" and r.status == 200 for r in store.requests[reads:]), 5, "pod-a back")
    assert not a.leadership.is_leader()
    stopped_at = time.monotonic()
    b.leadership.stop(5)
    released = [r for r in store.writes() if r.via == "pod-b"][-1]
    assert spec(released)["holderIdentity"] == "" and spec(released)["leaseDurationSeconds"] == 1
    assert spec(released)["leaseTransitions"] == 1, "a release keeps the count"
    wait_until(a.leadership.is_leader, LEASE, "pod-a to take the released Lease")
    print(f"released Lease taken {time.monotonic() - stopped_at:.2f}s after the leader stopped")
    assert time.monotonic() - stopped_at < LEASE - RENEW, "a released Lease is taken at once, not after expiry"
    again = [r for r in store.writes(200) if r.via == "pod-a"][-1]
    assert spec(again)["holderIdentity"] == "pod-a" and spec(again)["leaseTransitions"] == 2
    assert watch.stop() == 0, "never two leaders at once"
    assert store.problems == [], "every body had the Lease's field types and MicroTime format"


def test_a_replace_with_a_stale_resource_version_is_refused_and_not_taken_for_leadership(
    store: LeaseStore, candidates: Callable[[str], Candidate]
) -> None:
    a, b = candidates("pod-a"), candidates("pod-b")
    assert a.campaign.attempt() is Outcome.HELD
    assert b.campaign.attempt() is Outcome.NOT_HELD, "held by pod-a, not expired"
    assert a.campaign.attempt() is Outcome.HELD  # a renew: the Lease's resourceVersion moves on
    # pod-b writes from the copy it read before that renew (as after a lost race): 409 Conflict.
    now = str(dt.datetime.now())
    assert not b.campaign.lock.update(NAME, NAMESPACE, LeaderElectionRecord("pod-b", "2", now, now))  # type: ignore[no-untyped-call]
    conflict = store.requests[-1]
    assert (conflict.method, conflict.status, conflict.via) == ("PUT", 409, "pod-b")
    assert store.leases[(NAMESPACE, NAME)]["spec"]["holderIdentity"] == "pod-a"


def test_two_candidates_racing_to_create_the_lease_make_one_leader(
    store: LeaseStore, candidates: Callable[[str], Candidate]
) -> None:
    a, b = candidates("pod-a"), candidates("pod-b")
    a.leadership.start()
    b.leadership.start()
    wait_until(lambda: a.leadership.is_leader() or b.leadership.is_leader(), 5, "a leader")
    watch = Watch(a, b)
    wait_until(lambda: len(store.writes(200)) >= 8, 10, "renewals")
    assert watch.stop() == 0
    assert [r.status for r in store.writes() if r.method == "POST"].count(201) == 1
    assert store.leases[(NAMESPACE, NAME)]["spec"]["leaseTransitions"] == 0
