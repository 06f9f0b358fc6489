"""The ingest service as the core bootstrap runs it."""

from __future__ import annotations

from pathlib import Path

import grpc

from services.core import tenancy
from services.core.migrate import MigrationSet
from services.core.outbox import Outbox
from services.core.periodic import Periodic
from services.core.ratelimit import RateLimiter
from services.core.server import Background, ServiceContext, ServiceDefinition
from services.ingest.pipeline import Ingestor
from services.ingest.servicer import IngestServicer
from services.ingest.settings import IngestSettings
from services.ingest.storage import EventLogOutbox, EventStore
from tessera.v1 import ingest_pb2, ingest_pb2_grpc

SERVICE_NAME = ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name
MIGRATIONS = MigrationSet("ingest", Path(__file__).resolve().parent / "migrations")


def register(server: grpc.aio.Server, ctx: ServiceContext, own: IngestSettings) -> list[Background]:
    store = EventStore(ctx.engine, ctx.autocommit_engine)
    outbox = Outbox(
        ctx.engine,
        ctx.bus,
        EventLogOutbox(),
        sweep_seconds=ctx.settings.outbox_sweep_seconds,
        grace_seconds=ctx.settings.outbox_grace_seconds,
        sweep_limit=50,
    )
    ingestor = Ingestor(
        store,
        outbox,
        RateLimiter(ctx.redis),
        redis_prefix=ctx.settings.redis_prefix,
        default_rate=own.rate_limit,
        default_burst=own.rate_burst,
        dedupe_window_days=own.dedupe_window_days,
        suppression_cache_seconds=own.suppression_cache_seconds,
    )
    servicer = IngestServicer(ingestor, ctx.in_pool, ctx.settings.stream_idle_seconds)
    ingest_pb2_grpc.add_IngestServiceServicer_to_server(servicer, server)

    def upkeep() -> dict[str, int]:
        longest = max(own.dedupe_window_days, tenancy.longest_dedupe_window(ctx.engine) or 0)
        return store.upkeep(keep_dedupe_days=longest)

    return [outbox, Periodic("partition upkeep", 3600.0, upkeep, leader=ctx.leader)]


def definition() -> ServiceDefinition[IngestSettings]:
    return ServiceDefinition(
        name="ingest",
        grpc_services=[SERVICE_NAME],
        settings_type=IngestSettings,
        register=register,
        migrations=MIGRATIONS,
        redis_required=False,
        # Validation rejects an event with a NUL on its own, and keeps the good ones beside it.
        own_text_checks=(f"/{SERVICE_NAME}/IngestEvents", f"/{SERVICE_NAME}/StreamEvents"),
    )
