"""The gateway bench compares like with like: its HTTP and gRPC batches carry the same events, and
the system test routes through the gateway only events whose Segment mapping gives them back."""

from __future__ import annotations

import json

from bench.payloads import BatchMaker
from bench.segment_payloads import SegmentBatchMaker, check_same_batch, grpc_templates, json_templates, messages
from services.cli.demo import generate
from tessera.v1 import event_pb2, ingest_pb2
from tests.support.system import segment_message, via_gateway


def test_http_and_grpc_batches_hold_the_same_events() -> None:
    msgs = messages(60)
    assert check_same_batch(msgs, "t", 25, seq=3) > 0
    body = json.loads(SegmentBatchMaker(json_templates(msgs), "t", 25, offset=7).make(2))
    grpc_req = ingest_pb2.IngestEventsRequest.FromString(BatchMaker(grpc_templates(msgs), "t", 25, "unary", 7).make(2))
    assert [m["messageId"] for m in body["batch"]] == [e.message_id for e in grpc_req.events]
    assert len({m["messageId"] for m in body["batch"]}) == 25
    kinds = {m["type"] for m in msgs}
    assert kinds == {"identify", "track"}


def test_only_faithful_track_events_go_through_the_gateway() -> None:
    events = list(generate(customers=20, days=20))
    routed = [e for e in events if via_gateway(e)]
    assert routed, "the demo data has track events Segment can express"
    assert all(e.WhichOneof("payload") == "track" for e in routed)
    assert via_gateway(routed[0]) == via_gateway(routed[0])  # the same split every time
    ev = event_pb2.Event(message_id="m1", channel=event_pb2.CHANNEL_WEB, source="web")
    ev.timestamp.seconds = 1_700_000_000
    ev.identifiers.add(type="user_id", value="u1")
    ev.track.event = "Signed In"
    assert segment_message(ev) is not None
    ev.identifiers.add(type="device_id", value="d1")  # no Segment field says device_id
    assert segment_message(ev) is None
    identify = event_pb2.Event(message_id="m2", channel=event_pb2.CHANNEL_WEB, source="web")
    identify.identifiers.add(type="user_id", value="u1")
    identify.identify.traits.update({"plan": "gold"})
    assert segment_message(identify) is None  # its traits would carry the gateway's source
