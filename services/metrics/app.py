"""The metrics service as the core bootstrap runs it: the API, and the ``metrics`` consumers on
the resolved and changes streams, and upkeep of the open FCR contacts."""

from __future__ import annotations

from pathlib import Path

import grpc

from services.core import tenancy
from services.core.bus import ConsumerWorker, consumer_name
from services.core.migrate import MigrationSet
from services.core.periodic import Periodic
from services.core.server import Background, ServiceContext, ServiceDefinition
from services.metrics.consumer import ConfigCache, build_consumers
from services.metrics.reads import MetricsReads
from services.metrics.servicer import MetricsServicer
from services.metrics.settings import MetricsSettings
from services.metrics.storage import MetricsStore
from tessera.v1 import metrics_pb2, metrics_pb2_grpc

SERVICE_NAME = metrics_pb2.DESCRIPTOR.services_by_name["MetricsService"].full_name
MIGRATIONS = MigrationSet("metrics", Path(__file__).resolve().parent / "migrations")


def register(server: grpc.aio.Server, ctx: ServiceContext, own: MetricsSettings) -> list[Background]:
    s = ctx.settings
    store = MetricsStore(ctx.engine, reader=ctx.autocommit_engine)
    configs = ConfigCache(store, own.settings_cache_seconds)
    metrics_pb2_grpc.add_MetricsServiceServicer_to_server(MetricsServicer(MetricsReads(store, configs.get)), server)
    workers: list[Background] = []
    for n in range(own.consumers):
        resolved, changes = build_consumers(
            store,
            configs.get,
            ctx.bus,
            lambda: tenancy.tenant_ids(ctx.engine),
            name=f"{consumer_name()}-{n}",
            batch_size=s.consumer_batch_size,
            block_ms=s.consumer_block_ms,
            claim_idle_ms=s.consumer_claim_idle_ms,
            max_attempts=s.consumer_max_attempts,
            tenant_refresh_seconds=s.tenant_refresh_seconds,
        )
        workers += [ConsumerWorker(resolved), ConsumerWorker(changes)]
    workers.append(Periodic("metrics upkeep", own.upkeep_seconds, store.upkeep))
    return workers


def definition() -> ServiceDefinition[MetricsSettings]:
    return ServiceDefinition(
        name="metrics",
        grpc_services=[SERVICE_NAME],
        settings_type=MetricsSettings,
        register=register,
        migrations=MIGRATIONS,
    )
