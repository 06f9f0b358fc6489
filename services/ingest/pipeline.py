"""One batch's way through ingest: limits, rate limit, validation, commit, hand-off to the relay.

The pure steps (validate, stamp, serialize) are separate from the I/O so they can be
tested without a database; :class:`Ingestor` wires them to storage and Redis.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import sqlalchemy.exc

from services.core.bus import tenant_key
from services.core.errors import DeadlineExceeded, ResourceExhausted, Unavailable, Violation
from services.core.ratelimit import RateLimiter
from services.core.telemetry import inject_traceparent, meter
from services.core.tenancy import Tenant
from services.ingest import validation
from services.ingest.relay import OutboxRelay
from services.ingest.storage import EventStore, NewEvent, OutboxBatch
from tessera.v1 import event_pb2, ingest_pb2

ACCEPTED = ingest_pb2.EVENT_STATUS_ACCEPTED
DUPLICATE = ingest_pb2.EVENT_STATUS_DUPLICATE
REJECTED = ingest_pb2.EVENT_STATUS_REJECTED

_events = meter.create_counter("tessera.ingest.events", description="events by outcome")
_batch_latency = meter.create_histogram("tessera.ingest.batch.duration", unit="s", description="batch latency")
_rate_limited = meter.create_counter("tessera.ingest.rate_limited", description="batches refused by rate limit")


_RAND74 = (1 << 74) - 1


@functools.lru_cache(maxsize=4096)
def _attrs(tenant_id: str, status: str) -> dict[str, str]:
    """Metric attributes, built once per tenant and outcome (building them showed in profiles)."""
    return {"tenant": tenant_id, "status": status}


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


def _field_bytes(field_number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field, to append to a serialized message."""
    return _varint(field_number << 3 | 2) + _varint(len(payload)) + payload


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_EVENT_ID_FIELD = event_pb2.Event.DESCRIPTOR.fields_by_name["event_id"].number
_RECEIVED_AT_FIELD = event_pb2.Event.DESCRIPTOR.fields_by_name["received_at"].number
_TIMESTAMP_FIELD = event_pb2.Event.DESCRIPTOR.fields_by_name["timestamp"].number
# Tag and length of the event_id field: a UUID's text form is always 36 characters.
_EVENT_ID_PREFIX = _varint(_EVENT_ID_FIELD << 3 | 2) + _varint(36)


@dataclass
class BatchOutcome:
    results: list[ingest_pb2.EventResult] = field(default_factory=list)
    accepted: int = 0
    duplicate: int = 0
    rejected: int = 0


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
    check), with event_id and received_at (and a defaulted timestamp) appended as fields:
    protobuf parsing lets a later field win, so no event is copied and re-serialized.
    """
    now_s = received_at.timestamp()
    received = event_pb2.Event()
    received.received_at.FromDatetime(received_at)
    received_field = received.SerializeToString()
    default_ts = _field_bytes(_TIMESTAMP_FIELD, received.received_at.SerializeToString())
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
            result.violations.extend(v.to_proto() for v in violations)
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
        payload = b"".join((body, _EVENT_ID_PREFIX, event_id.encode(), received_field, b"" if has_ts else default_ts))
        occurred = ev.timestamp.seconds + ev.timestamp.nanos / 1e9 if has_ts else now_s
        to_store.append(
            NewEvent(
                event_id=event_id,
                message_id=ev.message_id,
                occurred=occurred,
                channel=int(ev.channel),
                kind=str(ev.WhichOneof("payload")),
                payload=payload,
            )
        )
        positions.append(i)
    return Prepared(results, to_store, positions, dups)


class Ingestor:
    def __init__(
        self,
        store: EventStore,
        relay: OutboxRelay,
        limiter: RateLimiter,
        *,
        redis_prefix: str,
        default_rate: float,
        default_burst: float,
        limits: validation.Limits = validation.DEFAULT_LIMITS,
    ) -> None:
        self.store = store
        self.relay = relay
        self.limiter = limiter
        self.prefix = redis_prefix
        self.default_rate = default_rate
        self.default_burst = default_burst
        self.limits = limits

    def ingest(
        self,
        tenant: Tenant,
        events: Sequence[event_pb2.Event],
        request_bytes: int,
        time_remaining: float | None = None,
    ) -> BatchOutcome:
        started = time.perf_counter()
        validation.check_batch(events, request_bytes, self.limits)
        self._rate_limit(tenant, len(events))
        received_at = dt.datetime.now(dt.UTC)
        prep = prepare(events, received_at, self.limits)
        outcome = BatchOutcome(results=prep.results)
        if prep.to_store:
            if time_remaining is not None:
                time_remaining -= time.perf_counter() - started
                if time_remaining <= 0:
                    raise DeadlineExceeded("deadline expired before the batch was committed; nothing was written")
            traceparent = inject_traceparent()
            try:
                written = self.store.write_batch(
                    tenant.tenant_id, prep.to_store, received_at, traceparent, timeout_seconds=time_remaining
                )
            except sqlalchemy.exc.OperationalError as exc:
                if "statement timeout" in str(exc.orig):
                    raise DeadlineExceeded("deadline expired while committing; nothing was written") from exc
                raise Unavailable("the event store is unavailable; nothing was written, retry the batch") from exc
            ids: list[str] = []
            payloads: list[bytes] = []
            for new, pos in zip(prep.to_store, prep.positions, strict=True):
                result = prep.results[pos]
                if new.event_id in written.accepted:
                    result.status = ACCEPTED
                    result.event_id = new.event_id
                    ids.append(new.event_id)
                    payloads.append(new.payload)
                else:
                    result.status = DUPLICATE
                    result.event_id = written.duplicates.get(new.message_id, "")
            if written.outbox_seq is not None:
                self.relay.submit(OutboxBatch(tenant.tenant_id, written.outbox_seq, ids, payloads, traceparent))
        for i, first in prep.in_batch_duplicates.items():
            prep.results[i].status = DUPLICATE
            prep.results[i].event_id = prep.results[first].event_id
        for r in prep.results:
            if r.status == ACCEPTED:
                outcome.accepted += 1
            elif r.status == DUPLICATE:
                outcome.duplicate += 1
            else:
                outcome.rejected += 1
        for status, count in (
            ("accepted", outcome.accepted),
            ("duplicate", outcome.duplicate),
            ("rejected", outcome.rejected),
        ):
            if count:
                _events.add(count, _attrs(tenant.tenant_id, status))
        _batch_latency.record(time.perf_counter() - started)
        return outcome

    def _rate_limit(self, tenant: Tenant, cost: int) -> None:
        rate = tenant.ingest_rate_limit or self.default_rate
        burst = tenant.ingest_rate_burst or max(self.default_burst, rate)
        decision = self.limiter.acquire(
            tenant_key(self.prefix, tenant.tenant_id, "ratelimit", "ingest"), cost, rate, burst
        )
        if not decision.allowed:
            _rate_limited.add(1, {"tenant": tenant.tenant_id})
            raise ResourceExhausted(
                f"tenant {tenant.tenant_id} is over its ingest rate of {rate:g} events/s; nothing was written, "
                f"retry after {decision.retry_after:.3f}s",
                retry_after=decision.retry_after,
                subject=f"tenant:{tenant.tenant_id}",
            )
