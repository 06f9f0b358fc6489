"""Computed traits: which events a definition counts, the value it takes from each, and how values
aggregate. Pure, no I/O.

A definition turns each matching event into at most one :class:`Point` (its time, event id and the
field's value). All-time traits fold points into a :class:`State` as events arrive (and two states
combine on a merge); windowed ones keep their points and aggregate those inside the window ending
now, so they expire as time passes. :func:`aggregate` over all of a profile's points is the
definition of every value, which the incremental paths must equal.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.struct_pb2 import Struct

from services.profile.traits import canonical, plain, value_hash
from tessera.v1 import event_pb2, profile_pb2

COUNT = profile_pb2.AGGREGATION_COUNT
SUM = profile_pb2.AGGREGATION_SUM
MIN = profile_pb2.AGGREGATION_MIN
MAX = profile_pb2.AGGREGATION_MAX
AVERAGE = profile_pb2.AGGREGATION_AVERAGE
FIRST = profile_pb2.AGGREGATION_FIRST
LAST = profile_pb2.AGGREGATION_LAST
DISTINCT_COUNT = profile_pb2.AGGREGATION_DISTINCT_COUNT
AGGREGATIONS: Final = (COUNT, SUM, MIN, MAX, AVERAGE, FIRST, LAST, DISTINCT_COUNT)
NUMERIC: Final = frozenset({SUM, MIN, MAX, AVERAGE})

#: Payload kinds, as the Event's oneof names them.
KINDS: Final = ("identify", "track", "interaction", "survey_response", "message")
#: Where a field path may start: a payload kind, the properties or context Structs, or a top field.
ROOTS: Final = frozenset({*KINDS, "properties", "context", "channel", "source"})
FIELD_RE: Final = re.compile(r"[a-z][a-z0-9_]*(\.[A-Za-z0-9_\-]+){0,7}")
KEY_RE: Final = re.compile(r"[a-z][a-z0-9_]{0,63}")
MIN_WINDOW_SECONDS: Final = 60
MAX_WINDOW_SECONDS: Final = 3650 * 86400
MAX_DEFINITIONS: Final = 50


@dataclass(frozen=True)
class Definition:
    """One computed trait. ``window_seconds`` 0 means all time."""

    key: str
    aggregation: int
    field: str = ""
    window_seconds: int = 0
    kinds: tuple[str, ...] = ()
    channels: tuple[int, ...] = ()
    property_equals: tuple[tuple[str, str], ...] = ()
    track_event: str = ""

    @property
    def windowed(self) -> bool:
        return self.window_seconds > 0


@dataclass(frozen=True, order=True)
class Point:
    """What one event contributes: ``num`` is the value as a number when it is one."""

    at: dt.datetime
    event_id: str
    value: Any = field(compare=False, default=None)
    num: float | None = field(compare=False, default=None)

    @property
    def value_hash(self) -> str:
        return value_hash(self.value)


@dataclass(frozen=True)
class State:
    """An all-time aggregate: enough to answer every aggregation and to combine with another."""

    n: int = 0
    num_n: int = 0
    total: float = 0.0
    low: float | None = None
    high: float | None = None
    first: Point | None = None
    last: Point | None = None
    distinct: int = 0

    def add(self, p: Point, new_value: bool) -> State:
        """This state with one more point; ``new_value`` when its value was not seen before."""
        return combine(self, fold([p], distinct=1 if new_value else 0))


def fold(points: Iterable[Point], *, distinct: int | None = None) -> State:
    """The state of a set of points (distinct counted here unless given)."""
    pts = list(points)
    nums = [p.num for p in pts if p.num is not None]
    return State(
        n=len(pts),
        num_n=len(nums),
        total=math.fsum(nums),
        low=min(nums) if nums else None,
        high=max(nums) if nums else None,
        first=min(pts) if pts else None,
        last=max(pts) if pts else None,
        distinct=len({p.value_hash for p in pts}) if distinct is None else distinct,
    )


def combine(a: State, b: State, *, distinct: int | None = None) -> State:
    """Two disjoint states as one (``distinct`` must be recounted by the caller when values overlap)."""
    return State(
        n=a.n + b.n,
        num_n=a.num_n + b.num_n,
        total=a.total + b.total,
        low=_opt(min, a.low, b.low),
        high=_opt(max, a.high, b.high),
        first=_opt(min, a.first, b.first),
        last=_opt(max, a.last, b.last),
        distinct=a.distinct + b.distinct if distinct is None else distinct,
    )


def _opt(fn: Any, a: Any, b: Any) -> Any:
    if a is None:
        return b
    if b is None:
        return a
    return fn(a, b)


def value_of(defn: Definition, state: State) -> tuple[Any, int]:
    """A definition's value from a state, and how many events it rests on; value None: no value."""
    agg = defn.aggregation
    if agg == COUNT:
        return state.n, state.n
    if agg == SUM:
        return (_number(state.total) if state.num_n else 0), state.num_n
    if agg == MIN:
        return (_number(state.low) if state.low is not None else None), state.num_n
    if agg == MAX:
        return (_number(state.high) if state.high is not None else None), state.num_n
    if agg == AVERAGE:
        return (state.total / state.num_n if state.num_n else None), state.num_n
    if agg == FIRST:
        return (state.first.value if state.first else None), state.n
    if agg == LAST:
        return (state.last.value if state.last else None), state.n
    return state.distinct, state.n


def aggregate(defn: Definition, points: Iterable[Point]) -> tuple[Any, int]:
    """The definition's value over ``points``: the reference every incremental path must equal."""
    return value_of(defn, fold(points))


def in_window(defn: Definition, points: Iterable[Point], now: dt.datetime) -> list[Point]:
    if not defn.windowed:
        return list(points)
    since = now - dt.timedelta(seconds=defn.window_seconds)
    return [p for p in points if p.at > since]


def window_start(defn: Definition, now: dt.datetime) -> dt.datetime:
    """Points strictly after this time are inside the window ending ``now``."""
    return now - dt.timedelta(seconds=defn.window_seconds)


def _number(x: float) -> float | int:
    return int(x) if float(x).is_integer() and abs(x) < 2**53 else x


# ---- which events, and what value ----------------------------------------------------------------


def matches(defn: Definition, event: event_pb2.Event, kind: str, properties: Mapping[str, Any] | None) -> bool:
    if defn.kinds and kind not in defn.kinds:
        return False
    if defn.channels and event.channel not in defn.channels:
        return False
    if defn.track_event and (kind != "track" or event.track.event != defn.track_event):
        return False
    if defn.property_equals:
        props = properties or {}
        for k, v in defn.property_equals:
            got = props.get(k)
            if got is None or _as_text(got) != v:
                return False
    return True


def _as_text(v: Any) -> str:
    if isinstance(v, str):
        return v
    return canonical(plain(v))


_MISSING = object()


def extract(event: event_pb2.Event, kind: str, path: str, struct_cache: dict[str, Any]) -> Any:
    """The value at ``path`` in the event, or ``_MISSING``. Message leaves are not values."""
    head, _, rest = path.partition(".")
    parts = rest.split(".") if rest else []
    if head in ("properties", "context"):
        return _walk(_struct(event, head, struct_cache), parts)
    if head == "channel" and not parts:
        return event_pb2.Channel.Name(event.channel)
    if head == "source" and not parts:
        return event.source or _MISSING
    if head not in KINDS or kind != head:
        return _MISSING
    msg: Any = getattr(event, head)
    for i, name in enumerate(parts):
        if isinstance(msg, Struct):
            return _walk(plain(json_format.MessageToDict(msg)), parts[i:])
        if not isinstance(msg, Message):
            return _MISSING
        fd = msg.DESCRIPTOR.fields_by_name.get(name)
        if fd is None:
            return _MISSING
        if fd.has_presence and not msg.HasField(name):
            return _MISSING
        value = getattr(msg, name)
        if fd.enum_type is not None and not isinstance(value, Message):
            value = fd.enum_type.values_by_number[value].name if value in fd.enum_type.values_by_number else value
        msg = value
    if isinstance(msg, Struct):
        return plain(json_format.MessageToDict(msg))
    if isinstance(msg, Message):
        return _MISSING
    if isinstance(msg, str) and msg == "":
        return _MISSING
    return msg


def _struct(event: event_pb2.Event, name: str, cache: dict[str, Any]) -> Any:
    if name not in cache:
        cache[name] = plain(json_format.MessageToDict(getattr(event, name))) if event.HasField(name) else {}  # type: ignore[arg-type]
    return cache[name]


def _walk(value: Any, parts: Sequence[str]) -> Any:
    for p in parts:
        if not isinstance(value, dict) or p not in value:
            return _MISSING
        value = value[p]
    return _MISSING if value is None else value


def point(defn: Definition, event: event_pb2.Event, kind: str, at: dt.datetime, cache: dict[str, Any]) -> Point | None:
    """The event's point for ``defn``, or None when the event does not count."""
    if not matches(defn, event, kind, _struct(event, "properties", cache)):
        return None
    if not defn.field:
        return Point(at, event.event_id, None, None)
    value = extract(event, kind, defn.field, cache)
    if value is _MISSING or (isinstance(value, float) and not math.isfinite(value)):
        return None  # NaN and Infinity are no JSON value: no point (they would poison sums and hashes)
    num = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
    if defn.aggregation in NUMERIC and num is None:
        return None
    return Point(at, event.event_id, value, num)


# ---- definitions: validation and proto -------------------------------------------------------------


def from_proto(msg: profile_pb2.ComputedTraitDefinition) -> Definition:
    window = msg.window.seconds if msg.HasField("window") else 0
    return Definition(
        key=msg.key,
        aggregation=int(msg.aggregation),
        field=msg.field,
        window_seconds=int(window),
        kinds=tuple(msg.filter.kinds),
        channels=tuple(int(c) for c in msg.filter.channels),
        property_equals=tuple(sorted(msg.filter.property_equals.items())),
        track_event=msg.filter.track_event,
    )


def to_proto(d: Definition) -> profile_pb2.ComputedTraitDefinition:
    msg = profile_pb2.ComputedTraitDefinition(key=d.key, aggregation=d.aggregation, field=d.field)  # type: ignore[arg-type]
    if d.window_seconds:
        msg.window.seconds = d.window_seconds
    msg.filter.kinds.extend(d.kinds)
    msg.filter.channels.extend(d.channels)  # type: ignore[arg-type]
    msg.filter.property_equals.update(dict(d.property_equals))
    msg.filter.track_event = d.track_event
    return msg


def to_json(d: Definition) -> dict[str, Any]:
    return {
        "key": d.key,
        "aggregation": d.aggregation,
        "field": d.field,
        "window_seconds": d.window_seconds,
        "kinds": list(d.kinds),
        "channels": list(d.channels),
        "property_equals": [list(p) for p in d.property_equals],
        "track_event": d.track_event,
    }


def from_json(raw: Mapping[str, Any]) -> Definition:
    return Definition(
        key=raw["key"],
        aggregation=int(raw["aggregation"]),
        field=raw.get("field", ""),
        window_seconds=int(raw.get("window_seconds", 0)),
        kinds=tuple(raw.get("kinds", ())),
        channels=tuple(int(c) for c in raw.get("channels", ())),
        property_equals=tuple((str(a), str(b)) for a, b in raw.get("property_equals", ())),
        track_event=raw.get("track_event", ""),
    )


def problems(defs: Sequence[profile_pb2.ComputedTraitDefinition], path: str) -> list[tuple[str, str]]:
    """(field path, why) for every problem in a list of definitions."""
    out: list[tuple[str, str]] = []
    if len(defs) > MAX_DEFINITIONS:
        out.append((path, f"at most {MAX_DEFINITIONS} computed traits"))
    seen: set[str] = set()
    channels = set(event_pb2.Channel.values())
    for i, d in enumerate(defs):
        at = f"{path}[{i}]"
        if not KEY_RE.fullmatch(d.key):
            out.append((f"{at}.key", "lower snake case, 1-64 characters, such as 'calls_30d'"))
        elif d.key in seen:
            out.append((f"{at}.key", f"{d.key!r} is defined twice"))
        seen.add(d.key)
        if d.aggregation not in AGGREGATIONS:
            out.append(
                (f"{at}.aggregation", "must be one of COUNT, SUM, MIN, MAX, AVERAGE, FIRST, LAST, DISTINCT_COUNT")
            )
        if d.field:
            root = d.field.partition(".")[0]
            if not FIELD_RE.fullmatch(d.field) or root not in ROOTS:
                out.append(
                    (
                        f"{at}.field",
                        "a dotted path starting with a payload kind (identify, track, interaction, "
                        "survey_response, message), properties, context, channel or source",
                    )
                )
            elif (why := _path_problem(d.field, d.aggregation)) is not None:
                out.append((f"{at}.field", why))
        elif d.aggregation != COUNT and d.aggregation in AGGREGATIONS:
            out.append((f"{at}.field", "required for every aggregation but COUNT"))
        if d.HasField("window"):
            secs = d.window.seconds
            if d.window.nanos or (secs and not MIN_WINDOW_SECONDS <= secs <= MAX_WINDOW_SECONDS):
                out.append((f"{at}.window", "whole seconds, from 60 s to 3650 days (or unset: all time)"))
        for j, k in enumerate(d.filter.kinds):
            if k not in KINDS:
                out.append((f"{at}.filter.kinds[{j}]", f"one of {', '.join(KINDS)}"))
        for j, c in enumerate(d.filter.channels):
            if c not in channels or c == 0:
                out.append((f"{at}.filter.channels[{j}]", "a known channel"))
        for k, v in d.filter.property_equals.items():
            if not k or len(k) > 128 or len(v) > 256:
                out.append((f"{at}.filter.property_equals", "keys of 1-128 and values of at most 256 characters"))
                break
        if len(d.filter.track_event) > 256:
            out.append((f"{at}.filter.track_event", "at most 256 characters"))
    return out


_TEXT_TYPES: Final = frozenset({FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BOOL, FieldDescriptor.TYPE_ENUM})


def _path_problem(path: str, aggregation: int) -> str | None:
    """Why no event can give ``path`` a (numeric, when the aggregation needs one) value, or None.
    Paths into properties, context and identify.traits are free-form, so always possible."""
    head, _, rest = path.partition(".")
    parts = rest.split(".") if rest else []
    if head in ("channel", "source"):
        if parts:
            return f"{head} has no fields below it"
        return f"{head} is text, not a number" if aggregation in NUMERIC else None
    if head not in KINDS:
        return None
    msg: Any = event_pb2.Event.DESCRIPTOR.fields_by_name[head].message_type
    leaf: Any = None
    for i, name in enumerate(parts):
        if msg is None:
            return f"{'.'.join([head, *parts[:i]])} has no fields below it"
        if msg.full_name == "google.protobuf.Struct":
            return None
        leaf = msg.fields_by_name.get(name)
        if leaf is None:
            return f"{msg.name} has no field {name!r}"
        msg = leaf.message_type
    if msg is not None and msg.full_name != "google.protobuf.Struct":
        return f"{path} is a message, not a value; name one of its fields"
    if leaf is not None and leaf.type in _TEXT_TYPES and aggregation in NUMERIC:
        return f"{path} is not a number"
    return None


def with_key(d: Definition, key: str) -> Definition:
    return replace(d, key=key)
