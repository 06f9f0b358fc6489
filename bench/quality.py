"""``tessera bench quality``: automated evaluation throughput per worker, and the latency from an
interaction's last event to its evaluation under a steady live load.

Throughput: ``TESSERA_BENCH_QUALITY_INTERACTIONS`` ended interactions (default 100,000) with
``TESSERA_BENCH_QUALITY_MESSAGES`` messages each (default 20), written straight into the metrics
tables by COPY (a setup shortcut: the consumer's own path is measured by ``tessera bench metrics``),
then one form of 20 questions over 30 categories evaluates all of them in this process, through
the same code the consumer runs (``QualityStore.reevaluate``).

Latency: a metrics server process with one consumer, and one alert rule (a category the customer
says in most interactions); interactions (their messages, then the leg
that ends them) go onto the tenant's resolved stream at ``TESSERA_BENCH_QUALITY_RATE`` per second
(default 100) for ``--seconds``; the latency of each is its evaluation's commit time minus the
time its last event was appended.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import logging
import random
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from bench.common import CpuGroup, backends, env_int, machine_facts, percentile, proc_cpu, run_configured, spawn
from services.core import db, streams, tenancy
from services.core.bus import Bus, connect
from services.core.harness import free_port, serve_argv, wait_serving
from services.metrics.categories import validate as validate_category
from services.metrics.facts import sentiment
from services.metrics.forms import validate as validate_form
from services.metrics.quality_storage import QualityStore
from services.metrics.tenant_settings import MetricsConfig
from tessera.v1 import event_pb2, quality_pb2, stream_pb2

log = logging.getLogger("bench")
CUSTOMER_LINES = (
    "I still have not received my refund and it has been two weeks",
    "thanks, that fixed it, great help!",
    "why is this so complicated, I am really annoyed",
    "ok",
    "can you check order 55120 for me",
    "I want to cancel my account",
    "this is the third time I am calling about this",
)
AGENT_LINES = (
    "Hello, thank you for contacting Acme, my name is Sam",
    "I am sorry to hear that, let me check your account",
    "Could you confirm your date of birth for verification?",
    "I have issued the refund, it takes 3 to 5 days",
    "Is there anything else I can help you with?",
    "Thank you for calling, have a great day",
    "Please hold while I check",
)
TOPICS = (
    "refund*",
    "cancel*",
    "{supervisor|manager}",
    "{lawyer|attorney}",
    "complicated",
    "annoyed",
    "third time",
    "order *",
    "account",
    "delivery",
    "late",
    "broken",
    "password",
    "login",
    "invoice",
)


@dataclass(frozen=True)
class Config:
    interactions: int
    messages: int
    rate: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_config(seconds: float, _extra: argparse.Namespace) -> Config:
    return Config(
        interactions=env_int("TESSERA_BENCH_QUALITY_INTERACTIONS", 100_000),
        messages=env_int("TESSERA_BENCH_QUALITY_MESSAGES", 20),
        rate=env_int("TESSERA_BENCH_QUALITY_RATE", 100),
        seconds=seconds,
    )


def categories() -> dict[str, quality_pb2.Category]:
    """30 categories: 15 topics the customer raises, and 15 agent behaviours, some negated and
    some limited to the first or last messages."""
    out: dict[str, quality_pb2.Category] = {}
    for i, topic in enumerate(TOPICS):
        out[f"topic-{i}"] = quality_pb2.Category(
            rules=[quality_pb2.CategoryRule(phrases=[topic], participant=quality_pb2.PARTICIPANT_CUSTOMER)]
        )
    agent = quality_pb2.PARTICIPANT_AGENT
    first, last = quality_pb2.TRANSCRIPT_WINDOW_FIRST_MESSAGES, quality_pb2.TRANSCRIPT_WINDOW_LAST_MESSAGES
    behaviours = [
        (["{hello|hi|good morning}"], first, 3, False),
        (["thank you for {calling|contacting}"], first, 3, False),
        (["my name is *"], first, 3, False),
        (["anything else"], last, 4, False),
        (["have a {great|nice|good} day"], last, 3, False),
        (["date of birth", "verification", "confirm your *"], 0, 0, False),
        (["sorry"], 0, 0, False),
        (["{stupid|idiot|shut up}"], 0, 0, True),
        (["not my problem"], 0, 0, True),
        (["please hold"], 0, 0, False),
        (["refund*"], 0, 0, False),
        (["days"], 0, 0, False),
        (["{transfer|escalat*}"], 0, 0, False),
        (["let me check"], 0, 0, False),
        (["account"], 0, 0, False),
    ]
    for i, (phrases, window, size, negate) in enumerate(behaviours):
        out[f"agent-{i}"] = quality_pb2.Category(
            rules=[
                quality_pb2.CategoryRule(
                    phrases=phrases,
                    participant=agent,
                    window=window,  # type: ignore[arg-type]
                    window_size=size,
                    negate=negate,
                )
            ]
        )
    return out


def form(names: list[str]) -> quality_pb2.EvaluationForm:
    """20 questions: 15 from categories, the rest from contact facts, sentiment and outcomes."""
    yes_no = quality_pb2.QUESTION_TYPE_YES_NO
    numeric = quality_pb2.QUESTION_TYPE_NUMERIC
    questions = [
        quality_pb2.FormQuestion(
            question_id=f"q-{n}",
            text=n,
            weight=5,
            type=yes_no,
            automatic=quality_pb2.AutomaticAnswer(category=f"categories/{n}"),
        )
        for n in names[15:30]
    ]
    ranges = [quality_pb2.NumericRange(max=60, points=100), quality_pb2.NumericRange(min=60, points=0)]
    questions += [
        quality_pb2.FormQuestion(
            question_id="hold",
            text="hold",
            weight=5,
            type=numeric,
            ranges=ranges,
            automatic=quality_pb2.AutomaticAnswer(fact=quality_pb2.CONTACT_FACT_HOLD_SECONDS),
        ),
        quality_pb2.FormQuestion(
            question_id="transfer",
            text="transfer",
            weight=5,
            type=yes_no,
            automatic=quality_pb2.AutomaticAnswer(fact=quality_pb2.CONTACT_FACT_TRANSFERRED),
        ),
        quality_pb2.FormQuestion(
            question_id="sentiment",
            text="sentiment",
            weight=5,
            type=numeric,
            ranges=[quality_pb2.NumericRange(max=-0.05, points=0), quality_pb2.NumericRange(min=-0.05, points=100)],
            automatic=quality_pb2.AutomaticAnswer(sentiment=quality_pb2.SENTIMENT_MEASURE_OVERALL),
            allow_not_applicable=True,
        ),
        quality_pb2.FormQuestion(
            question_id="trend",
            text="trend",
            weight=5,
            type=numeric,
            ranges=[quality_pb2.NumericRange(max=0, points=0), quality_pb2.NumericRange(min=0, points=100)],
            automatic=quality_pb2.AutomaticAnswer(sentiment=quality_pb2.SENTIMENT_MEASURE_TREND),
            allow_not_applicable=True,
        ),
        quality_pb2.FormQuestion(
            question_id="repeat",
            text="repeat",
            weight=5,
            type=yes_no,
            options=[quality_pb2.AnswerOption(value="yes", points=0), quality_pb2.AnswerOption(value="no", points=100)],
            automatic=quality_pb2.AutomaticAnswer(outcome=quality_pb2.OUTCOME_REPEAT_CONTACT),
        ),
    ]
    return quality_pb2.EvaluationForm(
        display_name="Bench form",
        sections=[quality_pb2.FormSection(section_id="all", title="All", weight=100, questions=questions)],
    )


def _copy(cur: Any, table: str, columns: str, rows: list[str]) -> None:
    cur.copy_expert(f"COPY metrics.{table} ({columns}) FROM STDIN", io.StringIO("".join(rows)))


def _load(engine: Any, tenant_id: str, cfg: Config, end: dt.datetime, rng: random.Random) -> None:
    """The interactions' legs and transcripts, straight into the tables by COPY."""
    scores = {text: sentiment(text) for text in CUSTOMER_LINES}
    profiles = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(max(1, cfg.interactions // 5))]
    batch = 5_000
    for start in range(0, cfg.interactions, batch):
        legs, msgs = [], []
        for n in range(start, min(cfg.interactions, start + batch)):
            iid, pid = f"c{n}", rng.choice(profiles)
            at = end - dt.timedelta(seconds=rng.random() * 30 * 86_400)
            ended = at + dt.timedelta(minutes=8)
            hold = rng.expovariate(1 / 40)
            legs.append(
                f"{tenant_id}\tleg:{iid}:{iid}\t1\tev-{n}\t{pid}\t{ended.isoformat()}\t2\tzendesk\t{iid}\tbilling\t"
                f"agent-{n % 50}\t{rng.choice(('billing', 'delivery', 'login'))}\t\t0\t{at.isoformat()}\t300.0\t"
                f"{hold!r}\t30.0\t10.0\t{'t' if rng.random() < 0.1 else 'f'}\tf\t{iid}\t0\t\\N\t0\t0.0\t"
                f"{ended.isoformat()}\tteam-{n % 5}\n"
            )
            for k in range(cfg.messages):
                customer = k % 2 == 1
                text = rng.choice(CUSTOMER_LINES if customer else AGENT_LINES)
                author = 1 if customer else 2
                compound = scores[text] if customer else 0.0
                t = at + dt.timedelta(seconds=20 * k)
                msgs.append(
                    f"{tenant_id}\tm{n}-{k}\t{iid}\t{pid}\t{t.isoformat()}\t{20.0 * k}\t"
                    f"{author}\t{compound!r}\t{text}\n"
                )
        with db.raw_transaction(engine, "bench.load") as (cur, _):
            cur.copy_expert("COPY metrics.facts FROM STDIN", io.StringIO("".join(legs)))
            _copy(
                cur,
                "messages",
                "tenant_id, event_id, interaction_id, profile_id, at, offset_seconds, author, compound, text",
                msgs,
            )


def _throughput(engine: Any, cfg: Config, end: dt.datetime) -> dict[str, Any]:
    tenant_id = f"quality-{uuid.uuid4().hex[:8]}"
    tenancy.create_tenant(engine, tenant_id)
    rng = random.Random(7)
    t0 = time.monotonic()
    _load(engine, tenant_id, cfg, end, rng)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM (ANALYZE) metrics.facts")  # as autovacuum would after a load
        conn.exec_driver_sql("VACUUM (ANALYZE) metrics.messages")
    log.info(
        "%d interactions with %d messages each loaded in %.0fs", cfg.interactions, cfg.messages, time.monotonic() - t0
    )
    store = QualityStore(engine)
    cats = categories()
    for cid, c in cats.items():
        validate_category(cid, c)
        store.create_category(tenant_id, cid, c)
    f = form(list(cats))
    validate_form("bench", f, {f"categories/{c}" for c in cats})
    store.save_form(tenant_id, "bench", f, create=True)
    postgres = CpuGroup(("postgres",))
    postgres.start()
    cpu0 = time.process_time()
    started = time.monotonic()
    written = store.reevaluate(tenant_id, "bench", MetricsConfig())
    wall = time.monotonic() - started
    cpu = time.process_time() - cpu0
    pg = postgres.stop()
    log.info("%d evaluations in %.1fs (%.0f/s)", written, wall, written / wall)
    return {
        "evaluations": written,
        "seconds": round(wall, 1),
        "evaluations_per_second": round(written / wall),
        "worker_cpu_ms_per_evaluation": round(cpu / max(written, 1) * 1000, 3),
        "postgres_cpu_ms_per_evaluation": round(pg / max(written, 1) * 1000, 3),
    }


def _live(be: Any, engine: Any, cfg: Config, end: dt.datetime) -> dict[str, Any]:
    tenant_id = f"quality-live-{uuid.uuid4().hex[:8]}"
    tenancy.create_tenant(engine, tenant_id)
    store = QualityStore(engine)
    cats = categories()
    for cid, c in cats.items():
        store.create_category(tenant_id, cid, c)
    store.save_form(tenant_id, "bench", form(list(cats)), create=True)
    refunds = quality_pb2.CategoryDetected(category="categories/topic-0")  # the customer says refund*
    store.create_alert_rule(tenant_id, "refund", quality_pb2.AlertRule(category_detected=refunds))
    port = free_port()
    env = be.env(
        TESSERA_METRICS_PORT=str(port),
        TESSERA_METRICS_CONSUMERS="1",
        TESSERA_TENANT_REFRESH_SECONDS="1",
        TESSERA_CONSUMER_BATCH_SIZE="1000",
    )
    proc = spawn("metrics", serve_argv("metrics"), env, be.workdir)
    bus = Bus(connect(be.redis_url), be.redis_prefix)
    rng = random.Random(11)
    sent: dict[str, float] = {}
    try:
        wait_serving(f"127.0.0.1:{port}", proc, 60, "tessera.v1.QualityService")
        cpu0 = proc_cpu(proc.pid or 0)
        started = time.monotonic()
        n = 0
        while time.monotonic() - started < cfg.seconds:
            due = int((time.monotonic() - started) * cfg.rate) + 1
            envelopes = []
            ids = []
            while n < due:
                iid, pid = f"live{n}", f"p{n % 5000}"
                at = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=8)
                for k in range(cfg.messages):
                    ev = event_pb2.Event(
                        event_id=f"lm{n}-{k}",
                        message_id=f"lm{n}-{k}",
                        profile_id=pid,
                        channel=event_pb2.CHANNEL_CHAT,
                        source="bench",
                    )
                    ev.timestamp.FromDatetime(at + dt.timedelta(seconds=20 * k))
                    ev.message.interaction_id = iid
                    ev.message.author = 1 if k % 2 else 2  # type: ignore[assignment]
                    ev.message.text = rng.choice(CUSTOMER_LINES if k % 2 else AGENT_LINES)
                    envelopes.append(
                        stream_pb2.ResolvedEventEnvelope(tenant_id=tenant_id, event=ev).SerializeToString()
                    )
                ev = event_pb2.Event(
                    event_id=f"ll{n}",
                    message_id=f"ll{n}",
                    profile_id=pid,
                    channel=event_pb2.CHANNEL_CHAT,
                    source="bench",
                )
                ev.timestamp.FromDatetime(at + dt.timedelta(minutes=8))
                i = ev.interaction
                i.interaction_id, i.agent_id, i.queue, i.reason = iid, f"agent-{n % 50}", "billing", "billing"
                i.started_at.FromDatetime(at)
                i.ended_at.FromDatetime(at + dt.timedelta(minutes=8))
                i.talk_seconds, i.hold_seconds = 300.0, rng.expovariate(1 / 40)
                envelopes.append(stream_pb2.ResolvedEventEnvelope(tenant_id=tenant_id, event=ev).SerializeToString())
                ids.append(iid)
                n += 1
            if envelopes:
                bus.append(tenant_id, streams.RESOLVED.name, envelopes)
                now = time.time()
                for iid in ids:
                    sent[iid] = now
            time.sleep(0.01)
        mark = bus.last_id(tenant_id, streams.RESOLVED.name)
        deadline = time.monotonic() + max(60.0, cfg.seconds * 10)
        while not bus.caught_up(tenant_id, streams.RESOLVED.name, "metrics", mark) and time.monotonic() < deadline:
            time.sleep(0.2)
        caught_up_after = time.monotonic() - started - cfg.seconds
        time.sleep(1.0)
        consumer_cpu = proc_cpu(proc.pid or 0) - cpu0
        with db.raw_transaction(engine, "bench.latency") as (cur, _):
            cur.execute(
                "SELECT interaction_id, extract(epoch FROM evaluated_at) FROM metrics.evaluations WHERE tenant_id = %s",
                (tenant_id,),
            )
            done = dict(cur.fetchall())
            cur.execute(
                "SELECT interaction_id, extract(epoch FROM fired_at) FROM metrics.alerts WHERE tenant_id = %s",
                (tenant_id,),
            )
            fired = dict(cur.fetchall())
    finally:
        proc.stop(15)
    latencies = sorted(max(0.0, float(done[i]) - t) * 1000 for i, t in sent.items() if i in done)
    alert_latencies = sorted(max(0.0, float(fired[i]) - t) * 1000 for i, t in sent.items() if i in fired)
    return {
        "interactions_per_second": cfg.rate,
        "events_per_second": cfg.rate * (cfg.messages + 1),
        "interactions": len(sent),
        "evaluated": len(done),
        "drained_seconds_after_load": round(caught_up_after, 1),
        "latency_p50_ms": round(percentile(latencies, 0.5), 1) if latencies else None,
        "latency_p99_ms": round(percentile(latencies, 0.99), 1) if latencies else None,
        "consumer_cpu_ms_per_interaction": round(consumer_cpu / max(len(sent), 1) * 1000, 2),
        "alerts": len(fired),
        "alert_latency_p50_ms": round(percentile(alert_latencies, 0.5), 1) if alert_latencies else None,
        "alert_latency_p99_ms": round(percentile(alert_latencies, 0.99), 1) if alert_latencies else None,
    }


def _run(cfg: Config) -> dict[str, Any]:
    with backends("quality") as be:
        engine = db.make_engine(be.database_url, application_name="bench", instrument=False)
        end = dt.datetime.now(dt.UTC).replace(microsecond=0)
        throughput = _throughput(engine, cfg, end)
        live = _live(be, engine, cfg, end)
    ok = (
        throughput["evaluations_per_second"] >= 500
        and live["latency_p99_ms"] is not None
        and live["latency_p99_ms"] <= 2000
        and live["evaluated"] == live["interactions"]
        and live["alert_latency_p99_ms"] is not None
        and live["alert_latency_p99_ms"] <= 1000
    )
    return {
        "scenario": "quality",
        "config": cfg.as_dict(),
        "machine": machine_facts(),
        "throughput": throughput,
        "live": live,
        "targets": {
            "evaluations_per_second": 500,
            "latency_p99_ms_at_100_per_second": 2000,
            "alert_latency_p99_ms": 1000,
        },
        "ok": ok,
    }


def table(rep: dict[str, Any]) -> str:
    t, live = rep["throughput"], rep["live"]
    lines = [
        f"tessera bench quality: one form of 20 questions over 30 categories, "
        f"{rep['config']['messages']} messages per interaction",
        "",
        f"{'evaluations/s, one worker':<48}{t['evaluations_per_second']:>10,}   (target >= 500; "
        f"{t['evaluations']:,} in {t['seconds']} s)",
        f"{'worker / PostgreSQL CPU per evaluation':<48}{t['worker_cpu_ms_per_evaluation']:>7.3f} / "
        f"{t['postgres_cpu_ms_per_evaluation']:.3f} ms",
        f"{'live: interactions/s (events/s)':<48}{live['interactions_per_second']:>10,} "
        f"({live['events_per_second']:,})",
        f"{'live: last event -> evaluation, p50 / p99':<48}{live['latency_p50_ms']} / {live['latency_p99_ms']} ms"
        "   (target p99 <= 2,000)",
        f"{'live: evaluated of sent':<48}{live['evaluated']:>10,} of {live['interactions']:,}",
        f"{'live: alerts; last event -> alert, p50 / p99':<48}{live['alerts']:>10,}; "
        f"{live['alert_latency_p50_ms']} / {live['alert_latency_p99_ms']} ms   (target: within a second)",
        "",
        "ok" if rep["ok"] else "TARGET MISSED",
    ]
    return "\n".join(lines)


def run(*, seconds: float, as_json: bool, extra: argparse.Namespace) -> int:
    return run_configured(make_config, _run, table, seconds=seconds, extra=extra, as_json=as_json)
