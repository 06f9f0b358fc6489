"""The typed contract of the streams between services: one module encodes and decodes every entry.

The messages are defined in ``protos/tessera/v1/stream.proto``; each Redis stream entry holds one,
encoded, in its field :data:`ENTRY_FIELD`. Producers and consumers name streams by the
:class:`Stream` constants here and never spell a field of another service's message.

For speed, some envelopes are built at the wire level instead of by copying messages: an event
already serialized for the event log becomes an ``EventEnvelope`` by prefixing two fields, and a
resolved entry is that envelope with the profile id appended (protobuf merges a repeated embedded
message field, and a later scalar wins). Every tag used for that is derived from the descriptors
at import time, and :func:`check_wire_compatibility` (run at import and by the tests) proves the
envelopes it splices between really share their layout.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from tessera.v1 import event_pb2, stream_pb2

ENTRY_FIELD = b"m"

M = TypeVar("M", bound=Message)


@dataclass(frozen=True)
class Stream(Generic[M]):
    """A stream name and the envelope type of its entries."""

    name: str
    envelope: type[M]


EVENTS: Stream[stream_pb2.EventEnvelope] = Stream("events", stream_pb2.EventEnvelope)
RESOLVED: Stream[stream_pb2.ResolvedEventEnvelope] = Stream("resolved", stream_pb2.ResolvedEventEnvelope)
CHANGES: Stream[stream_pb2.ProfileChangeEnvelope] = Stream("changes", stream_pb2.ProfileChangeEnvelope)
ALERTS: Stream[stream_pb2.AlertEnvelope] = Stream("alerts", stream_pb2.AlertEnvelope)
STREAMS: dict[str, Stream[Message]] = {s.name: s for s in (EVENTS, RESOLVED, CHANGES, ALERTS)}  # type: ignore[misc]

CREATED = stream_pb2.PROFILE_CHANGE_KIND_CREATED
MERGED = stream_pb2.PROFILE_CHANGE_KIND_MERGED
SPLIT = stream_pb2.PROFILE_CHANGE_KIND_SPLIT
ERASED = stream_pb2.PROFILE_CHANGE_KIND_ERASED


class UndecodableEntry(ValueError):
    """An entry that is not a well-formed envelope of its stream (or names another tenant)."""


# ---- wire helpers ------------------------------------------------------------------------------


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def tag(descriptor: Descriptor, name: str) -> bytes:
    """The wire tag of a string, bytes or message field (checked to be length-delimited)."""
    f = descriptor.fields_by_name[name]
    if f.type not in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES, FieldDescriptor.TYPE_MESSAGE):
        raise TypeError(f"{descriptor.full_name}.{name} is not length-delimited")
    return varint(f.number << 3 | 2)


def field_bytes(tag: bytes, payload: bytes) -> bytes:
    """One length-delimited field, to append to a serialized message."""
    return tag + varint(len(payload)) + payload


class _Tags:
    """The tags the splicing uses, from the descriptors."""

    def __init__(self) -> None:
        env = stream_pb2.EventEnvelope.DESCRIPTOR
        event = event_pb2.Event.DESCRIPTOR
        self.tenant = tag(env, "tenant_id")
        self.traceparent = tag(env, "traceparent")
        self.event = tag(env, "event")
        self.event_id = tag(event, "event_id")
        self.received_at = tag(event, "received_at")
        self.timestamp = tag(event, "timestamp")
        self.profile_id = tag(event, "profile_id")
        self.resolved_identifiers = tag(stream_pb2.ResolvedEventEnvelope.DESCRIPTOR, "identifiers")


TAGS = _Tags()


def check_wire_compatibility() -> None:
    """Envelopes spliced into one another must agree field by field (number, type, message type)."""
    envelopes = (stream_pb2.EventEnvelope, stream_pb2.ResolvedEventEnvelope, stream_pb2.ProfileChangeEnvelope)
    head = [(f.name, f.number, f.type) for f in stream_pb2.EventEnvelope.DESCRIPTOR.fields[:2]]
    for env in envelopes:
        if [(f.name, f.number, f.type) for f in env.DESCRIPTOR.fields[:2]] != head:
            raise AssertionError(f"{env.DESCRIPTOR.full_name} does not start with tenant_id=1, traceparent=2")

    def layout(d: Descriptor) -> list[tuple[str, int, int, str]]:
        return [(f.name, f.number, f.type, f.message_type.full_name if f.message_type else "") for f in d.fields]

    events = layout(stream_pb2.EventEnvelope.DESCRIPTOR)
    if layout(stream_pb2.ResolvedEventEnvelope.DESCRIPTOR)[: len(events)] != events:
        raise AssertionError("ResolvedEventEnvelope must start with EventEnvelope's layout")


check_wire_compatibility()


# ---- events and resolved -----------------------------------------------------------------------


class EventStamp:
    """The server's fields for the events of one batch, encoded once.

    :meth:`apply` turns a client's serialized event into the bytes the event log stores:
    ``event_id`` and ``received_at`` appended, and ``timestamp`` too when the client sent none.
    Parsing lets a later field win, so nothing is copied or re-serialized.
    """

    def __init__(self, received_at: bytes) -> None:
        """``received_at``: a serialized ``google.protobuf.Timestamp``."""
        self._received = field_bytes(TAGS.received_at, received_at)
        self._default_timestamp = field_bytes(TAGS.timestamp, received_at)
        self._uuid_prefix = TAGS.event_id + varint(36)  # a UUID's text form is 36 characters

    def apply(self, event_bytes: bytes, event_id: str, has_timestamp: bool) -> bytes:
        raw_id = event_id.encode()
        prefix = self._uuid_prefix if len(raw_id) == 36 else TAGS.event_id + varint(len(raw_id))
        tail = b"" if has_timestamp else self._default_timestamp
        return b"".join((event_bytes, prefix, raw_id, self._received, tail))


def event_envelope(tenant_id: str, traceparent: str, event_bytes: bytes) -> bytes:
    """An ``events`` entry around an already-serialized Event."""
    return b"".join(
        (
            field_bytes(TAGS.tenant, tenant_id.encode()),
            field_bytes(TAGS.traceparent, traceparent.encode()),
            field_bytes(TAGS.event, event_bytes),
        )
    )


def event_envelopes(tenant_id: str, traceparent: str, events: Iterable[bytes]) -> list[bytes]:
    """:func:`event_envelope` for many events of one tenant and trace (the head is built once)."""
    head = field_bytes(TAGS.tenant, tenant_id.encode()) + field_bytes(TAGS.traceparent, traceparent.encode())
    tag = TAGS.event
    return [b"".join((head, tag, varint(len(e)), e)) for e in events]


def resolved_envelope(
    event_envelope_bytes: bytes,
    profile_id: str | None,
    identifiers: Iterable[tuple[str, str]] = (),
    traceparent: str = "",
) -> bytes:
    """The ``resolved`` entry for an ``events`` entry: the same bytes with ``event.profile_id`` set
    and the normalized ``identifiers`` (type, value) identity linked for it appended; with a
    ``traceparent`` (the span that resolved it, in the source event's trace), that one replaces
    the source's (a later scalar wins), so downstream spans descend from identity's."""
    relay = field_bytes(TAGS.traceparent, traceparent.encode()) if traceparent else b""
    if not profile_id:
        return event_envelope_bytes + relay
    parts = [event_envelope_bytes, relay, field_bytes(TAGS.event, field_bytes(TAGS.profile_id, profile_id.encode()))]
    for type_, value in identifiers:
        ident = event_pb2.Identifier(type=type_, value=value).SerializeToString()
        parts.append(field_bytes(TAGS.resolved_identifiers, ident))
    return b"".join(parts)


# ---- changes -----------------------------------------------------------------------------------


def change(
    kind: int,
    profile_id: str,
    *,
    absorbed_profile_id: str = "",
    merge_id: int = 0,
    event_id: str = "",
    new_profile_id: str = "",
    moved_event_ids: Sequence[str] = (),
    erased_profile_ids: Sequence[str] = (),
    moved_identifiers: Iterable[tuple[str, str]] = (),
    at: dt.datetime | None = None,
) -> stream_pb2.ProfileChange:
    msg = stream_pb2.ProfileChange(
        kind=kind,  # type: ignore[arg-type]
        profile_id=profile_id,
        absorbed_profile_id=absorbed_profile_id,
        merge_id=merge_id,
        event_id=event_id,
        new_profile_id=new_profile_id,
        moved_event_ids=list(moved_event_ids),
        erased_profile_ids=list(erased_profile_ids),
        moved_identifiers=[event_pb2.Identifier(type=t, value=v) for t, v in moved_identifiers],
    )
    msg.change_time.FromDatetime(at or dt.datetime.now(dt.UTC))
    return msg


def change_envelope(tenant_id: str, traceparent: str, profile_change: stream_pb2.ProfileChange) -> bytes:
    return stream_pb2.ProfileChangeEnvelope(
        tenant_id=tenant_id, traceparent=traceparent, change=profile_change
    ).SerializeToString()


def change_key(change: stream_pb2.ProfileChange) -> str:
    """What makes a merge or a split the same one when it comes again (a publish retried across
    a Redis failover, a redelivery after a crash): a consumer applies each key once, so an old
    split replayed after the profiles merged back cannot move events a second time."""
    if change.kind == MERGED:
        return f"merge:{change.merge_id}:{change.absorbed_profile_id}"
    if change.kind == SPLIT:
        return f"split:{change.merge_id}"
    return f"{kind_name(change.kind)}:{change.profile_id}"


def kind_name(kind: int) -> str:
    """``created``, ``merged``... for logs and metrics."""
    return stream_pb2.ProfileChangeKind.Name(kind).removeprefix("PROFILE_CHANGE_KIND_").lower()  # type: ignore[arg-type]


# ---- decoding ----------------------------------------------------------------------------------


def decode(stream: Stream[M], raw: bytes, tenant_id: str | None = None) -> M:
    """The envelope of one entry; :class:`UndecodableEntry` if it is not one of this stream's, or
    (when ``tenant_id`` is given) if it names another tenant than the stream it was read from."""
    try:
        msg = stream.envelope.FromString(raw)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise UndecodableEntry(f"not a {stream.envelope.DESCRIPTOR.name}: {exc}") from None
    if tenant_id is not None and getattr(msg, "tenant_id", None) != tenant_id:
        raise UndecodableEntry(f"envelope names tenant {getattr(msg, 'tenant_id', '')!r}, not the stream's")
    return msg


def dead_letter(
    stream: str, group: str, original_id: str, attempts: int, reason: str, envelope: bytes
) -> stream_pb2.DeadLetter:
    msg = stream_pb2.DeadLetter(
        stream=stream, group=group, original_id=original_id, attempts=attempts, reason=reason[:500], envelope=envelope
    )
    msg.dead_time.FromDatetime(dt.datetime.now(dt.UTC))
    return msg


def describe(stream: str, envelope: bytes) -> str:
    """One line naming what an entry carries (for dead-letter listings): an event id or a change."""
    spec = STREAMS.get(stream)
    if spec is None:
        return ""
    try:
        msg = decode(spec, envelope)
    except UndecodableEntry:
        return "undecodable entry"
    if isinstance(msg, stream_pb2.ProfileChangeEnvelope):
        return f"{kind_name(msg.change.kind)} profiles/{msg.change.profile_id}"
    event = getattr(msg, "event", None)
    return f"event {event.event_id}" if event is not None else ""
