"""The metrics service as the core bootstrap runs it: the metrics and quality APIs, the ``metrics``
consumers on the resolved and changes streams (facts, then transcripts and evaluations), and
upkeep of the open FCR contacts."""

from __future__ import annotations

from pathlib import Path

import grpc

from services.core import streams
from services.core.migrate import MigrationSet
from services.core.outbox import Outbox
from services.core.periodic import Periodic
from services.core.server import Background, ServiceContext, ServiceDefinition
from services.metrics.consumer import CHANGES_GROUP, RESOLVED_GROUP, ChangesHandler, ConfigCache, ResolvedHandler
from services.metrics.quality import Quality
from services.metrics.quality_servicer import QualityServicer
from services.metrics.quality_storage import OUTBOX, QualityStore
from services.metrics.reads import MetricsReads
from services.metrics.servicer import MetricsServicer
from services.metrics.settings import MetricsSettings
from services.metrics.storage import MetricsStore
from tessera.v1 import metrics_pb2, metrics_pb2_grpc, quality_pb2, quality_pb2_grpc

SERVICE_NAME = metrics_pb2.DESCRIPTOR.services_by_name["MetricsService"].full_name
QUALITY_SERVICE_NAME = quality_pb2.DESCRIPTOR.services_by_name["QualityService"].full_name
MIGRATIONS = MigrationSet("metrics", Path(__file__).resolve().parent / "migrations")


def register(server: grpc.aio.Server, ctx: ServiceContext, own: MetricsSettings) -> list[Background]:
    store = MetricsStore(ctx.engine, reader=ctx.autocommit_engine)
    outbox = Outbox(
        ctx.engine,
        ctx.bus,
        OUTBOX,
        grace_seconds=ctx.settings.outbox_grace_seconds,
        sweep_seconds=ctx.settings.outbox_sweep_seconds,
    )
    quality = QualityStore(ctx.engine, reader=ctx.autocommit_engine, outbox=outbox)
    configs = ConfigCache(store, own.settings_cache_seconds)
    metrics_pb2_grpc.add_MetricsServiceServicer_to_server(
        MetricsServicer(MetricsReads(store, configs.get, quality)), server
    )
    quality_api = QualityServicer(Quality(quality, configs.get), ctx.in_pool, own.watch_poll_ms / 1000)
    quality_pb2_grpc.add_QualityServiceServicer_to_server(quality_api, server)
    workers: list[Background] = list(
        ctx.consumer_workers(
            own.consumers,
            (streams.RESOLVED, RESOLVED_GROUP, ResolvedHandler(store, configs.get, quality)),
            (streams.CHANGES, CHANGES_GROUP, ChangesHandler(store, configs.get, quality)),
        )
    )
    workers.append(Periodic("metrics upkeep", own.upkeep_seconds, store.upkeep, leader=ctx.leader))
    workers.append(outbox)
    workers.append(Periodic("quality re-evaluation", 0.25, lambda: quality.drain_reevaluations(configs.get)))
    return workers


def definition() -> ServiceDefinition[MetricsSettings]:
    return ServiceDefinition(
        name="metrics",
        grpc_services=[SERVICE_NAME, QUALITY_SERVICE_NAME],
        settings_type=MetricsSettings,
        register=register,
        migrations=MIGRATIONS,
    )
