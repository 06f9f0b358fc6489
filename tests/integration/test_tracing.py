"""One trace runs from the producer's RPC into the stream message that downstream services read."""

from __future__ import annotations

import time

import grpc
import pytest
import redis

from services.core import streams
from services.core.settings import Settings
from services.core.telemetry import configure_telemetry
from tessera.v1 import ingest_pb2, ingest_pb2_grpc
from tests.conftest import TenantKey
from tests.support.events import track

pytestmark = pytest.mark.integration

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def test_stream_message_continues_the_callers_trace(
    ingest_channel: grpc.Channel, tenant: TenantKey, redis_client: redis.Redis, settings: Settings
) -> None:
    configure_telemetry("ingest")  # what `tessera serve` does; idempotent
    stub = ingest_pb2_grpc.IngestServiceStub(ingest_channel)
    metadata = (*tenant.metadata, ("traceparent", f"00-{TRACE_ID}-00f067aa0ba902b7-01"))
    resp = stub.IngestEvents(ingest_pb2.IngestEventsRequest(events=[track()]), metadata=metadata)
    assert resp.accepted_count == 1
    key = f"{settings.redis_prefix}:{{{tenant.tenant_id}}}:events"
    deadline = time.monotonic() + 10
    rows: list = []  # type: ignore[type-arg]
    while time.monotonic() < deadline and not rows:
        rows = redis_client.xrange(key)  # type: ignore[assignment]
        time.sleep(0.05)
    assert rows, "the event never reached the stream"
    traceparent = streams.decode(streams.EVENTS, rows[0][1][streams.ENTRY_FIELD], tenant.tenant_id).traceparent
    _version, trace_id, span_id, _flags = traceparent.split("-")
    assert trace_id == TRACE_ID
    assert span_id != "00f067aa0ba902b7"  # the server's own span, a child of the caller's
