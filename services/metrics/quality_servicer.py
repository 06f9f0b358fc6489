"""QualityService over gRPC: thin; everything goes through :class:`~services.metrics.quality.Quality`.
The tenant is the credentials'. Plain methods run in the server's pool; the ``WatchAlerts``
stream runs on the event loop and reads the alerts table in the pool."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from services.core import pagination
from services.core.errors import InvalidArgument, Violation
from services.core.tenancy import current_tenant
from services.metrics.quality import Quality
from tessera.v1 import quality_pb2, quality_pb2_grpc


def _tenant() -> str:
    return current_tenant().tenant_id


InPool = Callable[..., Awaitable[Any]]
FEED_BATCH = 500
FEED = "alerts"


class QualityServicer(quality_pb2_grpc.QualityServiceServicer):
    def __init__(self, quality: Quality, pool: InPool, poll_seconds: float = 0.1) -> None:
        self.quality = quality
        self.pool = pool
        self.poll_seconds = poll_seconds

    def CreateCategory(
        self, request: quality_pb2.CreateCategoryRequest, context: Any
    ) -> quality_pb2.CreateCategoryResponse:
        return quality_pb2.CreateCategoryResponse(
            category=self.quality.create_category(_tenant(), request.category_id, request.category)
        )

    def UpdateCategory(
        self, request: quality_pb2.UpdateCategoryRequest, context: Any
    ) -> quality_pb2.UpdateCategoryResponse:
        return quality_pb2.UpdateCategoryResponse(category=self.quality.update_category(_tenant(), request.category))

    def ListCategories(
        self, request: quality_pb2.ListCategoriesRequest, context: Any
    ) -> quality_pb2.ListCategoriesResponse:
        return quality_pb2.ListCategoriesResponse(categories=self.quality.categories(_tenant()))

    def CreateEvaluationForm(
        self, request: quality_pb2.CreateEvaluationFormRequest, context: Any
    ) -> quality_pb2.CreateEvaluationFormResponse:
        return quality_pb2.CreateEvaluationFormResponse(
            form=self.quality.save_form(_tenant(), request.form_id, request.form)
        )

    def UpdateEvaluationForm(
        self, request: quality_pb2.UpdateEvaluationFormRequest, context: Any
    ) -> quality_pb2.UpdateEvaluationFormResponse:
        return quality_pb2.UpdateEvaluationFormResponse(form=self.quality.save_form(_tenant(), None, request.form))

    def GetEvaluationForm(
        self, request: quality_pb2.GetEvaluationFormRequest, context: Any
    ) -> quality_pb2.GetEvaluationFormResponse:
        return quality_pb2.GetEvaluationFormResponse(form=self.quality.form(_tenant(), request.name, request.version))

    def ListEvaluationForms(
        self, request: quality_pb2.ListEvaluationFormsRequest, context: Any
    ) -> quality_pb2.ListEvaluationFormsResponse:
        return quality_pb2.ListEvaluationFormsResponse(forms=self.quality.forms(_tenant()))

    def GetEvaluation(
        self, request: quality_pb2.GetEvaluationRequest, context: Any
    ) -> quality_pb2.GetEvaluationResponse:
        return quality_pb2.GetEvaluationResponse(evaluation=self.quality.evaluation(_tenant(), request.name))

    def ListEvaluations(
        self, request: quality_pb2.ListEvaluationsRequest, context: Any
    ) -> quality_pb2.ListEvaluationsResponse:
        rows, token = self.quality.evaluations(
            _tenant(), request.interaction_id, request.profile, request.page_size, request.page_token
        )
        return quality_pb2.ListEvaluationsResponse(evaluations=rows, next_page_token=token)

    def OverrideAnswer(
        self, request: quality_pb2.OverrideAnswerRequest, context: Any
    ) -> quality_pb2.OverrideAnswerResponse:
        return quality_pb2.OverrideAnswerResponse(evaluation=self.quality.override(_tenant(), request))

    def GetAnswerAgreement(
        self, request: quality_pb2.GetAnswerAgreementRequest, context: Any
    ) -> quality_pb2.GetAnswerAgreementResponse:
        return quality_pb2.GetAnswerAgreementResponse(questions=self.quality.agreement(_tenant(), request.form))

    def CreateAlertRule(
        self, request: quality_pb2.CreateAlertRuleRequest, context: Any
    ) -> quality_pb2.CreateAlertRuleResponse:
        return quality_pb2.CreateAlertRuleResponse(
            rule=self.quality.create_alert_rule(_tenant(), request.rule_id, request.rule)
        )

    def ListAlertRules(
        self, request: quality_pb2.ListAlertRulesRequest, context: Any
    ) -> quality_pb2.ListAlertRulesResponse:
        return quality_pb2.ListAlertRulesResponse(rules=self.quality.alert_rules(_tenant()))

    def DeleteAlertRule(
        self, request: quality_pb2.DeleteAlertRuleRequest, context: Any
    ) -> quality_pb2.DeleteAlertRuleResponse:
        self.quality.delete_alert_rule(_tenant(), request.name)
        return quality_pb2.DeleteAlertRuleResponse()

    async def WatchAlerts(
        self, request: quality_pb2.WatchAlertsRequest, context: Any
    ) -> AsyncIterator[quality_pb2.WatchAlertsResponse]:
        """Alerts after the cursor in firing order, then new ones as they fire (polled every
        ``poll_seconds``). A cursor beyond the newest alert was not issued here and is refused."""
        tenant = _tenant()
        position = pagination.decode_feed_cursor(tenant, request.cursor, FEED)
        queues, agents = list(request.queues), list(request.agent_ids)
        head = await self.pool(self.quality.alert_head, tenant)
        if position is None:
            position = head
        elif position > head:
            raise InvalidArgument("invalid cursor", [Violation("cursor", "not a cursor this API issued")])
        while True:
            rows = await self.pool(self.quality.alert_feed, tenant, position, FEED_BATCH, queues, agents)
            for seq, alert in rows:
                position = seq
                yield quality_pb2.WatchAlertsResponse(
                    alert=alert, cursor=pagination.encode_feed_cursor(tenant, seq, FEED)
                )
            if len(rows) < FEED_BATCH:
                await asyncio.sleep(self.poll_seconds)

    def ListAlerts(self, request: quality_pb2.ListAlertsRequest, context: Any) -> quality_pb2.ListAlertsResponse:
        return quality_pb2.ListAlertsResponse(
            alerts=self.quality.alerts(
                _tenant(), request.profile, request.interaction_id, request.include_acknowledged, request.page_size
            )
        )

    def AcknowledgeAlert(
        self, request: quality_pb2.AcknowledgeAlertRequest, context: Any
    ) -> quality_pb2.AcknowledgeAlertResponse:
        return quality_pb2.AcknowledgeAlertResponse(
            alert=self.quality.acknowledge(_tenant(), request.name, request.acknowledged_by)
        )
