"""What a hostile or careless client tried, and what must hold: idle streams never starve a
service, revoked keys stop open streams, NUL characters and oversized requests get field
violations, error details stay within gRPC's limits, and deadlines are honoured on the server."""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from sqlalchemy.engine import Engine

from services.core import tenancy
from services.core.server import RunningServer, start_server
from services.core.settings import Settings
from services.ingest.app import definition as ingest_definition
from services.ingest.settings import IngestSettings
from tessera.v1 import event_pb2, identity_pb2, identity_pb2_grpc, ingest_pb2, ingest_pb2_grpc
from tests.conftest import TenantKey, make_tenant
from tests.support.events import track
from tests.support.grpc_errors import bad_request

pytestmark = pytest.mark.integration


def health_ms(target: str) -> float:
    started = time.perf_counter()
    with grpc.insecure_channel(target) as channel:
        resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    return (time.perf_counter() - started) * 1000


class IdleStreams:
    """Streams that open and then send nothing, each on its own connection, until closed."""

    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.channels: list[grpc.Channel] = []
        self._stop = threading.Event()

    def _idle(self) -> Iterator[Any]:
        self._stop.wait()
        return
        yield  # a generator that yields nothing until stopped

    def open_stream_events(self, target: str, metadata: Any, n: int) -> None:
        for _ in range(n):
            channel = grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
            self.channels.append(channel)
            call = ingest_pb2_grpc.IngestServiceStub(channel).StreamEvents(self._idle(), metadata=metadata)
            self.calls.append(call)

    def open_reflection(self, target: str, n: int) -> None:
        for _ in range(n):
            channel = grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
            self.channels.append(channel)
            call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(self._idle())
            self.calls.append(call)

    def close(self) -> None:
        self._stop.set()
        for call in self.calls:
            call.cancel()
        for channel in self.channels:
            channel.close()


def test_hundreds_of_idle_streams_starve_nothing(ingest_server: RunningServer, engine: Engine) -> None:
    """32 idle StreamEvents (or 40 reflection streams) used to take every server thread."""
    target = f"127.0.0.1:{ingest_server.port}"
    a, b = make_tenant(engine, "idle"), make_tenant(engine, "busy")
    baseline = min(health_ms(target) for _ in range(5))
    idle = IdleStreams()
    try:
        idle.open_stream_events(target, a.metadata, 150)
        idle.open_reflection(target, 150)
        time.sleep(1.0)  # let them all reach the server
        worst = max(health_ms(target) for _ in range(10))
        assert worst < max(250.0, 20 * baseline), f"health took {worst:.0f} ms with 300 idle streams open"
        with grpc.insecure_channel(target) as channel:
            started = time.perf_counter()
            resp = ingest_pb2_grpc.IngestServiceStub(channel).IngestEvents(
                ingest_pb2.IngestEventsRequest(events=[track()]), metadata=b.metadata, timeout=5
            )
            assert resp.accepted_count == 1
            assert time.perf_counter() - started < 2.0
            # The idle tenant is not blocked either: its unary calls still go through.
            resp = ingest_pb2_grpc.IngestServiceStub(channel).IngestEvents(
                ingest_pb2.IngestEventsRequest(events=[track()]), metadata=a.metadata, timeout=5
            )
            assert resp.accepted_count == 1
    finally:
        idle.close()


def test_a_tenant_cannot_hold_more_streams_than_its_share(settings: Settings, engine: Engine) -> None:
    tenant = make_tenant(engine, "greedy")
    running = start_server(ingest_definition(), settings.with_overrides(max_streams_per_tenant=5), port=0)
    target = f"127.0.0.1:{running.port}"
    idle = IdleStreams()
    try:
        idle.open_stream_events(target, tenant.metadata, 5)
        time.sleep(0.5)
        with grpc.insecure_channel(target) as channel:
            requests = iter([ingest_pb2.StreamEventsRequest(batch_id="1", events=[track()])])
            with pytest.raises(grpc.RpcError) as err:
                list(ingest_pb2_grpc.IngestServiceStub(channel).StreamEvents(requests, metadata=tenant.metadata))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "open streams" in (err.value.details() or "")
        # Another tenant still gets its own.
        other = make_tenant(engine, "other")
        with grpc.insecure_channel(target) as channel:
            requests = iter([ingest_pb2.StreamEventsRequest(batch_id="1", events=[track()])])
            (answer,) = ingest_pb2_grpc.IngestServiceStub(channel).StreamEvents(requests, metadata=other.metadata)
        assert answer.accepted_count == 1
    finally:
        idle.close()
        running.shutdown(grace=1)


def test_an_idle_stream_is_ended_and_says_to_reopen(settings: Settings, tenant: TenantKey) -> None:
    running = start_server(ingest_definition(), settings.with_overrides(stream_idle_seconds=1.0), port=0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stop = threading.Event()

            def requests() -> Iterator[ingest_pb2.StreamEventsRequest]:
                yield ingest_pb2.StreamEventsRequest(batch_id="1", events=[track()])
                stop.wait(10)

            stream = ingest_pb2_grpc.IngestServiceStub(channel).StreamEvents(requests(), metadata=tenant.metadata)
            first = next(stream)
            assert first.accepted_count == 1
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                next(stream)
            stop.set()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert 0.8 < time.monotonic() - started < 5
    finally:
        running.shutdown(grace=1)


def test_a_revoked_key_stops_new_calls_and_open_streams_within_the_cache_lifetime(
    settings: Settings, engine: Engine
) -> None:
    """The production cache, not a disabled one: revocation takes effect within its lifetime."""
    tenant_id = f"revoke-{uuid.uuid4().hex[:8]}"
    api_key = tenancy.create_tenant(engine, tenant_id)
    metadata = (("authorization", f"Bearer {api_key}"),)
    running = start_server(ingest_definition(), settings.with_overrides(auth_cache_seconds=1.0), port=0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            outgoing: queue.Queue[ingest_pb2.StreamEventsRequest | None] = queue.Queue()

            def requests() -> Iterator[ingest_pb2.StreamEventsRequest]:
                while (item := outgoing.get()) is not None:
                    yield item

            stream = stub.StreamEvents(requests(), metadata=metadata)
            outgoing.put(ingest_pb2.StreamEventsRequest(batch_id="0", events=[track()]))
            assert next(stream).accepted_count == 1
            key_id = api_key.split("_")[1]
            assert tenancy.revoke_api_key(engine, tenant_id, key_id)
            revoked_at = time.monotonic()
            ended: grpc.RpcError | None = None
            for n in range(1, 40):
                outgoing.put(ingest_pb2.StreamEventsRequest(batch_id=str(n), events=[track()]))
                try:
                    next(stream)
                except grpc.RpcError as stream_error:
                    ended = stream_error
                    break
                time.sleep(0.1)
            outgoing.put(None)
            assert ended is not None, "the open stream kept accepting after the key was revoked"
            assert ended.code() == grpc.StatusCode.UNAUTHENTICATED
            assert time.monotonic() - revoked_at < 3.0
            with pytest.raises(grpc.RpcError) as refused:
                stub.IngestEvents(ingest_pb2.IngestEventsRequest(events=[track()]), metadata=metadata, timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        running.shutdown(grace=1)


def test_nul_in_an_event_rejects_that_event_and_keeps_the_good_one(
    ingest_channel: grpc.Channel, tenant: TenantKey, engine: Engine
) -> None:
    """It used to answer INTERNAL and lose the good event beside it (PostgreSQL text holds no NUL)."""
    stub = ingest_pb2_grpc.IngestServiceStub(ingest_channel)
    good, bad_id, bad_source = track(), track(), track()
    bad_id.message_id = "m-\x00-1"
    bad_source.source = "web\x00"
    resp = stub.IngestEvents(
        ingest_pb2.IngestEventsRequest(events=[good, bad_id, bad_source]), metadata=tenant.metadata
    )
    statuses = [r.status for r in resp.results]
    assert statuses == [
        ingest_pb2.EVENT_STATUS_ACCEPTED,
        ingest_pb2.EVENT_STATUS_REJECTED,
        ingest_pb2.EVENT_STATUS_REJECTED,
    ]
    assert [v.field for v in resp.results[1].violations] == ["events[1].message_id"]
    assert [v.reason for v in resp.results[2].violations] == ["INVALID_CHARACTER"]
    # The stream stays open past such a batch.
    answers = list(
        stub.StreamEvents(
            iter(
                [
                    ingest_pb2.StreamEventsRequest(batch_id="a", events=[bad_id]),
                    ingest_pb2.StreamEventsRequest(batch_id="b", events=[track()]),
                ]
            ),
            metadata=tenant.metadata,
        )
    )
    assert [(a.batch_id, a.rejected_count, a.accepted_count) for a in answers] == [("a", 1, 0), ("b", 0, 1)]


@pytest.mark.parametrize(
    ("rpc", "request_", "field"),
    [
        (
            "MergeProfiles",
            identity_pb2.MergeProfilesRequest(
                survivor_profile=f"profiles/{uuid.uuid4()}", absorbed_profile=f"profiles/{uuid.uuid4()}", reason="x\x00"
            ),
            "reason",
        ),
        (
            "UpdateIdentityRules",
            identity_pb2.UpdateIdentityRulesRequest(rules=identity_pb2.IdentityRules(blocked_values=["ok", "b\x00d"])),
            "rules.blocked_values[1]",
        ),
        (
            "ResolveIdentifiers",
            identity_pb2.ResolveIdentifiersRequest(identifiers=[event_pb2.Identifier(type="email", value="a\x00@b.c")]),
            "identifiers[0].value",
        ),
    ],
)
def test_nul_in_a_request_field_is_invalid_argument_naming_it(
    identity_channel: grpc.Channel,
    tenant: TenantKey,
    rpc: str,
    request_: Any,
    field: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """It used to be INTERNAL with a traceback that included a SQL fragment."""
    with pytest.raises(grpc.RpcError) as err:
        getattr(identity_pb2_grpc.IdentityServiceStub(identity_channel), rpc)(request_, metadata=tenant.metadata)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in bad_request(err.value)] == [field]
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_error_details_stay_within_grpcs_trailer_limit(identity_channel: grpc.Channel, tenant: TenantKey) -> None:
    """200 blocked identifiers used to produce a BadRequest too big for the trailers
    (RESOURCE_EXHAUSTED "received metadata size exceeds hard limit")."""
    stub = identity_pb2_grpc.IdentityServiceStub(identity_channel)
    many = [event_pb2.Identifier(type="email", value="test@test.com")] * 99 + [
        event_pb2.Identifier(type=f"nope_{i}", value="x") for i in range(1)
    ]
    with pytest.raises(grpc.RpcError) as err:
        stub.ResolveIdentifiers(identity_pb2.ResolveIdentifiersRequest(identifiers=many), metadata=tenant.metadata)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = bad_request(err.value)
    assert len(violations) == 50
    assert violations[-1][1] == "and 51 more violations not listed"  # 49 listed + 51 = 100
    with pytest.raises(grpc.RpcError) as err:
        stub.ResolveIdentifiers(
            identity_pb2.ResolveIdentifiersRequest(
                identifiers=[event_pb2.Identifier(type="email", value="a@b.c")] * 101
            ),
            metadata=tenant.metadata,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request(err.value) == [("identifiers", "at most 100 identifiers, got 101")]


def test_a_batch_over_4_mb_is_invalid_argument_and_far_over_is_refused_by_the_transport(
    ingest_channel: grpc.Channel, tenant: TenantKey
) -> None:
    stub = ingest_pb2_grpc.IngestServiceStub(ingest_channel)
    big = []
    for i in range(140):
        ev = track(f"big-{uuid.uuid4().hex[:6]}-{i}")
        ev.properties.update({"blob": "x" * 30_000})
        big.append(ev)
    request = ingest_pb2.IngestEventsRequest(events=big)
    assert 4 * 1024 * 1024 < request.ByteSize() < 4 * 1024 * 1024 + 64 * 1024
    with pytest.raises(grpc.RpcError) as err:
        stub.IngestEvents(request, metadata=tenant.metadata, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    huge = ingest_pb2.IngestEventsRequest(events=big * 2)
    with pytest.raises(grpc.RpcError) as err:
        stub.IngestEvents(huge, metadata=tenant.metadata, timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_deadline_reached_while_committing_is_deadline_exceeded_and_writes_nothing(
    ingest_channel: grpc.Channel, tenant: TenantKey, engine: Engine
) -> None:
    """The deadline reaches the server; the write waits on a lock held here until the statement
    timeout derived from the deadline fires: the server answers DEADLINE_EXCEEDED itself."""
    blocked = track()
    holder = engine.connect()
    tx = holder.begin()
    holder.execute(
        sa.text(
            "INSERT INTO ingest.dedupe_keys (tenant_id, key_hash, day, event_id, received_at) "
            "VALUES (:t, ingest.dedupe_key(:m), (now() AT TIME ZONE 'UTC')::date, :e, now())"
        ),
        {"t": tenant.tenant_id, "m": blocked.message_id, "e": str(uuid.uuid4())},
    )
    try:
        other = track()
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            ingest_pb2_grpc.IngestServiceStub(ingest_channel).IngestEvents(
                ingest_pb2.IngestEventsRequest(events=[blocked, other]), metadata=tenant.metadata, timeout=1.5
            )
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started >= 1.0
        # The server's statement must give up on its own (its timeout comes from the deadline), before
        # the lock is released: a statement still waiting would write both events once it is.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _waiting_on_locks(engine, "tessera-ingest"):
            time.sleep(0.05)
        assert not _waiting_on_locks(engine, "tessera-ingest"), "the write outlived the caller's deadline"
    finally:
        tx.rollback()
        holder.close()
    with engine.connect() as conn:
        stored = conn.execute(
            sa.text("SELECT count(*) FROM ingest.events WHERE tenant_id = :t AND message_id = :m"),
            {"t": tenant.tenant_id, "m": other.message_id},
        ).scalar_one()
    assert stored == 0


def _waiting_on_locks(engine: Engine, application: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = :a AND wait_event_type = 'Lock'"
                ),
                {"a": application},
            ).scalar_one()
        )


def test_reflection_streams_are_capped_apart_from_tenants(settings: Settings) -> None:
    running = start_server(
        ingest_definition(), settings.with_overrides(max_public_streams=3), port=0, service_settings=IngestSettings()
    )
    target = f"127.0.0.1:{running.port}"
    idle = IdleStreams()
    try:
        idle.open_reflection(target, 3)
        time.sleep(0.5)
        with grpc.insecure_channel(target) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert health_ms(target) < 1000  # health checks are never refused
    finally:
        idle.close()
        running.shutdown(grace=1)


def test_list_events_caps_the_message_ids_it_looks_up(ingest_channel: grpc.Channel, tenant: TenantKey) -> None:
    with pytest.raises(grpc.RpcError) as err:
        ingest_pb2_grpc.IngestServiceStub(ingest_channel).ListEvents(
            ingest_pb2.ListEventsRequest(message_ids=[f"m-{i}" for i in range(1001)]), metadata=tenant.metadata
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request(err.value) == [("message_ids", "at most 1000 per request, got 1001")]


def test_rules_reach_the_consumer_within_the_production_cache_lifetime(settings: Settings, engine: Engine) -> None:
    """Fixtures turn the rules cache off; here it is on (1 s), as in production (5 s by default): a
    type added by UpdateIdentityRules links events once the cache has expired, not before."""
    from google.protobuf import field_mask_pb2

    from services.identity.app import definition as identity_definition
    from services.identity.settings import IdentitySettings
    from tests.support.identity import person_event, wait_linked

    tenant = make_tenant(engine, "rules")
    # A key prefix of its own: the session's identity server (cache off) must not apply these events.
    mine = settings.with_overrides(redis_prefix=f"{settings.redis_prefix}-rules")
    running = start_server(
        identity_definition(), mine, port=0, service_settings=IdentitySettings(rules_cache_seconds=1.0)
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = identity_pb2_grpc.IdentityServiceStub(channel)
            current = stub.GetIdentityRules(identity_pb2.GetIdentityRulesRequest(), metadata=tenant.metadata).rules
            assert "loyalty_id" not in {t.type for t in current.types}
            types = [
                *current.types,
                identity_pb2.IdentifierTypeRule(type="loyalty_id", normalizer="trim", priority=80, max_per_profile=1),
            ]
            stub.UpdateIdentityRules(
                identity_pb2.UpdateIdentityRulesRequest(
                    rules=identity_pb2.IdentityRules(types=types), update_mask=field_mask_pb2.FieldMask(paths=["types"])
                ),
                metadata=tenant.metadata,
            )
            time.sleep(1.5)  # the cache's lifetime
            from services.core.bus import Bus
            from tests.support.streams import publish_events

            ev = person_event(("loyalty_id", "LY-1"))
            ev.event_id = str(uuid.uuid4())
            publish_events(Bus(running.ctx.redis, mine.redis_prefix), tenant.tenant_id, [ev.SerializeToString()])
            wait_linked(engine, tenant.tenant_id, 1)
            from services.core.harness import delete_prefix

            delete_prefix(running.ctx.redis, mine.redis_prefix)
            resolved = stub.ResolveIdentifiers(
                identity_pb2.ResolveIdentifiersRequest(
                    identifiers=[event_pb2.Identifier(type="loyalty_id", value="LY-1")]
                ),
                metadata=tenant.metadata,
            )
            assert resolved.profile_id
    finally:
        running.shutdown(grace=1)
