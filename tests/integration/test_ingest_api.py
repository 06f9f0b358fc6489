"""IngestService against real PostgreSQL and Redis: results, partial batches, dedupe,
auth, rate limits, the event round trip and what reaches the stream."""

from __future__ import annotations

import time

import grpc
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from services.core import streams
from services.core.bus import Bus
from services.core.server import RunningServer
from services.core.settings import Settings
from tessera.v1 import event_pb2, ingest_pb2, ingest_pb2_grpc
from tests.conftest import TenantKey, make_tenant
from tests.support.events import interaction, survey, track, uid
from tests.support.grpc_errors import bad_request, retry_delay
from tests.support.profile import wait_until
from tests.support.streams import entries

pytestmark = pytest.mark.integration

ACCEPTED = ingest_pb2.EVENT_STATUS_ACCEPTED
DUPLICATE = ingest_pb2.EVENT_STATUS_DUPLICATE
REJECTED = ingest_pb2.EVENT_STATUS_REJECTED


@pytest.fixture
def stub(ingest_channel: grpc.Channel) -> ingest_pb2_grpc.IngestServiceStub:
    return ingest_pb2_grpc.IngestServiceStub(ingest_channel)


def stored_message_ids(engine: Engine, tenant_id: str) -> list[str]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                sa.text("SELECT message_id FROM ingest.events WHERE tenant_id = :t ORDER BY message_id"),
                {"t": tenant_id},
            ).scalars()
        )


def stream_payloads(redis_client, settings: Settings, tenant_id: str) -> list[event_pb2.Event]:  # type: ignore[no-untyped-def]
    bus = Bus(redis_client, settings.redis_prefix)
    return [env.event for _id, env in entries(redis_client, bus, tenant_id, streams.EVENTS)]


def test_partial_batch_commits_the_good_events(stub, tenant: TenantKey, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    good1, bad, good2 = track(), survey(11), interaction()
    resp = stub.IngestEvents(ingest_pb2.IngestEventsRequest(events=[good1, bad, good2]), metadata=tenant.metadata)
    assert [r.status for r in resp.results] == [ACCEPTED, REJECTED, ACCEPTED]
    assert (resp.accepted_count, resp.duplicate_count, resp.rejected_count) == (2, 0, 1)
    assert [(v.field, v.description) for v in resp.results[1].violations] == [
        ("events[1].survey_response.score", "NPS score must be 0-10, got 11")
    ]
    assert resp.results[0].event_id and resp.results[2].event_id
    assert not resp.results[1].event_id
    assert stored_message_ids(engine, tenant.tenant_id) == sorted([good1.message_id, good2.message_id])


def test_retry_yields_duplicates_with_the_original_ids(stub, tenant: TenantKey, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    events = [track(), track()]
    first = stub.IngestEvents(ingest_pb2.IngestEventsRequest(events=events), metadata=tenant.metadata)
    again = stub.IngestEvents(ingest_pb2.IngestEventsRequest(events=events), metadata=tenant.metadata)
    assert [r.status for r in again.results] == [DUPLICATE, DUPLICATE]
    assert [r.event_id for r in again.results] == [r.event_id for r in first.results]
    assert len(stored_message_ids(engine, tenant.tenant_id)) == 2


def test_duplicate_within_one_batch(stub, tenant: TenantKey, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    ev = track()
    resp = stub.IngestEvents(ingest_pb2.IngestEventsRequest(events=[ev, ev]), metadata=tenant.metadata)
    assert [r.status for r in resp.results] == [ACCEPTED, DUPLICATE]
    assert resp.results[0].event_id == resp.results[1].event_id
    assert stored_message_ids(engine, tenant.tenant_id) == [ev.message_id]


def test_dedupe_across_both_rpcs(stub, tenant: TenantKey, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    a, b = track(), track()
    unary = stub.IngestEvents(ingest_pb2.IngestEventsRequest(events=[a]), metadata=tenant.metadata)
    responses = list(
        stub.StreamEvents(
            iter(
                [
                    ingest_pb2.StreamEventsRequest(batch_id="1", events=[a, b]),
                    ingest_pb2.StreamEventsRequest(batch_id="2", events=[b]),
                ]
            ),
            metadata=tenant.metadata,
        )
    )
    assert [r.batch_id for r in responses] == ["1", "2"]
    assert [r.status for r in responses[0].results] == [DUPLICATE, ACCEPTED]
    assert responses[0].results[0].event_id == unary.results[0].event_id
    assert [r.status for r in responses[1].results] == [DUPLICATE]
    again = stub.IngestEvents(ingest_pb2.IngestEventsRequest(events=[b]), metadata=tenant.metadata)
    assert again.results[0].status == DUPLICATE
    assert again.results[0].event_id == responses[0].results[1].event_id
    assert stored_message_ids(engine, tenant.tenant_id) == sorted([a.message_id, b.message_id])


def test_same_message_id_in_two_tenants_is_two_events(stub, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    t1, t2 = make_tenant(engine), make_tenant(engine)
    ev = track()
    r1 = stub.IngestEvents(ingest_pb2.IngestEventsRequest(events=[ev]), metadata=t1.metadata)
    r2 = stub.IngestEvents(ingest_pb2.IngestEventsRequest(events=[ev]), metadata=t2.metadata)
    assert r1.results[0].status == r2.results[0].status == ACCEPTED
    assert r1.results[0].event_id != r2.results[0].event_id


@pytest.mark.parametrize(
    ("metadata", "fragment"),
    [
        ((), "missing credentials"),
        ((("authorization", "Basic abc"),), "malformed credentials"),
        ((("authorization", "Bearer tsk_nope_nope"),), "invalid or revoked"),
    ],
)
def test_unauthenticated(stub, metadata, fragment: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as err:
        stub.IngestEvents(ingest_pb2.IngestEventsRequest(events=[track()]), metadata=metadata)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert fragment in err.value.details()


def test_revoked_key_stops_working(stub, tenant: TenantKey, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    from services.core import tenancy

    stub.IngestEvents(ingest_pb2.IngestEventsRequest(events=[track()]), metadata=tenant.metadata)
    key_id = tenant.api_key.split("_")[1]
    assert tenancy.revoke_api_key(engine, tenant.tenant_id, key_id)
    with pytest.raises(grpc.RpcError) as err:
        stub.IngestEvents(ingest_pb2.IngestEventsRequest(events=[track()]), metadata=tenant.metadata)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_keys_are_stored_hashed(tenant: TenantKey, engine: Engine) -> None:
    with engine.connect() as conn:
        hashes = (
            conn.execute(sa.text("SELECT key_hash FROM tenancy.api_keys WHERE tenant_id = :t"), {"t": tenant.tenant_id})
            .scalars()
            .all()
        )
    assert len(hashes) == 1
    assert tenant.api_key.encode() not in bytes(hashes[0])
    assert len(bytes(hashes[0])) == 32


def test_oversized_batch_is_invalid_argument_with_bad_request(stub, tenant: TenantKey, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as err:
        stub.IngestEvents(
            ingest_pb2.IngestEventsRequest(events=[track() for _ in range(501)]), metadata=tenant.metadata
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request(err.value) == [("events", "at most 500 events per batch, got 501")]
    assert stored_message_ids(engine, tenant.tenant_id) == []


def test_stream_refused_batch_keeps_the_stream_open(stub, tenant: TenantKey) -> None:  # type: ignore[no-untyped-def]
    good = track()
    responses = list(
        stub.StreamEvents(
            iter(
                [
                    ingest_pb2.StreamEventsRequest(batch_id="big", events=[track() for _ in range(501)]),
                    ingest_pb2.StreamEventsRequest(batch_id="ok", events=[good]),
                ]
            ),
            metadata=tenant.metadata,
        )
    )
    assert responses[0].batch_id == "big"
    assert responses[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "at most 500 events" in responses[0].error.message
    assert responses[1].results[0].status == ACCEPTED


def test_rate_limit_answers_resource_exhausted_with_retry_info(stub, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    limited = make_tenant(engine, "rl")
    with engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE tenancy.tenants SET ingest_rate_limit = 5, ingest_rate_burst = 10 WHERE tenant_id = :t"),
            {"t": limited.tenant_id},
        )
    ok = stub.IngestEvents(
        ingest_pb2.IngestEventsRequest(events=[track() for _ in range(10)]), metadata=limited.metadata
    )
    assert ok.accepted_count == 10
    with pytest.raises(grpc.RpcError) as err:
        stub.IngestEvents(ingest_pb2.IngestEventsRequest(events=[track() for _ in range(5)]), metadata=limited.metadata)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    delay = retry_delay(err.value)
    assert delay is not None and 0.5 < delay <= 1.1
    # Another tenant is not affected by this one's bucket.
    other = make_tenant(engine)
    assert (
        stub.IngestEvents(ingest_pb2.IngestEventsRequest(events=[track()]), metadata=other.metadata).accepted_count == 1
    )
    time.sleep(delay)
    again = stub.IngestEvents(
        ingest_pb2.IngestEventsRequest(events=[track() for _ in range(5)]), metadata=limited.metadata
    )
    assert again.accepted_count == 5


def test_event_round_trip_to_log_list_and_stream(  # type: ignore[no-untyped-def]
    stub, tenant: TenantKey, redis_client, settings: Settings
) -> None:
    sent = [track(), survey(0), interaction()]
    sent[0].context.update({"ip": "203.0.113.9", "locale": "en-GB"})
    sent[1].ClearField("timestamp")
    before = time.time()
    resp = stub.IngestEvents(ingest_pb2.IngestEventsRequest(events=sent), metadata=tenant.metadata)
    listed = stub.ListEvents(ingest_pb2.ListEventsRequest(page_size=10), metadata=tenant.metadata)
    by_mid = {e.message_id: e for e in listed.events}
    assert set(by_mid) == {e.message_id for e in sent}
    for original, result in zip(sent, resp.results, strict=True):
        stored = by_mid[original.message_id]
        assert stored.event_id == result.event_id
        assert stored.received_at.seconds >= int(before)
        expected = event_pb2.Event()
        expected.CopyFrom(original)
        expected.event_id = stored.event_id
        expected.received_at.CopyFrom(stored.received_at)
        if not original.HasField("timestamp"):
            expected.timestamp.CopyFrom(stored.received_at)  # defaulted to when it arrived
        assert stored == expected
    assert by_mid[sent[1].message_id].survey_response.HasField("score")  # NPS 0 is kept, not dropped
    wait_until(lambda: len(stream_payloads(redis_client, settings, tenant.tenant_id)) == 3)
    streamed = {e.message_id: e for e in stream_payloads(redis_client, settings, tenant.tenant_id)}
    assert streamed == by_mid


def test_list_events_pages_and_filters(stub, tenant: TenantKey) -> None:  # type: ignore[no-untyped-def]
    events = [track() for _ in range(5)]
    for ev in events:
        stub.IngestEvents(ingest_pb2.IngestEventsRequest(events=[ev]), metadata=tenant.metadata)
    seen: list[str] = []
    token = ""
    while True:
        page = stub.ListEvents(ingest_pb2.ListEventsRequest(page_size=2, page_token=token), metadata=tenant.metadata)
        seen.extend(e.message_id for e in page.events)
        token = page.next_page_token
        if not token:
            break
    assert seen == [e.message_id for e in reversed(events)]  # newest first, each once
    only = stub.ListEvents(
        ingest_pb2.ListEventsRequest(message_ids=[events[1].message_id, "unknown"]), metadata=tenant.metadata
    )
    assert [e.message_id for e in only.events] == [events[1].message_id]
    with pytest.raises(grpc.RpcError) as err:
        stub.ListEvents(ingest_pb2.ListEventsRequest(page_token="garbage!"), metadata=tenant.metadata)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request(err.value)[0][0] == "page_token"


def test_tenants_never_see_each_other(stub, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    t1, t2 = make_tenant(engine), make_tenant(engine)
    ev = track(uid("private"))
    stub.IngestEvents(ingest_pb2.IngestEventsRequest(events=[ev]), metadata=t1.metadata)
    assert stub.ListEvents(ingest_pb2.ListEventsRequest(), metadata=t2.metadata).events == []
    assert stub.ListEvents(ingest_pb2.ListEventsRequest(message_ids=[ev.message_id]), metadata=t2.metadata).events == []


def test_expired_deadline_writes_nothing(stub, tenant: TenantKey, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as err:
        stub.IngestEvents(ingest_pb2.IngestEventsRequest(events=[track()]), metadata=tenant.metadata, timeout=0.0001)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    time.sleep(0.2)
    assert stored_message_ids(engine, tenant.tenant_id) == []


def test_health_and_reflection_need_no_credentials(ingest_server: RunningServer) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{ingest_server.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "tessera.v1.IngestService"):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_retention_drops_old_event_partitions_only(stub, tenant: TenantKey, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    import datetime as dt

    from services.ingest.storage import EventStore

    ev = track()
    stub.IngestEvents(ingest_pb2.IngestEventsRequest(events=[ev]), metadata=tenant.metadata)
    store = EventStore(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("SELECT ingest.ensure_event_partitions('2001-01-01', 2)")
    assert store.drop_partitions_before(dt.date(2001, 2, 1)) == ["events_2001_01"]
    with engine.connect() as conn:
        names = set(conn.execute(sa.text("SELECT tablename FROM pg_tables WHERE schemaname = 'ingest'")).scalars())
    assert "events_2001_02" in names and "events_2001_01" not in names
    assert "events_default" in names
    this_month = dt.datetime.now(dt.UTC).strftime("events_%Y_%m")
    assert this_month in names
    assert stored_message_ids(engine, tenant.tenant_id) == [ev.message_id]  # current data untouched
    store.drop_partitions_before(dt.date(2001, 3, 1))


def test_per_tenant_limits_are_validated(engine: Engine, tenant: TenantKey) -> None:
    from services.core import tenancy
    from services.core.errors import InvalidArgument, NotFound

    tenancy.set_rate_limit(engine, tenant.tenant_id, 100, 200)
    with pytest.raises(InvalidArgument):
        tenancy.set_rate_limit(engine, tenant.tenant_id, -1, None)
    with pytest.raises(NotFound):
        tenancy.set_rate_limit(engine, "no-such-tenant", 10, None)
