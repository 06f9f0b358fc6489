"""A tenant's match weights re-estimated from its own records on real PostgreSQL, through the CLI:
``tessera identity estimate`` stores a proposal and leaves matching alone, ``--apply`` makes the
matcher use it (a pair that merged under the defaults now stays apart), and another tenant keeps
the defaults throughout; the optional schedule only proposes."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any, cast

import pytest
from sqlalchemy.engine import Engine

from services.cli.main import main
from services.core import streams
from services.core.bus import Bus
from services.core.outbox import EnvelopeTable, Outbox
from services.core.settings import Settings
from services.identity.app import weight_estimation
from services.identity.estimate import DEFAULT_WEIGHTS
from services.identity.matching import MatchRecord
from services.identity.reestimate import propose_all
from services.identity.resolver import IncomingEvent, Resolver, parse_event
from services.identity.rules_store import RulesCache
from services.identity.settings import IdentitySettings
from services.identity.storage import IdentityStore
from services.identity.weights import ACTIVE, PROPOSED
from services.identity.weights_store import WeightsStore
from tessera.v1 import event_pb2
from tests.conftest import TenantKey, make_tenant
from tests.support.synthetic_people import synthetic

pytestmark = pytest.mark.integration

RANDOM_PAIRS = "20000"


@pytest.fixture
def resolver(settings: Settings, engine: Engine, redis_client: Any) -> Iterator[Resolver]:
    bus = Bus(redis_client, f"{settings.redis_prefix}-weights")
    store = IdentityStore(engine)
    yield Resolver(store, RulesCache(store, ttl=0), Outbox(engine, bus, EnvelopeTable("identity")))


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    assert settings.database_url and settings.redis_url
    monkeypatch.setenv("TESSERA_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("TESSERA_REDIS_URL", settings.redis_url)


def _event(resolver: Resolver, tenant_id: str, traits: dict[str, str]) -> IncomingEvent:
    ev = event_pb2.Event(
        event_id=str(uuid.uuid4()),
        message_id=f"m-{uuid.uuid4().hex[:8]}",
        source="crm",
        identifiers=[event_pb2.Identifier(type="anonymous_id", value=f"anon-{uuid.uuid4().hex}")],
        identify=event_pb2.Identify(),
    )
    ev.identify.traits.update(traits)
    ev.timestamp.GetCurrentTime()
    rules = resolver.rules.get_full(tenant_id).rules
    return parse_event(rules, ev, streams.event_envelope(tenant_id, "", ev.SerializeToString()), with_traits=True)


def ingest(resolver: Resolver, tenant_id: str, records: list[MatchRecord], batch: int = 70) -> None:
    for start in range(0, len(records), batch):
        events = [_event(resolver, tenant_id, rec.to_json()) for rec in records[start : start + batch]]
        resolver.resolve_batch(tenant_id, events)


def pair(resolver: Resolver, tenant_id: str, nid: str, dob: str) -> tuple[str, str]:
    """Two records that share a national id and a birth date and differ in both names: the frozen
    defaults merge them (the id and date outweigh the names); weights estimated on records whose
    names are rare and whose duplicates keep their names keep them apart (review at most)."""
    a = {"first_name": "quillon", "last_name": "brackwater", "date_of_birth": dob, "national_id": nid}
    b = {"first_name": "mordecai", "last_name": "fenstrand", "date_of_birth": dob, "national_id": nid}
    out = []
    for traits in (a, b):
        (res,) = resolver.resolve_batch(tenant_id, [_event(resolver, tenant_id, traits)]).events
        assert res.profile_id is not None
        out.append(resolver.store.survivor(tenant_id, res.profile_id))
    return out[0] or "", out[1] or ""


def test_estimate_proposes_apply_activates_and_other_tenants_keep_the_defaults(
    resolver: Resolver, tenant: TenantKey, engine: Engine, cli_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    other = make_tenant(engine, "w-other")
    for t in (tenant.tenant_id, other.tenant_id):
        resolver.store.save_rules(t, {}, {"enabled": True})
    ingest(resolver, tenant.tenant_id, synthetic())
    weights = WeightsStore(engine)

    assert main(["identity", "estimate", tenant.tenant_id, "--random-pairs", RANDOM_PAIRS]) == 0
    table = capsys.readouterr().out
    assert "old: defaults" in table and "proposed (stored, not in use)" in table
    assert "first_name" in table and "national_id" in table and "auto-merge" in table
    assert "would no longer reach the threshold" in table
    stored = weights.load(tenant.tenant_id)
    assert set(stored) == {PROPOSED}
    proposed = stored[PROPOSED].weights
    assert proposed != DEFAULT_WEIGHTS
    assert stored[PROPOSED].summary["records"] > 300 and stored[PROPOSED].summary["source"] == "cli"
    assert main(["identity", "show", tenant.tenant_id, "--json"]) == 0  # the stored proposal, not a new one
    shown = json.loads(capsys.readouterr().out)
    assert shown["state"] == "proposed" and shown["new"] == proposed.to_json() and shown["old_source"] == "defaults"
    assert main(["identity", "show", other.tenant_id]) == 1
    assert "no proposed weights" in capsys.readouterr().err

    # Proposed only: the matcher still uses the defaults, so the pair merges.
    a, b = pair(resolver, tenant.tenant_id, "555000111", "19700505")
    assert a == b
    assert resolver.rules.get_full(tenant.tenant_id).weights is None

    assert main(["identity", "estimate", tenant.tenant_id, "--apply", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["state"] == "active" and shown["old_source"] == "defaults"
    assert shown["new"] == proposed.to_json()
    assert set(weights.load(tenant.tenant_id)) == {ACTIVE}
    assert resolver.rules.get_full(tenant.tenant_id).weights == proposed

    # Active: the same kind of pair no longer merges.
    a, b = pair(resolver, tenant.tenant_id, "555000222", "19710606")
    assert a != b
    with engine.connect() as conn:
        merged = conn.exec_driver_sql(
            "SELECT count(*) FROM identity.merges WHERE tenant_id = %s AND (survivor_id = %s OR absorbed_id = %s)",
            (tenant.tenant_id, a, a),
        ).scalar()
    assert merged == 0

    # The other tenant has no weights of its own and still merges such a pair.
    assert weights.load(other.tenant_id) == {}
    assert resolver.rules.get_full(other.tenant_id).weights is None
    a, b = pair(resolver, other.tenant_id, "555000222", "19710606")
    assert a == b

    # Applying again finds nothing proposed, and says so.
    assert main(["identity", "apply", tenant.tenant_id]) == 1
    assert "no proposed weights" in capsys.readouterr().err


def test_estimate_refuses_a_thin_tenant_and_the_schedule_skips_it(
    resolver: Resolver, tenant: TenantKey, engine: Engine, cli_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    resolver.store.save_rules(tenant.tenant_id, {}, {"enabled": True})
    ingest(resolver, tenant.tenant_id, synthetic()[:20])
    assert main(["identity", "estimate", tenant.tenant_id]) == 1
    assert "too few match records" in capsys.readouterr().err
    assert WeightsStore(engine).load(tenant.tenant_id) == {}
    outcome = propose_all(resolver.store, WeightsStore(engine), [tenant.tenant_id])
    assert outcome[tenant.tenant_id].startswith("skipped: too few match records")
    assert WeightsStore(engine).load(tenant.tenant_id) == {}


class _Leading:
    def is_leader(self) -> bool:
        return True

    def wait_leading(self, timeout: float) -> bool:
        return True


def test_the_schedule_is_off_by_default() -> None:
    assert weight_estimation(cast(Engine, None), _Leading(), IdentitySettings.from_env({})) is None


def test_the_schedule_proposes_and_never_applies(resolver: Resolver, tenant: TenantKey, engine: Engine) -> None:
    off = make_tenant(engine, "w-off")  # matching off: the schedule leaves it alone
    resolver.store.save_rules(tenant.tenant_id, {}, {"enabled": True})
    ingest(resolver, tenant.tenant_id, synthetic(seed=11))
    weights = WeightsStore(engine)
    leader = _Leading()
    job = weight_estimation(engine, leader, IdentitySettings.from_env({"TESSERA_IDENTITY_ESTIMATE_INTERVAL": "3600"}))
    assert job is not None and job.leader is leader and job.interval_seconds == 3600
    outcome = job.job()  # one run, as the leader's Periodic makes it
    assert isinstance(outcome, dict) and outcome.get(tenant.tenant_id) == "proposed"
    assert off.tenant_id not in outcome
    stored = weights.load(tenant.tenant_id)
    assert set(stored) == {PROPOSED} and stored[PROPOSED].summary["source"] == "schedule"
    assert weights.load(off.tenant_id) == {}
