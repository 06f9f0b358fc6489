"""Ingest is the single gate: whatever its validation accepts, every consumer can process.

Arbitrary events (odd strings with NUL and every plane, extreme and invalid timestamps, NaN and
Infinity inside Structs, empty Values, deep nesting, unknown enum values, every payload) go
through ingest's validation. Every event it accepts is then stored by ingest's own write and
resolved by identity's normalization and storage, with probabilistic matching on (which keeps
Identify traits as JSON), on real PostgreSQL, and none of that may fail.
"""

from __future__ import annotations

import datetime as dt
import math
import os
from typing import Any

import pytest
from google.protobuf import json_format, struct_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import Engine

from services.core import streams
from services.core.bus import Bus
from services.core.outbox import EnvelopeTable, Outbox
from services.identity.resolver import Resolver, parse_event
from services.identity.rules_store import RulesCache
from services.identity.storage import IdentityStore
from services.ingest import prepare, validation
from services.ingest.storage import EventStore
from tessera.v1 import event_pb2
from tests.conftest import TenantKey

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("TESSERA_GATE_EXAMPLES", "80"))

# Text from every plane, NUL and control characters included (protobuf refuses lone surrogates).
text = st.text(st.characters(exclude_categories=["Cs"]), max_size=40) | st.sampled_from(
    ["", " ", "\x00", "a\x00b", "ada@example.com", "+14155550142", "(415) 555-0142", "ÄrgerÜ", "😀" * 3]
)
ident_types = st.sampled_from(["email", "phone", "user_id", "anonymous_id", "device_id", "crm_id"]) | text
numbers = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(2**63), 2**63).map(float)
timestamps = st.tuples(
    st.integers(-(2**40), 2**40) | st.sampled_from([0, 86_400, 1_700_000_000, 253_402_300_799, 253_402_300_800]),
    st.integers(-(2**31), 2**31 - 1) | st.sampled_from([0, 999_999_999, 1_000_000_000, -1]),
)
enums = st.integers(-3, 12)
# Mostly valid, so that many events pass and the interesting ones are those just inside the gate.
ids = st.uuids().map(str) | text.filter(lambda t: bool(t.strip()))
valid_text = text.filter(lambda t: bool(t.strip()))
channels = st.sampled_from(list(event_pb2.Channel.values())[1:]) | enums
authors = st.sampled_from([1, 2, 3]) | enums


def json_values(depth: int = 0) -> st.SearchStrategy[Any]:
    leaves = st.none() | st.booleans() | numbers | text | st.just("<empty Value>")
    if depth >= 20:
        return leaves
    return st.deferred(
        lambda: (
            leaves
            | st.lists(json_values(depth + 1), max_size=3)
            | st.dictionaries(text, json_values(depth + 1), max_size=3)
        )
    )


def fill(struct: struct_pb2.Struct, value: dict[str, Any]) -> None:
    for key, item in value.items():
        put(struct.fields[key], item)


def put(target: struct_pb2.Value, item: Any) -> None:
    if item == "<empty Value>":
        target.Clear()  # a Value with no kind set: JSON cannot express it
    elif item is None:
        target.null_value = struct_pb2.NULL_VALUE
    elif isinstance(item, bool):
        target.bool_value = item
    elif isinstance(item, float):
        target.number_value = item
    elif isinstance(item, str):
        target.string_value = item
    elif isinstance(item, list):
        target.list_value.Clear()
        for element in item:
            put(target.list_value.values.add(), element)
    else:
        target.struct_value.Clear()
        fill(target.struct_value, item)


structs = st.dictionaries(text, json_values(), max_size=4)


@st.composite
def base_events(draw: st.DrawFn) -> event_pb2.Event:
    """A plausible event, often valid, with odd but legal values throughout."""
    ev = event_pb2.Event(message_id=draw(ids), source=draw(text), channel=draw(channels))  # type: ignore[arg-type]
    for _ in range(draw(st.integers(1, 4) | st.just(0))):
        ev.identifiers.add(type=draw(ident_types), value=draw(valid_text | text))
    if draw(st.booleans()):
        ev.timestamp.seconds, ev.timestamp.nanos = draw(timestamps)
    if draw(st.booleans()):
        fill(ev.properties, draw(structs))
    if draw(st.booleans()):
        fill(ev.context, draw(structs))
    kind = draw(st.sampled_from(["identify", "track", "interaction", "survey_response", "message"]) | st.none())
    if kind == "identify":
        ev.identify.SetInParent()
        traits = draw(structs)
        traits.update(draw(st.fixed_dictionaries({}, optional={"first_name": text, "date_of_birth": text})))
        fill(ev.identify.traits, traits)
    elif kind == "track":
        ev.track.event = draw(valid_text | text)
    elif kind == "interaction":
        it = ev.interaction
        it.interaction_id = draw(valid_text)
        it.queue, it.agent_id, it.reason, it.case_id = (draw(text) for _ in range(4))
        it.direction = draw(st.sampled_from([0, 1, 2]) | enums)  # type: ignore[assignment]
        it.case_status = draw(st.sampled_from([0, 1, 2, 3, 4]) | enums)  # type: ignore[assignment]
        seconds = st.floats(0, 1e6) | numbers
        it.talk_seconds, it.hold_seconds, it.wait_seconds = draw(seconds), draw(seconds), draw(seconds)
        if draw(st.booleans()):
            it.started_at.seconds, it.started_at.nanos = draw(timestamps)
        if draw(st.booleans()):
            it.ended_at.seconds, it.ended_at.nanos = draw(timestamps)
    elif kind == "survey_response":
        sr = ev.survey_response
        sr.type = draw(st.sampled_from([1, 2, 3]) | enums)  # type: ignore[assignment]
        sr.score = draw(st.integers(1, 5) | st.integers(-5, 15))
        sr.comment, sr.interaction_id, sr.survey_id = draw(text), draw(text), draw(text)
    elif kind == "message":
        m = ev.message
        m.interaction_id, m.text, m.agent_id = draw(valid_text), draw(valid_text | text), draw(text)
        m.author = draw(authors)  # type: ignore[assignment]
    return ev


def _valid_event() -> event_pb2.Event:
    ev = event_pb2.Event(message_id="gate-base", channel=event_pb2.CHANNEL_WEB, source="gate")
    ev.identifiers.add(type="email", value="gate@example.com")
    ev.identify.traits.update({"first_name": "Ada"})
    ev.timestamp.GetCurrentTime()
    return ev


def _mutations() -> list[Any]:
    """One hostile change each: the gate must refuse the event, or every consumer must cope."""

    def nul(ev: event_pb2.Event) -> None:
        ev.source = "web\x00"

    def nul_key(ev: event_pb2.Event) -> None:
        ev.properties.fields["a\x00b"].string_value = "x"

    def nan(ev: event_pb2.Event) -> None:
        ev.properties.fields["revenue"].number_value = math.nan

    def inf_trait(ev: event_pb2.Event) -> None:
        ev.identify.traits.fields["age"].number_value = math.inf

    def empty_value(ev: event_pb2.Event) -> None:
        ev.context.fields["page"].Clear()

    def nanos(ev: event_pb2.Event) -> None:
        ev.timestamp.nanos = 1_500_000_000

    def negative_nanos(ev: event_pb2.Event) -> None:
        ev.timestamp.nanos = -1

    def year_10000(ev: event_pb2.Event) -> None:
        ev.timestamp.seconds = 253_402_300_800

    def deep(ev: event_pb2.Event) -> None:
        value: Any = "leaf"
        for _ in range(40):
            value = {"k": value}
        fill(ev.properties, {"deep": value})

    return [nul, nul_key, nan, inf_trait, empty_value, nanos, negative_nanos, year_10000, deep]


MUTATIONS = _mutations()


@st.composite
def events(draw: st.DrawFn) -> event_pb2.Event:
    """An arbitrary plausible event, a valid one with exactly one hostile change, or a valid one
    as it is (so that every run stores some: the arbitrary ones pass only now and then)."""
    which = draw(st.sampled_from(["arbitrary", "mutated", "arbitrary", "mutated", "valid"]))
    if which == "arbitrary":
        return draw(base_events())
    ev = _valid_event()
    ev.message_id = draw(ids)
    if which == "mutated":
        draw(st.sampled_from(MUTATIONS))(ev)
    return ev


@pytest.fixture
def identity_resolver(engine: Engine, redis_client: Any, redis_prefix: str) -> Resolver:
    store = IdentityStore(engine)
    # Its outbox thread is not started: the changes stay in the table, which is all this needs.
    return Resolver(
        store,
        RulesCache(store, ttl=0),
        Outbox(engine, Bus(redis_client, f"{redis_prefix}-gate"), EnvelopeTable("identity")),
    )


def test_whatever_ingest_accepts_every_consumer_can_store(
    engine: Engine, tenant: TenantKey, identity_resolver: Resolver
) -> None:
    identity_resolver.rules.update(tenant.tenant_id, identity_resolver.rules.get(tenant.tenant_id), {"enabled": True})
    store = EventStore(engine)
    limits = validation.Limits()
    accepted = {"n": 0}

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(batch=st.lists(events(), min_size=1, max_size=4))
    def check(batch: list[event_pb2.Event]) -> None:
        now = dt.datetime.now(dt.UTC)
        prep = prepare.prepare(batch, now, limits)
        if not prep.to_store:
            return
        accepted["n"] += len(prep.to_store)
        # ingest's own storage
        written = store.write_batch(tenant.tenant_id, prep.to_store, now)
        assert len(written.accepted) + len(written.duplicates) == len(prep.to_store)
        # identity: decode the stream entry, normalize, resolve and store (traits included)
        rules = identity_resolver.rules.get_full(tenant.tenant_id)
        incoming = []
        for new in prep.to_store:
            raw = streams.event_envelope(tenant.tenant_id, "", new.payload)
            envelope = streams.decode(streams.EVENTS, raw, tenant.tenant_id)
            incoming.append(parse_event(rules.rules, envelope.event, raw, with_traits=True))
            # What ListEvents clients, grpcurl and the HTTP gateway do with it: render it as JSON.
            json_format.MessageToJson(envelope.event)
            assert all(math.isfinite(float(v)) for v in _numbers(envelope.event))
        identity_resolver.resolve_batch(tenant.tenant_id, incoming)

    check()
    assert accepted["n"] > 0, "the strategy must also produce events that pass"


def _numbers(ev: event_pb2.Event) -> list[float]:
    out: list[float] = []

    def walk(v: struct_pb2.Value) -> None:
        kind = v.WhichOneof("kind")
        if kind == "number_value":
            out.append(v.number_value)
        elif kind == "struct_value":
            for x in v.struct_value.fields.values():
                walk(x)
        elif kind == "list_value":
            for x in v.list_value.values:
                walk(x)

    for s in (ev.properties, ev.context, ev.identify.traits):
        for x in s.fields.values():
            walk(x)
    return out
