"""GuardInterceptor on a tiny in-process server: credentials to tenant, errors to statuses,
internals never leaking, and health staying public. Real PostgreSQL holds the API keys."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy.engine import Engine

from services.core import tenancy
from services.core.errors import FailedPrecondition, InvalidArgument, NotFound, Violation
from services.core.interceptors import GuardInterceptor
from services.core.server import LoopThread
from services.core.tenancy import Authenticator, current_tenant
from tests.conftest import TenantKey, make_tenant
from tests.support.grpc_errors import bad_request

pytestmark = pytest.mark.integration

SERVICE = "test.v1.Probe"
TRACE_ID_RE = re.compile(r"trace id ([0-9a-f]{32})\b")


class Probe:
    """The fake service's behaviours; bytes in, bytes out."""

    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()

    def _count(self) -> None:
        with self.lock:
            self.calls += 1

    def Boom(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._count()
        raise RuntimeError("secret internals: password=hunter2")

    def Invalid(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._count()
        raise InvalidArgument("bad probe", [Violation("probe.name", "must not be empty", "REQUIRED")])

    def Missing(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._count()
        raise NotFound("probe p-1 not found")

    def Abort(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._count()
        context.abort(grpc.StatusCode.NOT_FOUND, "no such probe")
        raise AssertionError("unreachable")

    def Whoami(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._count()
        return current_tenant().tenant_id.encode()

    def Count(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        """Streams the tenant, then two items, then fails the way the request says."""
        self._count()
        yield current_tenant().tenant_id.encode()
        yield b"1"
        yield b"2"
        if request == b"crash":
            raise RuntimeError("secret internals: password=hunter2")
        raise FailedPrecondition("the probe ran dry", type_="DRY", subject="probes/p-1")

    def Upload(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        self._count()
        n = sum(1 for _ in requests)
        return f"{current_tenant().tenant_id}:{n}".encode()

    def Chat(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        self._count()
        for r in requests:
            if r == b"bad":
                raise InvalidArgument("bad chat line", [Violation("line", "must not be 'bad'")])
            yield r.upper()


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture(scope="module")
def probe() -> Probe:
    return Probe()


@pytest.fixture(scope="module")
def probe_server(engine: Engine, probe: Probe, spans: InMemorySpanExporter) -> Iterator[int]:
    """The probe on the asyncio server, as services.core.server builds one: plain handlers in a pool."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    loop = LoopThread("probe-grpc")
    pool = futures.ThreadPoolExecutor(max_workers=8)

    async def build() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(
            migration_thread_pool=pool,
            interceptors=[GuardInterceptor(Authenticator(engine, ttl=0), pool, provider.get_tracer("tests"))],
        )
        handlers: dict[str, Any] = {
            "Boom": grpc.unary_unary_rpc_method_handler(probe.Boom),
            "Invalid": grpc.unary_unary_rpc_method_handler(probe.Invalid),
            "Missing": grpc.unary_unary_rpc_method_handler(probe.Missing),
            "Abort": grpc.unary_unary_rpc_method_handler(probe.Abort),
            "Whoami": grpc.unary_unary_rpc_method_handler(probe.Whoami),
            "Count": grpc.unary_stream_rpc_method_handler(probe.Count),
            "Upload": grpc.stream_unary_rpc_method_handler(probe.Upload),
            "Chat": grpc.stream_stream_rpc_method_handler(probe.Chat),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        health_servicer = health.aio.HealthServicer()
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = loop.run(build(), 30)
    yield port
    loop.run(server.stop(grace=None), 30)
    loop.close()
    pool.shutdown()
    provider.shutdown()


@pytest.fixture(scope="module")
def channel(probe_server: int) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{probe_server}") as ch:
        yield ch


def unary(channel: grpc.Channel, method: str) -> Any:
    return channel.unary_unary(f"/{SERVICE}/{method}")


def test_unexpected_error_becomes_generic_internal_with_trace_id(
    channel: grpc.Channel, tenant: TenantKey, spans: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="services.core.interceptors")
    with pytest.raises(grpc.RpcError) as info:
        unary(channel, "Boom")(b"", metadata=tenant.metadata, timeout=10)
    err = info.value
    assert err.code() == grpc.StatusCode.INTERNAL
    details = err.details()
    assert "internal error" in details
    assert "hunter2" not in details and "secret" not in details and "RuntimeError" not in details
    match = TRACE_ID_RE.search(details)
    assert match, details
    trace_id = match.group(1)
    assert trace_id != "0" * 32
    # Nothing leaks through trailers either.
    for _key, value in err.trailing_metadata() or ():
        assert b"hunter2" not in (value if isinstance(value, bytes) else value.encode())
    # The trace id is the server span's, so the log line can be found from what the caller saw.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        ids = {format(s.context.trace_id, "032x") for s in spans.get_finished_spans() if s.name.endswith("/Boom")}
        if trace_id in ids:
            break
        time.sleep(0.02)
    assert trace_id in ids
    # ...and the server logged the real error.
    logged = [r.exc_info[1] for r in caplog.records if r.name == "services.core.interceptors" and r.exc_info]
    assert any("hunter2" in str(exc) for exc in logged)


def test_invalid_argument_carries_bad_request(channel: grpc.Channel, tenant: TenantKey) -> None:
    with pytest.raises(grpc.RpcError) as info:
        unary(channel, "Invalid")(b"", metadata=tenant.metadata, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "bad probe"
    assert bad_request(info.value) == [("probe.name", "must not be empty")]


def test_domain_error_maps_to_its_code(channel: grpc.Channel, tenant: TenantKey) -> None:
    with pytest.raises(grpc.RpcError) as info:
        unary(channel, "Missing")(b"", metadata=tenant.metadata, timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert info.value.details() == "probe p-1 not found"


def test_stream_that_fails_midway_ends_with_the_mapped_status(channel: grpc.Channel, tenant: TenantKey) -> None:
    got: list[bytes] = []
    with pytest.raises(grpc.RpcError) as info:
        for item in channel.unary_stream(f"/{SERVICE}/Count")(b"", metadata=tenant.metadata, timeout=10):
            got.append(item)
    assert got == [tenant.tenant_id.encode(), b"1", b"2"]
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.details() == "the probe ran dry"


def test_stream_that_crashes_midway_ends_internal_without_leaking(channel: grpc.Channel, tenant: TenantKey) -> None:
    got: list[bytes] = []
    with pytest.raises(grpc.RpcError) as info:
        for item in channel.unary_stream(f"/{SERVICE}/Count")(b"crash", metadata=tenant.metadata, timeout=10):
            got.append(item)
    assert got[1:] == [b"1", b"2"]
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "internal error" in info.value.details()
    assert "hunter2" not in info.value.details()


def test_handler_sees_the_tenant_of_the_key(channel: grpc.Channel, tenant: TenantKey, engine: Engine) -> None:
    assert unary(channel, "Whoami")(b"", metadata=tenant.metadata, timeout=10) == tenant.tenant_id.encode()
    other = make_tenant(engine, "other")
    assert unary(channel, "Whoami")(b"", metadata=other.metadata, timeout=10) == other.tenant_id.encode()
    # Scheme is case-insensitive and surrounding spaces are tolerated.
    md = (("authorization", f"bearer   {tenant.api_key} "),)
    assert unary(channel, "Whoami")(b"", metadata=md, timeout=10) == tenant.tenant_id.encode()


def test_client_streaming_and_bidi_are_guarded_too(channel: grpc.Channel, tenant: TenantKey) -> None:
    upload = channel.stream_unary(f"/{SERVICE}/Upload")
    assert upload(iter([b"a", b"b", b"c"]), metadata=tenant.metadata, timeout=10) == f"{tenant.tenant_id}:3".encode()
    chat = channel.stream_stream(f"/{SERVICE}/Chat")
    got: list[bytes] = []
    with pytest.raises(grpc.RpcError) as info:
        for item in chat(iter([b"hi", b"bad", b"never"]), metadata=tenant.metadata, timeout=10):
            got.append(item)
    assert got == [b"HI"]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request(info.value) == [("line", "must not be 'bad'")]
    with pytest.raises(grpc.RpcError) as info:
        upload(iter([b"a"]), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    "metadata",
    [
        (),
        (("authorization", ""),),
        (("authorization", "Bearer"),),
        (("authorization", "Basic dXNlcjpwYXNz"),),
        (("authorization", "Bearer tsk_00000000_not-a-real-key"),),
    ],
    ids=["none", "empty", "no-key", "basic", "unknown-key"],
)
def test_bad_credentials_are_unauthenticated(channel: grpc.Channel, probe: Probe, metadata: Any) -> None:
    before = probe.calls
    for method in ("Whoami", "Boom"):
        with pytest.raises(grpc.RpcError) as info:
            unary(channel, method)(b"", metadata=metadata, timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as info:
        list(channel.unary_stream(f"/{SERVICE}/Count")(b"", metadata=metadata, timeout=10))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert probe.calls == before, "a handler ran without credentials"


def test_revoked_key_is_refused_at_once_without_cache(channel: grpc.Channel, tenant: TenantKey, engine: Engine) -> None:
    assert unary(channel, "Whoami")(b"", metadata=tenant.metadata, timeout=10) == tenant.tenant_id.encode()
    key_id = tenant.api_key.split("_")[1]
    assert tenancy.revoke_api_key(engine, tenant.tenant_id, key_id)
    with pytest.raises(grpc.RpcError) as info:
        unary(channel, "Whoami")(b"", metadata=tenant.metadata, timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_stays_public(channel: grpc.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as info:
        stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_unknown_method_is_unimplemented(channel: grpc.Channel, tenant: TenantKey) -> None:
    with pytest.raises(grpc.RpcError) as info:
        unary(channel, "NoSuchMethod")(b"", metadata=tenant.metadata, timeout=10)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_a_handlers_own_abort_keeps_its_status(channel: grpc.Channel, tenant: TenantKey) -> None:
    with pytest.raises(grpc.RpcError) as info:
        unary(channel, "Abort")(b"", metadata=tenant.metadata, timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert info.value.details() == "no such probe"


def test_a_client_cancelling_a_stream_is_not_a_server_error(
    ingest_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """grpcurl cancels its reflection stream after every call; the server must not log that as an
    unhandled error (it used to, with a traceback at ERROR)."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    caplog.set_level(logging.DEBUG)
    with grpc.insecure_channel(f"127.0.0.1:{ingest_server.port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        for _ in range(3):
            calls = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")] * 1000))
            first = next(calls)
            assert first.list_services_response.service
            calls.cancel()
    time.sleep(0.5)  # let the server notice
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("services.")]
    assert errors == [], [r.getMessage() for r in errors]
