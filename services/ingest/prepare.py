"""The pure part of an ingest batch: validate, assign ids, and produce the bytes to store.

No I/O here (tested without a database): :func:`prepare` decides which events of a batch may be
stored and builds each one's stored bytes, the client's event serialized once with the server's
fields appended (see :func:`services.core.streams.stamp_event`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from google.protobuf import timestamp_pb2

from services.core import streams
from services.core.errors import Violation
from services.core.status import capped, field_violation
from services.ingest import validation
from tessera.v1 import event_pb2, ingest_pb2

REJECTED = ingest_pb2.EVENT_STATUS_REJECTED


def dedupe_key(message_id: str) -> str:
    """The dedupe key of a message id: 16 bytes of SHA-256 over its UTF-8, as 32 hex digits (a
    ``uuid`` to PostgreSQL, whose ``ingest.dedupe_key()`` computes the same one)."""
    return hashlib.sha256(message_id.encode()).hexdigest()[:32]


class NewEvent(NamedTuple):
    """An event ready to store: validated, stamped, serialized (a tuple: one is built per event)."""

    event_id: str
    key_hash: str
    message_id: str
    occurred: float
    channel: int
    kind: str
    payload: bytes


_RAND74 = (1 << 74) - 1


def new_event_ids(count: int, now_ms: int | None = None) -> list[str]:
    """UUIDv7s: time-ordered, so the event log's index grows at its right edge.

    One ``os.urandom`` call per batch, not per event: each call releases the GIL.
    """
    ms = (int(time.time() * 1000) if now_ms is None else now_ms) & ((1 << 48) - 1)
    pool = os.urandom(10 * count)
    out = []
    for i in range(count):
        rand = int.from_bytes(pool[i * 10 : i * 10 + 10], "big") & _RAND74
        value = ms << 80 | 0x7 << 76 | (rand >> 62) << 64 | 0b10 << 62 | (rand & ((1 << 62) - 1))
        h = f"{value:032x}"
        out.append(f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")
    return out


def new_event_id(now_ms: int | None = None) -> str:
    return new_event_ids(1, now_ms)[0]


#: How far an event's ``received_at`` may sit from the millisecond in its id: :func:`prepare` takes
#: the id's time from ``received_at`` through a float, which may round a microsecond either way.
RECEIVED_AT_SLACK = dt.timedelta(milliseconds=1)


def received_at_range(event_id: str) -> tuple[dt.datetime, dt.datetime] | None:
    """``[lo, hi)`` holding the ``received_at`` of the event this service gave ``event_id`` (a UUIDv7
    whose first 48 bits are the receive time in ms, see :func:`new_event_ids`), so a look-up by id
    finds its partition of the event log; None when the id's time is beyond what a datetime holds."""
    ms = int(event_id.replace("-", "")[:12], 16)
    try:
        at = dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(milliseconds=ms)
        return at - RECEIVED_AT_SLACK, at + dt.timedelta(milliseconds=1) + RECEIVED_AT_SLACK
    except OverflowError:
        return None


@dataclass(frozen=True)
class Prepared:
    """The pure part of ingest: which events may be stored, and the bytes to store for them."""

    results: list[ingest_pb2.EventResult]
    to_store: list[NewEvent]
    # index into results for each event in to_store
    positions: list[int]
    # results index -> index of the first event in this batch with the same message_id
    in_batch_duplicates: dict[int, int]


def prepare(events: Sequence[event_pb2.Event], received_at: dt.datetime, limits: validation.Limits) -> Prepared:
    """Validate and stamp each event; the request's own messages are not modified.

    The stored bytes are the client's event, serialized once (the same bytes size the 32 KB
    check), with the server's fields appended (:class:`services.core.streams.EventStamp`).
    """
    now_s = received_at.timestamp()
    received = timestamp_pb2.Timestamp()
    received.FromDatetime(received_at)
    stamp = streams.EventStamp(received.SerializeToString())
    results: list[ingest_pb2.EventResult] = []
    to_store: list[NewEvent] = []
    positions: list[int] = []
    first_seen: dict[str, int] = {}
    dups: dict[int, int] = {}
    ids = new_event_ids(len(events), int(now_s * 1000))
    for i, ev in enumerate(events):
        result = ingest_pb2.EventResult(index=i, message_id=ev.message_id)
        results.append(result)
        raw = ev.SerializeToString()
        violations: list[Violation] = validation.validate_event(ev, i, now_s, limits, size=len(raw))
        if violations:
            result.status = REJECTED
            result.violations.extend(field_violation(v) for v in capped(violations))
            continue
        if ev.message_id in first_seen:
            dups[i] = first_seen[ev.message_id]
            continue
        first_seen[ev.message_id] = i
        event_id = ids[i]
        if ev.event_id or ev.profile_id or ev.HasField("received_at"):
            # Output-only fields sent by a client are replaced, not merged: take the slow path.
            clean = event_pb2.Event()
            clean.CopyFrom(ev)
            clean.ClearField("event_id")
            clean.ClearField("profile_id")
            clean.ClearField("received_at")
            body = clean.SerializeToString()
        else:
            body = raw
        has_ts = ev.HasField("timestamp")
        payload = stamp.apply(body, event_id, has_ts)
        occurred = ev.timestamp.seconds + ev.timestamp.nanos / 1e9 if has_ts else now_s
        to_store.append(
            NewEvent(
                event_id=event_id,
                key_hash=dedupe_key(ev.message_id),
                message_id=ev.message_id,
                occurred=occurred,
                channel=int(ev.channel),
                kind=str(ev.WhichOneof("payload")),
                payload=payload,
            )
        )
        positions.append(i)
    return Prepared(results, to_store, positions, dups)
