"""The metrics consumer killed with -9 in the middle of a backlog: the restarted process redelivers
what was not acknowledged, and every contact and survey counts exactly once, every interaction is
evaluated once into the quality rollups, and every alert fires and is published once."""

from __future__ import annotations

import datetime as dt
import signal
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from services.core import streams
from services.core.bus import Bus
from services.core.harness import ServiceProcess, free_port, spawn_service, wait_health
from services.core.settings import Settings
from services.metrics.quality_storage import QualityStore
from services.metrics.reads import MetricsReads
from services.metrics.storage import MetricsStore
from services.metrics.tenant_settings import MetricsConfig
from tessera.v1 import event_pb2, quality_pb2, stream_pb2
from tests.conftest import make_tenant
from tests.support.profile import wait_until
from tests.support.streams import entries

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CONTACTS = 1500


def envelopes(tenant_id: str, start: dt.datetime) -> list[bytes]:
    out = []
    for n in range(CONTACTS):
        at = start + dt.timedelta(minutes=7 * n)
        profile = f"00000000-0000-4000-8000-{n % 150:012d}"
        leg = event_pb2.Event(
            event_id=f"leg-{n}", message_id=f"leg-{n}", profile_id=profile, channel=event_pb2.CHANNEL_VOICE
        )
        leg.timestamp.FromDatetime(at)
        i = leg.interaction
        i.interaction_id, i.agent_id, i.reason, i.talk_seconds = f"c{n}", "a1", "billing", 60.0
        i.started_at.FromDatetime(at)
        i.ended_at.FromDatetime(at + dt.timedelta(minutes=1))
        msg = event_pb2.Event(
            event_id=f"m-{n}", message_id=f"m-{n}", profile_id=profile, channel=event_pb2.CHANNEL_VOICE
        )
        msg.timestamp.FromDatetime(at)
        msg.message.interaction_id, msg.message.author = f"c{n}", event_pb2.AUTHOR_CUSTOMER
        msg.message.text = "I want a refund" if n % 10 == 0 else "hello"
        ans = event_pb2.Event(
            event_id=f"s-{n}", message_id=f"s-{n}", profile_id=profile, channel=event_pb2.CHANNEL_EMAIL
        )
        ans.timestamp.FromDatetime(at + dt.timedelta(minutes=1))
        ans.survey_response.type = event_pb2.SURVEY_TYPE_NPS
        ans.survey_response.score = n % 11
        ans.survey_response.interaction_id = f"c{n}"
        for ev in (msg, leg, ans):
            out.append(stream_pb2.ResolvedEventEnvelope(tenant_id=tenant_id, event=ev).SerializeToString())
    return out


def facts_of(engine: Engine, tenant_id: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text("SELECT count(*) FROM metrics.facts WHERE tenant_id = :t"), {"t": tenant_id}
            ).scalar_one()
        )


def test_kill_9_mid_backlog_counts_every_contact_once(
    engine: Engine, settings: Settings, redis_client: object, tmp_path: Path
) -> None:
    tenant = make_tenant(engine, "kill")
    bus = Bus(redis_client, settings.redis_prefix)  # type: ignore[arg-type]
    quality = QualityStore(engine)
    refund = quality_pb2.Category(rules=[quality_pb2.CategoryRule(phrases=["refund"])])
    quality.create_category(tenant.tenant_id, "refund", refund)
    question = quality_pb2.FormQuestion(
        question_id="refund",
        text="refund",
        weight=100,
        type=quality_pb2.QUESTION_TYPE_YES_NO,
        automatic=quality_pb2.AutomaticAnswer(category="categories/refund"),
    )
    form = quality_pb2.EvaluationForm(
        display_name="f",
        sections=[quality_pb2.FormSection(section_id="s", title="s", weight=100, questions=[question])],
    )
    quality.save_form(tenant.tenant_id, "f", form, create=True)
    detected = quality_pb2.CategoryDetected(category="categories/refund")
    quality.create_alert_rule(tenant.tenant_id, "refund", quality_pb2.AlertRule(category_detected=detected))
    start = dt.datetime(2026, 9, 1, tzinfo=dt.UTC)
    bus.append(tenant.tenant_id, streams.RESOLVED.name, envelopes(tenant.tenant_id, start))
    port = free_port()
    env = {
        "TESSERA_DATABASE_URL": settings.require_database_url(),
        "TESSERA_REDIS_URL": settings.require_redis_url(),
        "TESSERA_REDIS_PREFIX": settings.redis_prefix,
        "TESSERA_BIND_HOST": "127.0.0.1",
        "TESSERA_METRICS_PORT": str(port),
        "TESSERA_CONSUMER_BATCH_SIZE": "50",
        "TESSERA_CONSUMER_CLAIM_IDLE_MS": "1000",
        "TESSERA_TENANT_REFRESH_SECONDS": "0.2",
    }
    procs: list[ServiceProcess] = []
    try:
        first = spawn_service("metrics", env, tmp_path / "metrics-1.log")
        procs.append(first)
        assert wait_health(f"127.0.0.1:{port}", timeout=60, process=first)
        wait_until(lambda: facts_of(engine, tenant.tenant_id) >= 600, 60, "part of the backlog applied")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        applied_before = facts_of(engine, tenant.tenant_id)
        assert applied_before < 3 * CONTACTS, "the kill came too late to test anything"
        second = spawn_service("metrics", env, tmp_path / "metrics-2.log")
        procs.append(second)
        mark = bus.last_id(tenant.tenant_id, streams.RESOLVED.name)
        wait_until(
            lambda: bus.caught_up(tenant.tenant_id, streams.RESOLVED.name, "metrics", mark), 120, "the backlog consumed"
        )
        alerts_published = wait_until(
            lambda: (
                entries(redis_client, bus, tenant.tenant_id, streams.ALERTS)  # type: ignore[arg-type]
                if len(entries(redis_client, bus, tenant.tenant_id, streams.ALERTS)) >= CONTACTS // 10  # type: ignore[arg-type]
                else None
            ),
            30,
            "the alerts published",
        )
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    time.sleep(0.2)
    store = MetricsStore(engine)
    reads = MetricsReads(store, lambda _t: MetricsConfig())
    resp = reads.query(
        tenant.tenant_id,
        ["contact_volume", "nps", "aht_seconds"],
        start - dt.timedelta(days=1),
        start + dt.timedelta(days=30),
        5,
        [],
        [],
    )
    totals = {s.metric: s.points[0].score for s in resp.series}
    assert totals["contact_volume"].value == CONTACTS
    assert totals["nps"].sample_size == CONTACTS
    promoters = sum(1 for n in range(CONTACTS) if n % 11 >= 9)
    detractors = sum(1 for n in range(CONTACTS) if n % 11 <= 6)
    assert totals["nps"].value == pytest.approx((promoters - detractors) / CONTACTS * 100)
    assert totals["aht_seconds"].sample_size == CONTACTS and totals["aht_seconds"].value == pytest.approx(60.0)
    # Quality: one evaluation per interaction, counted once in the rollups; one alert per refund
    # chat, published once.
    scored = MetricsReads(store, lambda _t: MetricsConfig(), quality).query(
        tenant.tenant_id,
        ["quality_score", "quality_pass_rate"],
        start - dt.timedelta(days=1),
        start + dt.timedelta(days=30),
        5,
        [],
        [],
    )
    q = {s.metric: s.points[0].score for s in scored.series}
    assert q["quality_score"].sample_size == CONTACTS
    assert q["quality_score"].value == pytest.approx(100 * (CONTACTS // 10) / CONTACTS)
    with engine.connect() as conn:
        evaluations, alerts = conn.execute(
            sa.text(
                "SELECT (SELECT count(*) FROM metrics.evaluations WHERE tenant_id = :t), "
                "(SELECT count(*) FROM metrics.alerts WHERE tenant_id = :t)"
            ),
            {"t": tenant.tenant_id},
        ).one()
    assert (evaluations, alerts) == (CONTACTS, CONTACTS // 10)
    time.sleep(1.0)  # anything published twice would be there by now
    names = [env.alert.name for _id, env in entries(redis_client, bus, tenant.tenant_id, streams.ALERTS)]  # type: ignore[arg-type]
    assert len(alerts_published) == len(names) == len(set(names)) == CONTACTS // 10
