"""JSON logs carry the trace id, and never the credentials in a URL."""

from __future__ import annotations

import json
import logging

from opentelemetry.sdk.trace import TracerProvider

from services.core.settings import redact_url
from services.core.telemetry import JsonFormatter


def test_json_log_line_carries_trace_and_span_ids() -> None:
    tracer = TracerProvider().get_tracer("test")
    record = logging.LogRecord("svc", logging.WARNING, __file__, 1, "hello %s", ("world",), None)
    record.tenant = "acme"
    with tracer.start_as_current_span("op") as span:
        line = JsonFormatter("ingest").format(record)
        ctx = span.get_span_context()
    out = json.loads(line)
    assert out["msg"] == "hello world"
    assert out["level"] == "WARNING"
    assert out["service"] == "ingest"
    assert out["tenant"] == "acme"
    assert out["trace_id"] == format(ctx.trace_id, "032x")
    assert out["span_id"] == format(ctx.span_id, "016x")


def test_json_log_line_outside_a_span_has_no_trace_id() -> None:
    record = logging.LogRecord("svc", logging.INFO, __file__, 1, "plain", (), None)
    assert "trace_id" not in json.loads(JsonFormatter("ingest").format(record))


def test_urls_in_messages_never_show_passwords() -> None:
    assert "s3cret" not in redact_url("postgresql://app:s3cret@db:5432/tessera")
    assert redact_url("postgresql://app:s3cret@db:5432/tessera") == "postgresql://app:***@db:5432/tessera"
    assert "s3cret" not in redact_url("redis://:s3cret@cache:6379/0")
    assert redact_url("redis://cache:6379/0") == "redis://cache:6379/0"
