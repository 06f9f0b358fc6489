"""One way to run a Tessera gRPC service: health, reflection, limits, telemetry, graceful stop.

The server is gRPC's asyncio server on an event loop of its own thread. Plain handlers run in a
thread pool (``TESSERA_GRPC_WORKERS``); coroutine and async-generator handlers run on the loop,
so an idle or slow stream holds no thread and can never starve health checks, unary calls or
other tenants. Reflection and health are the asyncio versions. Each connection may hold at most
``TESSERA_GRPC_MAX_STREAMS_PER_CONNECTION`` streams, keepalive pings are policed, and a stream
that sends nothing for ``TESSERA_STREAM_IDLE_SECONDS`` is ended by the servicers that read one.

Health is NOT_SERVING until PostgreSQL (and Redis, where the service needs it) answer, and again
whenever they stop answering. On SIGTERM health flips to NOT_SERVING, in-flight RPCs get
``shutdown_grace_seconds`` to finish, background workers stop, then pools close (the order of
grpc's graceful-shutdown example).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import signal
import threading
from collections.abc import Callable, Coroutine, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from sqlalchemy.engine import Engine

from services.core import db, tenancy
from services.core.bus import Bus, Consumer, ConsumerWorker, Delivery, RedisClient, connect, consumer_name
from services.core.interceptors import GuardInterceptor, StreamSlots
from services.core.leader import Leadership, build_leadership
from services.core.migrate import MigrationSet
from services.core.periodic import Periodic
from services.core.settings import EnvSettings, Settings
from services.core.streams import Stream
from services.core.telemetry import configure_logging, configure_telemetry, shutdown_telemetry
from services.core.tenancy import Authenticator

log = logging.getLogger(__name__)

# The largest request: a batch may be 4 MiB (validation refuses more with INVALID_ARGUMENT and
# field violations); a little framing on top is allowed, anything larger is refused by gRPC.
MAX_RECEIVE_BYTES = 4 * 1024 * 1024 + 64 * 1024
MAX_SEND_BYTES = 16 * 1024 * 1024
POSTGRES_HEALTH = "tessera.dependency.postgres"
REDIS_HEALTH = "tessera.dependency.redis"
# SERVING from start-up to shutdown whatever the dependencies do: a liveness probe asks this one,
# so an outage of PostgreSQL or Redis takes pods out of rotation (readiness) without restarting them.
LIVENESS_HEALTH = "tessera.liveness"
T = TypeVar("T")


class LoopThread:
    """An asyncio event loop on a thread of its own, for a server the rest of the process drives
    with plain calls (tests, the health watcher, the signal handler)."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


class Background(Protocol):
    """A worker thread a service runs beside its servicer (an outbox relay, a consumer)."""

    def start(self) -> None: ...

    def stop(self, timeout: float) -> None: ...


#: A consumer group's part of a service: which stream, which group, what handles a batch.
ConsumerGroup = tuple[Stream[Any], str, Callable[[list[Delivery[Any]]], None]]


@dataclass
class ServiceContext:
    """What a service's ``register`` gets: shared pools, built once per process."""

    settings: Settings
    engine: Engine
    # Same database, autocommit connections: for writes that are one statement.
    autocommit_engine: Engine
    redis: RedisClient
    bus: Bus
    authenticator: Authenticator
    # Where plain handlers run, and where async handlers send blocking work (see in_pool).
    executor: futures.ThreadPoolExecutor
    # This process's campaign for the service's singleton work (started before the workers, stopped
    # after them): give it to a Periodic (``leader=``) that must run once per cluster.
    leader: Leadership

    def consumer_workers(self, count: int, *groups: ConsumerGroup) -> list[ConsumerWorker]:
        """``count`` consumers per process in each (stream, group, handler), on the shared consumer
        settings, each on its own thread, reading every tenant's stream."""
        s = self.settings
        return [
            ConsumerWorker(
                Consumer(
                    bus=self.bus,
                    stream=stream,
                    group=group,
                    name=f"{consumer_name()}-{n}",
                    handler=handler,
                    tenants=lambda: tenancy.tenant_ids(self.engine),
                    batch_size=s.consumer_batch_size,
                    block_ms=s.consumer_block_ms,
                    claim_idle_ms=s.consumer_claim_idle_ms,
                    max_attempts=s.consumer_max_attempts,
                    tenant_refresh_seconds=s.tenant_refresh_seconds,
                )
            )
            for n in range(count)
            for stream, group, handler in groups
        ]

    async def in_pool(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking work (SQL, a batch's Python) in the pool, in the caller's context (its span
        and tenant), without holding the event loop."""
        ctx = contextvars.copy_context()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(ctx.run, fn, *args))


S = TypeVar("S", bound=EnvSettings)


@dataclass
class ServiceDefinition(Generic[S]):
    """What the bootstrap needs to run a service: its gRPC services, its own settings type, the
    function that adds its servicers and returns its background workers, and its migrations."""

    name: str
    grpc_services: Sequence[str]
    settings_type: type[S]
    register: Callable[[grpc.aio.Server, ServiceContext, S], list[Background]]
    migrations: MigrationSet | None = None
    # Ingest keeps serving while Redis is down (its outbox catches up later); readers do not.
    redis_required: bool = True
    # Full method names ("/pkg.Service/Method") whose servicers check the text of their requests
    # themselves, item by item; every other request is refused if any string holds a NUL.
    own_text_checks: Sequence[str] = ()

    def settings_from_env(self) -> S:
        return self.settings_type.from_env()


@dataclass(frozen=True)
class HttpServiceDefinition(Generic[S]):
    """A service that serves HTTP on a loop of its own (the gateway): no gRPC health, reflection
    or schema. ``run`` blocks until SIGTERM or SIGINT, then drains."""

    name: str
    settings_type: type[S]
    run: Callable[[Settings, S], None]
    migrations: MigrationSet | None = None

    def settings_from_env(self) -> S:
        return self.settings_type.from_env()


@dataclass
class RunningServer:
    definition: ServiceDefinition[Any]
    ctx: ServiceContext
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    workers: list[Background]
    loop: LoopThread
    _stop_watch: threading.Event = field(default_factory=threading.Event)
    _watcher: threading.Thread | None = None
    _stopped: bool = False

    def set_health(self, name: str, status: int) -> None:
        self.loop.run(self.health.set(name, status), timeout=10)

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
                if last.get(name) != ok and not self._stop_watch.is_set():
                    if name.startswith("tessera.dependency"):
                        log.log(
                            logging.INFO if ok else logging.WARNING,
                            "dependency %s",
                            "up" if ok else "down",
                            extra={"dependency": name.rsplit(".", 1)[-1]},
                        )
                    status = (
                        health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
                    )
                    self.set_health(name, status)
            last = states
            self._stop_watch.wait(interval)

    def shutdown(self, grace: float | None = None) -> None:
        if self._stopped:
            return
        self._stopped = True
        grace = self.ctx.settings.shutdown_grace_seconds if grace is None else grace
        log.info("shutting down", extra={"grace_seconds": grace})
        self._stop_watch.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        self.loop.run(self.health.enter_graceful_shutdown(), timeout=10)
        self.loop.run(self.server.stop(grace), timeout=grace + 10)
        for worker in self.workers:
            worker.stop(timeout=max(grace, 1.0))
        self.ctx.leader.stop(timeout=5.0)  # releases the lock: a successor takes over at once
        self.ctx.executor.shutdown(wait=False, cancel_futures=True)
        self.loop.close()
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
    client = connect(settings.require_redis_url(), cluster=settings.redis_cluster)
    return ServiceContext(
        settings=settings,
        engine=engine,
        autocommit_engine=autocommit_engine,
        redis=client,
        bus=Bus(client, settings.redis_prefix, settings.stream_maxlen, wait_replicas=settings.redis_wait_replicas),
        authenticator=Authenticator(engine, ttl=settings.auth_cache_seconds, service_token=settings.service_token),
        executor=futures.ThreadPoolExecutor(max_workers=settings.grpc_workers, thread_name_prefix="rpc"),
        leader=build_leadership(settings, service),
    )


def server_options(settings: Settings) -> list[tuple[str, Any]]:
    """Limits every server has: message sizes, streams per connection, keepalive policing."""
    return [
        ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
        ("grpc.max_send_message_length", MAX_SEND_BYTES),
        ("grpc.so_reuseport", 0),
        ("grpc.max_concurrent_streams", settings.grpc_max_streams_per_connection),
        # Pings from clients: at most one every 10 s without data, and none without calls, or
        # the connection is closed (grpc's ping-strike policy); ours keep idle links alive.
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 0),
        # A connection with no RPC for this long is closed; one that lived long is drained, so
        # load spreads again over new replicas.
        ("grpc.max_connection_idle_ms", 300_000),
        ("grpc.max_connection_age_ms", 3_600_000),
        ("grpc.max_connection_age_grace_ms", 30_000),
    ]


async def _build(
    definition: ServiceDefinition[S], ctx: ServiceContext, own: S, address: str, settings: Settings
) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int, list[Background]]:
    server = grpc.aio.server(
        migration_thread_pool=ctx.executor,
        interceptors=[
            GuardInterceptor(
                ctx.authenticator,
                ctx.executor,
                stream_slots=StreamSlots(settings.max_streams_per_tenant, settings.max_public_streams),
                own_text_checks=frozenset(definition.own_text_checks),
            )
        ],
        options=server_options(settings),
    )
    health_servicer = health.aio.HealthServicer()
    for name in ("", *definition.grpc_services, POSTGRES_HEALTH, REDIS_HEALTH):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await health_servicer.set(LIVENESS_HEALTH, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    workers = definition.register(server, ctx, own)
    if definition.migrations is not None and settings.analyze_seconds:
        schema = definition.migrations.schema
        analyze = db.StaleStatistics(ctx.engine, schema)
        workers.append(Periodic(f"{schema} statistics", settings.analyze_seconds, analyze, leader=ctx.leader))
    reflection.enable_server_reflection(
        (*definition.grpc_services, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    if settings.tls_cert_file and settings.tls_key_file:
        creds = grpc.ssl_server_credentials([(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())])
        bound = server.add_secure_port(address, creds)
    else:
        bound = server.add_insecure_port(address)
    await server.start()
    return server, health_servicer, bound, workers


def start_server(
    definition: ServiceDefinition[S],
    settings: Settings,
    port: int | None = None,
    service_settings: S | None = None,
) -> RunningServer:
    """Build and start the server on its own event loop thread; it reports NOT_SERVING until its
    dependencies answer. ``service_settings`` defaults to the service's own ``TESSERA_*``
    variables; ``port`` to its configured port (0 picks a free one)."""
    own = definition.settings_from_env() if service_settings is None else service_settings
    ctx = build_context(settings, definition.name)
    loop = LoopThread(f"{definition.name}-grpc")
    address = f"{settings.bind_host}:{_port(own) if port is None else port}"
    try:
        server, health_servicer, bound, workers = loop.run(_build(definition, ctx, own, address, settings), 30)
    except BaseException:
        loop.close()
        raise
    running = RunningServer(definition, ctx, server, health_servicer, bound, workers, loop)
    ctx.leader.start()
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
    configure_telemetry(definition.name, settings.prometheus_port, settings.bind_host)
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
