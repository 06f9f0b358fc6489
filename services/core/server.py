"""One way to run a Tessera gRPC service: health, reflection, limits, telemetry, graceful stop.

Health is NOT_SERVING until PostgreSQL (and Redis, where the service needs it) answer,
and again whenever they stop answering. On SIGTERM health flips to NOT_SERVING, in-flight
RPCs get ``shutdown_grace_seconds`` to finish, background workers stop, then pools close
(the order of grpc's graceful-shutdown example).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import grpc
import redis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from sqlalchemy.engine import Engine

from services.core import db
from services.core.bus import Bus, connect
from services.core.interceptors import GuardInterceptor
from services.core.migrate import MigrationSet
from services.core.settings import EnvSettings, Settings
from services.core.telemetry import configure_logging, configure_telemetry, shutdown_telemetry
from services.core.tenancy import Authenticator

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
POSTGRES_HEALTH = "tessera.dependency.postgres"
REDIS_HEALTH = "tessera.dependency.redis"


class Background(Protocol):
    """A worker thread a service runs beside its servicer (an outbox relay, a consumer)."""

    def start(self) -> None: ...

    def stop(self, timeout: float) -> None: ...


@dataclass
class ServiceContext:
    """What a service's ``register`` gets: shared pools, built once per process."""

    settings: Settings
    engine: Engine
    # Same database, autocommit connections: for writes that are one statement.
    autocommit_engine: Engine
    redis: redis.Redis
    bus: Bus
    authenticator: Authenticator


S = TypeVar("S", bound=EnvSettings)


@dataclass
class ServiceDefinition(Generic[S]):
    """What the bootstrap needs to run a service: its gRPC services, its own settings type, the
    function that adds its servicers and returns its background workers, and its migrations."""

    name: str
    grpc_services: Sequence[str]
    settings_type: type[S]
    register: Callable[[grpc.Server, ServiceContext, S], list[Background]]
    migrations: MigrationSet | None = None
    # Ingest keeps serving while Redis is down (its outbox catches up later); readers do not.
    redis_required: bool = True

    def settings_from_env(self) -> S:
        return self.settings_type.from_env()


@dataclass
class RunningServer:
    definition: ServiceDefinition[Any]
    ctx: ServiceContext
    server: grpc.Server
    health: health.HealthServicer
    port: int
    workers: list[Background]
    _stop_watch: threading.Event = field(default_factory=threading.Event)
    _watcher: threading.Thread | None = None
    _stopped: bool = False

    def start_watching(self) -> None:
        self._watcher = threading.Thread(target=self._watch, name="health-watch", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        """Follow the dependencies; log only transitions, so an outage is one line, not a flood."""
        last: dict[str, bool] = {}
        interval = self.ctx.settings.health_interval_seconds
        while not self._stop_watch.is_set():
            states = {POSTGRES_HEALTH: _probe(lambda: db.ping(self.ctx.engine))}
            states[REDIS_HEALTH] = _probe(self.ctx.redis.ping)
            serving = states[POSTGRES_HEALTH] and (states[REDIS_HEALTH] or not self.definition.redis_required)
            states[""] = serving
            for name in self.definition.grpc_services:
                states[name] = serving
            for name, ok in states.items():
                if last.get(name) != ok:
                    if name.startswith("tessera.dependency"):
                        log.log(
                            logging.INFO if ok else logging.WARNING,
                            "dependency %s",
                            "up" if ok else "down",
                            extra={"dependency": name.rsplit(".", 1)[-1]},
                        )
                    status = (
                        health_pb2.HealthCheckResponse.SERVING if ok else (health_pb2.HealthCheckResponse.NOT_SERVING)
                    )
                    self.health.set(name, status)
            last = states
            self._stop_watch.wait(interval)

    def shutdown(self, grace: float | None = None) -> None:
        if self._stopped:
            return
        self._stopped = True
        grace = self.ctx.settings.shutdown_grace_seconds if grace is None else grace
        log.info("shutting down", extra={"grace_seconds": grace})
        self._stop_watch.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        for worker in self.workers:
            worker.stop(timeout=max(grace, 1.0))
        self.ctx.engine.dispose()
        self.ctx.autocommit_engine.dispose()
        self.ctx.redis.close()
        log.info("stopped")


def _probe(fn: Callable[[], Any]) -> bool:
    try:
        fn()
        return True
    except Exception:
        return False


def build_context(settings: Settings, service: str) -> ServiceContext:
    engine = db.make_engine(settings.require_database_url(), application_name=service, pool_size=settings.db_pool_size)
    autocommit_engine = db.make_engine(
        settings.require_database_url(),
        application_name=service,
        pool_size=settings.db_pool_size,
        autocommit=True,
    )
    client = connect(settings.require_redis_url())
    return ServiceContext(
        settings=settings,
        engine=engine,
        autocommit_engine=autocommit_engine,
        redis=client,
        bus=Bus(client, settings.redis_prefix, settings.stream_maxlen),
        authenticator=Authenticator(engine, ttl=settings.auth_cache_seconds),
    )


def start_server(
    definition: ServiceDefinition[S],
    settings: Settings,
    port: int | None = None,
    service_settings: S | None = None,
) -> RunningServer:
    """Build and start the server; it reports NOT_SERVING until its dependencies answer.

    ``service_settings`` defaults to the service's own ``TESSERA_*`` variables; ``port`` to its
    configured port (0 picks a free one).
    """
    from opentelemetry.instrumentation.grpc import server_interceptor

    own = definition.settings_from_env() if service_settings is None else service_settings
    ctx = build_context(settings, definition.name)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.grpc_workers, thread_name_prefix="rpc"),
        interceptors=[server_interceptor(), GuardInterceptor(ctx.authenticator)],  # type: ignore[no-untyped-call]
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.keepalive_permit_without_calls", 1),
        ],
        maximum_concurrent_rpcs=settings.grpc_workers * 8,
    )
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    for name in ("", *definition.grpc_services, POSTGRES_HEALTH, REDIS_HEALTH):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    workers = definition.register(server, ctx, own)
    reflection.enable_server_reflection(
        (*definition.grpc_services, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{settings.bind_host}:{_port(own) if port is None else port}"
    if settings.tls_cert_file and settings.tls_key_file:
        creds = grpc.ssl_server_credentials([(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())])
        bound = server.add_secure_port(address, creds)
    else:
        bound = server.add_insecure_port(address)
    server.start()
    running = RunningServer(definition, ctx, server, health_servicer, bound, workers)
    for worker in workers:
        worker.start()
    running.start_watching()
    log.info("serving", extra={"service": definition.name, "port": bound, "tls": bool(settings.tls_cert_file)})
    return running


def _port(own: EnvSettings) -> int:
    port = getattr(own, "port", None)
    if not isinstance(port, int):
        raise TypeError(f"{type(own).__name__} has no port setting")
    return port


def serve(definition: ServiceDefinition[S], settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully. Every setting is checked before anything starts."""
    own = definition.settings_from_env()
    configure_logging(definition.name, settings.log_level)
    configure_telemetry(definition.name)
    running = start_server(definition, settings, service_settings=own)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal received", extra={"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stop.wait()
    running.shutdown()
    shutdown_telemetry()
