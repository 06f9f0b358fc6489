"""The Redis Streams bus on a real Redis: consumer groups, reclaiming a dead consumer's messages,
poison messages to dead letters and back, trace context in messages, and per-tenant keys."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import redis
from opentelemetry.sdk.trace import TracerProvider
from redis.crc import key_slot

from services.core import streams
from services.core.bus import Bus, Consumer, Delivery, Publication, dead_letter_name, tenant_key
from services.core.streams import ENTRY_FIELD
from services.core.telemetry import inject_traceparent
from tessera.v1 import event_pb2, stream_pb2

pytestmark = pytest.mark.integration

GROUP = "tests"
EVENTS = streams.EVENTS.name
Envelope = stream_pb2.EventEnvelope


@pytest.fixture
def bus(redis_client: redis.Redis, redis_prefix: str) -> Bus:
    return Bus(redis_client, redis_prefix)


def new_tenant() -> str:
    return f"bus-{secrets.token_hex(4)}"


def entry(tenant_id: str, n: int | str, traceparent: str | None = None) -> bytes:
    """An events entry whose event's message_id is ``n``, traced from the current span."""
    tp = inject_traceparent() if traceparent is None else traceparent
    return streams.event_envelope(tenant_id, tp, event_pb2.Event(message_id=str(n)).SerializeToString())


def publish_n(bus: Bus, tenant_id: str, n: int, stream: str = EVENTS) -> list[str]:
    return bus.publish([Publication(tenant_id, stream, entry(tenant_id, i)) for i in range(n)])


def number(m: Delivery[Envelope]) -> str:
    return m.envelope.event.message_id


class Recorder:
    """A handler that records what it saw and fails for the message numbers in ``poison``."""

    def __init__(self, poison: Iterable[str] = ()) -> None:
        self.poison = set(poison)
        self.seen: list[Delivery[Envelope]] = []  # messages of successful calls
        self.calls: list[list[str]] = []  # every call's message numbers, failed or not

    def __call__(self, batch: list[Delivery[Envelope]]) -> None:
        numbers = [number(m) for m in batch]
        self.calls.append(numbers)
        bad = self.poison.intersection(numbers)
        if bad:
            raise ValueError(f"poison n={sorted(bad)[0]}")
        self.seen.extend(batch)

    @property
    def ids(self) -> list[str]:
        return [m.id for m in self.seen]


def consumer(
    bus: Bus,
    tenants: Callable[[], Iterable[str]],
    handler: Callable[[list[Delivery[Envelope]]], None],
    name: str = "c1",
    **kw: object,
) -> Consumer[Envelope]:
    kw.setdefault("block_ms", 20)
    return Consumer(bus=bus, stream=streams.EVENTS, group=GROUP, name=name, handler=handler, tenants=tenants, **kw)  # type: ignore[arg-type]


def poll_until(consumers: list[Consumer[Envelope]], done: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "condition not met in time"
        for c in consumers:
            c.poll()


def pending_count(bus: Bus, tenant_id: str) -> int:
    return int(bus.redis.xpending(bus.key(tenant_id, EVENTS), GROUP)["pending"])  # type: ignore[index]


def test_every_message_is_delivered_once_and_acked(bus: Bus) -> None:
    t = new_tenant()
    ids = publish_n(bus, t, 7)  # published before the group exists: still delivered
    rec = Recorder()
    c = consumer(bus, lambda: [t], rec)
    poll_until([c], lambda: len(rec.seen) >= 7)
    assert rec.ids == ids
    assert [number(m) for m in rec.seen] == [str(i) for i in range(7)]
    assert {m.tenant_id for m in rec.seen} == {t}
    assert {m.deliveries for m in rec.seen} == {1}
    assert pending_count(bus, t) == 0
    # Nothing is delivered a second time.
    assert c.poll() == 0
    assert len(rec.seen) == 7
    # New messages are picked up on the next poll.
    more = publish_n(bus, t, 2)
    poll_until([c], lambda: len(rec.seen) >= 9)
    assert rec.ids == ids + more
    assert pending_count(bus, t) == 0


def test_two_consumers_in_one_group_split_without_overlap(bus: Bus) -> None:
    t = new_tenant()
    ids = publish_n(bus, t, 20)
    a, b = Recorder(), Recorder()
    ca = consumer(bus, lambda: [t], a, name="a", batch_size=4)
    cb = consumer(bus, lambda: [t], b, name="b", batch_size=4)
    poll_until([ca, cb], lambda: len(a.seen) + len(b.seen) >= 20)
    assert a.seen and b.seen
    assert not set(a.ids) & set(b.ids)
    assert sorted(a.ids + b.ids) == sorted(ids)
    assert pending_count(bus, t) == 0


def test_dead_consumers_messages_are_reclaimed(bus: Bus) -> None:
    t = new_tenant()
    key = bus.key(t, EVENTS)
    ids = publish_n(bus, t, 3)
    bus.ensure_group(t, EVENTS, GROUP)
    # A consumer reads and dies before acking.
    got: Any = bus.redis.xreadgroup(GROUP, "dead", {key: ">"}, count=10)
    assert [m.decode() for m, _ in got[0][1]] == ids
    assert pending_count(bus, t) == 3

    rec = Recorder()
    rescuer = consumer(bus, lambda: [t], rec, name="rescuer", claim_idle_ms=50)
    poll_until([rescuer], lambda: len(rec.seen) >= 3)
    assert rec.ids == ids
    assert {m.deliveries for m in rec.seen} == {2}
    assert pending_count(bus, t) == 0
    assert bus.redis.xpending_range(key, GROUP, "-", "+", 10, consumername="dead") == []


def test_messages_of_a_live_consumer_are_not_stolen(bus: Bus) -> None:
    t = new_tenant()
    key = bus.key(t, EVENTS)
    publish_n(bus, t, 2)
    bus.ensure_group(t, EVENTS, GROUP)
    bus.redis.xreadgroup(GROUP, "busy", {key: ">"}, count=10)
    rec = Recorder()
    other = consumer(bus, lambda: [t], rec, name="other", claim_idle_ms=60_000)
    assert other.poll() == 0
    assert rec.seen == []
    assert pending_count(bus, t) == 2


def test_poison_message_does_not_hold_back_others_and_is_dead_lettered(bus: Bus) -> None:
    t = new_tenant()
    key = bus.key(t, EVENTS)
    ids = publish_n(bus, t, 5)
    poison_id = ids[2]
    rec = Recorder(poison={"2"})
    c = consumer(bus, lambda: [t], rec, claim_idle_ms=1, max_attempts=3)

    # First delivery: the batch fails, its messages are retried one by one, the good ones are acked.
    assert c.poll() == 5
    assert sorted(rec.ids) == sorted(ids[:2] + ids[3:])
    pending: Any = bus.redis.xpending_range(key, GROUP, "-", "+", 10)
    assert [p["message_id"].decode() for p in pending] == [poison_id]

    poll_until([c], lambda: bool(bus.dead_letters(t, EVENTS)))
    # After the first (whole-batch) call, the poison message is only ever retried alone.
    poison_calls = [call for call in rec.calls if "2" in call]
    assert poison_calls[0] == ["0", "1", "2", "3", "4"]
    assert all(call == ["2"] for call in poison_calls[1:])
    assert len(rec.seen) == 4  # the good ones, once each

    ((_dead_id, dead),) = bus.dead_letters(t, EVENTS)
    assert bus.redis.xlen(bus.key(t, "events:dead")) == 1
    assert dead.stream == EVENTS
    assert Envelope.FromString(dead.envelope).event.message_id == "2"
    assert dead.original_id == poison_id
    assert dead.group == GROUP
    assert dead.reason == "ValueError: poison n=2"
    assert dead.attempts == 3  # the handler saw it max_attempts times
    assert pending_count(bus, t) == 0
    # Dead-lettered means it is not delivered again.
    calls = len(rec.calls)
    assert c.poll() == 0
    assert len(rec.calls) == calls

    # After a fix, the dead letter is replayed onto the stream and handled.
    rec.poison.clear()
    assert bus.replay_dead_letters(t, EVENTS) == 1
    assert bus.dead_letters(t, EVENTS) == []
    poll_until([c], lambda: len(rec.seen) >= 5)
    replayed = rec.seen[-1]
    assert number(replayed) == "2"
    assert replayed.id != poison_id
    assert replayed.raw == dead.envelope, "a replay puts back the entry exactly as it was"
    assert pending_count(bus, t) == 0


def test_poison_message_is_delivered_max_attempts_times(bus: Bus) -> None:
    t = new_tenant()
    (poison_id,) = publish_n(bus, t, 1)
    deliveries: list[int] = []

    def always_fail(batch: list[Delivery[Envelope]]) -> None:
        deliveries.extend(m.deliveries for m in batch)
        raise RuntimeError("cannot apply")

    c = consumer(bus, lambda: [t], always_fail, claim_idle_ms=1, max_attempts=4)
    poll_until([c], lambda: bool(bus.dead_letters(t, EVENTS)))
    assert sorted(set(deliveries)) == [1, 2, 3, 4]
    ((_dead_id, dead),) = bus.dead_letters(t, EVENTS)
    assert dead.original_id == poison_id
    assert dead.reason == "RuntimeError: cannot apply"
    assert dead.attempts == 4


def test_replay_only_the_chosen_dead_letters(bus: Bus) -> None:
    t = new_tenant()
    publish_n(bus, t, 3)
    rec = Recorder(poison={"0", "1", "2"})
    c = consumer(bus, lambda: [t], rec, claim_idle_ms=1, max_attempts=1)
    poll_until([c], lambda: len(bus.dead_letters(t, EVENTS)) == 3)
    first_id, _ = bus.dead_letters(t, EVENTS)[0]
    assert bus.replay_dead_letters(t, EVENTS, ids=[first_id]) == 1
    left = bus.dead_letters(t, EVENTS)
    assert [Envelope.FromString(d.envelope).event.message_id for _, d in left] == ["1", "2"]
    tail: Any = bus.redis.xrevrange(bus.key(t, EVENTS), count=1)
    assert Envelope.FromString(tail[0][1][ENTRY_FIELD]).event.message_id == "0"


def test_traceparent_of_the_publishing_span_rides_in_the_message(bus: Bus) -> None:
    t = new_tenant()
    tracer = TracerProvider().get_tracer("tests")
    with tracer.start_as_current_span("produce") as span:
        trace_id = format(span.get_span_context().trace_id, "032x")
        span_id = format(span.get_span_context().span_id, "016x")
        bus.publish([Publication(t, EVENTS, entry(t, 0))])
    explicit = f"00-{'a' * 32}-{'b' * 16}-01"
    bus.publish([Publication(t, EVENTS, entry(t, 1, explicit))])

    rec = Recorder()
    c = consumer(bus, lambda: [t], rec)
    poll_until([c], lambda: len(rec.seen) >= 2)
    first, second = rec.seen
    version, tp_trace_id, tp_span_id, _flags = first.traceparent.split("-")
    assert (version, tp_trace_id, tp_span_id) == ("00", trace_id, span_id)
    from opentelemetry import trace as otel_trace

    ctx = otel_trace.get_current_span(first.context()).get_span_context()
    assert format(ctx.trace_id, "032x") == trace_id
    assert ctx.is_remote
    assert second.traceparent == explicit


def test_keys_carry_the_tenant_hash_tag_and_the_prefix(bus: Bus, redis_prefix: str) -> None:
    t = new_tenant()
    key = bus.key(t, EVENTS)
    assert key == f"{redis_prefix}:{{{t}}}:events"
    assert tenant_key(redis_prefix, t, "ratelimit", "ingest") == f"{redis_prefix}:{{{t}}}:ratelimit:ingest"
    publish_n(bus, t, 1)
    assert bus.redis.exists(key) == 1
    # Every key of one tenant hashes to one Redis Cluster slot.
    slots = {key_slot(k.encode()) for k in (key, bus.key(t, dead_letter_name(EVENTS)), bus.key(t, "changes"))}
    assert slots == {key_slot(t.encode())}
    found = {k.decode() for k in bus.redis.scan_iter(match=f"{redis_prefix}:{{{t}}}:*")}
    assert found == {key}


def test_tenants_streams_are_separate(bus: Bus) -> None:
    a, b = new_tenant(), new_tenant()
    a_ids = publish_n(bus, a, 3)
    b_ids = publish_n(bus, b, 2)
    assert bus.key(a, EVENTS) != bus.key(b, EVENTS)
    rec_a = Recorder()
    only_a = consumer(bus, lambda: [a], rec_a, name="only-a")
    poll_until([only_a], lambda: len(rec_a.seen) >= 3)
    for _ in range(3):
        only_a.poll()
    assert rec_a.ids == a_ids
    assert {m.tenant_id for m in rec_a.seen} == {a}
    assert {m.key for m in rec_a.seen} == {bus.key(a, EVENTS)}

    # A consumer that also serves B, added to the group later, gets exactly B's messages, tagged B.
    rec_both = Recorder()
    both = consumer(bus, lambda: [a, b], rec_both, name="both")
    poll_until([both], lambda: len(rec_both.seen) >= 2)
    both.poll()
    assert rec_both.ids == b_ids
    assert {m.tenant_id for m in rec_both.seen} == {b}


def test_consumer_picks_up_new_tenants(bus: Bus) -> None:
    a, b = new_tenant(), new_tenant()
    tenants = [a]
    rec = Recorder()
    c = consumer(bus, lambda: list(tenants), rec, tenant_refresh_seconds=0)
    publish_n(bus, b, 1)
    c.poll()
    assert rec.seen == []
    tenants.append(b)
    poll_until([c], lambda: len(rec.seen) >= 1)
    assert rec.seen[0].tenant_id == b


def test_publish_nothing_is_a_no_op(bus: Bus) -> None:
    assert bus.publish([]) == []


def test_poison_messages_among_in_flight_ones_are_still_dead_lettered(bus: Bus) -> None:
    """Delivery counts of reclaimed messages must not be lost to other consumers' in-flight
    messages lying between them in the pending list (a range XPENDING capped at 2*n did)."""
    t = new_tenant()
    key = bus.key(t, EVENTS)
    ids = publish_n(bus, t, 10)
    bus.ensure_group(t, EVENTS, GROUP)
    bus.redis.xreadgroup(GROUP, "dead", {key: ">"}, count=10)
    # The first and last were delivered many times and are idle; the 8 between are in flight elsewhere.
    bus.redis.xclaim(key, GROUP, "dead", 0, [ids[0], ids[-1]], idle=60_000, retrycount=9)
    bus.redis.xclaim(key, GROUP, "busy", 0, list[Any](ids[1:-1]), idle=0, justid=True)

    rec = Recorder()
    c = consumer(bus, lambda: [t], rec, name="rescuer", claim_idle_ms=30_000, max_attempts=3)
    c.poll()
    assert rec.seen == [], "a message past max_attempts was handed to the handler"
    assert [d.original_id for _, d in bus.dead_letters(t, EVENTS)] == [ids[0], ids[-1]]


def test_an_entry_that_is_not_an_envelope_is_dead_lettered_without_reaching_the_handler(bus: Bus) -> None:
    """Garbage on a stream can never become valid: it goes to the dead letters on first sight."""
    t = new_tenant()
    good = publish_n(bus, t, 1)
    bad: Any = bus.redis.xadd(bus.key(t, EVENTS), {ENTRY_FIELD: b"\xff\xff not protobuf"})
    rec = Recorder()
    c = consumer(bus, lambda: [t], rec)
    poll_until([c], lambda: len(rec.seen) >= 1 and bool(bus.dead_letters(t, EVENTS)))
    assert rec.ids == good
    assert [number(m) for m in rec.seen] == ["0"]
    ((_id, dead),) = bus.dead_letters(t, EVENTS)
    assert dead.original_id == bad.decode()
    assert dead.reason.startswith("UndecodableEntry")
    assert dead.attempts == 1
    assert pending_count(bus, t) == 0


def test_an_envelope_naming_another_tenant_is_never_applied(bus: Bus) -> None:
    """Defence in depth: a message on tenant A's stream that says it is B's is refused."""
    a, b = new_tenant(), new_tenant()
    bus.publish([Publication(a, EVENTS, entry(b, "forged")), Publication(a, EVENTS, entry(a, "mine"))])
    rec = Recorder()
    c = consumer(bus, lambda: [a], rec)
    poll_until([c], lambda: len(rec.seen) >= 1 and bool(bus.dead_letters(a, EVENTS)))
    assert [number(m) for m in rec.seen] == ["mine"]
    ((_id, dead),) = bus.dead_letters(a, EVENTS)
    assert "not the stream's" in dead.reason
