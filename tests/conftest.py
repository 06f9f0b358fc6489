"""Fixtures on real PostgreSQL and Redis (never mocks): one database and one Redis key
prefix per test run, dropped at the end; one tenant per test for isolation."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from sqlalchemy.engine import Engine

from services.cli import registry
from services.core import db, harness, tenancy
from services.core.bus import RedisClient, connect
from services.core.server import RunningServer, start_server
from services.core.settings import Settings
from tests.support.profile import Apis, apis

#: What a test server of each service runs with beyond the defaults (no caches to wait out).
SERVICE_OVERRIDES: dict[str, dict[str, object]] = {
    "identity": {"rules_cache_seconds": 0.0},
    "ingest": {"suppression_cache_seconds": 0.2},
    "metrics": {"settings_cache_seconds": 0.0},
    "profile": {
        "metrics_address": "",
        "rules_cache_seconds": 0.5,
        "erasure_settle_seconds": 0.5,
        "erasure_poll_seconds": 0.1,
        "watch_poll_ms": 50,
    },
}
#: Lets the session's profile server act for tenants in identity and ingest (erasure).
SERVICE_TOKEN = "tests-service-token-0123456789abcdef"
#: Every metric recorded in this process, the in-process servers' included. Installed before any
#: test runs, so it is the meter provider they all use (a later configure_telemetry keeps it).
METRICS = InMemoryMetricReader()


def pytest_configure(config: pytest.Config) -> None:
    metrics.set_meter_provider(MeterProvider(metric_readers=[METRICS]))


@pytest.fixture(scope="session")
def backends() -> Iterator[harness.Scratch]:
    """This run's database and key prefix, on the servers CI names, else embedded ones."""
    with harness.scratch(
        "test",
        registry.migration_sets(),
        database_url=harness.configured("TESSERA_TEST_DATABASE_URL"),
        redis_url=harness.configured("TESSERA_TEST_REDIS_URL"),
        # Set, the whole suite runs on a Redis Cluster (an embedded one unless the URL names a node).
        redis_cluster=harness.configured("TESSERA_TEST_REDIS_CLUSTER") is not None,
    ) as found:
        yield found


@pytest.fixture(scope="session")
def database_url(backends: harness.Scratch) -> str:
    return backends.database_url


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[Engine]:
    eng = db.make_engine(database_url, application_name="tests", pool_size=4, instrument=False)
    yield eng
    eng.dispose()


@pytest.fixture(scope="session")
def redis_server_url(backends: harness.Scratch) -> str:
    return backends.redis_url


@pytest.fixture(scope="session")
def redis_prefix(backends: harness.Scratch) -> str:
    return backends.redis_prefix


@pytest.fixture(scope="session")
def redis_client(backends: harness.Scratch) -> Iterator[RedisClient]:
    client = connect(backends.redis_url, cluster=backends.redis_cluster)
    yield client
    client.close()


@pytest.fixture(scope="session")
def settings(database_url: str, backends: harness.Scratch) -> Settings:
    return Settings(
        database_url=database_url,
        redis_url=backends.redis_url,
        redis_prefix=backends.redis_prefix,
        redis_cluster=backends.redis_cluster,
        bind_host="127.0.0.1",
        health_interval_seconds=0.1,
        outbox_sweep_seconds=0.2,
        outbox_grace_seconds=1.0,
        shutdown_grace_seconds=5.0,
        auth_cache_seconds=0.0,
        consumer_block_ms=100,
        consumer_claim_idle_ms=2000,
        tenant_refresh_seconds=0.1,
        service_token=SERVICE_TOKEN,
    )


@dataclass(frozen=True)
class TenantKey:
    tenant_id: str
    api_key: str

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.api_key}"),)


def make_tenant(engine: Engine, label: str = "t") -> TenantKey:
    tenant_id = f"{label}-{secrets.token_hex(4)}"
    return TenantKey(tenant_id, tenancy.create_tenant(engine, tenant_id))


@pytest.fixture
def tenant(engine: Engine) -> TenantKey:
    return make_tenant(engine)


def _serve(service: str, settings: Settings, **extra: object) -> Iterator[RunningServer]:
    """A service in this process on a free port, SERVING before the tests get it."""
    definition = registry.grpc_definition(service)
    own = definition.settings_type(**{**SERVICE_OVERRIDES.get(service, {}), **extra})
    running = start_server(definition, settings, port=0, service_settings=own)
    assert harness.wait_health(f"127.0.0.1:{running.port}"), f"{service} never became SERVING"
    yield running
    running.shutdown(grace=1)


@pytest.fixture(scope="session")
def ingest_server(settings: Settings) -> Iterator[RunningServer]:
    yield from _serve("ingest", settings)


@pytest.fixture(scope="session")
def ingest_channel(ingest_server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{ingest_server.port}") as channel:
        yield channel


@pytest.fixture(scope="session")
def identity_server(settings: Settings) -> Iterator[RunningServer]:
    yield from _serve("identity", settings)


@pytest.fixture(scope="session")
def identity_channel(identity_server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{identity_server.port}") as channel:
        yield channel


def _profile(
    settings: Settings, ingest_server: RunningServer, identity_server: RunningServer, **extra: object
) -> Iterator[RunningServer]:
    peers = {
        "identity_address": f"127.0.0.1:{identity_server.port}",
        "ingest_address": f"127.0.0.1:{ingest_server.port}",
    }
    yield from _serve("profile", settings, **{**peers, **extra})


@pytest.fixture(scope="session")
def profile_server(
    settings: Settings, ingest_server: RunningServer, identity_server: RunningServer
) -> Iterator[RunningServer]:
    yield from _profile(settings, ingest_server, identity_server)


@pytest.fixture
def start_profile_server(
    settings: Settings, ingest_server: RunningServer, identity_server: RunningServer
) -> Iterator[Callable[..., RunningServer]]:
    """Starts profile servers with other settings (``metrics_address=...``) for one test; they
    share the database and Redis with the session's and stop when the test ends."""
    started: list[Iterator[RunningServer]] = []

    def start(**extra: object) -> RunningServer:
        served = _profile(settings, ingest_server, identity_server, **extra)
        started.append(served)
        return next(served)

    yield start
    for served in reversed(started):
        next(served, None)  # past the yield: the shutdown


@pytest.fixture(scope="session")
def metrics_server(settings: Settings) -> Iterator[RunningServer]:
    yield from _serve("metrics", settings)


@pytest.fixture(scope="session")
def metrics_channel(metrics_server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{metrics_server.port}") as channel:
        yield channel


@pytest.fixture(scope="session")
def profile_channel(profile_server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{profile_server.port}") as channel:
        yield channel


@pytest.fixture
def tmp_data_dir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def api(
    ingest_channel: grpc.Channel,
    identity_channel: grpc.Channel,
    profile_channel: grpc.Channel,
    engine: Engine,
    tenant: TenantKey,
) -> Apis:
    """The public APIs as one test tenant drives them (ingest in, identity and profile out)."""
    return apis(ingest_channel, identity_channel, profile_channel, engine, tenant.tenant_id, tenant.metadata)
