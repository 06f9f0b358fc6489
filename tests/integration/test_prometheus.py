"""``TESSERA_PROMETHEUS_PORT`` alone (no OTLP exporter) makes a service serve ``/metrics``: after one
RPC, the RPC latency and the ingest outcomes are there under the names the dashboard uses, which
are the names :mod:`tests.support.metric_names` derives from the code."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from services.core.harness import ServiceProcess, free_port, spawn_service, wait_serving
from services.core.settings import Settings
from tessera.v1 import ingest_pb2, ingest_pb2_grpc
from tests.conftest import TenantKey
from tests.support.events import track
from tests.support.metric_names import declared_instruments, prometheus_names, sample_names
from tests.support.profile import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXERCISED = ("tessera.rpc.duration", "tessera.ingest.events", "tessera.ingest.batch.duration")


@pytest.fixture
def ingest(settings: Settings, tmp_path: Path) -> Iterator[tuple[int, int]]:
    port, scrape = free_port(), free_port()
    env = {
        "TESSERA_DATABASE_URL": settings.require_database_url(),
        "TESSERA_REDIS_URL": settings.require_redis_url(),
        "TESSERA_REDIS_PREFIX": settings.redis_prefix,
        "TESSERA_BIND_HOST": "127.0.0.1",
        "TESSERA_INGEST_PORT": str(port),
        "TESSERA_PROMETHEUS_PORT": str(scrape),
        "TESSERA_AUTH_CACHE_SECONDS": "0",
        "OTEL_TRACES_EXPORTER": "none",
        "OTEL_METRICS_EXPORTER": "none",
    }
    proc: ServiceProcess = spawn_service("ingest", env, tmp_path / "ingest.log")
    try:
        wait_serving(f"127.0.0.1:{port}", proc, timeout=60)
        yield port, scrape
    finally:
        proc.stop(5)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


def test_one_rpc_shows_on_the_scrape_port_under_the_derived_names(ingest: tuple[int, int], tenant: TenantKey) -> None:
    port, scrape_port = ingest
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        resp = stub.IngestEvents(ingest_pb2.IngestEventsRequest(events=[track()]), metadata=tenant.metadata, timeout=10)
    assert resp.accepted_count == 1

    derived = prometheus_names(i for i in declared_instruments() if i.name in EXERCISED)
    assert set(derived) == set(EXERCISED)

    def served() -> str | None:
        try:
            text = scrape(scrape_port)
        except (urllib.error.URLError, OSError):
            return None
        return text if set().union(*derived.values()) <= sample_names(text) else None

    text = wait_until(served, 10, "the derived names on /metrics")
    assert set(derived["tessera.rpc.duration"]) == {
        "tessera_rpc_duration_seconds_bucket",
        "tessera_rpc_duration_seconds_sum",
        "tessera_rpc_duration_seconds_count",
    }
    assert derived["tessera.ingest.events"] == {"tessera_ingest_events_total"}
    lines = text.splitlines()
    rpc = [line for line in lines if line.startswith("tessera_rpc_duration_seconds_count{")]
    assert any(
        'rpc_method="/tessera.v1.IngestService/IngestEvents"' in line
        and 'rpc_grpc_status_code="OK"' in line
        and 'service_name="tessera-ingest"' in line
        for line in rpc
    ), rpc
    events = [line for line in lines if line.startswith("tessera_ingest_events_total{")]
    accepted = [line for line in events if 'status="accepted"' in line]
    assert accepted and float(accepted[0].rsplit(" ", 1)[1]) >= 1


def test_a_taken_scrape_port_stops_the_service_with_a_message_naming_the_setting(
    settings: Settings, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {
            "TESSERA_DATABASE_URL": settings.require_database_url(),
            "TESSERA_REDIS_URL": settings.require_redis_url(),
            "TESSERA_BIND_HOST": "127.0.0.1",
            "TESSERA_INGEST_PORT": str(free_port()),
            "TESSERA_PROMETHEUS_PORT": str(taken.getsockname()[1]),
        }
        proc = spawn_service("ingest", env, tmp_path / "ingest.log")
        try:
            assert proc.wait(60) == 2
        finally:
            proc.stop(1)
    assert "TESSERA_PROMETHEUS_PORT: cannot serve metrics on 127.0.0.1:" in proc.log_tail()


def test_the_gateway_counts_its_requests_by_route_pattern_on_the_scrape_port(
    settings: Settings, tmp_path: Path
) -> None:
    """The gateway is HTTP, not on the gRPC bootstrap, yet serves ``/metrics`` the same way: its
    requests by route pattern (a profile id in the path never becomes a label) and status."""
    port, scrape_port = free_port(), free_port()
    env = {
        "TESSERA_BIND_HOST": "127.0.0.1",
        "TESSERA_GATEWAY_PORT": str(port),
        "TESSERA_PROMETHEUS_PORT": str(scrape_port),
        "OTEL_TRACES_EXPORTER": "none",
        "OTEL_METRICS_EXPORTER": "none",
    }
    proc = spawn_service("gateway", env, tmp_path / "gateway.log")
    try:

        def up() -> bool | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
                    return resp.status == 200 or None
            except (urllib.error.URLError, OSError):
                return None

        wait_until(up, 30, "the gateway's /healthz")
        profile = "0b7c3f5e-8a41-4c55-9a3e-2f1d6c0e9b11"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/profiles/{profile}", timeout=5)
        assert refused.value.code == 401

        def served() -> str | None:
            try:
                text = scrape(scrape_port)
            except (urllib.error.URLError, OSError):
                return None
            return text if "tessera_gateway_requests_total{" in text else None

        text = wait_until(served, 10, "the gateway's request counter on /metrics")
    finally:
        proc.stop(5)
    requests = [line for line in text.splitlines() if line.startswith("tessera_gateway_requests_total{")]
    assert any('route="/healthz"' in line and 'status="200"' in line for line in requests), requests
    assert any('route="/api/v1/profiles/{profile_id}"' in line and 'status="401"' in line for line in requests), (
        requests
    )
    assert profile not in text
    assert "tessera_gateway_request_duration_seconds_bucket{" in text
