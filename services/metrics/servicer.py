"""MetricsService over gRPC: thin; everything goes through :class:`~services.metrics.reads.MetricsReads`.
The tenant is the credentials'; another tenant's profile ids have no facts here."""

from __future__ import annotations

from datetime import UTC as _UTC
from typing import Any

from google.protobuf import json_format

from services.core.tenancy import current_tenant
from services.metrics.reads import MetricsReads
from services.metrics.tenant_settings import MetricsConfig
from tessera.v1 import metrics_pb2, metrics_pb2_grpc


def settings_proto(config: MetricsConfig) -> metrics_pb2.MetricsSettings:
    return metrics_pb2.MetricsSettings(**config.to_json())


class MetricsServicer(metrics_pb2_grpc.MetricsServiceServicer):
    def __init__(self, reads: MetricsReads) -> None:
        self.reads = reads

    def GetCustomerMetrics(
        self, request: metrics_pb2.GetCustomerMetricsRequest, context: Any
    ) -> metrics_pb2.GetCustomerMetricsResponse:
        return metrics_pb2.GetCustomerMetricsResponse(
            metrics=self.reads.customer(current_tenant().tenant_id, request.profile)
        )

    def EraseCustomerMetrics(
        self, request: metrics_pb2.EraseCustomerMetricsRequest, context: Any
    ) -> metrics_pb2.EraseCustomerMetricsResponse:
        erased = self.reads.erase(current_tenant().tenant_id, list(request.profile_ids))
        return metrics_pb2.EraseCustomerMetricsResponse(erased_count=erased)

    def QueryMetrics(self, request: metrics_pb2.QueryMetricsRequest, context: Any) -> metrics_pb2.QueryMetricsResponse:
        return self.reads.query(
            current_tenant().tenant_id,
            list(request.metrics),
            request.start_time.ToDatetime(tzinfo=_UTC) if request.HasField("start_time") else None,
            request.end_time.ToDatetime(tzinfo=_UTC) if request.HasField("end_time") else None,
            request.granularity,
            list(request.group_by),
            [(f.dimension, list(f.values)) for f in request.filters],
        )

    def ListMetricDefinitions(
        self, request: metrics_pb2.ListMetricDefinitionsRequest, context: Any
    ) -> metrics_pb2.ListMetricDefinitionsResponse:
        return self.reads.definitions()

    def GetMetricsSettings(
        self, request: metrics_pb2.GetMetricsSettingsRequest, context: Any
    ) -> metrics_pb2.GetMetricsSettingsResponse:
        return metrics_pb2.GetMetricsSettingsResponse(
            settings=settings_proto(self.reads.settings(current_tenant().tenant_id))
        )

    def UpdateMetricsSettings(
        self, request: metrics_pb2.UpdateMetricsSettingsRequest, context: Any
    ) -> metrics_pb2.UpdateMetricsSettingsResponse:
        values = json_format.MessageToDict(request.settings, preserving_proto_field_name=True)
        for name in ("fcr_window_days", "service_level_seconds", "max_range_days", "max_points"):
            values.setdefault(name, 0)
        values.setdefault("time_zone", "")
        config = self.reads.update_settings(current_tenant().tenant_id, values, list(request.update_mask.paths))
        return metrics_pb2.UpdateMetricsSettingsResponse(settings=settings_proto(config))
