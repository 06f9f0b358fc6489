"""``tessera bench identity``: events/s that one identity worker resolves, and its consumer lag,
on a demo-like mix of new people, known people and merges.

1. PostgreSQL and Redis: the servers named by ``TESSERA_DATABASE_URL``/``TESSERA_REDIS_URL`` (or
   ``TESSERA_TEST_*``), else embedded ones; a fresh migrated database, a tenant and a Redis prefix,
   all removed at the end.
2. Load goes straight onto the tenant's events stream, as ingest's outbox relay writes it (same
   fields, same one-call column append), so the measurement is identity's alone. Each event is a
   demo event body with bench identifiers: 30 % a new person (email and/or phone), 60 % a person
   seen before (their email or phone, sometimes revealing the other one), 10 % one identifier each
   of two people never merged yet, which must merge them. National phone formats and padded or
   capitalised emails make the normalizers work as on demo data.
3. Drain: a seed population and a backlog are on the stream before ``tessera serve identity``
   starts as the one worker; events/s is measured while it drains the backlog (its capacity).
4. Sustained: a producer thread offers a steady rate (the target, by default) for a warm-up plus
   the window; resolved events/s, consumer lag (oldest unacknowledged entry, backlog) and the
   latency from stream append to resolved publish are measured.
5. Correctness: every produced event has exactly one ``identity.event_links`` row; merges, active
   profiles and identifiers equal what the mix implies; nothing pending or dead-lettered.

Resolved events are counted on the ``resolved`` stream, which the worker appends to after each
commit. CPU is user+system time per process over each window (psutil).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import random
import secrets
import shlex
import threading
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import redis
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from bench.common import (
    Backends,
    CpuGroup,
    backends,
    fmt,
    idle_machine_facts,
    machine_busy,
    percentile,
    proc_cpu,
    rounded,
    run_configured,
    spawn,
    utc_now,
)
from bench.ingest import postgres_facts
from services.cli.demo import EMAIL_DOMAINS, FIRST_NAMES, LAST_NAMES, generate
from services.core import db, streams, tenancy
from services.core.bus import Bus, RedisClient, connect, dead_letter_name
from services.core.harness import ServiceProcess, free_port, run_token, serve_argv, wait_serving
from services.core.settings import Settings
from services.core.streams import tag, varint
from services.identity.consumer import GROUP
from services.identity.storage import IdentityStore
from tessera.v1 import event_pb2, identity_pb2

log = logging.getLogger("bench.identity")

TARGET_EVENTS_PER_S = 5_000
EVENTS = streams.EVENTS.name
RESOLVED = streams.RESOLVED.name
IDENTITY_SERVICE = "tessera.v1.IdentityService"
SHARE_NEW, SHARE_KNOWN = 0.30, 0.60  # the rest (10 %) merges two people
SEED_PEOPLE = 2_000  # like `tessera up`'s demo: known people exist before the first measured event
PRELOAD_CHUNK = 500
SAMPLE_SECONDS = 0.1
MIN_EVENTS_PER_S = 100  # below this the worker counts as stuck (the waits' timeouts)
KEEPS_UP_RATIO = 0.97  # resolved/offered over the sustained window, allowing for sampling edges

# Fictional US numbers (555 exchange) in the demo's area codes: 9,900 per (area, exchange).
AREAS = (
    "206", "212", "213", "214", "215", "267", "303", "305", "310", "312", "313", "323", "347", "404",
    "415", "469", "470", "480", "503", "510", "512", "602", "612", "615", "617", "619", "628", "646",
    "713", "718", "720", "737", "773", "786", "801", "832", "857", "858", "971",
)  # fmt: skip
EXCHANGES = ("555", "556", "557", "558", "559")
# Streets and cities of the bench people's own Identify traits (``--matching on``).
_STREET_NAMES = (
    "Oak", "Maple", "Cedar", "Pine", "Elm", "Lake", "Hill", "Park", "Church", "Mill", "River", "Spring",
    "Willow", "Walnut", "Market", "Bridge", "Union", "Garden", "Valley", "Forest",
)  # fmt: skip
_CITIES = ("Springfield", "Portland", "Austin", "Denver", "Seattle", "Boston", "Chicago", "Miami", "Atlanta")
LINES_PER_EXCHANGE = 9_900

# tessera.v1.Event: message_id = 1, identifiers = 6, event_id = 20; Identifier: type = 1, value = 2.
_MESSAGE_ID_TAG = tag(event_pb2.Event.DESCRIPTOR, "message_id")
_IDENTIFIER_TAG = tag(event_pb2.Event.DESCRIPTOR, "identifiers")
_EVENT_ID_TAG = tag(event_pb2.Event.DESCRIPTOR, "event_id")
_IDENT_TYPE_TAG = tag(event_pb2.Identifier.DESCRIPTOR, "type")
_IDENT_VALUE_TAG = tag(event_pb2.Identifier.DESCRIPTOR, "value")
_EMAIL, _PHONE = 1, 2  # bits of a person's "seen" mask: which identifiers the graph knows


# ---- configuration -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    seconds: float
    warmup: float
    rate: float  # events/s offered in the sustained phase
    backlog: int  # events on the stream before the worker starts (after the seed)
    seed_people: int
    seed: int
    consumer_batch_size: int
    matching: bool = False  # probabilistic matching on for the tenant (``--matching on``)

    def as_dict(self) -> dict[str, Any]:
        return {
            "seconds": self.seconds,
            "warmup_seconds": self.warmup,
            "sustained_offered_events_per_s": self.rate,
            "drain_backlog_events": self.backlog,
            "seed_people": self.seed_people,
            "random_seed": self.seed,
            "consumer_batch_size": self.consumer_batch_size,
            "probabilistic_matching": "on" if self.matching else "off",
            "mix": {"new": SHARE_NEW, "known": SHARE_KNOWN, "merge": round(1 - SHARE_NEW - SHARE_KNOWN, 2)},
        }


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    return float(raw) if raw else default


def make_config(seconds: float, extra: argparse.Namespace) -> Config:
    """``--seconds`` from the CLI; knobs for experiments from ``TESSERA_BENCH_IDENTITY_*``. The
    backlog defaults to the target rate times the window, so at the target the drain takes as
    long as the sustained window."""
    rate = _env_number("TESSERA_BENCH_IDENTITY_RATE", TARGET_EVENTS_PER_S)
    backlog = int(_env_number("TESSERA_BENCH_IDENTITY_BACKLOG", TARGET_EVENTS_PER_S * seconds))
    seed_people = int(_env_number("TESSERA_BENCH_IDENTITY_SEED_PEOPLE", SEED_PEOPLE))
    if rate <= 0 or backlog < 1000 or seed_people < 2:
        raise ValueError(
            "TESSERA_BENCH_IDENTITY_RATE must be > 0, _BACKLOG >= 1000 and _SEED_PEOPLE >= 2, "
            f"got {rate}, {backlog}, {seed_people}"
        )
    # The worker reads its batch size from the same environment the bench passes on.
    batch = Settings.from_env().consumer_batch_size
    return Config(
        seconds=seconds,
        warmup=min(2.0, max(0.5, seconds / 5)),
        rate=rate,
        backlog=backlog,
        seed_people=seed_people,
        seed=int(_env_number("TESSERA_BENCH_IDENTITY_SEED", 23)),
        consumer_batch_size=batch,
        matching=getattr(extra, "matching", "off") == "on",
    )


# ---- the event mix -----------------------------------------------------------------------------


def event_bodies(customers: int = 200, seed: int = 11, days: int = 30) -> list[bytes]:
    """Demo events serialized without message_id, identifiers or ids: the bench adds its own."""
    out = []
    for ev in generate(seed=seed, customers=customers, days=days):
        for name in ("message_id", "identifiers", "event_id", "profile_id"):
            ev.ClearField(name)  # type: ignore[arg-type]
        out.append(ev.SerializeToString())
    return out


def _identifier(type_name: bytes, value: str) -> bytes:
    raw = value.encode()
    body = _IDENT_TYPE_TAG + varint(len(type_name)) + type_name + _IDENT_VALUE_TAG + varint(len(raw)) + raw
    return _IDENTIFIER_TAG + varint(len(body)) + body


def _ascii(text: str) -> str:
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return "".join(ch for ch in folded.lower() if ch.isalnum())


@dataclass
class MixCounts:
    new: int = 0
    known: int = 0
    merge: int = 0
    # A known person who also shows the identifier the graph has not seen yet (attach, not create).
    known_revealing: int = 0
    # A merge drawn while fewer than two never-merged people existed: sent as a known-person event.
    merge_fallback: int = 0


class Mix:
    """Makes event ``n`` of the run as stream fields, and remembers what the graph must end with.

    Every person has an email and a phone; ``seen`` says which of them some event already carried.
    A merge takes two people never merged before, so each merge event merges exactly two profiles
    and no profile nears an identifier limit (merge protection would blur the expected counts).
    """

    def __init__(self, bodies: Sequence[bytes], token: str, seed: int, *, matching: bool = False) -> None:
        if len(token) != 8:
            raise ValueError("token must be 8 hex digits")
        self.rng = random.Random(seed)
        self.bodies = list(bodies)
        self.token = token
        self.seq = 0
        self.emails: list[str] = []
        self.phones: list[str] = []
        self.seen: list[int] = []
        self.unmerged: list[int] = []
        self.counts = MixCounts()
        self.identifiers = 0  # distinct identifiers sent so far
        self._names = [(_ascii(f), _ascii(last)) for f in FIRST_NAMES for last in LAST_NAMES[:40]]
        self._eid_head = f"{token}-0000-4000-8000-"
        self._mid_head = f"bench-{token}-".encode()
        self._email_type, self._phone_type = b"email", b"phone"
        self.seed = seed
        self.matching = matching
        self._subject = 0  # the person the current event is about (the first one of a merge)
        # With matching on, an Identify body carries its person's own traits instead of the demo
        # customer's (reused across bench people, those would merge strangers by their traits).
        self._identify_heads: dict[int, event_pb2.Event] = {}
        if matching:
            for i, raw in enumerate(self.bodies):
                ev = event_pb2.Event.FromString(raw)
                if ev.WhichOneof("payload") == "identify":
                    self._identify_heads[i] = event_pb2.Event(
                        timestamp=ev.timestamp, channel=ev.channel, source=ev.source, identify=event_pb2.Identify()
                    )

    # People and their identifiers, as a producer would send them.

    def _new_person(self) -> int:
        n = len(self.emails)
        per_exchange = LINES_PER_EXCHANGE * len(AREAS)
        if n >= per_exchange * len(EXCHANGES):
            raise RuntimeError(f"the mix ran out of phone numbers after {n} people; use a shorter run")
        first, last = self._names[self.rng.randrange(len(self._names))]
        self.emails.append(f"{first}.{last}.{n:x}@{EMAIL_DOMAINS[n % len(EMAIL_DOMAINS)]}")
        exchange = EXCHANGES[n // per_exchange]
        line = 100 + n % LINES_PER_EXCHANGE
        self.phones.append(f"+1{AREAS[(n // LINES_PER_EXCHANGE) % len(AREAS)]}{exchange}{line:04d}")
        self.seen.append(0)
        self.unmerged.append(n)
        return n

    def _email(self, p: int) -> bytes:
        value = self.emails[p]
        r = self.rng.random()
        if r < 0.04:  # as forms and CRMs deliver it (the demo's variants)
            local, _, domain = value.partition("@")
            value = f"{local.title()}@{domain.capitalize()}"
        elif r < 0.06:
            value = f" {value} "
        return _identifier(self._email_type, value)

    def _phone(self, p: int) -> bytes:
        e164 = self.phones[p]
        r = self.rng.random()
        if r < 0.3:  # a caller-id or CRM national format
            area, exchange, line = e164[2:5], e164[5:8], e164[8:]
            value = f"({area}) {exchange}-{line}" if r < 0.15 else f"{area}-{exchange}-{line}"
        else:
            value = e164
        return _identifier(self._phone_type, value)

    def _show(self, p: int, bits: int) -> bytes:
        """The identifiers ``bits`` of person ``p``, now known to the graph."""
        fresh = bits & ~self.seen[p]
        self.identifiers += (fresh & _EMAIL) + (fresh >> 1)
        self.seen[p] |= bits
        return (self._email(p) if bits & _EMAIL else b"") + (self._phone(p) if bits & _PHONE else b"")

    def _one_seen(self, p: int) -> int:
        s = self.seen[p]
        if s == _EMAIL | _PHONE:
            return _EMAIL if self.rng.random() < 0.6 else _PHONE
        return s

    def _take_unmerged(self) -> int:
        i = self.rng.randrange(len(self.unmerged))
        p = self.unmerged[i]
        self.unmerged[i] = self.unmerged[-1]
        self.unmerged.pop()
        return p

    def identifiers_for(self, kind: str) -> bytes:
        rng = self.rng
        if kind == "merge" and len(self.unmerged) < 2:
            self.counts.merge_fallback += 1
            kind = "known"
        if kind == "known" and not self.emails:
            kind = "new"
        if kind == "new":
            self.counts.new += 1
            r = rng.random()
            self._subject = self._new_person()
            return self._show(self._subject, _EMAIL | _PHONE if r < 0.6 else _EMAIL if r < 0.85 else _PHONE)
        if kind == "known":
            self.counts.known += 1
            p = rng.randrange(len(self.emails))
            self._subject = p
            s = self.seen[p]
            r = rng.random()
            if s != _EMAIL | _PHONE and r < 0.15:
                self.counts.known_revealing += 1
                return self._show(p, _EMAIL | _PHONE)
            bits = (_EMAIL | _PHONE) if s == _EMAIL | _PHONE and r < 0.2 else self._one_seen(p)
            return self._show(p, bits)
        self.counts.merge += 1
        a, b = self._take_unmerged(), self._take_unmerged()
        self._subject = a
        return self._show(a, self._one_seen(a)) + self._show(b, self._one_seen(b))

    def draw_kind(self) -> str:
        r = self.rng.random()
        return "new" if r < SHARE_NEW else "known" if r < SHARE_NEW + SHARE_KNOWN else "merge"

    def event(self, kind: str | None = None) -> tuple[bytes, bytes]:
        """(event_id, payload) of the next event; ``kind`` forces new/known/merge."""
        n = self.seq
        self.seq += 1
        idents = self.identifiers_for(kind or self.draw_kind())
        eid = (self._eid_head + f"{n:012x}").encode()
        mid = self._mid_head + b"%d" % n
        body = self.bodies[n % len(self.bodies)]
        if self.matching and (head := self._identify_heads.get(n % len(self.bodies))) is not None:
            body = self.identify_body(head, self._subject)
        payload = b"".join(
            (
                body,
                _MESSAGE_ID_TAG,
                varint(len(mid)),
                mid,
                idents,
                _EVENT_ID_TAG,
                varint(len(eid)),
                eid,
            )
        )
        return eid, payload

    def person_traits(self, p: int) -> dict[str, str]:
        """Person ``p``'s Identify traits, the same every time: name, birth date, address, phone and
        email. Surnames are double-barrelled so that two bench people rarely share a full name and a
        birth date (those two alone score as one person)."""
        rng = random.Random(self.seed * 1_000_003 + p)
        first = FIRST_NAMES[rng.randrange(len(FIRST_NAMES))]
        last = f"{LAST_NAMES[rng.randrange(len(LAST_NAMES))]}-{LAST_NAMES[rng.randrange(len(LAST_NAMES))]}"
        dob = dt.date(1940, 1, 1) + dt.timedelta(days=rng.randrange(65 * 365))
        e164 = self.phones[p]
        return {
            "first_name": first,
            "last_name": last,
            "date_of_birth": dob.isoformat(),
            "address": f"{rng.randint(1, 9999)} {rng.choice(_STREET_NAMES)} St",
            "city": rng.choice(_CITIES),
            "postcode": f"{rng.randint(10000, 99999)}",
            "phone": f"({e164[2:5]}) {e164[5:8]}-{e164[8:]}",
            "email": self.emails[p],
        }

    def identify_body(self, head: event_pb2.Event, p: int) -> bytes:
        ev = event_pb2.Event()
        ev.CopyFrom(head)
        ev.identify.traits.update(self.person_traits(p))
        return ev.SerializeToString()

    def envelopes(self, tenant_id: str, count: int, kind: str | None = None) -> tuple[list[bytes], list[bytes]]:
        """(event ids, ``events`` entries) of ``count`` events, one traceparent per append like
        ingest's batches, encoded by the codec ingest's outbox uses."""
        ids: list[bytes] = []
        payloads: list[bytes] = []
        for _ in range(count):
            eid, payload = self.event(kind)
            ids.append(eid)
            payloads.append(payload)
        tp = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
        return ids, streams.event_envelopes(tenant_id, tp, payloads)

    @property
    def people(self) -> int:
        return len(self.emails)

    def check(self, samples: int = 50) -> None:
        """Parse a fresh mix's first events with the generated classes (the bytes are hand-made)."""
        probe = Mix(self.bodies, self.token, self.rng.randrange(1 << 30), matching=self.matching)
        for _ in range(samples):
            eid, payload = probe.event()
            ev = event_pb2.Event.FromString(payload)
            if ev.event_id != eid.decode() or not ev.message_id or not ev.identifiers:
                raise AssertionError(f"bad bench event: {ev}")
            if any(i.type not in ("email", "phone") for i in ev.identifiers):
                raise AssertionError(f"unexpected identifiers: {list(ev.identifiers)}")


def validate_phone_space() -> None:
    """Every (area, exchange) the mix may use gives numbers the phone normalizer accepts."""
    from services.core.identity_rules import DEFAULT_RULES

    for area in AREAS:
        for exchange in EXCHANGES:
            for line in (100, 100 + LINES_PER_EXCHANGE - 1):
                if DEFAULT_RULES.normalize("phone", f"+1{area}{exchange}{line:04d}").value is None:
                    raise AssertionError(f"+1{area}{exchange}{line:04d} is not a valid phone number")


# ---- producing -------------------------------------------------------------------------------


class Producer:
    """Appends the mix's events to the tenant's events stream; remembers each event's stream id
    (its append time in Redis milliseconds) when asked, for the append-to-resolved latency."""

    def __init__(self, bus: Bus, tenant_id: str, mix: Mix) -> None:
        self.bus = bus
        self.tenant_id = tenant_id
        self.mix = mix
        self.produced = 0
        self.appended_ms: dict[bytes, int] = {}
        self.record = False
        self.cpu_s = 0.0  # thread CPU of the paced producer

    def append(self, count: int, kind: str | None = None) -> None:
        eids, envelopes = self.mix.envelopes(self.tenant_id, count, kind)
        ids = self.bus.append(self.tenant_id, EVENTS, envelopes)
        if self.record:
            for eid, sid in zip(eids, ids, strict=True):
                self.appended_ms[eid] = int(sid.split("-", 1)[0])
        self.produced += count

    def preload(self, count: int, kind: str | None = None) -> None:
        left = count
        while left > 0:
            n = min(PRELOAD_CHUNK, left)
            self.append(n, kind)
            left -= n

    def paced(self, rate: float, stop: threading.Event, started: Callable[[float], None]) -> None:
        """Offer ``rate`` events/s until ``stop``: every few ms, whatever the clock says is due
        (at most 1,000 per append), so a slow append is caught up rather than lost."""
        cpu0 = time.thread_time()
        t0 = time.monotonic()
        started(t0)
        sent = 0
        tick = max(0.002, min(0.02, 100 / rate))
        try:
            while not stop.is_set():
                due = int(rate * (time.monotonic() - t0)) - sent
                if due <= 0:
                    stop.wait(tick)
                    continue
                n = min(due, 1000)
                self.append(n)
                sent += n
        except Exception:
            log.exception("the producer failed; the offered rate shows how far it got")
        self.cpu_s = time.thread_time() - cpu0


# ---- watching the consumer ---------------------------------------------------------------------


@dataclass
class Sample:
    t: float  # monotonic
    produced: int
    resolved: int
    pending: int  # delivered to the worker, not acknowledged
    undelivered: int | None  # XINFO GROUPS lag (Redis 7+)
    behind_s: float  # age of the oldest unacknowledged entry (0 when there is none)


class Watcher:
    """Samples the consumer group every ``SAMPLE_SECONDS`` on its own connection and thread."""

    def __init__(self, redis_url: str, bus: Bus, tenant_id: str, producer: Producer) -> None:
        self.client = connect(redis_url)
        self.events_key = bus.key(tenant_id, EVENTS)
        self.resolved_key = bus.key(tenant_id, RESOLVED)
        self.producer = producer
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.client.close()

    def resolved(self) -> int:
        return int(self.client.xlen(self.resolved_key))

    def sample(self) -> Sample:
        produced = self.producer.produced
        pipe = self.client.pipeline(transaction=False)
        pipe.time()
        pipe.xlen(self.resolved_key)
        pipe.xinfo_groups(self.events_key)
        pipe.xpending(self.events_key, GROUP)
        now, resolved, groups, pending = pipe.execute(raise_on_error=False)
        t = time.monotonic()
        group = next((g for g in groups if g["name"] == GROUP.encode()), None) if isinstance(groups, list) else None
        n_pending = int(pending["pending"]) if isinstance(pending, dict) else 0
        oldest: bytes | None = None
        if n_pending:
            oldest = pending["min"]
        else:
            after = "(" + group["last-delivered-id"].decode() if group else "-"
            first: Any = self.client.xrange(self.events_key, min=after, count=1)
            oldest = first[0][0] if first else None
        now_ms = int(now[0]) * 1000 + int(now[1]) // 1000
        behind = max(0.0, (now_ms - int(oldest.split(b"-", 1)[0])) / 1000) if oldest else 0.0
        lag = group.get("lag") if group else None
        return Sample(t, produced, int(resolved), n_pending, None if lag is None else int(lag), behind)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self.sample())
            except redis.RedisError:
                log.warning("watcher sample failed", exc_info=True)
            self._stop.wait(SAMPLE_SECONDS)

    def window(self, start: float, end: float) -> list[Sample]:
        return [s for s in self.samples if start <= s.t <= end]


def lag_figures(samples: Sequence[Sample]) -> dict[str, Any]:
    behind = sorted(s.behind_s for s in samples)
    backlog = [s.produced - s.resolved for s in samples]
    return {
        "lag_samples": len(samples),
        "lag_seconds_p50": rounded(percentile(behind, 50), 3),
        "lag_seconds_p99": rounded(percentile(behind, 99), 3),
        "lag_seconds_max": rounded(behind[-1], 3) if behind else None,
        "backlog_events_mean": rounded(sum(backlog) / len(backlog), 0) if backlog else None,
        "backlog_events_max": max(backlog) if backlog else None,
        "backlog_events_at_end": backlog[-1] if backlog else None,
        "pending_max": max((s.pending for s in samples), default=None),
        "undelivered_max": max((s.undelivered for s in samples if s.undelivered is not None), default=None),
    }


# ---- phases ------------------------------------------------------------------------------------


@dataclass
class Meter:
    """Counters at one instant, for the difference over a window."""

    t: float
    resolved: int
    produced: int
    server_cpu: float
    bench_cpu: float  # this process: the producer thread, the watcher
    busy: float
    total: float

    @classmethod
    def now(cls, watcher: Watcher, producer: Producer, server: ServiceProcess) -> Meter:
        busy, total = machine_busy()
        resolved = watcher.resolved()
        return cls(
            time.monotonic(), resolved, producer.produced, proc_cpu(server.pid), proc_cpu(os.getpid()), busy, total
        )


@dataclass
class PhaseFigures:
    name: str
    start: Meter
    end: Meter
    postgres_cpu_s: float
    redis_cpu_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    def figures(self) -> dict[str, Any]:
        secs = self.end.t - self.start.t
        events = self.end.resolved - self.start.resolved
        srv = self.end.server_cpu - self.start.server_cpu
        per_k = (lambda cpu: cpu / events * 1000) if events else (lambda _cpu: float("nan"))
        total = self.end.total - self.start.total
        busy_cores = (self.end.busy - self.start.busy) / total * (os.cpu_count() or 1) if total else 0.0
        bench = self.end.bench_cpu - self.start.bench_cpu
        return {
            "measured_seconds": rounded(secs, 2),
            "resolved_events": events,
            "resolved_events_per_s": rounded(events / secs if secs else float("nan"), 1),
            "offered_events_per_s": rounded((self.end.produced - self.start.produced) / secs if secs else 0.0, 1),
            "server_cpu_s_per_1k_events": rounded(per_k(srv), 4),
            "server_cpu_cores": rounded(srv / secs if secs else float("nan"), 2),
            "postgres_cpu_s_per_1k_events": rounded(per_k(self.postgres_cpu_s), 4),
            "postgres_cpu_cores": rounded(self.postgres_cpu_s / secs if secs else float("nan"), 2),
            "redis_cpu_s_per_1k_events": rounded(per_k(self.redis_cpu_s), 4),
            "bench_cpu_cores": rounded(bench / secs if secs else float("nan"), 2),
            "machine_cpu_busy_pct": rounded(100 * (self.end.busy - self.start.busy) / total if total else 0.0, 1),
            # busy CPU that is not the worker, PostgreSQL, Redis or the bench: kernel work for them, or
            # something else running on the machine (a contaminated run)
            "other_cpu_cores": rounded(
                busy_cores - (srv + self.postgres_cpu_s + self.redis_cpu_s + bench) / secs if secs else float("nan"), 2
            ),
            **self.extra,
        }


def _timeout(cfg: Config, events: int) -> float:
    """How long to wait for ``events`` to resolve before calling the run failed: a slow worker (matching
    on, a busy shared machine) still finishes, a stuck one does not hold the run for ever."""
    return max(120.0, 10 * cfg.seconds, events / MIN_EVENTS_PER_S)


def _wait_until(
    watcher: Watcher, server: ServiceProcess, predicate: Callable[[int], bool], timeout: float, what: str
) -> None:
    deadline = time.monotonic() + timeout
    last_log = time.monotonic()
    while True:
        resolved = watcher.resolved()
        if predicate(resolved):
            return
        if not server.alive():
            raise RuntimeError(f"identity exited with {server.returncode} while {what}:\n{server.log_tail()}")
        now = time.monotonic()
        if now > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s {what} ({resolved} resolved)")
        if now - last_log > 5:
            log.info("%s: %d resolved so far", what, resolved)
            last_log = now
        time.sleep(0.02)


def drain_phase(
    cfg: Config, watcher: Watcher, producer: Producer, server: ServiceProcess, preloaded: int
) -> PhaseFigures:
    """Capacity: the window runs from 5 % into the backlog (seed and start-up behind it) until
    the last preloaded event is resolved."""
    start_at = cfg.seed_people + cfg.backlog // 20
    timeout = _timeout(cfg, preloaded)
    _wait_until(watcher, server, lambda r: r >= start_at, timeout, "waiting for the drain window")
    pg, rd = CpuGroup(["postgres"]), CpuGroup(["redis-server"])
    pg.start()
    rd.start()
    start = Meter.now(watcher, producer, server)
    _wait_until(watcher, server, lambda r: r >= preloaded, timeout, "draining the backlog")
    end = Meter.now(watcher, producer, server)
    phase = PhaseFigures("drain", start, end, pg.stop(), rd.stop())
    phase.extra["lag"] = lag_figures(watcher.window(start.t, end.t))
    return phase


def sustained_phase(cfg: Config, watcher: Watcher, producer: Producer, server: ServiceProcess) -> PhaseFigures:
    """A steady offered rate: warm-up, then the window; the producer stops at its end."""
    stop = threading.Event()
    t0_box: list[float] = []
    thread = threading.Thread(
        target=producer.paced, args=(cfg.rate, stop, t0_box.append), name="bench-producer", daemon=True
    )
    producer.record = True
    thread.start()
    try:
        while not t0_box:
            time.sleep(0.001)
        t0 = t0_box[0]
        time.sleep(max(0.0, t0 + cfg.warmup - time.monotonic()))
        pg, rd = CpuGroup(["postgres"]), CpuGroup(["redis-server"])
        pg.start()
        rd.start()
        start = Meter.now(watcher, producer, server)
        window_start_ms = _redis_ms(watcher.client)
        time.sleep(max(0.0, start.t + cfg.seconds - time.monotonic()))
        end = Meter.now(watcher, producer, server)
        window_end_ms = _redis_ms(watcher.client)
        pg_s, rd_s = pg.stop(), rd.stop()
        if not server.alive():
            raise RuntimeError(f"identity died during the sustained phase:\n{server.log_tail()}")
    finally:
        stop.set()
        thread.join(30)
        producer.record = False
    phase = PhaseFigures("sustained", start, end, pg_s, rd_s)
    phase.extra["lag"] = lag_figures(watcher.window(start.t, end.t))
    phase.extra["window_ms"] = (window_start_ms, window_end_ms)
    return phase


def _redis_ms(client: RedisClient) -> int:
    sec, usec = client.time()
    return int(sec) * 1000 + int(usec) // 1000


def resolve_latency(watcher: Watcher, producer: Producer, window_ms: tuple[int, int]) -> dict[str, Any]:
    """Append-to-resolved latency of the events appended in the sustained window (stream ids are
    Redis milliseconds on both ends, so the two clocks are one)."""
    lo, hi = window_ms
    wanted = {eid: ms for eid, ms in producer.appended_ms.items() if lo <= ms <= hi}
    latencies: list[float] = []
    cursor = f"{lo}-0"
    while True:
        rows: Any = watcher.client.xrange(watcher.resolved_key, min=cursor, count=2000)
        if not rows:
            break
        for sid, fields in rows:
            resolved = streams.decode(streams.RESOLVED, fields[streams.ENTRY_FIELD])
            appended = wanted.pop(resolved.event.event_id.encode(), None)
            if appended is not None:
                latencies.append(int(sid.split(b"-", 1)[0]) - appended)
        if not wanted:
            break
        cursor = "(" + rows[-1][0].decode()
    latencies.sort()
    return {
        "resolve_latency_events": len(latencies),
        "resolve_latency_ms_p50": rounded(percentile(latencies, 50), 1),
        "resolve_latency_ms_p99": rounded(percentile(latencies, 99), 1),
        "resolve_latency_ms_max": rounded(latencies[-1], 1) if latencies else None,
        "resolve_latency_unmatched": len(wanted),
    }


# ---- correctness -------------------------------------------------------------------------------


def verify(engine: Engine, redis_url: str, bus: Bus, tenant_id: str, mix: Mix, produced: int) -> dict[str, Any]:
    """What the database holds against what the mix implies, once everything is resolved."""
    first_id = f"{mix.token}-0000-4000-8000-{0:012x}"
    last_id = f"{mix.token}-0000-4000-8000-{mix.seq - 1:012x}"
    q = {"t": tenant_id, "lo": first_id, "hi": last_id}
    with engine.connect() as conn:

        def one(sql: str) -> int:
            return int(conn.execute(sa.text(sql), q).scalar_one())

        links = one("SELECT count(*) FROM identity.event_links WHERE tenant_id = :t")
        ours = one("SELECT count(*) FROM identity.event_links WHERE tenant_id = :t AND event_id BETWEEN :lo AND :hi")
        unlinked = one("SELECT count(*) FROM identity.event_links WHERE tenant_id = :t AND profile_id IS NULL")
        merges = one("SELECT count(*) FROM identity.merges WHERE tenant_id = :t")
        kind = identity_pb2.MERGE_KIND_PROBABILISTIC
        probabilistic = one(f"SELECT count(*) FROM identity.merges WHERE tenant_id = :t AND kind = {kind}")
        suggestions = one("SELECT count(*) FROM identity.match_suggestions WHERE tenant_id = :t")
        match_records = one("SELECT count(*) FROM identity.match_records WHERE tenant_id = :t")
        profiles = one("SELECT count(*) FROM identity.profiles WHERE tenant_id = :t")
        active = one("SELECT count(*) FROM identity.profiles WHERE tenant_id = :t AND merged_into IS NULL")
        identifiers = one("SELECT count(*) FROM identity.identifiers WHERE tenant_id = :t")
    client = connect(redis_url)
    try:
        pipe = client.pipeline(transaction=False)
        pipe.xpending(bus.key(tenant_id, EVENTS), GROUP)
        pipe.xlen(bus.key(tenant_id, dead_letter_name(EVENTS)))
        pipe.xlen(bus.key(tenant_id, RESOLVED))
        pending, dead, resolved = pipe.execute()
    finally:
        client.close()
    c = mix.counts
    # Order-independent expectations only. With several consumers, a person's first event and a
    # later one that joins them to someone else can be applied in either order: then the person is
    # attached rather than created and merged. Either way the customers (connected components) and
    # their identifiers are the same, and created - merges always equals the customers.
    # With matching on, every bench person has traits of their own, so a probabilistic merge joins
    # two people who share a name and birth date by chance: reported, and taken off the customers.
    expected = {
        "event_links": produced,
        "active_profiles": mix.people - c.merge - probabilistic,
        "identifiers": mix.identifiers,
        "created_minus_merges": mix.people - c.merge - probabilistic,
    }
    found = {
        "event_links": links,
        "active_profiles": active,
        "identifiers": identifiers,
        "created_minus_merges": profiles - merges,
    }
    mismatches = {k: {"expected": v, "found": found[k]} for k, v in expected.items() if found[k] != v}
    ok = (
        not mismatches
        and ours == produced  # event_id is the key with the tenant: one row each, none missing
        and unlinked == 0
        and int(pending["pending"]) == 0
        and int(dead) == 0
        and int(resolved) == produced
    )
    return {
        "produced_events": produced,
        "event_links_rows": links,
        "event_links_rows_for_produced_ids": ours,
        "events_without_profile": unlinked,
        "merges": merges,
        "probabilistic_merges": probabilistic,
        "match_suggestions": suggestions,
        "match_records": match_records,  # Identify records stored for matching (0 with matching off)
        "profiles_created": profiles,
        "active_profiles": active,
        "identifiers": identifiers,
        "resolved_stream_entries": int(resolved),
        "pending_left": int(pending["pending"]),
        "dead_letters": int(dead),
        "mismatches": mismatches,
        "ok": ok,
    }


# ---- the run -----------------------------------------------------------------------------------


def start_identity(be: Backends, cfg: Config) -> tuple[ServiceProcess, str]:
    port = free_port()
    env = be.env(
        TESSERA_IDENTITY_PORT=str(port),
        TESSERA_CONSUMER_BATCH_SIZE=str(cfg.consumer_batch_size),
        TESSERA_TENANT_REFRESH_SECONDS="1",
        # no trimming: the resolved stream is the bench's counter
        TESSERA_STREAM_MAXLEN=str(10**10),
        TESSERA_SHUTDOWN_GRACE_SECONDS="5",
    )
    # TESSERA_BENCH_IDENTITY_ARGV runs the worker another way (under a profiler, a timing harness);
    # it must still be `... serve identity` reading the same environment.
    override = os.environ.get("TESSERA_BENCH_IDENTITY_ARGV", "").strip()
    argv = shlex.split(override) if override else serve_argv("identity")
    return spawn("identity", argv, env, be.workdir), f"127.0.0.1:{port}"


def _run(cfg: Config) -> dict[str, Any]:
    started = time.monotonic()
    facts = idle_machine_facts()
    date = utc_now()
    validate_phone_space()
    bodies = event_bodies()
    log.info("%d demo event bodies, %.0f bytes on average", len(bodies), sum(map(len, bodies)) / len(bodies))
    token = run_token()[:8]  # the mix's event ids are UUIDs with these 8 hex digits first
    with backends("identity") as be:
        engine = db.make_engine(be.database_url, application_name="bench", pool_size=2, instrument=False)
        client = connect(be.redis_url)
        try:
            pg_facts = postgres_facts(engine)
            tenant_id = f"bench-{token}"
            tenancy.create_tenant(engine, tenant_id)
            if cfg.matching:  # as UpdateIdentityRules stores it: default rules, matching enabled
                IdentityStore(engine).save_rules(tenant_id, {}, {"enabled": True})
            bus = Bus(client, be.redis_prefix, maxlen=10**10)
            mix = Mix(bodies, token, cfg.seed, matching=cfg.matching)
            mix.check()
            producer = Producer(bus, tenant_id, mix)
            t = time.monotonic()
            producer.preload(cfg.seed_people, "new")
            producer.preload(cfg.backlog)
            preloaded = producer.produced
            log.info("preloaded %d events in %.1fs (%d seed people)", preloaded, time.monotonic() - t, cfg.seed_people)
            watcher = Watcher(be.redis_url, bus, tenant_id, producer)
            watcher.start()
            identity, target = start_identity(be, cfg)
            exit_code: int | None = None
            try:
                drain = drain_phase(cfg, watcher, producer, identity, preloaded)
                _log_phase(drain)
                wait_serving(target, identity, timeout=60, service=IDENTITY_SERVICE)
                sustained = sustained_phase(cfg, watcher, producer, identity)
                _wait_until(
                    watcher,
                    identity,
                    lambda r: r >= producer.produced,
                    _timeout(cfg, producer.produced - watcher.resolved()),
                    "draining after the sustained phase",
                )
                sustained.extra.update(resolve_latency(watcher, producer, sustained.extra.pop("window_ms")))
                _log_phase(sustained)
                check = verify(engine, be.redis_url, bus, tenant_id, mix, producer.produced)
                log.info("correctness: %s", check)
            finally:
                watcher.stop()
                exit_code = identity.stop(15)
            sustained.extra["producer_thread_cpu_s"] = rounded(producer.cpu_s, 2)
        finally:
            client.close()
            engine.dispose()
    return report(cfg, facts, date, be, pg_facts, drain, sustained, mix, check, exit_code, time.monotonic() - started)


def _log_phase(phase: PhaseFigures) -> None:
    f = phase.figures()
    log.info(
        "%s: %s resolved events/s (offered %s), server %s CPU s/1k events, lag p99 %s s",
        phase.name,
        f["resolved_events_per_s"],
        f["offered_events_per_s"],
        f["server_cpu_s_per_1k_events"],
        f["lag"]["lag_seconds_p99"],
    )


def report(
    cfg: Config,
    facts: dict[str, Any],
    date: str,
    be: Backends,
    pg_facts: dict[str, Any],
    drain: PhaseFigures,
    sustained: PhaseFigures,
    mix: Mix,
    check: dict[str, Any],
    exit_code: int | None,
    wall: float,
) -> dict[str, Any]:
    d, s = drain.figures(), sustained.figures()
    c = mix.counts
    sent = c.new + c.known + c.merge
    mixed = sent - cfg.seed_people  # the seed is all new people; the shares describe the rest
    capacity = d["resolved_events_per_s"] or 0.0
    offered = s["offered_events_per_s"] or 0.0
    keeps_up = bool(offered and (s["resolved_events_per_s"] or 0.0) >= KEEPS_UP_RATIO * offered)
    return {
        "scenario": "identity",
        "date": date,
        "machine": facts,
        "servers": {"mode": be.mode, "postgres": pg_facts},
        "config": cfg.as_dict(),
        "workers": 1,
        "results": {"drain": d, "sustained": s},
        "mix": {
            **asdict(c),
            "events": sent,
            "seed_events": cfg.seed_people,
            "new_pct": rounded(100 * (c.new - cfg.seed_people) / mixed, 1),
            "known_pct": rounded(100 * c.known / mixed, 1),
            "merge_pct": rounded(100 * c.merge / mixed, 1),
            "people": mix.people,
            "identifiers": mix.identifiers,
        },
        "targets": {
            "events_per_s_per_worker": TARGET_EVENTS_PER_S,
            "drain_meets": capacity >= TARGET_EVENTS_PER_S,
            "sustained_keeps_up": keeps_up,
            "sustained_offered_at_least_target": offered >= 0.99 * TARGET_EVENTS_PER_S,
            "met": capacity >= TARGET_EVENTS_PER_S and keeps_up and offered >= 0.99 * TARGET_EVENTS_PER_S,
        },
        "correctness": {**check, "identity_exit_code": exit_code},
        "ok": bool(check.get("ok")) and exit_code == 0,
        "wall_seconds": rounded(wall, 1),
    }


def table(rep: dict[str, Any]) -> str:
    m, c, mx = rep["machine"], rep["config"], rep["mix"]
    pg = rep["servers"]["postgres"]
    lines = [
        f"tessera bench identity  {rep['date']}",
        f"machine: {m['cpu_count']} CPUs, {m['cpu_model']}, Python {m['python']}, protobuf {m['protobuf']} "
        f"({m['protobuf_backend']})",
        f"servers: {rep['servers']['mode']}, PostgreSQL {pg.get('server_version')} "
        f"(synchronous_commit={pg.get('synchronous_commit')})",
        f"worker: 1 identity process, consumer batch {c['consumer_batch_size']}, "
        f"probabilistic matching {c.get('probabilistic_matching', 'off')}; "
        f"drain of {c['drain_backlog_events']:,} events after {c['seed_people']:,} seed people; "
        f"sustained {c['sustained_offered_events_per_s']:,.0f} events/s offered, "
        f"{c['warmup_seconds']}s warm-up + {c['seconds']}s measured",
        f"mix: {mx['events']:,} events ({mx['seed_events']:,} seed): new {mx['new_pct']}%, known {mx['known_pct']}%, "
        f"merge {mx['merge_pct']}% after the seed ({mx['people']:,} people)",
        "",
    ]
    head = (
        "phase",
        "resolved ev/s",
        "offered ev/s",
        "lag p50 s",
        "lag p99 s",
        "backlog max",
        "srv CPU s/1k ev",
        "srv cores",
        "pg CPU s/1k ev",
        "other cores",
    )
    rows = [head]
    for name in ("drain", "sustained"):
        f = rep["results"][name]
        rows.append(
            (
                name,
                fmt(f["resolved_events_per_s"], ",.0f"),
                fmt(f["offered_events_per_s"], ",.0f") if name == "sustained" else "(backlog)",
                fmt(f["lag"]["lag_seconds_p50"], ".2f"),
                fmt(f["lag"]["lag_seconds_p99"], ".2f"),
                fmt(f["lag"]["backlog_events_max"], ","),
                fmt(f["server_cpu_s_per_1k_events"], ".3f"),
                fmt(f["server_cpu_cores"], ".2f"),
                fmt(f["postgres_cpu_s_per_1k_events"], ".3f"),
                fmt(f["other_cpu_cores"], ".2f"),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for i, r in enumerate(rows):
        lines.append("  ".join(cell.ljust(widths[j]) if j == 0 else cell.rjust(widths[j]) for j, cell in enumerate(r)))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    s = rep["results"]["sustained"]
    chk, t = rep["correctness"], rep["targets"]
    lines += [
        "",
        f"sustained: append-to-resolved latency p50 {fmt(s['resolve_latency_ms_p50'], '.0f')} ms, "
        f"p99 {fmt(s['resolve_latency_ms_p99'], '.0f')} ms ({s['resolve_latency_events']:,} events); "
        f"machine {fmt(s['machine_cpu_busy_pct'], '.0f')}% busy",
        f"correctness: {chk['event_links_rows_for_produced_ids']:,} event_links rows for {chk['produced_events']:,} "
        f"events, {chk['merges']:,} merges, {chk['active_profiles']:,} active profiles, "
        f"{chk['identifiers']:,} identifiers -> {'OK' if chk['ok'] else 'MISMATCH ' + json.dumps(chk['mismatches'])} "
        f"(pending {chk['pending_left']}, dead letters {chk['dead_letters']}, exit {chk['identity_exit_code']})",
        *(
            [
                f"matching on: {chk['match_records']:,} Identify records stored for matching, "
                f"{chk['probabilistic_merges']:,} probabilistic merges, {chk['match_suggestions']:,} suggestions"
            ]
            if c.get("probabilistic_matching") == "on"
            else []
        ),
        f"target: >= {t['events_per_s_per_worker']:,} events/s per worker: "
        f"{'met' if t['drain_meets'] else 'NOT met'} (drain), "
        f"{'keeps up' if t['sustained_keeps_up'] else 'falls behind'} at the sustained rate -> "
        f"{'MET' if t['met'] else 'NOT MET'}",
    ]
    return "\n".join(lines)


def run(*, seconds: float, as_json: bool, extra: argparse.Namespace) -> int:
    return run_configured(make_config, _run, table, seconds=seconds, extra=extra, as_json=as_json)
