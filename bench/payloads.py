"""Pre-serialized request bytes, so the load generator spends its CPU on gRPC, not protobuf.

Events come from the demo dataset, serialized once without their ``message_id``. A batch is then
a ``b"".join`` of ready-made pieces: the field tag and length of each event, a fixed-width
``message_id`` unique to the run, client and batch, and the rest of the event. Protobuf accepts
fields in any order, so the result parses exactly like a request built with the generated classes
(``check_batch_bytes`` proves it for the first batch of every client).
"""

from __future__ import annotations

from collections.abc import Sequence

from services.cli.demo import generate
from services.core.streams import tag, varint
from tessera.v1 import event_pb2, ingest_pb2

# Tags from the descriptors (the codec's helpers), never spelled by hand.
_EVENTS_TAG = {
    "unary": tag(ingest_pb2.IngestEventsRequest.DESCRIPTOR, "events"),
    "stream": tag(ingest_pb2.StreamEventsRequest.DESCRIPTOR, "events"),
}
_MESSAGE_ID_TAG = tag(event_pb2.Event.DESCRIPTOR, "message_id")
_BATCH_ID_TAG = tag(ingest_pb2.StreamEventsRequest.DESCRIPTOR, "batch_id")


def demo_templates(customers: int = 200, seed: int = 11, days: int = 30) -> list[bytes]:
    """Demo events serialized without their message_id (the bench gives each one a fresh id)."""
    out = []
    for ev in generate(seed=seed, customers=customers, days=days):
        ev.ClearField("message_id")
        out.append(ev.SerializeToString())
    return out


class BatchMaker:
    """Makes batch number ``seq`` of one client: ``size`` events with message ids
    ``{tag}-{seq:09d}-{i:03d}``, as IngestEventsRequest or StreamEventsRequest bytes."""

    def __init__(self, templates: Sequence[bytes], tag: str, size: int, kind: str, offset: int = 0) -> None:
        if kind not in _EVENTS_TAG:
            raise ValueError(f"kind must be unary or stream, got {kind!r}")
        if not templates:
            raise ValueError("no templates")
        self.templates = list(templates)
        self.tag = tag
        self.size = size
        self.kind = kind
        self.offset = offset
        mid_len = len(f"{tag}-{0:09d}-{0:03d}")
        mid_field = _MESSAGE_ID_TAG + varint(mid_len)
        events_tag = _EVENTS_TAG[kind]
        # per template: events tag + length of the whole event, then the message_id tag + length
        self._heads = [events_tag + varint(len(mid_field) + mid_len + len(t)) + mid_field for t in self.templates]
        self._suffixes = [b"%03d" % i for i in range(size)]

    def make(self, seq: int) -> bytes:
        base = f"{self.tag}-{seq:09d}-".encode()
        n = len(self.templates)
        start = self.offset + seq * self.size
        parts: list[bytes] = []
        if self.kind == "stream":
            bid = str(seq).encode()
            parts.append(_BATCH_ID_TAG + varint(len(bid)) + bid)
        heads, templates, suffixes = self._heads, self.templates, self._suffixes
        for i in range(self.size):
            j = (start + i) % n
            parts += (heads[j], base, suffixes[i], templates[j])
        return b"".join(parts)


def check_batch_bytes(maker: BatchMaker, seq: int = 0) -> int:
    """Parse one made batch with the generated classes; returns its byte size or raises."""
    raw = maker.make(seq)
    req: ingest_pb2.IngestEventsRequest | ingest_pb2.StreamEventsRequest
    if maker.kind == "unary":
        req = ingest_pb2.IngestEventsRequest.FromString(raw)
    else:
        req = ingest_pb2.StreamEventsRequest.FromString(raw)
        if req.batch_id != str(seq):
            raise AssertionError(f"batch_id {req.batch_id!r} != {seq}")
    if len(req.events) != maker.size:
        raise AssertionError(f"{len(req.events)} events parsed, {maker.size} made")
    ids = [ev.message_id for ev in req.events]
    if len(set(ids)) != len(ids) or not ids[0].startswith(maker.tag):
        raise AssertionError(f"bad message ids: {ids[:3]}")
    j = (maker.offset + seq * maker.size) % len(maker.templates)
    first = event_pb2.Event.FromString(maker.templates[j])
    first.message_id = ids[0]
    if req.events[0] != first:
        raise AssertionError("first event does not round-trip")
    return len(raw)
