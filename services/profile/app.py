"""The profile service as the core bootstrap runs it: the API, the ``profile`` consumers on the
resolved and changes streams, the erasure worker and partition/feed upkeep."""

from __future__ import annotations

from pathlib import Path

import grpc

from services.core import streams
from services.core.channels import service_channel
from services.core.hotredis import HotRedis
from services.core.migrate import MigrationSet
from services.core.periodic import Periodic
from services.core.server import Background, ServiceContext, ServiceDefinition
from services.profile import clients
from services.profile.cache import ContextCache
from services.profile.consumer import CHANGES_GROUP, RESOLVED_GROUP, ChangesHandler, ConfigCache, ResolvedHandler
from services.profile.erasure import ErasureWorker
from services.profile.erasure_store import ErasureStore
from services.profile.reads import ProfileReads
from services.profile.servicer import ProfileServicer
from services.profile.settings import ProfileSettings
from services.profile.storage import ProfileStore
from services.profile.writes import ProfileWrites
from tessera.v1 import profile_pb2, profile_pb2_grpc

SERVICE_NAME = profile_pb2.DESCRIPTOR.services_by_name["ProfileService"].full_name
MIGRATIONS = MigrationSet("profile", Path(__file__).resolve().parent / "migrations")


def register(server: grpc.aio.Server, ctx: ServiceContext, own: ProfileSettings) -> list[Background]:
    s = ctx.settings
    cache = ContextCache(
        ctx.redis,
        # The hot path is one connection to one node; on a cluster the ordinary client routes.
        None if s.redis_cluster else HotRedis(s.require_redis_url()),
        s.redis_prefix,
        context_seconds=own.context_cache_seconds,
        owner_seconds=own.owner_cache_seconds,
    )
    # Every writing transaction holds the caches of what it changes, just before it commits.
    store = ProfileStore(ctx.engine, hold=cache.hold, reader=ctx.autocommit_engine)
    channels = clients.channels(lambda target: service_channel(target, s))
    rules = clients.RulesSource(channels, own.identity_address, own.rules_cache_seconds)
    # No gRPC retries for the scores: their back-offs would spend the short deadline, so an
    # unreachable metrics service would read as a slow one and never pause the calls.
    scores_channels = clients.channels(lambda target: service_channel(target, s, retries=False))
    scores = clients.MetricsScores(scores_channels, own.metrics_address, own.metrics_deadline_ms / 1000)
    configs = ConfigCache(store)
    reads = ProfileReads(
        store,
        cache,
        rules,
        scores,
        configs.get,
        context_seconds=own.context_cache_seconds,
        degraded_seconds=own.degraded_cache_seconds,
    )
    erasures = ErasureStore(ctx.engine, store)
    writes = ProfileWrites(store, erasures, configs, cache, reads, scores, channels.get(own.identity_address))
    servicer = ProfileServicer(reads, writes, ctx.in_pool, own.watch_poll_ms / 1000)
    profile_pb2_grpc.add_ProfileServiceServicer_to_server(servicer, server)
    workers: list[Background] = list(
        ctx.consumer_workers(
            own.consumers,
            (streams.RESOLVED, RESOLVED_GROUP, ResolvedHandler(store, configs, cache)),
            (streams.CHANGES, CHANGES_GROUP, ChangesHandler(store, configs, cache)),
        )
    )
    calls = clients.ErasureCalls(
        channels, s.service_token, own.identity_address, own.ingest_address, own.metrics_address
    )
    workers.append(
        ErasureWorker(
            erasures,
            calls,
            ctx.bus,
            cache,
            settle_seconds=own.erasure_settle_seconds,
            poll_seconds=own.erasure_poll_seconds,
            lease_seconds=own.erasure_lease_seconds,
            leader=ctx.leader,
        )
    )
    workers.append(
        Periodic(
            "profile upkeep",
            own.upkeep_seconds,
            lambda: store.upkeep(own.feed_retention_hours * 3600),
            leader=ctx.leader,
        )
    )
    return workers


def definition() -> ServiceDefinition[ProfileSettings]:
    return ServiceDefinition(
        name="profile",
        grpc_services=[SERVICE_NAME],
        settings_type=ProfileSettings,
        register=register,
        migrations=MIGRATIONS,
    )
