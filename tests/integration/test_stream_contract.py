"""The streams are a typed contract: what each producer writes, each consumer reads back.

Producers: ingest's outbox (``events``), identity's consumer (``resolved``) and identity's outbox
(``changes``). Consumers: identity reads ``events``; whatever reads ``resolved`` and ``changes``
(profile, metrics) decodes them with the same codec, as this test does.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from services.core import streams
from services.core.bus import Bus
from services.core.server import RunningServer
from services.core.settings import Settings
from tessera.v1 import event_pb2, ingest_pb2, ingest_pb2_grpc
from tests.conftest import TenantKey
from tests.support.streams import entries, wait_entries

pytestmark = pytest.mark.integration

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def test_an_ingested_event_reaches_resolved_and_changes_typed_and_traced(
    ingest_channel: grpc.Channel,
    identity_server: RunningServer,
    tenant: TenantKey,
    redis_client: Any,
    settings: Settings,
) -> None:
    ev = event_pb2.Event(
        message_id="contract-1",
        channel=event_pb2.CHANNEL_CHAT,
        source="contract",
        identifiers=[event_pb2.Identifier(type="email", value=" Contract@Example.com ")],
        message=event_pb2.Message(interaction_id="i-1", author=event_pb2.AUTHOR_CUSTOMER, text="hello"),
    )
    metadata = (*tenant.metadata, ("traceparent", f"00-{TRACE_ID}-00f067aa0ba902b7-01"))
    resp = ingest_pb2_grpc.IngestServiceStub(ingest_channel).IngestEvents(
        ingest_pb2.IngestEventsRequest(events=[ev]), metadata=metadata
    )
    (result,) = resp.results
    bus = Bus(redis_client, settings.redis_prefix)

    # events: written by ingest's outbox, read by identity.
    ((_, sent),) = wait_entries(redis_client, bus, tenant.tenant_id, streams.EVENTS, bool)
    assert sent.tenant_id == tenant.tenant_id
    assert sent.traceparent.split("-")[1] == TRACE_ID
    assert sent.event.event_id == result.event_id and sent.event.HasField("received_at")
    assert sent.event.message == ev.message and list(sent.event.identifiers) == list(ev.identifiers)

    # resolved: written by identity's consumer, the event unchanged but for its profile.
    ((_, resolved),) = wait_entries(redis_client, bus, tenant.tenant_id, streams.RESOLVED, bool)
    assert resolved.tenant_id == tenant.tenant_id and resolved.traceparent == sent.traceparent
    profile_id = resolved.event.profile_id
    assert profile_id
    unstamped = event_pb2.Event()
    unstamped.CopyFrom(resolved.event)
    unstamped.ClearField("profile_id")
    assert unstamped == sent.event

    # changes: written by identity's outbox.
    found = wait_entries(redis_client, bus, tenant.tenant_id, streams.CHANGES, bool)
    assert [(e.change.kind, e.change.profile_id) for _, e in found] == [(streams.CREATED, profile_id)]
    assert found[0][1].tenant_id == tenant.tenant_id
    assert entries(redis_client, bus, tenant.tenant_id, streams.CHANGES) == found
