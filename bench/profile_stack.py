"""What the profile benchmarks share: the services as processes on scratch servers, a tenant,
and customers preloaded through the real pipeline (events stream -> identity -> profile)."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import random
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from bench.common import Backends, backends, spawn
from services.core import db, streams, tenancy
from services.core.bus import Bus, connect
from services.core.harness import ServiceProcess, free_port, serve_argv, wait_serving
from tessera.v1 import event_pb2

log = logging.getLogger("bench")
SERVICE_TOKEN = "bench-service-token-0123456789abcdefghij"
GRPC_NAMES = {
    "ingest": "tessera.v1.IngestService",
    "identity": "tessera.v1.IdentityService",
    "profile": "tessera.v1.ProfileService",
}
FIRST = ("Ada", "Grace", "Alan", "Linus", "Maya", "Noor", "Kofi", "Ines", "Yuki", "Omar")
LAST = ("Okafor", "Lovelace", "Hopper", "Turing", "Pauling", "Haddad", "Sato", "Silva", "Mensah", "Kowalski")
REASONS = ("billing", "delivery_delay", "returns", "login", "upgrade")


@dataclass
class Stack:
    targets: dict[str, str]
    processes: dict[str, ServiceProcess] = field(default_factory=dict)


@contextlib.contextmanager
def services(be: Backends, names: Sequence[str], **extra_env: str) -> Iterator[Stack]:
    """Start the named services (in order) as processes; stop them all at the end."""
    ports = {n: free_port() for n in ("ingest", "identity", "profile", "metrics")}
    targets = {n: f"127.0.0.1:{p}" for n, p in ports.items()}
    env = be.env(
        TESSERA_INGEST_PORT=str(ports["ingest"]),
        TESSERA_IDENTITY_PORT=str(ports["identity"]),
        TESSERA_PROFILE_PORT=str(ports["profile"]),
        TESSERA_PROFILE_IDENTITY_ADDRESS=targets["identity"],
        TESSERA_PROFILE_INGEST_ADDRESS=targets["ingest"],
        TESSERA_PROFILE_METRICS_ADDRESS="none",
        TESSERA_SERVICE_TOKEN=SERVICE_TOKEN,
        TESSERA_TENANT_REFRESH_SECONDS="1",
        TESSERA_STREAM_MAXLEN=str(10**10),
        TESSERA_SHUTDOWN_GRACE_SECONDS="5",
        **extra_env,
    )
    stack = Stack({n: targets[n] for n in names})
    try:
        for name in names:
            proc = spawn(name, serve_argv(name), env, be.workdir)
            stack.processes[name] = proc
            wait_serving(targets[name], proc, timeout=60, service=GRPC_NAMES[name])
            log.info("started %s on %s (pid %s)", name, targets[name], proc.pid)
        yield stack
    finally:
        for proc in reversed(list(stack.processes.values())):
            proc.stop(15)


def new_tenant(engine: Engine, label: str) -> tuple[str, str]:
    tenant_id = f"{label}-{uuid.uuid4().hex[:8]}"
    return tenant_id, tenancy.create_tenant(engine, tenant_id)


@dataclass(frozen=True)
class Customer:
    email: str
    phone: str


def customer(n: int) -> Customer:
    # 555-01xx numbers are fictional in every NANP area; 10 area codes x 10^4 lines x 10 prefixes.
    area = (415, 212, 312, 646, 718, 305, 206, 617, 213, 702)[n % 10]
    exchange = 200 + (n // 10) % 700
    line = (n // 7000) % 10_000
    return Customer(f"customer{n}@example.com", f"+1{area}{exchange}{line:04d}")


def customer_events(n: int, c: Customer, now: dt.datetime, rng: random.Random) -> list[event_pb2.Event]:
    """An Identify with traits, and one call (some with an open case)."""
    received = now - dt.timedelta(seconds=rng.randint(60, 20 * 86400))
    ident = event_pb2.Event(
        event_id=str(uuid.uuid4()),
        message_id=f"bench-{n}-identify",
        channel=event_pb2.CHANNEL_WEB,
        source="web-sdk",
        identifiers=[
            event_pb2.Identifier(type="email", value=c.email),
            event_pb2.Identifier(type="phone", value=c.phone),
        ],
    )
    ident.timestamp.FromDatetime(received)
    ident.received_at.FromDatetime(received)
    ident.identify.traits.update(
        {"first_name": FIRST[n % 10], "last_name": LAST[(n // 10) % 10], "plan": ("gold", "silver", "free")[n % 3]}
    )
    call = event_pb2.Event(
        event_id=str(uuid.uuid4()),
        message_id=f"bench-{n}-call",
        channel=event_pb2.CHANNEL_VOICE,
        source="contact-center",
        identifiers=[event_pb2.Identifier(type="phone", value=c.phone)],
    )
    at = received + dt.timedelta(hours=rng.randint(1, 48))
    call.timestamp.FromDatetime(at)
    call.received_at.FromDatetime(at)
    i = call.interaction
    i.interaction_id = f"call-{n}"
    i.direction = event_pb2.DIRECTION_INBOUND
    i.queue = "support"
    i.agent_id = f"agt-{n % 40}"
    i.reason = REASONS[n % 5]
    i.disposition = "resolved" if n % 10 else "follow_up_required"
    i.talk_seconds = float(rng.randint(60, 900))
    i.hold_seconds = float(rng.randint(0, 120))
    i.after_contact_work_seconds = float(rng.randint(10, 90))
    i.started_at.FromDatetime(at)
    if n % 10 == 0:
        i.case_id = f"CS-{n}"
        i.case_status = event_pb2.CASE_STATUS_OPEN
    return [ident, call]


def preload(bus: Bus, tenant_id: str, count: int, seed: int = 7, chunk: int = 2000) -> list[Customer]:
    """Append ``count`` customers' events to the tenant's events stream (as ingest would)."""
    rng = random.Random(seed)
    now = dt.datetime.now(dt.UTC)
    people = [customer(n) for n in range(count)]
    batch: list[bytes] = []
    for n, c in enumerate(people):
        batch.extend(e.SerializeToString() for e in customer_events(n, c, now, rng))
        if len(batch) >= chunk:
            bus.append(tenant_id, streams.EVENTS.name, streams.event_envelopes(tenant_id, "", batch))
            batch = []
    if batch:
        bus.append(tenant_id, streams.EVENTS.name, streams.event_envelopes(tenant_id, "", batch))
    return people


def steady(engine: Engine) -> None:
    """After a bulk preload: VACUUM ANALYZE the schemas the reads use, as autovacuum would soon,
    so it does not start in the middle of a measured phase and plans rest on real statistics."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        tables = conn.execute(
            sa.text(
                "SELECT format('%I.%I', schemaname, relname) FROM pg_stat_user_tables "
                "WHERE schemaname IN ('profile', 'identity')"
            )
        ).scalars()
        for table in list(tables):
            conn.execute(sa.text(f"VACUUM (ANALYZE) {table}"))


def timeline_count(engine: Engine, tenant_id: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text("SELECT count(*) FROM profile.timeline WHERE tenant_id = :t"), {"t": tenant_id}
            ).scalar_one()
        )


def settled(bus: Bus, tenant_id: str) -> bool:
    """Whether identity and profile have read and acknowledged everything on the tenant's streams
    (the changes stream too: a profile's cache moves on when its CREATED change is applied)."""
    return all(
        bus.caught_up(tenant_id, stream, group, bus.last_id(tenant_id, stream))
        for stream, group in (
            (streams.EVENTS.name, "identity"),
            (streams.RESOLVED.name, "profile"),
            (streams.CHANGES.name, "profile"),
        )
    )


def wait_built(
    engine: Engine,
    tenant_id: str,
    events: int,
    timeout: float,
    procs: Sequence[ServiceProcess],
    bus: Bus | None = None,
) -> float:
    """Seconds until profile has recorded ``events`` events of the tenant (and, given ``bus``,
    every stream of the tenant is consumed: the pipeline is idle)."""
    t0 = time.monotonic()
    last_log = t0
    while True:
        seen = timeline_count(engine, tenant_id)
        if seen >= events and (bus is None or settled(bus, tenant_id)):
            return time.monotonic() - t0
        for p in procs:
            if not p.alive():
                raise RuntimeError(f"{p.name} died while the profiles were built; see {p.log_path}")
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"profile built {seen} of {events} events in {timeout:.0f}s")
        if time.monotonic() - last_log > 10:
            log.info("profiles: %d of %d events applied", seen, events)
            last_log = time.monotonic()
        time.sleep(0.5)


@dataclass
class Preloaded:
    """A running stack on scratch servers with one tenant whose customers are built and settled."""

    be: Backends
    stack: Stack
    tenant_id: str
    api_key: str
    people: list[Customer]
    build_seconds: float

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.api_key}"),)


@contextlib.contextmanager
def preloaded(label: str, names: Sequence[str], profiles: int) -> Iterator[Preloaded]:
    """Scratch servers, the named services, a tenant and ``profiles`` customers through the
    pipeline, every stream consumed and the tables analyzed: what a profile bench measures on."""
    with backends(label) as be:
        engine = db.make_engine(be.database_url, application_name="bench", pool_size=2, instrument=False)
        client = connect(be.redis_url)
        try:
            tenant_id, api_key = new_tenant(engine, label[:5])
            bus = Bus(client, be.redis_prefix, maxlen=10**10)
            with services(be, names) as stack:
                t = time.monotonic()
                people = preload(bus, tenant_id, profiles)
                wait_built(engine, tenant_id, 2 * profiles, 3600, list(stack.processes.values()), bus)
                steady(engine)
                yield Preloaded(be, stack, tenant_id, api_key, people, time.monotonic() - t)
        finally:
            client.close()
            engine.dispose()
