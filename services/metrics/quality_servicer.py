"""QualityService over gRPC: thin; everything goes through :class:`~services.metrics.quality.Quality`.
The tenant is the credentials'."""

from __future__ import annotations

from typing import Any

from services.core.tenancy import current_tenant
from services.metrics.quality import Quality
from tessera.v1 import quality_pb2, quality_pb2_grpc


def _tenant() -> str:
    return current_tenant().tenant_id


class QualityServicer(quality_pb2_grpc.QualityServiceServicer):
    def __init__(self, quality: Quality) -> None:
        self.quality = quality

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
