"""Tenant isolation over every QualityService RPC: tenant B, holding every name tenant A's data has,
finds none of it, changes none of it, and its own writes stay its own."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy.engine import Engine

from services.core.server import RunningServer
from tessera.v1 import event_pb2, quality_pb2
from tests.conftest import TenantKey, make_tenant
from tests.integration.test_quality_alerts import ANGRY, Alerts
from tests.integration.test_quality_api import Quality, chat, ended_chat
from tests.support.events import uid
from tests.support.profile import Apis, wait_until

pytestmark = pytest.mark.integration

NOT_FOUND = grpc.StatusCode.NOT_FOUND


def test_every_quality_rpc_keeps_tenant_a_from_tenant_b(
    api: Apis, metrics_channel: grpc.Channel, metrics_server: RunningServer, engine: Engine, tenant: TenantKey
) -> None:
    a = Quality(metrics_channel, tenant.metadata)
    a.setup()
    a_alerts = Alerts(metrics_channel, tenant.metadata)
    rule = a_alerts.rule("angry", sentiment_below=quality_pb2.SentimentBelow(threshold=-0.3))
    phone, done, live = "+14155550141", uid("chat"), uid("chat")
    t0 = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(hours=1)
    api.send(chat(phone, done, event_pb2.AUTHOR_AGENT, "hello", t0), ended_chat(phone, done, t0))
    api.send(*[chat(phone, live, event_pb2.AUTHOR_CUSTOMER, ANGRY, t0) for _ in range(2)])
    evaluation = a.wait(done)
    alert = wait_until(lambda: a_alerts.listed(interaction_id=live), 30, "A's alert")[0]
    a_form = a.call("GetEvaluationForm", quality_pb2.GetEvaluationFormRequest(name="evaluationForms/chat")).form

    b_key = make_tenant(engine, "b")
    b = Quality(metrics_channel, b_key.metadata)
    b_alerts = Alerts(metrics_channel, b_key.metadata)

    def code(method: str, request: Any) -> grpc.StatusCode:
        try:
            b.call(method, request)
        except grpc.RpcError as err:
            return err.code()  # type: ignore[no-any-return]
        return grpc.StatusCode.OK

    # Reads by A's names are NOT_FOUND or empty for B.
    checks: list[tuple[str, Any, Callable[[Any], bool] | grpc.StatusCode]] = [
        ("GetEvaluation", quality_pb2.GetEvaluationRequest(name=evaluation.name), NOT_FOUND),
        ("GetEvaluationForm", quality_pb2.GetEvaluationFormRequest(name=a_form.name), NOT_FOUND),
        ("GetAnswerAgreement", quality_pb2.GetAnswerAgreementRequest(form=a_form.name), NOT_FOUND),
        (
            "OverrideAnswer",
            quality_pb2.OverrideAnswerRequest(
                name=evaluation.name, question_id="greeted", value="no", reviewer="b", reason="b"
            ),
            NOT_FOUND,
        ),
        ("AcknowledgeAlert", quality_pb2.AcknowledgeAlertRequest(name=alert.name, acknowledged_by="b"), NOT_FOUND),
        ("DeleteAlertRule", quality_pb2.DeleteAlertRuleRequest(name=rule.name), NOT_FOUND),
        (
            "UpdateCategory",
            quality_pb2.UpdateCategoryRequest(
                category=quality_pb2.Category(
                    name="categories/greeting", rules=[quality_pb2.CategoryRule(phrases=["b"])]
                )
            ),
            NOT_FOUND,
        ),
        ("UpdateEvaluationForm", quality_pb2.UpdateEvaluationFormRequest(form=a_form), "b has no such categories"),
        (
            "ListEvaluations",
            quality_pb2.ListEvaluationsRequest(interaction_id=done),
            lambda r: list(r.evaluations) == [],
        ),
        (
            "ListEvaluations",
            quality_pb2.ListEvaluationsRequest(profile=evaluation.profile),
            lambda r: list(r.evaluations) == [],
        ),
        ("ListAlerts", quality_pb2.ListAlertsRequest(profile=alert.profile), lambda r: list(r.alerts) == []),
        ("ListAlerts", quality_pb2.ListAlertsRequest(interaction_id=live), lambda r: list(r.alerts) == []),
        ("ListAlerts", quality_pb2.ListAlertsRequest(include_acknowledged=True), lambda r: list(r.alerts) == []),
        ("ListCategories", quality_pb2.ListCategoriesRequest(), lambda r: list(r.categories) == []),
        ("ListEvaluationForms", quality_pb2.ListEvaluationFormsRequest(), lambda r: list(r.forms) == []),
        ("ListAlertRules", quality_pb2.ListAlertRulesRequest(), lambda r: list(r.rules) == []),
    ]
    for method, request, expect in checks:
        if isinstance(expect, grpc.StatusCode):
            assert code(method, request) == expect, method
        elif isinstance(expect, str):
            assert code(method, request) == grpc.StatusCode.INVALID_ARGUMENT, method  # its categories are A's
        else:
            assert expect(b.call(method, request)), method
    # B's watch never shows A's alert, whatever cursor it holds.
    got, call = b_alerts.watch()
    again = uid("chat")
    api.send(*[chat(phone, again, event_pb2.AUTHOR_CUSTOMER, ANGRY, t0) for _ in range(2)])
    wait_until(lambda: len(a_alerts.listed(profile=alert.profile)) >= 2, 30, "A's second alert")
    call.cancel()
    assert got == []
    # B creating the same ids makes its own, and A's are untouched.
    b.setup()
    b_alerts.rule("angry", sentiment_below=quality_pb2.SentimentBelow(threshold=-0.9))
    assert a.evaluation(done) == evaluation
    assert a.call("ListAlertRules", quality_pb2.ListAlertRulesRequest()).rules[0].sentiment_below.threshold == -0.3
    assert [x.name for x in a_alerts.listed(interaction_id=live)] == [alert.name]
    assert a.call("GetEvaluationForm", quality_pb2.GetEvaluationFormRequest(name=a_form.name)).form.version == 1


#: Exercised through the helpers above (setup, rule, watch) rather than by name.
THROUGH_HELPERS = {"CreateCategory", "CreateEvaluationForm", "CreateAlertRule", "WatchAlerts"}


def test_every_rpc_is_in_the_isolation_test() -> None:
    """A new RPC must be added to the test above."""
    names = set(quality_pb2.DESCRIPTOR.services_by_name["QualityService"].methods_by_name)
    source = Path(__file__).read_text()
    assert sorted(n for n in names - THROUGH_HELPERS if f'"{n}"' not in source) == []
