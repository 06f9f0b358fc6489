"""``tessera bench freshness``: how long from ingest's acknowledgement of an event until
``GetCustomerContext`` shows it, while the pipeline carries a sustained load.

1. Scratch PostgreSQL and Redis; ingest, identity and profile as processes (the real pipeline:
   ingest -> events stream -> identity -> resolved stream -> profile -> context cache).
2. ``TESSERA_BENCH_PROFILES`` customers (10,000) preloaded, so events land on known profiles.
3. For ``--seconds``: a loader offers ``TESSERA_BENCH_RATE`` events/s (1,000) through
   ``IngestEvents`` in batches of 20 on a fixed schedule (track events by email, calls by phone,
   for random customers). Beside it, probe threads each pick a customer, send one Identify with a
   unique ``freshness_probe`` trait, and from the moment ingest acknowledges it, ask for the
   customer's context by phone every ``POLL_MS`` until the trait is there.
4. Targets: freshness p50 at most 100 ms and p99 at most 1 s, with the load offered in full.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import grpc

from bench.common import env_int, fmt, idle_machine_facts, percentile, rounded, run_configured, utc_now
from bench.profile_stack import Customer, preloaded
from tessera.v1 import event_pb2, ingest_pb2, ingest_pb2_grpc, profile_pb2, profile_pb2_grpc

BATCH = 20
POLL_MS = 5
PROBE_THREADS = 2
PROBE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Config:
    seconds: float
    profiles: int
    rate: int


def make_config(seconds: float, _extra: argparse.Namespace) -> Config:
    return Config(
        seconds=seconds,
        profiles=env_int("TESSERA_BENCH_PROFILES", 10_000),
        rate=env_int("TESSERA_BENCH_RATE", 1000),
    )


def _event(c: Customer, rng: random.Random) -> event_pb2.Event:
    ev = event_pb2.Event(message_id=f"load-{uuid.uuid4().hex}", source="bench")
    if rng.random() < 0.7:
        ev.channel = event_pb2.CHANNEL_WEB
        ev.identifiers.append(event_pb2.Identifier(type="email", value=c.email))
        ev.track.event = rng.choice(("Viewed Product", "Added to Cart", "Order Completed"))
        ev.properties.update({"sku": f"sku-{rng.randint(1, 500)}", "price": rng.randint(5, 300)})
    else:
        ev.channel = event_pb2.CHANNEL_VOICE
        ev.identifiers.append(event_pb2.Identifier(type="phone", value=c.phone))
        i = ev.interaction
        i.interaction_id = f"call-{uuid.uuid4().hex[:12]}"
        i.direction = event_pb2.DIRECTION_INBOUND
        i.queue = "support"
        i.agent_id = f"agt-{rng.randint(1, 40)}"
        i.reason = rng.choice(("billing", "delivery_delay", "returns"))
        i.disposition = "resolved"
        i.talk_seconds = float(rng.randint(60, 900))
    ev.timestamp.FromDatetime(dt.datetime.now(dt.UTC))
    if ev.HasField("interaction"):
        ev.interaction.started_at.CopyFrom(ev.timestamp)
    return ev


class Load:
    """Offers ``rate`` events/s on a fixed schedule (batches of ``BATCH``) until stopped."""

    def __init__(self, target: str, metadata: tuple[tuple[str, str], ...], people: list[Customer], rate: int) -> None:
        self.stub = ingest_pb2_grpc.IngestServiceStub(grpc.insecure_channel(target))
        self.metadata = metadata
        self.people = people
        self.interval = BATCH / rate
        self.offered = 0
        self.accepted = 0
        self.errors: list[str] = []
        self.behind_s = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        rng = random.Random(11)
        next_at = time.monotonic()
        while not self.stop.is_set():
            batch = [_event(rng.choice(self.people), rng) for _ in range(BATCH)]
            self.offered += BATCH
            try:
                resp = self.stub.IngestEvents(
                    ingest_pb2.IngestEventsRequest(events=batch), metadata=self.metadata, timeout=10
                )
                self.accepted += resp.accepted_count
            except grpc.RpcError as err:
                if len(self.errors) < 5:
                    self.errors.append(f"{err.code().name}: {err.details()}")
            next_at += self.interval
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                self.behind_s = max(self.behind_s, -delay)


class Probes:
    """Each thread: an Identify with a unique trait, then polls the context until it shows it."""

    def __init__(
        self, ingest: str, profile: str, metadata: tuple[tuple[str, str], ...], people: list[Customer]
    ) -> None:
        self.ingest = ingest_pb2_grpc.IngestServiceStub(grpc.insecure_channel(ingest))
        self.profile = profile_pb2_grpc.ProfileServiceStub(grpc.insecure_channel(profile))
        self.metadata = metadata
        self.people = people
        self.latencies: list[float] = []
        self.polls = 0
        self.timeouts = 0
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def _shows(self, phone: str, marker: str) -> bool:
        self.polls += 1
        ctx = self.profile.GetCustomerContext(
            profile_pb2.GetCustomerContextRequest(identifier=event_pb2.Identifier(type="phone", value=phone)),
            metadata=self.metadata,
            timeout=5,
        )
        return any(t.key == "freshness_probe" and t.value.string_value == marker for t in ctx.profile.traits)

    def run(self, n: int) -> None:
        rng = random.Random(100 + n)
        while not self.stop.is_set():
            c = rng.choice(self.people)
            marker = uuid.uuid4().hex
            ev = event_pb2.Event(message_id=f"probe-{marker}", source="bench-probe", channel=event_pb2.CHANNEL_WEB)
            ev.identifiers.extend(
                [event_pb2.Identifier(type="email", value=c.email), event_pb2.Identifier(type="phone", value=c.phone)]
            )
            ev.identify.traits.update({"freshness_probe": marker})
            ev.timestamp.FromDatetime(dt.datetime.now(dt.UTC))
            try:
                resp = self.ingest.IngestEvents(
                    ingest_pb2.IngestEventsRequest(events=[ev]), metadata=self.metadata, timeout=10
                )
                acked = time.perf_counter()
                if resp.accepted_count != 1:
                    raise RuntimeError(f"the probe was not accepted: {resp.results[0]}")
                while not self._shows(c.phone, marker):
                    if time.perf_counter() - acked > PROBE_TIMEOUT_S:
                        with self.lock:
                            self.timeouts += 1
                        break
                    time.sleep(POLL_MS / 1000)
                else:
                    with self.lock:
                        self.latencies.append((time.perf_counter() - acked) * 1000)
            except (grpc.RpcError, RuntimeError) as err:
                with self.lock:
                    if len(self.errors) < 5:
                        self.errors.append(str(err)[:200])
            time.sleep(rng.uniform(0.05, 0.15))


def produce(cfg: Config) -> dict[str, Any]:
    started = time.monotonic()
    facts = idle_machine_facts()
    date = utc_now()
    with preloaded("freshness", ["ingest", "identity", "profile"], cfg.profiles) as run:
        be, stack, metadata, people = run.be, run.stack, run.metadata, run.people
        build_s = run.build_seconds
        load = Load(stack.targets["ingest"], metadata, people, cfg.rate)
        probes = Probes(stack.targets["ingest"], stack.targets["profile"], metadata, people)
        threads = [threading.Thread(target=load.run)]
        threads += [threading.Thread(target=probes.run, args=(n,)) for n in range(PROBE_THREADS)]
        t0 = time.monotonic()
        for th in threads:
            th.start()
        time.sleep(cfg.seconds)
        load.stop.set()
        probes.stop.set()
        for th in threads:
            th.join(timeout=PROBE_TIMEOUT_S + 15)
        window = time.monotonic() - t0
    lat = sorted(probes.latencies)
    offered_rate = load.offered / window
    targets = {
        "p50_at_most_100_ms": bool(lat) and percentile(lat, 50) <= 100,
        "p99_at_most_1_s": bool(lat) and percentile(lat, 99) <= 1000 and probes.timeouts == 0,
        "load_offered_in_full": offered_rate >= 0.95 * cfg.rate,
    }
    errors = len(load.errors) + len(probes.errors)
    return {
        "scenario": "freshness",
        "date": date,
        "machine": facts,
        "config": {
            "profiles": cfg.profiles,
            "rate_events_per_s": cfg.rate,
            "batch": BATCH,
            "probe_threads": PROBE_THREADS,
            "poll_ms": POLL_MS,
            "seconds": cfg.seconds,
            "servers": be.mode,
        },
        "preload_seconds": rounded(build_s, 1),
        "load": {
            "offered": load.offered,
            "accepted": load.accepted,
            "offered_per_s": rounded(offered_rate, 1),
            "max_behind_schedule_s": rounded(load.behind_s, 3),
            "errors": load.errors,
        },
        "freshness_ms": {
            "probes": len(lat),
            "p50": rounded(percentile(lat, 50)) if lat else None,
            "p90": rounded(percentile(lat, 90)) if lat else None,
            "p99": rounded(percentile(lat, 99)) if lat else None,
            "max": rounded(lat[-1]) if lat else None,
            "timeouts": probes.timeouts,
            "context_polls": probes.polls,
            "errors": probes.errors,
        },
        "targets": targets,
        "errors": errors,
        "ok": errors == 0 and all(targets.values()),
        "wall_seconds": rounded(time.monotonic() - started, 1),
    }


def table(rep: dict[str, Any]) -> str:
    cfg, f, ld = rep["config"], rep["freshness_ms"], rep["load"]
    return "\n".join(
        [
            f"tessera bench freshness  {rep['date']}",
            f"machine: {rep['machine'].get('cpu_count')} CPUs, {rep['machine'].get('cpu_model', '')}",
            f"{cfg['profiles']:,} profiles; {cfg['rate_events_per_s']:,} events/s offered through ingest in batches "
            f"of {cfg['batch']} for {cfg['seconds']:g} s; {cfg['probe_threads']} probe threads polling every "
            f"{cfg['poll_ms']} ms",
            "",
            f"load: {ld['offered']:,} offered ({fmt(ld['offered_per_s'], ',.0f')}/s), {ld['accepted']:,} accepted, "
            f"at most {fmt(ld['max_behind_schedule_s'], '.3f')} s behind schedule",
            f"ack -> context shows it: {f['probes']} probes  p50 {fmt(f['p50'], '.1f')} ms  p90 {fmt(f['p90'], '.1f')} "
            f"ms  p99 {fmt(f['p99'], '.1f')} ms  max {fmt(f['max'], '.1f')} ms  timeouts {f['timeouts']}",
            f"targets: {rep['targets']}",
        ]
    )


def run(*, seconds: float, as_json: bool, extra: argparse.Namespace) -> int:
    return run_configured(make_config, produce, table, seconds=seconds, extra=extra, as_json=as_json)
