"""``tessera bench metrics``: the metrics consumer's throughput on a quarter of CX events, and the
latency of a 90-day daily series by channel from the rollups, beside the same figures computed
from the raw facts in PostgreSQL in the same run.

The events (interaction legs, transfers and abandons, chat messages, surveys) go straight onto
the tenant's resolved stream, stamped with their customer as identity would, in time order with
a little jitter (late events), so the run measures the metrics consumer alone: one process with
one worker. Knobs: ``TESSERA_BENCH_METRICS_EVENTS`` (default 1,000,000),
``TESSERA_BENCH_METRICS_CONSUMERS`` (consumer threads in that process, default 1),
``TESSERA_BENCH_METRICS_CUSTOMERS`` (default 60,000), ``TESSERA_BENCH_METRICS_QUERIES`` (200).
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import random
import statistics
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from bench.common import (
    CpuGroup,
    backends,
    env_int,
    machine_facts,
    percentile,
    proc_cpu,
    run_configured,
    spawn,
)
from services.core import db, streams, tenancy
from services.core.bus import Bus, connect
from services.core.harness import free_port, serve_argv, wait_serving
from tessera.v1 import event_pb2, metrics_pb2, metrics_pb2_grpc, stream_pb2

log = logging.getLogger("bench")
DAYS = 90
CHANNELS = (event_pb2.CHANNEL_VOICE, event_pb2.CHANNEL_CHAT, event_pb2.CHANNEL_EMAIL, event_pb2.CHANNEL_SMS)
QUEUES = ("billing", "tech", "sales", "retention")
REASONS = ("billing", "delivery", "returns", "login", "upgrade", "cancel")
LINES = (
    "I still have not received my refund and it has been two weeks",
    "thanks, that fixed it, great help!",
    "why is this so complicated, I am really annoyed",
    "ok",
    "can you check order 55120 for me",
    "perfect, appreciate it",
)
QUERY_METRICS = ["contact_volume", "aht_seconds", "nps", "csat", "fcr"]


@dataclass(frozen=True)
class Config:
    events: int
    customers: int
    queries: int
    #: Consumer threads in the one metrics process (``TESSERA_METRICS_CONSUMERS``).
    consumers: int = 1

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_config(_seconds: float, _extra: argparse.Namespace) -> Config:
    return Config(
        events=env_int("TESSERA_BENCH_METRICS_EVENTS", 1_000_000),
        customers=env_int("TESSERA_BENCH_METRICS_CUSTOMERS", 60_000),
        queries=env_int("TESSERA_BENCH_METRICS_QUERIES", 200),
        consumers=env_int("TESSERA_BENCH_METRICS_CONSUMERS", 1),
    )


def _stamp(ev: event_pb2.Event, n: int, at: dt.datetime, profile: str, channel: int) -> None:
    ev.event_id = f"ev-{n}"
    ev.message_id = f"m-{n}"
    ev.profile_id = profile
    ev.channel = channel  # type: ignore[assignment]
    ev.source = "genesys" if channel == event_pb2.CHANNEL_VOICE else "zendesk"
    ev.timestamp.FromDatetime(at)
    ev.received_at.FromDatetime(at)


def contacts(cfg: Config, tenant_id: str, end: dt.datetime, seed: int = 5) -> list[tuple[dt.datetime, bytes]]:
    """``cfg.events`` events of ``cfg.customers`` customers over 90 days, as resolved envelopes with
    their arrival time (a few arrive late)."""
    rng = random.Random(seed)

    def _envelope(ev: event_pb2.Event) -> bytes:
        return stream_pb2.ResolvedEventEnvelope(tenant_id=tenant_id, event=ev).SerializeToString()

    profiles = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(cfg.customers)]
    start = end - dt.timedelta(days=DAYS)
    out: list[tuple[dt.datetime, bytes]] = []
    n = 0
    span = DAYS * 86_400
    while n < cfg.events:
        profile = rng.choice(profiles)
        channel = rng.choices(CHANNELS, weights=(5, 4, 2, 1))[0]
        at = start + dt.timedelta(seconds=rng.random() * span)
        iid = f"c{n}"
        reason = rng.choice(REASONS)
        queue = rng.choice(QUEUES)
        legs = 2 if rng.random() < 0.12 else 1
        abandoned = rng.random() < 0.06
        t = at
        for leg in range(legs):
            ev = event_pb2.Event()
            _stamp(ev, n, t, profile, channel)
            i = ev.interaction
            i.interaction_id, i.leg_id, i.queue, i.reason = iid, f"{iid}-{leg}", queue, reason
            i.started_at.FromDatetime(t)
            i.wait_seconds = rng.expovariate(1 / 25)
            if abandoned:
                i.abandoned = True
            else:
                i.agent_id = f"agent-{rng.randrange(60)}"
                i.talk_seconds = rng.lognormvariate(5.5, 0.6)
                i.hold_seconds = rng.expovariate(1 / 20)
                i.after_contact_work_seconds = rng.expovariate(1 / 45)
                i.transferred = leg < legs - 1
            i.case_id = f"case-{profile[:8]}-{reason}"
            i.case_status = rng.choice((event_pb2.CASE_STATUS_OPEN, event_pb2.CASE_STATUS_RESOLVED))  # type: ignore[assignment]
            out.append((t, _envelope(ev)))
            n += 1
            t += dt.timedelta(seconds=i.talk_seconds + 5)
        if channel in (event_pb2.CHANNEL_CHAT, event_pb2.CHANNEL_SMS):
            for k in range(rng.randrange(2, 7)):
                ev = event_pb2.Event()
                _stamp(ev, n, at + dt.timedelta(seconds=20 * k), profile, channel)
                m = ev.message
                m.interaction_id = iid
                m.author = event_pb2.AUTHOR_BOT if k == 0 else rng.choice((1, 2))  # type: ignore[assignment]
                m.text = rng.choice(LINES)
                out.append((at + dt.timedelta(seconds=20 * k), _envelope(ev)))
                n += 1
        if not abandoned and rng.random() < 0.3:
            ev = event_pb2.Event()
            late = t + dt.timedelta(hours=rng.random() * 48)
            _stamp(ev, n, late, profile, event_pb2.CHANNEL_EMAIL)
            s = ev.survey_response
            s.type = rng.choice((1, 2, 3))  # type: ignore[assignment]
            s.score = rng.randint(0 if s.type == 1 else 1, {1: 10, 2: 5, 3: 7}[s.type])
            s.interaction_id = iid
            ev.source = rng.choice(("qualtrics", "ivr-survey"))
            out.append((late, _envelope(ev)))
            n += 1
    # Arrival order: by time, with one event in 50 arriving up to a day late.
    keyed = [
        (t + (dt.timedelta(hours=rng.random() * 24) if rng.random() < 0.02 else dt.timedelta()), b) for t, b in out
    ]
    keyed.sort(key=lambda x: x[0])
    return keyed[: cfg.events]


def _ts(t: dt.datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(t)
    return out


RAW_SQL = """
WITH legs AS (
    SELECT interaction_id, coalesce(started_at, at) AS started, channel, talk + hold + acw AS handle,
           agent <> '' AND NOT abandoned AS handled
    FROM metrics.facts WHERE tenant_id = %(t)s AND kind = 1 AND at >= %(lo)s AND at < %(hi)s
), firsts AS (
    SELECT DISTINCT ON (interaction_id) interaction_id, channel, date_trunc('day', started) AS day
    FROM legs ORDER BY interaction_id, started
), surveys AS (
    SELECT date_trunc('day', s.at) AS day, coalesce(f.channel, s.channel) AS channel, s.survey_type, s.score
    FROM metrics.facts s LEFT JOIN firsts f USING (interaction_id)
    WHERE s.tenant_id = %(t)s AND s.kind = 2 AND s.at >= %(lo)s AND s.at < %(hi)s
)
SELECT f.day, f.channel, count(DISTINCT l.interaction_id), avg(l.handle) FILTER (WHERE l.handled), NULL, NULL
FROM legs l JOIN firsts f USING (interaction_id) GROUP BY 1, 2
UNION ALL
SELECT day, channel, NULL, NULL,
       100.0 * (count(*) FILTER (WHERE survey_type = 1 AND score >= 9)
                - count(*) FILTER (WHERE survey_type = 1 AND score <= 6))
         / nullif(count(*) FILTER (WHERE survey_type = 1), 0),
       100.0 * count(*) FILTER (WHERE survey_type = 2 AND score >= 4)
         / nullif(count(*) FILTER (WHERE survey_type = 2), 0)
FROM surveys GROUP BY 1, 2
"""


def _run(cfg: Config) -> dict[str, Any]:
    with backends("metrics") as be:
        engine = db.make_engine(be.database_url, application_name="bench", instrument=False)
        tenant_id = f"metrics-{uuid.uuid4().hex[:8]}"
        api_key = tenancy.create_tenant(engine, tenant_id)
        end = dt.datetime.now(dt.UTC).replace(microsecond=0)
        t0 = time.monotonic()
        events = contacts(cfg, tenant_id, end)
        gen_s = time.monotonic() - t0
        bus = Bus(connect(be.redis_url), be.redis_prefix)
        for i in range(0, len(events), 5000):
            bus.append(tenant_id, streams.RESOLVED.name, [b for _, b in events[i : i + 5000]])
        mark = bus.last_id(tenant_id, streams.RESOLVED.name)
        log.info("%d events generated in %.0fs and on the resolved stream", len(events), gen_s)
        port = free_port()
        env = be.env(
            TESSERA_METRICS_PORT=str(port),
            TESSERA_METRICS_CONSUMERS=str(cfg.consumers),
            TESSERA_TENANT_REFRESH_SECONDS="1",
            TESSERA_STREAM_MAXLEN=str(10**10),
            TESSERA_CONSUMER_BATCH_SIZE="1000",
        )
        postgres = CpuGroup(("postgres",))
        postgres.start()
        proc = spawn("metrics", serve_argv("metrics"), env, be.workdir)
        try:
            target = f"127.0.0.1:{port}"
            wait_serving(target, proc, 60, "tessera.v1.MetricsService")
            started = time.monotonic()
            cpu0 = proc_cpu(proc.pid or 0)
            last = started
            while not bus.caught_up(tenant_id, streams.RESOLVED.name, "metrics", mark):
                if not proc.alive():
                    raise RuntimeError(f"metrics died; see {proc.log_path}")
                if time.monotonic() - last > 15:
                    log.info("consuming ... %.0fs", time.monotonic() - started)
                    last = time.monotonic()
                time.sleep(0.2)
            consume_s = time.monotonic() - started
            consumer_cpu = proc_cpu(proc.pid or 0) - cpu0
            pg_cpu = postgres.stop()
            log.info("consumed %d events in %.1fs (%.0f/s)", len(events), consume_s, len(events) / consume_s)
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.exec_driver_sql("VACUUM (ANALYZE) metrics.rollup_day")
                conn.exec_driver_sql("VACUUM (ANALYZE) metrics.facts")
            rollup, raw = _queries(cfg, target, api_key, engine, tenant_id, end)
        finally:
            proc.stop(15)
        return {
            "scenario": "metrics",
            "config": cfg.as_dict(),
            "machine": machine_facts(),
            "events": len(events),
            "generate_seconds": round(gen_s, 1),
            "consume_seconds": round(consume_s, 1),
            "events_per_second": round(len(events) / consume_s),
            "consumer_cpu_ms_per_event": round(consumer_cpu / len(events) * 1000, 3),
            "postgres_cpu_ms_per_event": round(pg_cpu / len(events) * 1000, 3),
            "query": rollup,
            "raw_query": raw,
            "targets": {"events_per_second": 5000, "query_p50_ms": 50},
            "ok": len(events) / consume_s >= 5000 and rollup["p50_ms"] <= 50,
        }


def _queries(
    cfg: Config, target: str, api_key: str, engine: Any, tenant_id: str, end: dt.datetime
) -> tuple[dict[str, Any], dict[str, Any]]:
    start = end - dt.timedelta(days=DAYS)
    req = metrics_pb2.QueryMetricsRequest(
        metrics=QUERY_METRICS,
        start_time=_ts(start),
        end_time=_ts(end),
        granularity=metrics_pb2.GRANULARITY_DAY,
        group_by=["channel"],
    )
    md = (("authorization", f"Bearer {api_key}"),)
    latencies = []
    with grpc.insecure_channel(target) as channel:
        stub = metrics_pb2_grpc.MetricsServiceStub(channel)
        resp = stub.QueryMetrics(req, metadata=md, timeout=30)
        points = sum(len(s.points) for s in resp.series)
        for _ in range(cfg.queries):
            t = time.perf_counter()
            stub.QueryMetrics(req, metadata=md, timeout=30)
            latencies.append((time.perf_counter() - t) * 1000)
    latencies.sort()
    raw_times = []
    with db.raw_transaction(engine, "bench.raw") as (cur, _):
        for _ in range(max(3, cfg.queries // 40)):
            t = time.perf_counter()
            cur.execute(RAW_SQL, {"t": tenant_id, "lo": start, "hi": end})
            rows = cur.fetchall()
            raw_times.append((time.perf_counter() - t) * 1000)
    raw_times.sort()
    return (
        {
            "metrics": QUERY_METRICS,
            "series": len(resp.series),
            "points": points,
            "calls": len(latencies),
            "p50_ms": round(percentile(latencies, 0.5), 2),
            "p99_ms": round(percentile(latencies, 0.99), 2),
        },
        {
            "what": "contact volume, AHT, NPS and CSAT by day and channel (no FCR) from metrics.facts in SQL",
            "rows": len(rows),
            "calls": len(raw_times),
            "p50_ms": round(statistics.median(raw_times), 1),
            "max_ms": round(raw_times[-1], 1),
        },
    )


def table(rep: dict[str, Any]) -> str:
    q, raw = rep["query"], rep["raw_query"]
    lines = [
        f"tessera bench metrics: {rep['events']:,} events over {DAYS} days, one consumer process",
        "",
        f"{'consumer throughput':<44}{rep['events_per_second']:>10,} events/s   (target >= 5,000)",
        f"{'consumer CPU / PostgreSQL CPU per event':<44}{rep['consumer_cpu_ms_per_event']:>7.3f} / "
        f"{rep['postgres_cpu_ms_per_event']:.3f} ms",
        f"{'90-day daily series by channel, p50 / p99':<44}{q['p50_ms']:>7.2f} / {q['p99_ms']:.2f} ms"
        f"   (target p50 <= 50; {q['series']} series, {q['points']} points)",
        f"{'same figures from the raw facts in SQL, p50':<44}{raw['p50_ms']:>7.1f} ms",
        "",
        "ok" if rep["ok"] else "TARGET MISSED",
    ]
    return "\n".join(lines)


def run(*, seconds: float, as_json: bool, extra: argparse.Namespace) -> int:
    return run_configured(make_config, _run, table, seconds=seconds, extra=extra, as_json=as_json)
