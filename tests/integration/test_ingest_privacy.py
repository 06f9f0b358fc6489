"""The right to erasure at ingest, on real servers: the suppression list drops an erased person's
later events before storage, whatever the spelling of their identifiers and on every replica
within the cache time, and PurgeEvents deletes their stored events from the log and the outbox.

Two extra ingest replicas run beside the session's one: ``fresh`` checks the list on every batch
(``suppression_cache_seconds=0``), ``cached`` trusts its copy for 1 s. Suppressions are made
through the session's server, so every test also crosses replicas.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Iterator

import grpc
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from services.cli import registry
from services.core import harness, streams
from services.core.bus import Bus
from services.core.normalize import normalize_phone
from services.core.server import RunningServer, start_server
from services.core.settings import Settings
from services.ingest.settings import IngestSettings
from tessera.v1 import event_pb2, ingest_pb2, ingest_pb2_grpc
from tests.conftest import TenantKey, make_tenant
from tests.support.events import interaction, track
from tests.support.grpc_errors import bad_request
from tests.support.profile import wait_until
from tests.support.streams import entries

pytestmark = pytest.mark.integration

ACCEPTED = ingest_pb2.EVENT_STATUS_ACCEPTED
SUPPRESSED = ingest_pb2.EVENT_STATUS_SUPPRESSED
REJECTED = ingest_pb2.EVENT_STATUS_REJECTED
Stub = ingest_pb2_grpc.IngestServiceStub


def _replica(settings: Settings, cache_seconds: float) -> Iterator[Stub]:
    running: RunningServer = start_server(
        registry.grpc_definition("ingest"),
        settings,
        port=0,
        service_settings=IngestSettings(suppression_cache_seconds=cache_seconds),
    )
    try:
        assert harness.wait_health(f"127.0.0.1:{running.port}"), "ingest never became SERVING"
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield Stub(channel)
    finally:
        running.shutdown(grace=1)


@pytest.fixture(scope="module")
def fresh(settings: Settings) -> Iterator[Stub]:
    """A replica that reads the suppression list's versions for every batch."""
    yield from _replica(settings, 0.0)


@pytest.fixture(scope="module")
def cached(settings: Settings) -> Iterator[Stub]:
    """A replica that trusts its copy of the list for 1 s."""
    yield from _replica(settings, 1.0)


@pytest.fixture
def admin(ingest_channel: grpc.Channel) -> Stub:
    """The session's ingest server, through which the erasure calls go."""
    return Stub(ingest_channel)


def erased_email() -> str:
    return f"erased.{secrets.token_hex(5)}@example.com"


def erased_phone() -> str:
    """A valid US number in E.164, random, so no other test stores it."""
    while True:
        number = f"+1628{2 + secrets.randbelow(8)}{secrets.randbelow(10**6):06d}"
        if normalize_phone(national(number), "US") == number:
            return number


def national(e164: str) -> str:
    digits = e164.removeprefix("+1")
    return f"({digits[:3]}) {digits[3:6]}-{digits[6:]}"


def suppress(
    stub: Stub, tenant: TenantKey, *identifiers: tuple[str, str], region: str = "US"
) -> ingest_pb2.SuppressIdentifiersResponse:
    resp: ingest_pb2.SuppressIdentifiersResponse = stub.SuppressIdentifiers(
        ingest_pb2.SuppressIdentifiersRequest(
            identifiers=[event_pb2.Identifier(type=t, value=v) for t, v in identifiers],
            normalizers=[
                ingest_pb2.SuppressionNormalizer(type="email", normalizer="email"),
                ingest_pb2.SuppressionNormalizer(type="phone", normalizer="phone"),
            ],
            default_region=region,
            erasure_request=f"erasureRequests/{uuid.uuid4()}",
        ),
        metadata=tenant.metadata,
    )
    return resp


def call_from(phone: str) -> event_pb2.Event:
    ev = interaction()
    ev.identifiers[0].value = phone
    return ev


def listed(stub: Stub, tenant: TenantKey, message_ids: list[str] | None = None) -> list[str]:
    """Message ids ListEvents shows the tenant (every page)."""
    out: list[str] = []
    token = ""
    while True:
        resp = stub.ListEvents(
            ingest_pb2.ListEventsRequest(page_size=1000, page_token=token, message_ids=message_ids or []),
            metadata=tenant.metadata,
        )
        out.extend(e.message_id for e in resp.events)
        token = resp.next_page_token
        if not token:
            return sorted(out)


def dedupe_keys(engine: Engine, tenant: TenantKey, message_ids: list[str]) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text(
                    "SELECT count(*) FROM ingest.dedupe_keys WHERE tenant_id = :t "
                    "AND key_hash IN (SELECT ingest.dedupe_key(m) FROM unnest(CAST(:m AS text[])) AS m)"
                ),
                {"t": tenant.tenant_id, "m": message_ids},
            ).scalar_one()
        )


def published(redis_client, settings: Settings, tenant: TenantKey) -> list[str]:  # type: ignore[no-untyped-def]
    bus = Bus(redis_client, settings.redis_prefix)
    return sorted(env.event.message_id for _id, env in entries(redis_client, bus, tenant.tenant_id, streams.EVENTS))


def test_unary_batches_drop_the_erased_persons_events_in_any_spelling(  # type: ignore[no-untyped-def]
    admin: Stub, fresh: Stub, tenant: TenantKey, engine: Engine, redis_client, settings: Settings
) -> None:
    email, phone = erased_email(), erased_phone()
    assert suppress(admin, tenant, ("email", email), ("phone", phone)).added_count == 2

    by_email = track(email=f"  {email.upper()} ")
    by_phone = call_from(national(phone))
    good, other_call = track(email="someone.else@example.com"), call_from("+14155550100")
    bad = track(email=email)
    bad.ClearField("track")  # invalid: rejected, whoever it names
    resp = fresh.IngestEvents(
        ingest_pb2.IngestEventsRequest(events=[by_email, good, by_phone, other_call, bad]), metadata=tenant.metadata
    )
    assert [r.status for r in resp.results] == [SUPPRESSED, ACCEPTED, SUPPRESSED, ACCEPTED, REJECTED]
    assert (resp.accepted_count, resp.duplicate_count, resp.rejected_count, resp.suppressed_count) == (2, 0, 1, 2)
    for r in (resp.results[0], resp.results[2]):
        assert not r.event_id and not r.violations

    stored = sorted([good.message_id, other_call.message_id])
    assert listed(fresh, tenant) == stored
    assert dedupe_keys(engine, tenant, [by_email.message_id, by_phone.message_id]) == 0
    wait_until(lambda: published(redis_client, settings, tenant) == stored)

    # A retry is suppressed again, not a duplicate of anything.
    again = fresh.IngestEvents(ingest_pb2.IngestEventsRequest(events=[by_email]), metadata=tenant.metadata)
    assert [r.status for r in again.results] == [SUPPRESSED] and again.suppressed_count == 1


def test_streamed_batches_drop_them_too(admin: Stub, fresh: Stub, tenant: TenantKey) -> None:
    email, phone = erased_email(), erased_phone()
    suppress(admin, tenant, ("email", email), ("phone", phone))
    first = [track(email=email.title()), track(email="kept@example.com")]
    second = [call_from(national(phone)), call_from("+14155550199")]
    responses = list(
        fresh.StreamEvents(
            iter(
                [
                    ingest_pb2.StreamEventsRequest(batch_id="1", events=first),
                    ingest_pb2.StreamEventsRequest(batch_id="2", events=second),
                ]
            ),
            metadata=tenant.metadata,
        )
    )
    assert [(r.batch_id, [x.status for x in r.results]) for r in responses] == [
        ("1", [SUPPRESSED, ACCEPTED]),
        ("2", [SUPPRESSED, ACCEPTED]),
    ]
    assert [(r.accepted_count, r.suppressed_count) for r in responses] == [(1, 1), (1, 1)]
    assert listed(fresh, tenant) == sorted([first[1].message_id, second[1].message_id])


def test_another_tenant_sending_the_same_identifier_is_unaffected(admin: Stub, fresh: Stub, engine: Engine) -> None:
    erasing, other = make_tenant(engine), make_tenant(engine)
    email = erased_email()
    suppress(admin, erasing, ("email", email))
    resp = fresh.IngestEvents(ingest_pb2.IngestEventsRequest(events=[track(email=email)]), metadata=other.metadata)
    assert [r.status for r in resp.results] == [ACCEPTED] and resp.suppressed_count == 0
    assert len(listed(fresh, other)) == 1


def test_suppressing_is_idempotent(admin: Stub, tenant: TenantKey) -> None:
    email, phone = erased_email(), erased_phone()
    assert suppress(admin, tenant, ("email", email), ("phone", phone), ("email", email)).added_count == 2
    assert suppress(admin, tenant, ("email", email), ("phone", phone)).added_count == 0
    assert suppress(admin, tenant, ("email", email), ("email", erased_email())).added_count == 1


def test_the_latest_region_reads_national_numbers(admin: Stub, fresh: Stub, tenant: TenantKey) -> None:
    london = "+442079460" + f"{secrets.randbelow(1000):03d}"
    suppress(admin, tenant, ("phone", london), region="GB")
    national_uk = "020 7946 0" + london[-3:]
    resp = fresh.IngestEvents(ingest_pb2.IngestEventsRequest(events=[call_from(national_uk)]), metadata=tenant.metadata)
    assert [r.status for r in resp.results] == [SUPPRESSED]
    # Read in the US, the same digits are not that number (nor a valid one): they do not match.
    suppress(admin, tenant, ("phone", london), region="US")
    resp = fresh.IngestEvents(ingest_pb2.IngestEventsRequest(events=[call_from(national_uk)]), metadata=tenant.metadata)
    assert [r.status for r in resp.results] == [ACCEPTED]


def _holding(engine: Engine, needle: str) -> list[str]:
    """Every column of every ingest table (text, bytea, jsonb, text[]) holding ``needle``."""
    with engine.connect() as conn:
        cols = conn.execute(
            sa.text(
                "SELECT c.table_name, c.column_name, c.data_type, c.udt_name FROM information_schema.columns c "
                "JOIN information_schema.tables t USING (table_schema, table_name) "
                "WHERE c.table_schema = 'ingest' AND t.table_type = 'BASE TABLE'"
            )
        ).all()
        found = []
        for table, column, data_type, udt in cols:
            ref = f'"{column}"'
            if data_type in ("text", "character varying", "character"):
                test = f"strpos({ref}, :v) > 0"
            elif data_type == "bytea":
                test = f"position(convert_to(:v, 'UTF8') in {ref}) > 0"
            elif data_type in ("jsonb", "json"):
                test = f"strpos({ref}::text, :v) > 0"
            elif data_type == "ARRAY" and udt in ("_text", "_varchar"):
                test = f"strpos(array_to_string({ref}, ' '), :v) > 0"
            else:
                continue
            hit = conn.execute(
                sa.text(f'SELECT EXISTS (SELECT 1 FROM ingest."{table}" WHERE {test})'),
                {"v": needle},
            ).scalar_one()
            if hit:
                found.append(f"{table}.{column}")
        return found


def test_no_erased_value_is_kept_anywhere_in_the_ingest_schema(
    admin: Stub, fresh: Stub, tenant: TenantKey, engine: Engine
) -> None:
    email, phone = erased_email(), erased_phone()
    suppress(admin, tenant, ("email", email), ("phone", phone))
    fresh.IngestEvents(
        ingest_pb2.IngestEventsRequest(events=[track(email=email), call_from(national(phone))]),
        metadata=tenant.metadata,
    )
    # The scan does find a value that is stored: an accepted event's email is in its payload.
    control = erased_email()
    fresh.IngestEvents(ingest_pb2.IngestEventsRequest(events=[track(email=control)]), metadata=tenant.metadata)
    assert "events.payload" in _holding(engine, control)
    for needle in (email, phone, national(phone), phone.removeprefix("+")):
        assert _holding(engine, needle) == [], needle


def test_a_cached_replica_applies_a_suppression_within_its_cache_time(
    admin: Stub, cached: Stub, tenant: TenantKey
) -> None:
    email = erased_email()
    warm_start = time.monotonic()
    cached.IngestEvents(ingest_pb2.IngestEventsRequest(events=[track()]), metadata=tenant.metadata)
    suppress(admin, tenant, ("email", email))
    suppressed_at = time.monotonic()
    first = cached.IngestEvents(ingest_pb2.IngestEventsRequest(events=[track(email=email)]), metadata=tenant.metadata)
    if time.monotonic() - warm_start < 0.9:
        # The replica read the list's versions during the warm-up, less than its 1 s ago: it has
        # not looked again, so this event still got through. (The erasure waits out this time.)
        assert first.results[0].status == ACCEPTED
    while True:
        sent = time.monotonic() - suppressed_at
        resp = cached.IngestEvents(
            ingest_pb2.IngestEventsRequest(events=[track(email=email)]), metadata=tenant.metadata
        )
        if resp.results[0].status == SUPPRESSED:
            break
        assert resp.results[0].status == ACCEPTED
        # Checked by the server after it was sent: no later than 1 s after the suppression.
        assert sent < 1.0, f"still accepted when sent {sent:.2f}s after the suppression"
        time.sleep(0.05)


def _outbox_row(engine: Engine, tenant: TenantKey, event_ids: list[str]) -> int:
    """An outbox row naming these events, as if the relay had not published them yet (created in
    the future, so no sweep takes it during the test)."""
    with engine.begin() as conn:
        return int(
            conn.execute(
                sa.text(
                    "INSERT INTO ingest.outbox (tenant_id, received_at, event_ids, created_at) "
                    "VALUES (:t, now(), CAST(:ids AS uuid[]), now() + interval '1 hour') RETURNING seq"
                ),
                {"t": tenant.tenant_id, "ids": event_ids},
            ).scalar_one()
        )


def _outbox(engine: Engine, seqs: list[int]) -> dict[int, list[str]]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT seq, event_ids::text[] FROM ingest.outbox WHERE seq = ANY(:s)"), {"s": seqs}
        ).all()
    return {int(seq): sorted(ids) for seq, ids in rows}


def test_purge_deletes_events_and_their_outbox_rows_and_only_the_callers(
    admin: Stub, fresh: Stub, engine: Engine
) -> None:
    mine, theirs = make_tenant(engine), make_tenant(engine)
    events = [track(), call_from("+14155550123"), track()]
    resp = fresh.IngestEvents(ingest_pb2.IngestEventsRequest(events=events), metadata=mine.metadata)
    a, b, c = (r.event_id for r in resp.results)
    (their,) = (
        r.event_id
        for r in fresh.IngestEvents(ingest_pb2.IngestEventsRequest(events=[track()]), metadata=theirs.metadata).results
    )
    both_purged = _outbox_row(engine, mine, [a, b])
    one_purged = _outbox_row(engine, mine, [b, c])
    other_tenant = _outbox_row(engine, theirs, [their])
    try:
        purge = ingest_pb2.PurgeEventsRequest(event_ids=[a, b.upper(), their], erasure_request="erasureRequests/x")
        assert admin.PurgeEvents(purge, metadata=mine.metadata).purged_count == 2
        assert listed(fresh, mine) == [events[2].message_id]
        assert listed(fresh, mine, [events[0].message_id, events[1].message_id]) == []
        assert len(listed(fresh, theirs)) == 1  # its id was named, by another tenant: untouched
        assert _outbox(engine, [both_purged, one_purged, other_tenant]) == {
            one_purged: [c],
            other_tenant: [their],
        }
        assert admin.PurgeEvents(purge, metadata=mine.metadata).purged_count == 0  # idempotent
        assert admin.PurgeEvents(ingest_pb2.PurgeEventsRequest(), metadata=mine.metadata).purged_count == 0
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM ingest.outbox WHERE seq = ANY(:s)"), {"s": [one_purged, other_tenant]})


def test_validation_errors_name_their_fields(admin: Stub, tenant: TenantKey) -> None:
    bad = ingest_pb2.SuppressIdentifiersRequest(
        identifiers=[
            event_pb2.Identifier(type="email", value="ada@example.com"),
            event_pb2.Identifier(type="E-Mail", value="ada@example.com"),
            event_pb2.Identifier(type="email", value=""),
        ],
        normalizers=[ingest_pb2.SuppressionNormalizer(type="email", normalizer="soundex")],
        default_region="ZZ",
    )
    with pytest.raises(grpc.RpcError) as err:
        admin.SuppressIdentifiers(bad, metadata=tenant.metadata)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in bad_request(err.value)] == [
        "identifiers[1].type",
        "identifiers[2].value",
        "default_region",
        "normalizers[0].normalizer",
    ]
    too_many = ingest_pb2.SuppressIdentifiersRequest(
        identifiers=[event_pb2.Identifier(type="email", value=f"p{i}@example.com") for i in range(1001)]
    )
    with pytest.raises(grpc.RpcError) as err:
        admin.SuppressIdentifiers(too_many, metadata=tenant.metadata)
    assert [f for f, _ in bad_request(err.value)] == ["identifiers"]

    good_id = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
    with pytest.raises(grpc.RpcError) as err:
        admin.PurgeEvents(
            ingest_pb2.PurgeEventsRequest(event_ids=[good_id, "not-an-id", str(uuid.uuid4())]), metadata=tenant.metadata
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in bad_request(err.value)] == ["event_ids[1]", "event_ids[2]"]
    with pytest.raises(grpc.RpcError) as err:
        admin.PurgeEvents(ingest_pb2.PurgeEventsRequest(event_ids=[good_id] * 1001), metadata=tenant.metadata)
    assert [f for f, _ in bad_request(err.value)] == ["event_ids"]
