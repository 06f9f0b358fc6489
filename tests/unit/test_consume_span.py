"""A consumer's batch continues the traces of its messages: one trace runs from the producer's RPC
through every consumer, whether a batch holds one trace or several, and tracing that is off costs
no span per message."""

from __future__ import annotations

from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from services.core import streams
from services.core.telemetry import consume_span, inject_traceparent, traceparent_of
from tessera.v1 import event_pb2

T1 = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
T2 = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@dataclass
class Msg:
    traceparent: str
    relay: str = ""


def recording() -> tuple[trace.Tracer, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("tests"), exporter


def trace_id(traceparent: str) -> int:
    return int(traceparent.split("-")[1], 16)


def span_id(traceparent: str) -> int:
    return int(traceparent.split("-")[2], 16)


def named(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def test_a_batch_of_one_trace_is_a_child_of_it_and_relays_its_own_span() -> None:
    tracer, exporter = recording()
    batch = [Msg(T1), Msg(T1), Msg(T1)]
    with consume_span("events", "identity", batch, tracer) as span:
        published = inject_traceparent()  # what the handler's own publications carry
        own = span.get_span_context()
    (consume,) = exporter.get_finished_spans()
    assert consume.name == "consume events" and consume.kind == trace.SpanKind.CONSUMER
    assert consume.context.trace_id == trace_id(T1)
    assert consume.parent is not None and consume.parent.span_id == span_id(T1)
    assert consume.attributes is not None
    assert consume.attributes["messaging.consumer.group.name"] == "identity"
    assert consume.attributes["messaging.batch.message_count"] == 3
    assert {m.relay for m in batch} == {published}
    assert span_id(published) == own.span_id and trace_id(published) == trace_id(T1)


def test_a_batch_of_several_traces_links_them_and_continues_each_in_a_process_span() -> None:
    tracer, exporter = recording()
    batch = [Msg(T1), Msg(T2), Msg(T1)]
    with consume_span("resolved", "profile", batch, tracer) as span:
        own = span.get_span_context()
    spans = exporter.get_finished_spans()
    (consume,) = named(spans, "consume resolved")
    process = {s.context.trace_id: s for s in named(spans, "process resolved")}
    # The batch is a trace of its own, linked to each message's.
    assert consume.parent is None and consume.context.trace_id not in (trace_id(T1), trace_id(T2))
    assert {(link.context.trace_id, link.context.span_id) for link in consume.links} == {
        (trace_id(T1), span_id(T1)),
        (trace_id(T2), span_id(T2)),
    }
    # Each trace goes on in a child of the message's span, linked back to the batch.
    assert set(process) == {trace_id(T1), trace_id(T2)}
    for tp, count in ((T1, 2), (T2, 1)):
        child = process[trace_id(tp)]
        assert child.parent is not None and child.parent.span_id == span_id(tp)
        assert [link.context.span_id for link in child.links] == [own.span_id]
        assert child.attributes is not None and child.attributes["messaging.batch.message_count"] == count
    # What each message causes downstream descends from its own trace's process span.
    assert batch[0].relay == batch[2].relay == traceparent_of_span(process[trace_id(T1)])
    assert batch[1].relay == traceparent_of_span(process[trace_id(T2)])


def traceparent_of_span(span: ReadableSpan) -> str:
    ctx = span.context
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-01"


def test_unsampled_batches_make_no_span_per_trace_and_relay_nothing() -> None:
    provider = TracerProvider(sampler=ALWAYS_OFF)  # what configure_telemetry installs with no exporter
    tracer = provider.get_tracer("tests")
    batch = [Msg(T1), Msg(T2)]
    with consume_span("events", "identity", batch, tracer) as span:
        assert not span.is_recording()
    assert [m.relay for m in batch] == ["", ""]
    # Still the same trace for the logs when the batch holds one.
    single = [Msg(T1)]
    with consume_span("events", "identity", single, tracer) as span:
        assert span.get_span_context().trace_id == trace_id(T1)
    assert single[0].relay == ""


def test_resolved_entry_carries_the_relayed_traceparent_else_the_sources() -> None:
    tracer, _ = recording()
    with tracer.start_as_current_span("identity batch") as span:
        relay = traceparent_of(span)
    source = streams.event_envelope("acme", T1, event_pb2.Event(event_id="e-1").SerializeToString())
    for profile_id in ("p-1", None):
        relayed = streams.decode(streams.RESOLVED, streams.resolved_envelope(source, profile_id, (), relay), "acme")
        assert relayed.traceparent == relay and relayed.event.event_id == "e-1"
        assert relayed.event.profile_id == (profile_id or "")
        kept = streams.decode(streams.RESOLVED, streams.resolved_envelope(source, profile_id), "acme")
        assert kept.traceparent == T1
