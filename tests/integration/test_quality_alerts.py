"""Quality alerts through the real pipeline: rules over gRPC, events in at ingest, the metrics
consumer fires each rule once per interaction, publishes it to the alerts stream and serves it on
WatchAlerts (resumable, filtered), ListAlerts and AcknowledgeAlert."""

from __future__ import annotations

import datetime as dt
import threading
import time
from typing import Any

import grpc
import pytest

from services.core import streams
from services.core.bus import Bus
from services.core.server import RunningServer
from services.core.settings import Settings
from tessera.v1 import event_pb2, quality_pb2, quality_pb2_grpc
from tests.conftest import TenantKey
from tests.integration.test_quality_api import chat, ended_chat
from tests.support.events import uid
from tests.support.grpc_errors import bad_request
from tests.support.profile import Apis, interaction, survey, wait_until
from tests.support.streams import entries

pytestmark = pytest.mark.integration

ANGRY = "This is terrible, I am furious and nobody helps me"


class Alerts:
    def __init__(self, channel: grpc.Channel, metadata: tuple[tuple[str, str], ...]) -> None:
        self.stub = quality_pb2_grpc.QualityServiceStub(channel)
        self.md = metadata

    def rule(self, rule_id: str, **kw: Any) -> quality_pb2.AlertRule:
        resp = self.stub.CreateAlertRule(
            quality_pb2.CreateAlertRuleRequest(rule_id=rule_id, rule=quality_pb2.AlertRule(display_name=rule_id, **kw)),
            metadata=self.md,
            timeout=10,
        )
        return resp.rule  # type: ignore[no-any-return]

    def watch(self, cursor: str = "", **kw: Any) -> tuple[list[quality_pb2.WatchAlertsResponse], Any]:
        """Start a watch in the background; returns the list it fills and the call (cancel it)."""
        got: list[quality_pb2.WatchAlertsResponse] = []
        call = self.stub.WatchAlerts(quality_pb2.WatchAlertsRequest(cursor=cursor, **kw), metadata=self.md)

        def pump() -> None:
            try:
                for item in call:
                    got.append(item)
            except grpc.RpcError:
                pass

        threading.Thread(target=pump, daemon=True).start()
        time.sleep(0.5)  # the first read (the head) happens before any alert of the test
        return got, call

    def listed(self, **kw: Any) -> list[quality_pb2.Alert]:
        resp = self.stub.ListAlerts(quality_pb2.ListAlertsRequest(**kw), metadata=self.md, timeout=10)
        return list(resp.alerts)


@pytest.fixture
def alerts(metrics_channel: grpc.Channel, tenant: TenantKey, metrics_server: RunningServer) -> Alerts:
    return Alerts(metrics_channel, tenant.metadata)


def test_falling_sentiment_in_an_open_chat_fires_once_and_is_watched_listed_and_acknowledged(
    api: Apis, alerts: Alerts, settings: Settings, redis_client: Any
) -> None:
    alerts.rule("angry", sentiment_below=quality_pb2.SentimentBelow(threshold=-0.3, min_messages=2))
    got, call = alerts.watch()
    phone, iid = "+14155550121", uid("chat")
    t0 = dt.datetime.now(dt.UTC).replace(microsecond=0)
    try:
        api.send(chat(phone, iid, event_pb2.AUTHOR_CUSTOMER, ANGRY, t0))
        api.send(chat(phone, iid, event_pb2.AUTHOR_CUSTOMER, "Terrible. Awful. I hate this.", t0))
        wait_until(lambda: got, 30, "the alert on the watch")
        api.send(chat(phone, iid, event_pb2.AUTHOR_CUSTOMER, "still horrible and useless", t0))
        time.sleep(1.5)
    finally:
        call.cancel()
    assert len(got) == 1, "a rule fires once per interaction"
    alert = got[0].alert
    assert alert.interaction_id == iid and alert.rule == "alertRules/angry"
    assert "below -0.300" in alert.description and alert.state == quality_pb2.ALERT_STATE_OPEN
    # Published once to the tenant's alerts stream.
    bus = Bus(redis_client, settings.redis_prefix)
    wait_until(lambda: list(entries(redis_client, bus, api.tenant_id, streams.ALERTS)), 10, "the alerts stream")
    published = [env.alert.name for _id, env in entries(redis_client, bus, api.tenant_id, streams.ALERTS)]
    assert published == [alert.name]
    # Listed for the customer until acknowledged.
    assert [a.name for a in alerts.listed(profile=alert.profile)] == [alert.name]
    acked = alerts.stub.AcknowledgeAlert(
        quality_pb2.AcknowledgeAlertRequest(name=alert.name, acknowledged_by="sup@acme"), metadata=alerts.md, timeout=10
    ).alert
    assert acked.state == quality_pb2.ALERT_STATE_ACKNOWLEDGED and acked.acknowledged_by == "sup@acme"
    assert alerts.listed(profile=alert.profile) == []
    assert [a.name for a in alerts.listed(profile=alert.profile, include_acknowledged=True)] == [alert.name]
    assert [a.name for a in alerts.listed(include_acknowledged=True)] == [alert.name]  # the whole tenant's


def test_a_watch_resumes_after_its_cursor_and_filters_by_queue(api: Apis, alerts: Alerts) -> None:
    alerts.rule("third-contact", repeated_reason=quality_pb2.RepeatedReason(contacts=2, days=7))
    got, call = alerts.watch()
    t0 = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(days=2)
    phones = ["+14155550122", "+14155550123"]
    try:
        for k, phone in enumerate(phones):
            for n in range(2):
                api.send(
                    interaction(("phone", phone), interaction_id=uid("call"), at=t0 + dt.timedelta(hours=k * 3 + n))
                )
        wait_until(lambda: len(got) >= 2, 30, "two alerts")
    finally:
        call.cancel()
    assert [g.alert.description.startswith("contact 2 on 'billing'") for g in got] == [True, True]
    resumed, call2 = alerts.watch(cursor=got[0].cursor)
    try:
        wait_until(lambda: resumed, 10, "the resumed watch")
        time.sleep(0.5)
    finally:
        call2.cancel()
    assert [g.alert.name for g in resumed] == [got[1].alert.name]
    filtered, call3 = alerts.watch(cursor=got[0].cursor, queues=["elsewhere"])
    time.sleep(1.0)
    call3.cancel()
    assert filtered == []


def test_a_detected_category_and_a_contact_after_a_low_nps_fire_with_evidence(api: Apis, alerts: Alerts) -> None:
    alerts.stub.CreateCategory(
        quality_pb2.CreateCategoryRequest(
            category_id="legal-threat",
            category=quality_pb2.Category(
                rules=[
                    quality_pb2.CategoryRule(
                        phrases=["{lawyer|attorney|sue you}"], participant=quality_pb2.PARTICIPANT_CUSTOMER
                    )
                ]
            ),
        ),
        metadata=alerts.md,
        timeout=10,
    )
    alerts.rule("legal", category_detected=quality_pb2.CategoryDetected(category="categories/legal-threat"))
    alerts.rule("after-low-nps", contact_after_low_nps=quality_pb2.ContactAfterLowNps(days=7, max_score=6))
    phone = "+14155550124"
    t0 = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(days=1)
    iid = uid("chat")
    api.send(chat(phone, iid, event_pb2.AUTHOR_CUSTOMER, "I will call my Lawyer about this", t0))
    legal = wait_until(lambda: alerts.listed(interaction_id=iid), 30, "the legal alert")
    assert legal[0].rule == "alertRules/legal"
    assert [e.phrase for e in legal[0].evidence] == ["{lawyer|attorney|sue you}"]
    api.send(survey(("phone", phone), kind=event_pb2.SURVEY_TYPE_NPS, score=3, at=t0))
    later = uid("call")
    api.send(interaction(("phone", phone), interaction_id=later, at=t0 + dt.timedelta(hours=5)))
    nps = wait_until(lambda: alerts.listed(interaction_id=later), 30, "the low-NPS alert")
    assert nps[0].rule == "alertRules/after-low-nps" and "NPS 3" in nps[0].description


def test_an_ended_interaction_does_not_fire_the_open_sentiment_rule(api: Apis, alerts: Alerts) -> None:
    alerts.rule("angry", sentiment_below=quality_pb2.SentimentBelow(threshold=-0.3))
    phone, iid = "+14155550125", uid("chat")
    t0 = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(hours=2)
    api.send(ended_chat(phone, iid, t0))
    api.send(
        chat(phone, iid, event_pb2.AUTHOR_CUSTOMER, ANGRY, t0), chat(phone, iid, event_pb2.AUTHOR_CUSTOMER, ANGRY, t0)
    )
    marker = uid("chat")  # a later open chat that does fire proves the batch above was applied
    api.send(
        chat(phone, marker, event_pb2.AUTHOR_CUSTOMER, ANGRY, t0),
        chat(phone, marker, event_pb2.AUTHOR_CUSTOMER, ANGRY, t0),
    )
    wait_until(lambda: alerts.listed(interaction_id=marker), 30, "the marker alert")
    assert alerts.listed(interaction_id=iid) == []


def test_bad_rules_and_cursors_get_field_violations(alerts: Alerts, metrics_channel: grpc.Channel) -> None:
    cases = [
        (quality_pb2.CreateAlertRuleRequest(rule_id="x", rule=quality_pb2.AlertRule()), {"rule.condition"}),
        (
            quality_pb2.CreateAlertRuleRequest(
                rule_id="Bad", rule=quality_pb2.AlertRule(sentiment_below=quality_pb2.SentimentBelow(threshold=-3))
            ),
            {"rule_id", "rule.sentiment_below.threshold"},
        ),
        (
            quality_pb2.CreateAlertRuleRequest(
                rule_id="c", rule=quality_pb2.AlertRule(category_detected=quality_pb2.CategoryDetected(category="x"))
            ),
            {"rule.category_detected.category"},
        ),
    ]
    for request, fields in cases:
        with pytest.raises(grpc.RpcError) as err:
            alerts.stub.CreateAlertRule(request, metadata=alerts.md, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert {f for f, _ in bad_request(err.value)} == fields
    with pytest.raises(grpc.RpcError) as err:
        list(alerts.stub.WatchAlerts(quality_pb2.WatchAlertsRequest(cursor="nope"), metadata=alerts.md, timeout=5))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert {f for f, _ in bad_request(err.value)} == {"cursor"}


def test_the_customer_context_shows_the_latest_evaluations_and_open_alerts(
    engine: Any,
    ingest_channel: grpc.Channel,
    identity_channel: grpc.Channel,
    metrics_server: RunningServer,
    metrics_channel: grpc.Channel,
    start_profile_server: Any,
    tenant: TenantKey,
) -> None:
    from tests.integration.test_quality_api import Quality
    from tests.support.profile import apis

    qa = Quality(metrics_channel, tenant.metadata)
    qa.setup()
    alerts = Alerts(metrics_channel, tenant.metadata)
    alerts.rule("angry", sentiment_below=quality_pb2.SentimentBelow(threshold=-0.3))
    profile_server = start_profile_server(metrics_address=f"127.0.0.1:{metrics_server.port}")
    phone = "+14155550126"
    with grpc.insecure_channel(f"127.0.0.1:{profile_server.port}") as channel:
        drive = apis(ingest_channel, identity_channel, channel, engine, tenant.tenant_id, tenant.metadata)
        t0 = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(hours=1)
        done, live = uid("chat"), uid("chat")
        drive.send(chat(phone, done, event_pb2.AUTHOR_AGENT, "hello!", t0), ended_chat(phone, done, t0))
        drive.send(*[chat(phone, live, event_pb2.AUTHOR_CUSTOMER, ANGRY, t0) for _ in range(2)])
        qa.wait(done)
        wait_until(lambda: alerts.listed(interaction_id=live), 30, "the alert")

        def shown() -> Any:
            ctx = drive.context(ident=("phone", phone))
            m = ctx.scores.metrics
            return ctx if m.latest_evaluations and m.open_alerts else None

        ctx = wait_until(shown, 70, "the context's evaluations and alerts")  # contexts are cached up to a minute
    m = ctx.scores.metrics
    assert [e.interaction_id for e in m.latest_evaluations] == [done]
    assert m.latest_evaluations[0].HasField("score") and not m.latest_evaluations[0].answers
    assert [a.interaction_id for a in m.open_alerts] == [live]
