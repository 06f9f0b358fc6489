"""Telemetry end to end, across real processes: ingest, identity, profile and metrics run as
``tessera serve`` with the standard ``OTEL_*`` variables pointing at an OTLP/gRPC receiver this
test runs, and with a Prometheus port each.

- One event sent to IngestEvents makes one trace: the ingest RPC, identity's consumer (a child of
  it), and profile's and metrics' consumers (children of identity's), carried in the stream
  messages.
- The metrics an operator relies on arrive over OTLP from the service that owns them.
- Each process serves them on ``/metrics`` under the names the dashboard uses (derived from the
  code by :mod:`tests.support.metric_names`, checked here against the real output).
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import secrets
import threading
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import Engine

from services.cli import registry
from services.core import db, harness, streams, tenancy
from services.core.bus import Bus, connect
from services.core.harness import ServiceProcess, free_port, wait_serving
from tessera.v1 import (
    event_pb2,
    identity_pb2,
    identity_pb2_grpc,
    ingest_pb2_grpc,
    profile_pb2,
    profile_pb2_grpc,
    quality_pb2,
)
from tests.conftest import SERVICE_TOKEN, TenantKey
from tests.integration.test_quality_alerts import ANGRY, Alerts
from tests.integration.test_quality_api import Quality, chat, ended_chat
from tests.support.events import track, uid
from tests.support.identity import person_event, send
from tests.support.metric_names import declared_instruments, prometheus_names, sample_names
from tests.support.profile import wait_until
from tests.unit.test_dashboard import DASHBOARD, expressions, labels_in, metric_names_in

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SERVICES = ("ingest", "identity", "profile", "metrics")
GRPC_NAMES = {
    "ingest": "tessera.v1.IngestService",
    "identity": "tessera.v1.IdentityService",
    "profile": "tessera.v1.ProfileService",
    "metrics": "tessera.v1.MetricsService",
}
#: What each service must export once the pipeline has run: the issue's list, by owner.
EXPECTED_METRICS = {
    "ingest": {"tessera.rpc.duration", "tessera.ingest.events", "tessera.ingest.batch.duration"},
    "identity": {
        "tessera.rpc.duration",
        "tessera.bus.consumer_lag",
        "tessera.bus.consumer_pending",
        "tessera.identity.merges",
        "tessera.identity.unmerges",
    },
    "profile": {"tessera.rpc.duration", "tessera.bus.consumer_lag", "tessera.profile.context.cache"},
    "metrics": {
        "tessera.rpc.duration",
        "tessera.bus.consumer_lag",
        "tessera.quality.evaluations",
        "tessera.quality.alerts",
    },
}
LEADER_STATUS = "tessera.leader.status"
#: The services that run singleton work, and so report whether they lead it.
LEADING = SERVICES


# ---- the OTLP receiver -------------------------------------------------------------------------


@dataclass
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    links: list[tuple[str, str]]


@dataclass
class Receiver:
    """An OTLP/gRPC collector that keeps what it is sent: spans, and metric names by service."""

    port: int = 0
    spans: list[Span] = field(default_factory=list)
    metrics: dict[str, set[str]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_spans(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        got = []
        for rs in request.resource_spans:
            service = _service_name(rs.resource)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append(
                        Span(
                            service,
                            s.name,
                            s.trace_id.hex(),
                            s.span_id.hex(),
                            s.parent_span_id.hex(),
                            [(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                        )
                    )
        with self.lock:
            self.spans.extend(got)

    def add_metrics(self, request: metrics_service_pb2.ExportMetricsServiceRequest) -> None:
        with self.lock:
            for rm in request.resource_metrics:
                names = self.metrics.setdefault(_service_name(rm.resource), set())
                names.update(m.name for sm in rm.scope_metrics for m in sm.metrics)

    def trace(self, trace_id: str) -> list[Span]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def find(self, service: str, name: str) -> list[Span]:
        with self.lock:
            return [s for s in self.spans if s.service == service and s.name == name]

    def exported(self, service: str) -> set[str]:
        with self.lock:
            return set(self.metrics.get(f"tessera-{service}", ()))


class _TraceServicer(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver

    def Export(self, request: Any, context: Any) -> Any:
        self.receiver.add_spans(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class _MetricsServicer(metrics_service_pb2_grpc.MetricsServiceServicer):  # type: ignore[misc]
    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver

    def Export(self, request: Any, context: Any) -> Any:
        self.receiver.add_metrics(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


def _service_name(resource: Any) -> str:
    return next((a.value.string_value for a in resource.attributes if a.key == "service.name"), "")


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceServicer(found), server)  # type: ignore[no-untyped-call]
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_MetricsServicer(found), server)  # type: ignore[no-untyped-call]
    found.port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield found
    server.stop(grace=1)


# ---- the services ------------------------------------------------------------------------------


@dataclass
class Stack:
    engine: Engine
    ports: dict[str, int]
    scrape_ports: dict[str, int]
    procs: dict[str, ServiceProcess]
    bus: Bus
    tenants: list[str] = field(default_factory=list)
    alert: str = ""  # the alert drive_everything made fire
    channels: dict[str, grpc.Channel] = field(default_factory=dict)

    def channel(self, name: str) -> grpc.Channel:
        if name not in self.channels:
            self.channels[name] = grpc.insecure_channel(f"127.0.0.1:{self.ports[name]}")
        return self.channels[name]

    def scrape(self, name: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.scrape_ports[name]}/metrics", timeout=5) as resp:
            return str(resp.read().decode())

    def new_tenant(self) -> TenantKey:
        tenant_id = f"otel-{harness.run_token()}"
        self.tenants.append(tenant_id)
        return TenantKey(tenant_id, tenancy.create_tenant(self.engine, tenant_id))


@pytest.fixture(scope="module")
def stack(backends: harness.Scratch, receiver: Receiver, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The four services on a database and key prefix of their own (no in-process server of
    another test takes their messages), exporting to the receiver."""
    logs = tmp_path_factory.mktemp("trace-e2e")
    with harness.scratch(
        "trace_e2e", registry.migration_sets(), database_url=backends.admin_url, redis_url=backends.redis_url
    ) as own:
        ports = {name: free_port() for name in SERVICES}
        scrape_ports = {name: free_port() for name in SERVICES}
        base = own.env(
            TESSERA_INGEST_PORT=str(ports["ingest"]),
            TESSERA_IDENTITY_PORT=str(ports["identity"]),
            TESSERA_PROFILE_PORT=str(ports["profile"]),
            TESSERA_METRICS_PORT=str(ports["metrics"]),
            TESSERA_PROFILE_IDENTITY_ADDRESS=f"127.0.0.1:{ports['identity']}",
            TESSERA_PROFILE_INGEST_ADDRESS=f"127.0.0.1:{ports['ingest']}",
            TESSERA_PROFILE_METRICS_ADDRESS=f"127.0.0.1:{ports['metrics']}",
            TESSERA_SERVICE_TOKEN=SERVICE_TOKEN,
            TESSERA_HEALTH_INTERVAL_SECONDS="0.1",
            TESSERA_TENANT_REFRESH_SECONDS="0.2",
            TESSERA_AUTH_CACHE_SECONDS="0",
            TESSERA_OUTBOX_SWEEP_SECONDS="0.2",
            TESSERA_OUTBOX_GRACE_SECONDS="1",
            TESSERA_CONSUMER_BLOCK_MS="100",
            TESSERA_SHUTDOWN_GRACE_SECONDS="2",
            TESSERA_IDENTITY_RULES_CACHE_SECONDS="0",
            TESSERA_METRICS_SETTINGS_CACHE_SECONDS="0",
            TESSERA_PROFILE_RULES_CACHE_SECONDS="0.5",
            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{receiver.port}",
            OTEL_EXPORTER_OTLP_INSECURE="true",
            OTEL_BSP_SCHEDULE_DELAY="200",
            OTEL_METRIC_EXPORT_INTERVAL="500",
        )
        engine = db.make_engine(own.database_url, application_name="tests-trace-e2e", pool_size=2, instrument=False)
        procs = {
            name: ServiceProcess.service(
                name, {**base, "TESSERA_PROMETHEUS_PORT": str(scrape_ports[name])}, logs / f"{name}.log"
            )
            for name in SERVICES
        }
        client = connect(own.redis_url)
        running = Stack(engine, ports, scrape_ports, procs, Bus(client, own.redis_prefix))
        try:
            for proc in procs.values():
                proc.start()
            for name, proc in procs.items():
                wait_serving(f"127.0.0.1:{ports[name]}", proc, timeout=90, service=GRPC_NAMES[name])
            yield running
        finally:
            for channel in running.channels.values():
                channel.close()
            for proc in procs.values():
                proc.stop(5)
            client.close()
            engine.dispose()


def log_tails(stack: Stack) -> str:
    return "\n".join(f"--- {name}\n{proc.log_tail(15)}" for name, proc in stack.procs.items())


# ---- one trace ---------------------------------------------------------------------------------


def ancestors(span: Span, by_id: dict[str, Span]) -> list[str]:
    """The span ids above ``span`` in its trace, nearest first."""
    out: list[str] = []
    parent = span.parent_id
    while parent and parent not in out:
        out.append(parent)
        parent = by_id[parent].parent_id if parent in by_id else ""
    return out


def test_one_event_makes_one_trace_through_all_four_services(stack: Stack, receiver: Receiver) -> None:
    tenant = stack.new_tenant()
    ingest = ingest_pb2_grpc.IngestServiceStub(stack.channel("ingest"))
    # A traced client: its trace goes on in the server (a client sending none starts one there).
    client_trace, client_span = secrets.token_hex(16), secrets.token_hex(8)
    md = (*tenant.metadata, ("traceparent", f"00-{client_trace}-{client_span}-01"))
    (event_id,) = send(ingest, md, track(uid("trace"), email=f"{uid('ada')}@example.com"))
    assert event_id

    def ingest_rpc() -> list[Span]:
        return [
            s
            for s in receiver.find("tessera-ingest", "tessera.v1.IngestService/IngestEvents")
            if s.trace_id == client_trace
        ]

    (rpc,) = wait_until(ingest_rpc, 20, "the ingest RPC's span")
    assert rpc.parent_id == client_span
    wanted = {
        ("tessera-identity", "consume events"),
        ("tessera-profile", "consume resolved"),
        ("tessera-metrics", "consume resolved"),
        ("tessera-profile", "consume changes"),  # the new profile, announced by identity
    }

    def complete() -> list[Span] | None:
        spans = receiver.trace(rpc.trace_id)
        return spans if wanted <= {(s.service, s.name) for s in spans} else None

    try:
        spans = wait_until(complete, 30, "the consumers' spans in the ingest RPC's trace")
    except AssertionError:
        seen = sorted({(s.service, s.name) for s in receiver.trace(rpc.trace_id)})
        raise AssertionError(f"trace {rpc.trace_id} holds only {seen}\n{log_tails(stack)}") from None

    assert {s.service for s in spans} >= {f"tessera-{name}" for name in SERVICES}
    by_id = {s.span_id: s for s in spans}
    (identity,) = [s for s in spans if (s.service, s.name) == ("tessera-identity", "consume events")]
    assert rpc.span_id in ancestors(identity, by_id), "identity's consumer continues the ingest RPC"
    for service, name in (
        ("tessera-profile", "consume resolved"),
        ("tessera-metrics", "consume resolved"),
        ("tessera-profile", "consume changes"),
    ):
        (span,) = [s for s in spans if (s.service, s.name) == (service, name)]
        chain = ancestors(span, by_id)
        assert identity.span_id in chain, f"{service} {name} descends from identity's consumer span"
        assert rpc.span_id in chain
    # The identity consumer's own work (SQL, Redis) is inside its span.
    assert any(identity.span_id in ancestors(s, by_id) for s in spans if s.service == "tessera-identity"), spans


# ---- metrics -----------------------------------------------------------------------------------


def drive_everything(stack: Stack) -> None:
    """What makes every expected metric record: a merge and an unmerge, an alert, an evaluation, a
    customer context read twice (a miss, then a hit)."""
    tenant = stack.new_tenant()
    ingest = ingest_pb2_grpc.IngestServiceStub(stack.channel("ingest"))
    identity = identity_pb2_grpc.IdentityServiceStub(stack.channel("identity"))
    md = tenant.metadata
    email, phone = f"{uid('grace')}@example.com", "+14155550199"

    # Two profiles, then an event with both identifiers: identity merges them (only once the two
    # exist: within one batch, the three events would make one new profile, not a merge).
    def owners() -> tuple[str, str] | None:
        found = []
        for t, v in (("email", email), ("phone", phone)):
            request = identity_pb2.ResolveIdentifiersRequest(identifiers=[event_pb2.Identifier(type=t, value=v)])
            try:
                found.append(str(identity.ResolveIdentifiers(request, metadata=md, timeout=5).profile_id))
            except grpc.RpcError:
                return None
        return (found[0], found[1]) if all(found) else None

    send(ingest, md, person_event(("email", email)))
    send(ingest, md, person_event(("phone", phone)))
    first, second = wait_until(owners, 30, "identity to make the two profiles")
    assert first != second
    send(ingest, md, person_event(("email", email), ("phone", phone)))

    def merged() -> str | None:
        found = owners()
        return found[0] if found is not None and found[0] == found[1] else None

    survivor = wait_until(merged, 30, "identity to merge the two profiles")
    identity.UnmergeProfile(
        identity_pb2.UnmergeProfileRequest(
            profile=f"profiles/{survivor}",
            identifiers=[event_pb2.Identifier(type="phone", value=phone)],
            reason="shared phone",
        ),
        metadata=md,
        timeout=10,
    )
    # Quality: a form and an alert rule, an angry open chat (an alert), the chat ended (an evaluation).
    quality = Quality(stack.channel("metrics"), md)
    quality.setup()
    alerts = Alerts(stack.channel("metrics"), md)
    alerts.rule("angry", sentiment_below=quality_pb2.SentimentBelow(threshold=-0.3, min_messages=2))
    chat_phone, iid = "+14155550198", uid("chat")
    t0 = dt.datetime.now(dt.UTC).replace(microsecond=0)
    send(ingest, md, chat(chat_phone, iid, event_pb2.AUTHOR_CUSTOMER, ANGRY, t0))
    send(ingest, md, chat(chat_phone, iid, event_pb2.AUTHOR_CUSTOMER, "Terrible. Awful. I hate this.", t0))
    alert = wait_until(alerts.listed, 30, "the alert")[
        0
    ]  # while the chat is open: an ended one fires no sentiment rule
    send(ingest, md, ended_chat(chat_phone, iid, t0))
    quality.wait(iid, what="the chat's evaluation")
    stack.alert = alert.name
    # A customer context, twice: the second is a cache hit.
    profile = profile_pb2_grpc.ProfileServiceStub(stack.channel("profile"))
    request = profile_pb2.GetCustomerContextRequest(identifier=event_pb2.Identifier(type="email", value=email))
    for _ in range(2):
        wait_until(lambda: _context(profile, request, md), 20, "the customer context")


def _context(stub: Any, request: Any, md: Any) -> bool:
    try:
        stub.GetCustomerContext(request, metadata=md, timeout=5)
    except grpc.RpcError:
        return False
    return True


@pytest.fixture(scope="module")
def driven(stack: Stack) -> Stack:
    drive_everything(stack)
    return stack


def expected(service: str) -> set[str]:
    names = set(EXPECTED_METRICS[service])
    if service in LEADING and importlib.util.find_spec("services.core.leader") is not None:
        names.add(LEADER_STATUS)
    return names


def wait_exported(receiver: Receiver, service: str) -> None:
    wait_until(lambda: not (expected(service) - receiver.exported(service)), 20, f"{service}'s metrics")


@pytest.mark.parametrize("service", SERVICES)
def test_each_service_exports_its_metrics_over_otlp(driven: Stack, receiver: Receiver, service: str) -> None:
    want = expected(service)

    def arrived() -> set[str] | None:
        return None if want - receiver.exported(service) else receiver.exported(service)

    try:
        wait_until(arrived, 20, f"{service}'s metrics")
    except AssertionError:
        missing = sorted(want - receiver.exported(service))
        raise AssertionError(f"tessera-{service} never exported {missing}\n{log_tails(driven)}") from None


@pytest.mark.parametrize("service", SERVICES)
def test_each_service_serves_its_metrics_to_prometheus_under_the_dashboards_names(
    driven: Stack, receiver: Receiver, service: str
) -> None:
    # Whatever this process exported over OTLP, it also serves, under the names derived from the
    # code (the ones the dashboard's check accepts).
    wait_exported(receiver, service)
    derived = prometheus_names(i for i in declared_instruments() if i.name in receiver.exported(service))
    text = driven.scrape(service)
    served = sample_names(text)
    for otel_name, names in derived.items():
        assert names <= served, f"{otel_name}: {sorted(names - served)} not on /metrics"
    assert f'service_name="tessera-{service}"' in text
    if service == "ingest":
        assert 'rpc_method="/tessera.v1.IngestService/IngestEvents"' in text
        assert 'status="accepted"' in text


def test_the_alerts_stream_continues_the_trace_of_the_batch_that_fired_it(driven: Stack, receiver: Receiver) -> None:
    """A system acting on the alerts stream can continue the trace: the entry carries the
    traceparent of a span inside the metrics consumer's batch that fired it."""
    tenant_id = driven.tenants[-1]
    key = driven.bus.key(tenant_id, streams.ALERTS.name)
    rows: list[Any] = wait_until(lambda: driven.bus.redis.xrange(key), 10, "the alerts stream")  # type: ignore[arg-type]
    (envelope,) = [streams.decode(streams.ALERTS, fields[streams.ENTRY_FIELD], tenant_id) for _id, fields in rows]
    assert envelope.alert.name == driven.alert
    _version, trace_id, span_id, _flags = envelope.traceparent.split("-")
    consumers = {
        s.span_id
        for name in ("consume resolved", "process resolved")
        for s in receiver.find("tessera-metrics", name)
        if s.trace_id == trace_id
    }

    def chain() -> list[str] | None:
        by_id = {s.span_id: s for s in receiver.trace(trace_id)}
        return [span_id, *ancestors(by_id[span_id], by_id)] if span_id in by_id else None

    assert consumers & set(wait_until(chain, 10, "the span that published the alert")), "a metrics consumer span"


def test_a_read_that_calls_another_service_is_one_trace(driven: Stack, receiver: Receiver) -> None:
    """GetCustomerContext asks metrics for the customer's scores: metrics' span is a child of
    profile's, in the same trace."""

    def calls() -> list[tuple[Span, Span]] | None:
        contexts = {
            s.span_id: s for s in receiver.find("tessera-profile", "tessera.v1.ProfileService/GetCustomerContext")
        }
        found = [
            (contexts[s.parent_id], s)
            for s in receiver.find("tessera-metrics", "tessera.v1.MetricsService/GetCustomerMetrics")
            if s.parent_id in contexts
        ]
        return found or None

    pairs = wait_until(calls, 10, "a metrics span under a GetCustomerContext span")
    assert all(parent.trace_id == child.trace_id for parent, child in pairs)


def test_the_dashboards_labels_are_on_the_metrics_it_reads(driven: Stack, receiver: Receiver) -> None:
    """Each label a panel filters or groups by is one the services really attach (a typo would
    silently show one unlabelled line); checked for every panel whose metrics this run recorded."""
    for service in SERVICES:
        wait_exported(receiver, service)
    labels: dict[str, set[str]] = {}
    for service in SERVICES:
        for family in text_string_to_metric_families(driven.scrape(service)):
            for sample in family.samples:
                labels.setdefault(sample.name, set()).update(sample.labels)
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    checked = 0
    for expr in expressions(dashboard):
        names = metric_names_in(expr)
        if not names <= labels.keys():
            continue  # not recorded in this run (dead letters, rate limits)
        have = set().union(*(labels[n] for n in names))
        assert labels_in(expr) <= have, f"{expr}: {sorted(labels_in(expr) - have)} not on {sorted(names)}"
        checked += 1
    assert checked >= 20, checked


def test_the_prometheus_names_cover_the_documented_table() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    derived = prometheus_names(declared_instruments())
    for names in EXPECTED_METRICS.values():
        for otel_name in names:
            assert f"`{otel_name}`" in readme, f"README's metric table lacks {otel_name}"
            assert any(f"`{n.removesuffix('_bucket')}" in readme for n in derived[otel_name]), otel_name
