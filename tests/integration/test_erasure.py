"""Right to erasure and right of access, end to end: ErasePerson removes a person from profile,
identity and ingest's event log, from every stream and cache, and puts their identifiers on the
suppression list; ExportPerson gives everything held about them first."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import grpc
import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from services.core.bus import RedisClient
from services.core.settings import Settings
from tessera.v1 import event_pb2, ingest_pb2, ingest_pb2_grpc, profile_pb2, profile_pb2_grpc
from tests.conftest import TenantKey, make_tenant
from tests.support.identity import send
from tests.support.profile import base, identify, interaction, wait_applied, wait_until

pytestmark = [pytest.mark.integration]

SCHEMAS = ("profile", "identity", "ingest")


def tables(conn: sa.Connection) -> list[tuple[str, str, bool]]:
    rows = conn.execute(
        sa.text(
            "SELECT t.table_schema, t.table_name, EXISTS (SELECT 1 FROM information_schema.columns c "
            "WHERE c.table_schema = t.table_schema AND c.table_name = t.table_name AND c.column_name = 'tenant_id') "
            "FROM information_schema.tables t WHERE t.table_schema = ANY(:s) AND t.table_type = 'BASE TABLE'"
        ),
        {"s": list(SCHEMAS)},
    ).all()
    return [(s, t, bool(p)) for s, t, p in rows]


def mentions(engine: Engine, tenant_id: str, needles: list[str]) -> dict[str, list[str]]:
    """Rows of every table of every schema (the tenant's, where there is a tenant_id) whose text
    form holds a needle (also hex-encoded, as bytea prints)."""
    wanted = {f for n in needles for f in (n.casefold(), n.encode().hex())}
    found: dict[str, list[str]] = {}
    with engine.connect() as conn:
        for schema, table, per_tenant in tables(conn):
            sql = f'SELECT r::text FROM ONLY {schema}."{table}" r' + (" WHERE r.tenant_id = :t" if per_tenant else "")
            rows = conn.execute(sa.text(sql), {"t": tenant_id})
            hits = [t for (t,) in rows if any(w in t.casefold() for w in wanted)]
            if hits:
                found[f"{schema}.{table}"] = hits
    return found


def redis_mentions(client: RedisClient, prefix: str, tenant_id: str, needles: list[str]) -> dict[str, int]:
    """Keys of the tenant (streams, caches) holding a needle anywhere in their entries or values."""
    wanted = [n.encode() for n in needles] + [n.casefold().encode() for n in needles]
    found: dict[str, int] = {}
    for key in client.scan_iter(match=f"{prefix}:{{{tenant_id}}}:*", count=1000):
        kind = client.type(key)
        blobs: list[Any] = []
        if kind == b"stream":
            entries: Any = client.xrange(key)
            for _id, fields in entries:
                blobs.extend(fields.values())
        elif kind == b"string":
            blobs.append(client.get(key) or b"")
        elif kind == b"hash":
            values: Any = client.hgetall(key)
            blobs.extend(values.values())
        n = sum(1 for b in blobs if any(w in b for w in wanted))
        if n:
            found[key.decode()] = n
    return found


def erase_and_wait(
    profile: profile_pb2_grpc.ProfileServiceStub, tenant: TenantKey, request: profile_pb2.ErasePersonRequest
) -> profile_pb2.ErasureRequest:
    started = profile.ErasePerson(request, metadata=tenant.metadata, timeout=10).request
    assert started.state == profile_pb2.ERASURE_STATE_RUNNING
    assert started.steps[0].service == "profile" and started.steps[0].done

    def done() -> profile_pb2.ErasureRequest | None:
        r = profile.GetErasureRequest(
            profile_pb2.GetErasureRequestRequest(name=started.name), metadata=tenant.metadata, timeout=10
        ).request
        return r if r.state == profile_pb2.ERASURE_STATE_DONE else None

    finished = wait_until(done, 60, "the erasure to finish")
    assert finished is not None
    return finished


def test_erase_then_export_nothing_of_the_person_remains_anywhere(
    engine: Engine,
    settings: Settings,
    redis_client: redis.Redis,
    ingest_channel: grpc.Channel,
    profile_channel: grpc.Channel,
) -> None:
    tenant = make_tenant(engine, "erase")
    ingest = ingest_pb2_grpc.IngestServiceStub(ingest_channel)
    profile = profile_pb2_grpc.ProfileServiceStub(profile_channel)
    ada_email, ada_phone, ada_device = "ada.lovelace@example.org", "+14155550177", "dev-ada-93c1"
    secret_text = "my card ending 4242 was charged twice"
    ada = [("email", ada_email), ("phone", ada_phone)]
    message = base(("device_id", ada_device), ("email", ada_email), channel=event_pb2.CHANNEL_CHAT)
    message.message.interaction_id = "chat-ada-1"
    message.message.author = event_pb2.AUTHOR_CUSTOMER
    message.message.text = secret_text
    ids = send(
        ingest,
        tenant.metadata,
        identify(*ada, traits={"first_name": "Augusta", "last_name": "Byronson", "city": "Marylebone"}),
        interaction(("phone", ada_phone), interaction_id="call-ada-1", reason="double charge"),
        message,
    )
    # Someone else, who must keep everything.
    grace = [("email", "grace.hopper@example.org")]
    send(ingest, tenant.metadata, identify(*grace, traits={"first_name": "Grace"}))
    wait_applied(engine, tenant.tenant_id, 4)
    needles = [ada_email, ada_phone, ada_device, "Augusta", "Byronson", "Marylebone", secret_text, *ids]
    assert mentions(engine, tenant.tenant_id, needles), "the scan must find the person before the erasure"

    # Right of access first: everything held about her, as JSON.
    exported = profile.ExportPerson(
        profile_pb2.ExportPersonRequest(identifier=event_pb2.Identifier(type="email", value=ada_email)),
        metadata=tenant.metadata,
        timeout=10,
    )
    doc = json.loads(exported.json)
    assert {e["event_id"] for e in doc["timeline"]} == set(ids)
    assert {i["value"] for i in doc["profile"]["identifiers"]} >= {ada_email, ada_phone}
    assert "graph" in doc["identity"], doc["identity"]
    assert secret_text in exported.json

    done = erase_and_wait(
        profile,
        tenant,
        profile_pb2.ErasePersonRequest(
            identifier=event_pb2.Identifier(type="phone", value="(415) 555-0177"), reason="GDPR art. 17 request #81"
        ),
    )
    assert all(s.done for s in done.steps), done
    assert {s.type for s in done.suppressed} == {"email", "phone", "device_id"}
    assert all(not s.value for s in done.suppressed), "the request must not keep the values it erased"

    # Nothing about her in any schema, stream or cache. Her events' ids (random UUIDs, which say
    # nothing by themselves) remain only as idempotency records: identity's event links (with no
    # identifiers) and ingest's dedupe window (keyed by hashes, expiring with the window).
    personal = needles[: -len(ids)]
    assert mentions(engine, tenant.tenant_id, personal) == {}
    left = mentions(engine, tenant.tenant_id, ids)
    assert set(left) <= {"identity.event_links"} | {t for t in left if t.startswith("ingest.dedupe_")}, left
    assert all("{}" in row for row in left.get("identity.event_links", [])), "event links keep no identifiers"
    assert redis_mentions(redis_client, settings.redis_prefix, tenant.tenant_id, needles) == {}
    for ident in ada:
        with pytest.raises(grpc.RpcError) as err:
            profile.GetProfile(
                profile_pb2.GetProfileRequest(identifier=event_pb2.Identifier(type=ident[0], value=ident[1])),
                metadata=tenant.metadata,
                timeout=10,
            )
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        profile.GetProfile(profile_pb2.GetProfileRequest(name=done.profile), metadata=tenant.metadata, timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    # A new event with her email, in another spelling, is dropped at ingest before storage.
    again = ingest.IngestEvents(
        ingest_pb2.IngestEventsRequest(
            events=[identify(("email", "  ADA.Lovelace@Example.ORG"), traits={"first_name": "Augusta"})]
        ),
        metadata=tenant.metadata,
        timeout=10,
    )
    assert again.results[0].status == ingest_pb2.EVENT_STATUS_SUPPRESSED and again.suppressed_count == 1

    # Grace is untouched.
    kept = profile.GetProfile(
        profile_pb2.GetProfileRequest(identifier=event_pb2.Identifier(type="email", value=grace[0][1])),
        metadata=tenant.metadata,
        timeout=10,
    ).profile
    assert {t.key: t.value.string_value for t in kept.traits} == {"first_name": "Grace"}

    # Idempotent: erasing again finds nobody.
    with pytest.raises(grpc.RpcError) as err:
        profile.ErasePerson(
            profile_pb2.ErasePersonRequest(name=done.profile, reason="again"), metadata=tenant.metadata, timeout=10
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_events_in_flight_during_an_erasure_leave_nothing_behind(
    engine: Engine,
    settings: Settings,
    redis_client: redis.Redis,
    ingest_channel: grpc.Channel,
    profile_channel: grpc.Channel,
) -> None:
    """Events of the person keep arriving while the erasure runs: the ones ingest accepted before
    the suppression are erased too, wherever they got to; the later ones are suppressed."""
    tenant = make_tenant(engine, "erase-race")
    ingest = ingest_pb2_grpc.IngestServiceStub(ingest_channel)
    profile = profile_pb2_grpc.ProfileServiceStub(profile_channel)
    email = "linus.pauling@example.net"
    send(ingest, tenant.metadata, identify(("email", email), traits={"city": "Portlandia"}))
    wait_applied(engine, tenant.tenant_id, 1)
    stop = threading.Event()
    statuses: list[int] = []

    def keep_sending() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            ev = identify(("email", email), ("device_id", f"dev-linus-{n}"), traits={"city": "Portlandia"})
            resp = ingest.IngestEvents(ingest_pb2.IngestEventsRequest(events=[ev]), metadata=tenant.metadata)
            statuses.append(resp.results[0].status)
            time.sleep(0.01)

    sender = threading.Thread(target=keep_sending)
    sender.start()
    try:
        time.sleep(0.3)
        erase_and_wait(
            profile,
            tenant,
            profile_pb2.ErasePersonRequest(identifier=event_pb2.Identifier(type="email", value=email), reason="race"),
        )
    finally:
        stop.set()
        sender.join(10)
    assert ingest_pb2.EVENT_STATUS_ACCEPTED in statuses and ingest_pb2.EVENT_STATUS_SUPPRESSED in statuses
    assert statuses[-1] == ingest_pb2.EVENT_STATUS_SUPPRESSED
    time.sleep(1.0)  # anything still moving would land now
    assert mentions(engine, tenant.tenant_id, [email, "Portlandia", "dev-linus-"]) == {}
    assert redis_mentions(redis_client, settings.redis_prefix, tenant.tenant_id, [email, "Portlandia"]) == {}


def test_an_erasure_request_is_validated_and_scoped_to_its_tenant(
    engine: Engine, tenant: TenantKey, ingest_channel: grpc.Channel, profile_channel: grpc.Channel
) -> None:
    ingest = ingest_pb2_grpc.IngestServiceStub(ingest_channel)
    profile = profile_pb2_grpc.ProfileServiceStub(profile_channel)
    send(ingest, tenant.metadata, identify(("email", "scoped@example.com"), traits={"a": 1}))
    wait_applied(engine, tenant.tenant_id, 1)
    with pytest.raises(grpc.RpcError) as err:
        profile.ErasePerson(
            profile_pb2.ErasePersonRequest(identifier=event_pb2.Identifier(type="email", value="scoped@example.com")),
            metadata=tenant.metadata,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # no reason given
    started = profile.ErasePerson(
        profile_pb2.ErasePersonRequest(
            identifier=event_pb2.Identifier(type="email", value="scoped@example.com"), reason="request #1"
        ),
        metadata=tenant.metadata,
    ).request
    other = make_tenant(engine, "other")
    for name in (started.name, "erasureRequests/not-a-uuid", "profiles/x"):
        with pytest.raises(grpc.RpcError) as err:
            profile.GetErasureRequest(profile_pb2.GetErasureRequestRequest(name=name), metadata=other.metadata)
        assert err.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
    with pytest.raises(grpc.RpcError) as err:
        profile.GetErasureRequest(profile_pb2.GetErasureRequestRequest(name=started.name), metadata=other.metadata)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
