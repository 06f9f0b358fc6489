"""The profile service through its public API, on real PostgreSQL and Redis, fed by the real
ingest and identity services."""

from __future__ import annotations

import datetime as dt

import grpc
import pytest
from sqlalchemy.engine import Engine

from tessera.v1 import event_pb2, ingest_pb2_grpc, profile_pb2, profile_pb2_grpc
from tests.conftest import TenantKey
from tests.support.identity import send
from tests.support.profile import NOW, identify, interaction, track, wait_applied

pytestmark = [pytest.mark.integration]


@pytest.fixture
def stubs(
    ingest_channel: grpc.Channel, profile_channel: grpc.Channel
) -> tuple[ingest_pb2_grpc.IngestServiceStub, profile_pb2_grpc.ProfileServiceStub]:
    return ingest_pb2_grpc.IngestServiceStub(ingest_channel), profile_pb2_grpc.ProfileServiceStub(profile_channel)


def traits_of(profile: profile_pb2.Profile) -> dict[str, object]:
    from google.protobuf import json_format

    return {t.key: json_format.MessageToDict(t.value) for t in profile.traits}


def test_one_customer_across_channels_has_one_context(
    engine: Engine,
    tenant: TenantKey,
    stubs: tuple[ingest_pb2_grpc.IngestServiceStub, profile_pb2_grpc.ProfileServiceStub],
) -> None:
    """Events from web, voice and email about one person become one profile: the newest trait by
    event time wins even when it arrives first, and the context shows contacts and open cases."""
    ingest, profile = stubs
    email, phone = ("email", "ada@example.com"), ("phone", "+14155550100")
    day = dt.timedelta(days=1)
    send(
        ingest,
        tenant.metadata,
        identify(email, phone, traits={"plan": "gold", "name": "Ada"}, at=NOW - day),
        identify(email, traits={"plan": "silver"}, at=NOW - 3 * day),
        interaction(
            phone,
            interaction_id="call-1",
            reason="billing",
            case_id="C-1",
            case_status=event_pb2.CASE_STATUS_OPEN,
            at=NOW - 2 * day,
        ),
        track(email, name="Viewed pricing", at=NOW - 5 * day),
    )
    wait_applied(engine, tenant.tenant_id, 4)
    got = profile.GetProfile(
        profile_pb2.GetProfileRequest(identifier=event_pb2.Identifier(type="email", value="  ADA@Example.com ")),
        metadata=tenant.metadata,
        timeout=10,
    ).profile
    assert traits_of(got) == {"plan": "gold", "name": "Ada"}
    assert got.event_count == 4
    assert {(i.type, i.value) for i in got.identifiers} == {email, phone}
    ctx = profile.GetCustomerContext(
        profile_pb2.GetCustomerContextRequest(identifier=event_pb2.Identifier(type="phone", value="(415) 555-0100")),
        metadata=tenant.metadata,
        timeout=10,
    )
    assert ctx.profile.profile_id == got.profile_id
    assert [i.interaction_id for i in ctx.recent_interactions] == ["call-1"]
    assert ctx.recent_interactions[0].handle_seconds == 150.0
    assert [c.case_id for c in ctx.open_cases] == ["C-1"]
    assert ctx.contacts.last_7_days == 1 and ctx.contacts.last_reason == "billing"
    assert ctx.scores.missing_reason
