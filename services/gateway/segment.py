"""Segment tracking-API messages to Tessera events: pure, no I/O, so every rule is unit-tested.

The gateway is only a client of ingest, so this module decides nothing ingest decides (dedupe,
normalization, limits); it only translates shapes and reports what cannot be translated, each
problem named by the message's index in the request and its Segment field name."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import struct_pb2

from tessera.v1 import event_pb2

#: Nesting deeper than this is refused before it reaches protobuf (Struct recursion) or ingest.
MAX_DEPTH = 32
TYPES = ("track", "identify", "page", "screen", "group", "alias")
#: Fields a Segment (or RudderStack) library may send; anything else is named as unknown.
KNOWN_FIELDS = frozenset(
    {
        "type", "messageId", "timestamp", "originalTimestamp", "sentAt", "receivedAt", "context",
        "integrations", "userId", "anonymousId", "traits", "event", "properties", "name", "category",
        "groupId", "previousId", "channel", "version", "_metadata", "writeKey", "options", "rudderId",
        "request_ip", "requestId",
    }
)  # fmt: skip
#: context.channel values (Segment's and Tessera's spellings) to Tessera channels.
CHANNELS: Mapping[str, event_pb2.Channel.ValueType] = {
    "web": event_pb2.CHANNEL_WEB,
    "browser": event_pb2.CHANNEL_WEB,
    "mobile": event_pb2.CHANNEL_MOBILE_APP,
    "app": event_pb2.CHANNEL_MOBILE_APP,
    "mobile_app": event_pb2.CHANNEL_MOBILE_APP,
    "server": event_pb2.CHANNEL_OTHER,
    "email": event_pb2.CHANNEL_EMAIL,
    "sms": event_pb2.CHANNEL_SMS,
    "chat": event_pb2.CHANNEL_CHAT,
    "voice": event_pb2.CHANNEL_VOICE,
    "social": event_pb2.CHANNEL_SOCIAL,
    "in_store": event_pb2.CHANNEL_IN_STORE,
    "other": event_pb2.CHANNEL_OTHER,
}
#: Library names (context.library.name) to channels; server-side libraries have no channel of
#: their own in the proto, so they are OTHER.
_WEB_LIBRARIES = ("analytics.js", "analytics-next", "rudder-sdk-js", "rudderanalytics.js")
_APP_LIBRARIES = ("analytics-ios", "analytics-android", "analytics-swift", "analytics-kotlin",
                  "analytics-react-native", "analytics-flutter", "rudder-ios", "rudder-android")  # fmt: skip


@dataclass(frozen=True)
class Violation:
    """One bad message: its index in the request, the Segment field, and why."""

    index: int
    field: str
    description: str


@dataclass
class Mapped:
    """The events to send (each with its index in the request) and the messages refused here."""

    events: list[tuple[int, event_pb2.Event]] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)


class BadField(Exception):
    def __init__(self, field_name: str, description: str) -> None:
        super().__init__(description)
        self.field = field_name
        self.description = description


def depth(value: Any) -> int:
    """How deep a JSON value nests (iterative: a hostile body cannot exhaust the stack). Only
    containers go on the stack: this runs on every message of every batch (the bench's hot path)."""
    if not isinstance(value, dict | list):
        return 0
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        for v in item.values() if isinstance(item, dict) else item:
            if isinstance(v, dict | list):
                stack.append((v, level + 1))
    return deepest


def parse_time(raw: Any, name: str) -> dt.datetime | None:
    """An ISO-8601 Segment timestamp (naive ones are UTC); None when absent."""
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise BadField(name, "must be an ISO-8601 string")
    try:
        parsed = dt.datetime.fromisoformat(raw.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise BadField(name, "is not an ISO-8601 date-time") from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=dt.UTC)


def event_time(msg: Mapping[str, Any], received_at: dt.datetime, sent_at: dt.datetime | None) -> dt.datetime:
    """Segment's rule: with sentAt and originalTimestamp, correct the device clock's skew
    (receivedAt - (sentAt - originalTimestamp)); else the timestamp given; else receivedAt."""
    sent = parse_time(msg.get("sentAt"), "sentAt") or sent_at
    original = parse_time(msg.get("originalTimestamp"), "originalTimestamp")
    if sent is not None and original is not None:
        return received_at - (sent - original)
    given = parse_time(msg.get("timestamp"), "timestamp")
    if given is not None:
        return given
    if original is not None:
        return original
    return received_at


def channel(context: Mapping[str, Any]) -> event_pb2.Channel.ValueType:
    """From context.channel, else from the library that sent it, else OTHER."""
    named = context.get("channel")
    if isinstance(named, str) and named.strip().lower() in CHANNELS:
        return CHANNELS[named.strip().lower()]
    library = context.get("library")
    name = library.get("name") if isinstance(library, dict) else None
    if isinstance(name, str):
        lowered = name.lower()
        if lowered in _WEB_LIBRARIES:
            return event_pb2.CHANNEL_WEB
        if lowered in _APP_LIBRARIES:
            return event_pb2.CHANNEL_MOBILE_APP
        if lowered.startswith(("analytics-", "analytics.", "rudder")):
            return event_pb2.CHANNEL_OTHER
    return event_pb2.CHANNEL_OTHER  # ingest requires a channel; OTHER is its "none fits"


def _object(msg: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = msg.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadField(name, "must be an object")
    return value


def _id(msg: Mapping[str, Any], name: str) -> str:
    """Segment allows ids as strings or numbers."""
    value = msg.get(name)
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise BadField(name, "must be a string or a number")
    return str(value).strip() if isinstance(value, str) else str(value)


def _struct(value: Mapping[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(value)
    return out


def _identifiers(
    msg: Mapping[str, Any], traits: Mapping[str, Any], context: Mapping[str, Any]
) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []

    def add(kind: str, value: str) -> None:
        if value and (kind, value) not in found:
            found.append((kind, value))

    add("user_id", _id(msg, "userId"))
    add("anonymous_id", _id(msg, "anonymousId"))
    ctx_traits = context.get("traits")
    for source, prefix in ((traits, "traits"), (ctx_traits if isinstance(ctx_traits, dict) else {}, "context.traits")):
        for kind in ("email", "phone"):
            value = source.get(kind)
            if value is None or value == "":
                continue
            if not isinstance(value, str):
                raise BadField(f"{prefix}.{kind}", "must be a string")
            add(kind, value.strip())
    return found


def to_event(
    msg: Any, kind: str | None, received_at: dt.datetime, sent_at: dt.datetime | None = None
) -> event_pb2.Event:
    """One Segment message to one Tessera event; raises :class:`BadField` naming the field."""
    if not isinstance(msg, dict):
        raise BadField("", "must be a JSON object")
    unknown = sorted(k for k in msg if k not in KNOWN_FIELDS)
    if unknown:
        raise BadField(unknown[0], "is not a field of the Segment tracking API")
    given = msg.get("type")
    if kind is None:
        if not isinstance(given, str) or given not in TYPES:
            raise BadField("type", f"must be one of {', '.join(TYPES)}")
        kind = given
    elif given is not None and given != kind:
        raise BadField("type", f"must be {kind!r} on /v1/{kind}")
    message_id = _id(msg, "messageId")
    if not message_id:
        raise BadField("messageId", "is required (it makes retries safe)")
    context = _object(msg, "context")
    traits = _object(msg, "traits")
    properties = _object(msg, "properties")
    identifiers = _identifiers(msg, traits, context)
    if not identifiers:
        raise BadField("userId", "userId or anonymousId is required")
    ev = event_pb2.Event(message_id=message_id, channel=channel(context), source=f"segment:{kind}")
    ev.timestamp.FromDatetime(event_time(msg, received_at, sent_at))
    ev.identifiers.extend(event_pb2.Identifier(type=t, value=v) for t, v in identifiers)
    if context:
        ev.context.CopyFrom(_struct(context))
    if kind == "identify":
        ev.identify.traits.CopyFrom(_struct(traits))
    elif kind == "alias":
        ev.identify.SetInParent()
        previous = _id(msg, "previousId")
        if not previous:
            raise BadField("previousId", "is required for alias")
        # The previous id is nearly always the anonymous one the user had before they signed in.
        ev.identifiers.append(event_pb2.Identifier(type="anonymous_id", value=previous))
        if not _id(msg, "userId"):
            raise BadField("userId", "is required for alias")
    elif kind == "track":
        name = msg.get("event")
        if not isinstance(name, str) or not name.strip():
            raise BadField("event", "is required and must be a non-empty string")
        ev.track.event = name.strip()
        ev.properties.CopyFrom(_struct(properties))
    elif kind in ("page", "screen"):
        extra = {k: msg[k] for k in ("name", "category") if msg.get(k) is not None}
        for k, v in extra.items():
            if not isinstance(v, str):
                raise BadField(k, "must be a string")
        ev.track.event = "Page Viewed" if kind == "page" else "Screen Viewed"
        ev.properties.CopyFrom(_struct({**properties, **extra}))
    else:  # group
        group_id = _id(msg, "groupId")
        if not group_id:
            raise BadField("groupId", "is required for group")
        ev.track.event = "Group"
        ev.properties.CopyFrom(_struct({"group_id": group_id, "traits": traits}))
    return ev


def map_messages(
    messages: Sequence[Any],
    kind: str | None,
    received_at: dt.datetime,
    sent_at: dt.datetime | None = None,
    batch_context: Mapping[str, Any] | None = None,
) -> Mapped:
    """Every message of a request (a single call is a batch of one); ``kind`` None reads each
    message's ``type`` (a batch). A batch's own context fills what a message's context lacks."""
    out = Mapped()
    for index, given in enumerate(messages):
        msg = given
        try:
            if isinstance(msg, dict) and batch_context:
                own = msg.get("context")
                if own is None or isinstance(own, dict):
                    msg = {**msg, "context": {**batch_context, **(own or {})}}
            if depth(msg) > MAX_DEPTH:
                raise BadField("", f"nests deeper than {MAX_DEPTH} levels")
            out.events.append((index, to_event(msg, kind, received_at, sent_at)))
        except BadField as bad:
            out.violations.append(Violation(index, bad.field, bad.description))
        except (ValueError, TypeError, OverflowError) as err:  # Struct refuses a value (NaN, huge ints)
            out.violations.append(Violation(index, "", f"cannot be stored: {err}"))
    return out


def ingest_field(path: str) -> str:
    """An ingest violation's field (``events[2].track.event``) without its batch position, in
    Segment's words where they differ."""
    head, _, rest = path.partition("].")
    rest = rest if head.startswith("events[") else path
    renames = {"message_id": "messageId", "track.event": "event", "identify.traits": "traits"}
    for ours, theirs in renames.items():
        if rest == ours or rest.startswith(ours + "."):
            return theirs + rest[len(ours) :]
    return rest
