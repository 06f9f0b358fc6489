"""Leader election without I/O: the state machine, the step-down deadline, the gate on singleton
jobs, the settings that bound it and the ``tessera.leader.status`` gauge."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.metrics.export import Gauge, NumberDataPoint

from services.core.leader import (
    AdvisoryLockCampaign,
    Leadership,
    Outcome,
    Term,
    build_leadership,
    identity,
    lock_key,
    lock_name,
    pod_namespace,
)
from services.core.periodic import Periodic
from services.core.settings import Settings, SettingsError
from tests.conftest import METRICS

HELD, NOT_HELD, UNKNOWN = Outcome.HELD, Outcome.NOT_HELD, Outcome.UNKNOWN


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Scripted:
    """A campaign that answers what the test says, and records step-downs and releases."""

    backend = "scripted"

    def __init__(self, *outcomes: Outcome) -> None:
        self.outcomes = list(outcomes)
        self.step_downs = 0
        self.releases = 0

    def attempt(self) -> Outcome:
        return self.outcomes.pop(0) if self.outcomes else NOT_HELD

    def step_down(self) -> None:
        self.step_downs += 1

    def release(self) -> None:
        self.releases += 1


def leadership(campaign: Scripted, clock: Clock, service: str = "unit") -> Leadership:
    return Leadership(service, campaign, lease_seconds=15, renew_seconds=5, identity="pod-a", clock=clock)


@pytest.mark.parametrize(
    ("before", "outcome", "at", "after"),
    [
        (Term(), HELD, 10.0, Term(True, 10.0)),
        (Term(), NOT_HELD, 10.0, Term()),
        (Term(), UNKNOWN, 10.0, Term()),
        (Term(True, 10.0), HELD, 15.0, Term(True, 15.0)),
        # A leader that cannot tell keeps leading until the deadline (10 s here) since its last confirmation...
        (Term(True, 10.0), UNKNOWN, 19.9, Term(True, 10.0)),
        (Term(True, 10.0), UNKNOWN, 20.0, Term()),
        # ...but one whose lock is known gone steps down at once.
        (Term(True, 10.0), NOT_HELD, 11.0, Term()),
    ],
)
def test_term_transitions(before: Term, outcome: Outcome, at: float, after: Term) -> None:
    assert before.after(outcome, at, deadline=10.0) == after


def test_a_leader_steps_down_when_it_cannot_confirm_its_lock_within_lease_minus_renew(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    campaign = Scripted(HELD, UNKNOWN, UNKNOWN, UNKNOWN)
    lead = leadership(campaign, clock)
    assert lead.deadline == 10
    with caplog.at_level(logging.INFO, logger="services.core.leader"):
        lead.tick()
        assert lead.is_leader()
        clock.now += 5
        lead.tick()  # unknown, 5 s after the confirmation
        assert lead.is_leader()
        clock.now += 4.9
        assert lead.is_leader()
        clock.now += 0.1  # 10 s since the last confirmed attempt started: no longer leading, even unasked
        assert not lead.is_leader()
        assert campaign.step_downs == 0
        lead.tick()
    assert not lead.is_leader()
    assert campaign.step_downs == 1
    transitions = [(r.getMessage(), getattr(r, "identity", None)) for r in caplog.records]
    assert transitions == [("leader acquired", "pod-a"), ("leader lost", "pod-a")]
    assert getattr(caplog.records[-1], "reason", None) == "lock not confirmed within the lease"


def test_a_lock_known_lost_ends_leadership_at_once_and_a_new_one_can_begin() -> None:
    clock = Clock()
    campaign = Scripted(HELD, NOT_HELD, NOT_HELD, HELD)
    lead = leadership(campaign, clock)
    lead.tick()
    assert lead.is_leader()
    clock.now += 1
    lead.tick()
    assert not lead.is_leader()
    assert campaign.step_downs == 1
    lead.tick()
    assert not lead.is_leader()
    lead.tick()
    assert lead.is_leader()


def test_an_attempt_that_raises_counts_as_unknown() -> None:
    class Broken(Scripted):
        def attempt(self) -> Outcome:
            if self.outcomes:
                return super().attempt()
            raise ConnectionError("api down")

    clock = Clock()
    lead = leadership(Broken(HELD), clock)
    lead.tick()
    clock.now += 5
    lead.tick()
    assert lead.is_leader(), "one failed attempt within the deadline keeps the leader"
    clock.now += 5
    lead.tick()
    assert not lead.is_leader()


def test_stop_releases_the_lock_and_wait_leading_sees_the_transitions() -> None:
    campaign = Scripted(*[HELD] * 1000)
    lead = Leadership("unit", campaign, lease_seconds=1.0, renew_seconds=0.05, identity="pod-a")
    assert not lead.wait_leading(0.01)
    lead.start()
    assert lead.wait_leading(5.0)
    lead.stop(5.0)
    assert campaign.releases == 1
    assert not lead.is_leader()


def test_renew_must_be_shorter_than_the_lease() -> None:
    with pytest.raises(ValueError, match="shorter than the lease"):
        Leadership("unit", Scripted(), lease_seconds=5, renew_seconds=5, identity="x")
    with pytest.raises(SettingsError, match="TESSERA_LEADER_RENEW_SECONDS must be shorter"):
        Settings.from_env({"TESSERA_LEADER_LEASE_SECONDS": "3", "TESSERA_LEADER_RENEW_SECONDS": "3"})
    with pytest.raises(SettingsError, match="TESSERA_LEADER_LEASE_SECONDS must be between"):
        Settings.from_env({"TESSERA_LEADER_LEASE_SECONDS": "0.5"})
    s = Settings.from_env({"TESSERA_LEADER_LEASE_SECONDS": "3", "TESSERA_LEADER_RENEW_SECONDS": "1"})
    assert (s.leader_lease_seconds, s.leader_renew_seconds) == (3.0, 1.0)
    assert (Settings().leader_lease_seconds, Settings().leader_renew_seconds) == (15.0, 5.0)


def test_identity_and_namespace_come_from_the_downward_api(tmp_path: Path) -> None:
    assert identity({"POD_NAME": "tessera-ingest-7d9f-abcde"}) == "tessera-ingest-7d9f-abcde"
    assert identity({}).endswith(f"-{os.getpid()}")
    missing = tmp_path / "none"
    assert pod_namespace({"POD_NAMESPACE": "cdp"}, missing) == "cdp"
    assert pod_namespace({}, missing) == "default"
    (tmp_path / "ns").write_text("tessera-prod\n")
    assert pod_namespace({}, tmp_path / "ns") == "tessera-prod"


def test_lock_keys_are_stable_signed_64_bit_values_per_service() -> None:
    keys = {s: lock_key(lock_name(s)) for s in ("ingest", "identity", "profile", "metrics")}
    assert len(set(keys.values())) == 4
    assert all(-(2**63) <= k < 2**63 for k in keys.values())
    # The key is part of the deployment's contract: replicas of two versions must agree on it.
    assert keys["ingest"] == lock_key("tessera-ingest-leader") == -2093749164405712962


def test_outside_kubernetes_the_backend_is_the_advisory_lock_and_inside_it_can_be_chosen() -> None:
    s = Settings(database_url="postgresql://u@db:5432/tessera")
    built = build_leadership(s, "ingest", environ={})
    assert isinstance(built.campaign, AdvisoryLockCampaign)
    assert built.campaign.name == "tessera-ingest-leader"
    assert (built.lease_seconds, built.renew_seconds, built.deadline) == (15.0, 5.0, 10.0)
    # A pod without RBAC for Leases (or a CI runner that is a pod) keeps the advisory lock.
    pinned = Settings.from_env({"TESSERA_DATABASE_URL": "postgresql://u@db/t", "TESSERA_LEADER_BACKEND": "Postgres"})
    in_cluster = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "POD_NAME": "tessera-ingest-0"}
    built = build_leadership(pinned, "ingest", environ=in_cluster)
    assert isinstance(built.campaign, AdvisoryLockCampaign) and built.identity == "tessera-ingest-0"
    with pytest.raises(SettingsError, match="TESSERA_LEADER_BACKEND must be one of auto, kubernetes, postgres"):
        Settings.from_env({"TESSERA_LEADER_BACKEND": "zookeeper"})


class Switch:
    """A Leader whose answer the test flips, counting how often a follower waited."""

    def __init__(self) -> None:
        self.leading = False
        self.waits = 0
        self._flipped = threading.Event()

    def is_leader(self) -> bool:
        return self.leading

    def wait_leading(self, timeout: float) -> bool:
        self.waits += 1
        self._flipped.wait(min(timeout, 0.01))
        return self.leading


@pytest.fixture
def switch() -> Iterator[Switch]:
    yield Switch()


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return False


def test_a_gated_periodic_job_runs_only_while_leading(switch: Switch) -> None:
    ran: list[int] = []
    job = Periodic("unit job", 0.01, lambda: ran.append(1), leader=switch)
    job.start()
    try:
        assert wait_for(lambda: switch.waits >= 5), "a follower waits for leadership"
        assert ran == [], "and never runs the job"
        switch.leading = True
        assert wait_for(lambda: len(ran) >= 3), "the leader runs it"
        switch.leading = False
        seen = len(ran)
        waits = switch.waits
        assert wait_for(lambda: switch.waits >= waits + 5)
        assert len(ran) <= seen + 1, "at most the run already under way when leadership went"
    finally:
        job.stop(5)


def test_the_gauge_reports_each_services_leader_status() -> None:
    clock = Clock()
    lead = leadership(Scripted(HELD), clock, service="gauge-unit")
    follower = leadership(Scripted(NOT_HELD), clock, service="gauge-unit-follower")

    def status() -> dict[str, float]:
        data = METRICS.get_metrics_data()
        assert data is not None
        out: dict[str, float] = {}
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name == "tessera.leader.status":
                        assert isinstance(m.data, Gauge)
                        for p in m.data.data_points:
                            assert isinstance(p, NumberDataPoint)
                            out[str((p.attributes or {})["service"])] = p.value
        return out

    assert status()["gauge-unit"] == 0
    lead.tick()
    follower.tick()
    got = status()
    assert (got["gauge-unit"], got["gauge-unit-follower"]) == (1, 0)


def test_the_erasure_worker_claims_pending_erasures_only_while_leading(switch: Switch) -> None:
    from services.profile.erasure import ErasureWorker

    class Claims:
        calls = 0

        def claim(self, lease_seconds: float) -> None:
            self.calls += 1

    claims = Claims()
    worker = ErasureWorker(
        claims,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        settle_seconds=0,
        poll_seconds=0.01,
        leader=switch,
    )
    worker.start()
    try:
        assert wait_for(lambda: switch.waits >= 5)
        assert claims.calls == 0, "a follower leaves pending erasures to the leader"
        switch.leading = True
        assert wait_for(lambda: claims.calls >= 3)
    finally:
        worker.stop(5)
