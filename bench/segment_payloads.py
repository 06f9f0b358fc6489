"""Segment-style batches as the SDKs send them, ready-made, and the same batches as IngestEvents bytes.

Messages are generated once (identify and track, with userId and/or anonymousId, traits and a
library context, an explicit ``timestamp`` so the gateway's mapping is deterministic) and encoded
as JSON without their ``messageId``. A batch is then a ``b"".join`` of pieces with a fresh
``{tag}-{seq:09d}-{i:03d}`` message id in front of each message: the same ids and the same event
order as :class:`bench.payloads.BatchMaker` gives the gRPC side, whose templates are these very
messages mapped by :func:`services.gateway.segment.map_messages`.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from collections.abc import Sequence
from typing import Any

from bench.payloads import BatchMaker
from bench.profile_stack import customer
from services.gateway import segment
from tessera.v1 import ingest_pb2

EVENTS = ("Product Viewed", "Product Added", "Cart Viewed", "Checkout Started", "Order Completed", "Signed In")
PLANS = ("free", "silver", "gold")
LIBRARY = {"name": "analytics-python", "version": "2.3.2"}


def messages(count: int = 500, seed: int = 3, now: dt.datetime | None = None) -> list[dict[str, Any]]:
    """``count`` Segment messages without messageId: one identify in five, the rest tracks; one in
    four anonymous only (a visitor before sign-in), the others with a userId."""
    rng = random.Random(seed)
    now = now or dt.datetime.now(dt.UTC)
    out: list[dict[str, Any]] = []
    for n in range(count):
        person = customer(n % 2000)
        at = now - dt.timedelta(seconds=rng.randint(60, 2 * 86400))
        context: dict[str, Any] = {
            "library": LIBRARY,
            "ip": f"203.0.113.{n % 250 + 1}",
            "userAgent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0",
            "locale": "en-US",
            "timezone": "Europe/Berlin",
        }
        msg: dict[str, Any] = {"timestamp": at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "context": context}
        if n % 4 == 3:
            msg["anonymousId"] = f"anon-{n:06d}-{rng.getrandbits(32):08x}"
        else:
            msg["userId"] = f"user-{n % 2000:05d}"
            if n % 2:
                msg["anonymousId"] = f"anon-{n:06d}-{rng.getrandbits(32):08x}"
        if n % 5 == 0 and "userId" in msg:
            msg["type"] = "identify"
            msg["traits"] = {
                "email": person.email,
                "phone": person.phone,
                "firstName": ("Ada", "Grace", "Alan", "Linus", "Maya")[n % 5],
                "lastName": ("Okafor", "Hopper", "Turing", "Sato", "Silva")[n % 5],
                "plan": PLANS[n % 3],
                "createdAt": (at - dt.timedelta(days=rng.randint(1, 900))).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "address": {"city": "Berlin", "country": "DE", "postalCode": f"10{n % 1000:03d}"},
            }
        else:
            msg["type"] = "track"
            msg["event"] = EVENTS[n % len(EVENTS)]
            msg["properties"] = {
                "product_id": f"sku-{rng.randint(1, 5000):05d}",
                "name": "Wireless headphones",
                "category": "audio",
                "price": round(rng.uniform(5, 400), 2),
                "currency": "EUR",
                "quantity": rng.randint(1, 3),
                "coupon": None if n % 3 else "WINTER10",
                "url": f"https://shop.example.com/p/{n % 5000}",
            }
        out.append(msg)
    return out


class SegmentBatchMaker:
    """Batch ``seq`` of one client as a /v1/batch body: ``size`` messages, message ids
    ``{tag}-{seq:09d}-{i:03d}``, messages chosen exactly as :class:`BatchMaker` chooses its events."""

    def __init__(self, rests: Sequence[bytes], tag: str, size: int, offset: int = 0) -> None:
        if not rests:
            raise ValueError("no messages")
        self.rests = list(rests)
        self.tag = tag
        self.size = size
        self.offset = offset
        self._suffixes = [b"%03d" % i for i in range(size)]
        sent = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        self._tail = b'],"sentAt":"' + sent.encode() + b'","context":{"library":' + json.dumps(LIBRARY).encode() + b"}}"

    def make(self, seq: int) -> bytes:
        base = b'{"messageId":"' + f"{self.tag}-{seq:09d}-".encode()
        n = len(self.rests)
        start = self.offset + seq * self.size
        rests, suffixes = self.rests, self._suffixes
        parts = [base + suffixes[i] + b'",' + rests[(start + i) % n] for i in range(self.size)]
        return b'{"batch":[' + b",".join(parts) + self._tail


def json_templates(msgs: Sequence[dict[str, Any]]) -> list[bytes]:
    """Each message as JSON without its opening brace (the message id goes in front)."""
    return [json.dumps(m, separators=(",", ":")).encode()[1:] for m in msgs]


def grpc_templates(msgs: Sequence[dict[str, Any]]) -> list[bytes]:
    """The messages as the gateway maps them, serialized without message_id (for :class:`BatchMaker`)."""
    received = dt.datetime.now(dt.UTC)
    with_ids = [{**m, "messageId": f"template-{n}"} for n, m in enumerate(msgs)]
    mapped = segment.map_messages(with_ids, None, received, None, {"library": LIBRARY})
    if mapped.violations:
        raise ValueError(f"the generated messages do not map: {mapped.violations[:3]}")
    out = []
    for _, ev in mapped.events:
        ev.ClearField("message_id")
        out.append(ev.SerializeToString())
    return out


def check_same_batch(msgs: Sequence[dict[str, Any]], tag: str, size: int, seq: int = 0) -> int:
    """The HTTP body and the gRPC request of one batch carry the same events (as the gateway maps
    them); returns the body's size in bytes or raises."""
    http = SegmentBatchMaker(json_templates(msgs), tag, size).make(seq)
    body = json.loads(http)
    mapped = segment.map_messages(body["batch"], None, dt.datetime.now(dt.UTC), None, body["context"])
    if mapped.violations:
        raise AssertionError(f"the gateway would refuse: {mapped.violations[:3]}")
    grpc_req = ingest_pb2.IngestEventsRequest.FromString(BatchMaker(grpc_templates(msgs), tag, size, "unary").make(seq))
    if [e for _, e in mapped.events] != list(grpc_req.events):
        raise AssertionError("the HTTP batch and the gRPC batch differ")
    return len(http)
