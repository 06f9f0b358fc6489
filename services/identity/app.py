"""The identity service as the core bootstrap runs it: the API and the ``identity`` consumer."""

from __future__ import annotations

from pathlib import Path

import grpc
from sqlalchemy.engine import Engine

from services.core import tenancy
from services.core.bus import ConsumerWorker, consumer_name
from services.core.leader import Leader
from services.core.migrate import MigrationSet
from services.core.outbox import EnvelopeTable, Outbox
from services.core.periodic import Periodic
from services.core.server import Background, ServiceContext, ServiceDefinition
from services.identity.consumer import build_consumer
from services.identity.reads import IdentityReads
from services.identity.reestimate import propose_all
from services.identity.resolver import Resolver
from services.identity.rules_store import RulesCache
from services.identity.servicer import IdentityServicer
from services.identity.settings import IdentitySettings
from services.identity.storage import IdentityStore
from services.identity.weights_store import WeightsStore
from tessera.v1 import identity_pb2, identity_pb2_grpc

SERVICE_NAME = identity_pb2.DESCRIPTOR.services_by_name["IdentityService"].full_name
MIGRATIONS = MigrationSet("identity", Path(__file__).resolve().parent / "migrations")


def register(server: grpc.aio.Server, ctx: ServiceContext, own: IdentitySettings) -> list[Background]:
    store = IdentityStore(ctx.engine)
    outbox = Outbox(
        ctx.engine,
        ctx.bus,
        EnvelopeTable("identity"),
        grace_seconds=ctx.settings.outbox_grace_seconds,
        sweep_seconds=ctx.settings.outbox_sweep_seconds,
    )
    resolver = Resolver(store, RulesCache(store, ttl=own.rules_cache_seconds), outbox)
    identity_pb2_grpc.add_IdentityServiceServicer_to_server(IdentityServicer(resolver, IdentityReads(store)), server)
    s = ctx.settings
    consumers = [
        build_consumer(
            resolver,
            ctx.bus,
            lambda: tenancy.tenant_ids(ctx.engine),
            name=f"{consumer_name()}-{n}",
            batch_size=s.consumer_batch_size,
            block_ms=s.consumer_block_ms,
            claim_idle_ms=s.consumer_claim_idle_ms,
            max_attempts=s.consumer_max_attempts,
            tenant_refresh_seconds=s.tenant_refresh_seconds,
        )
        for n in range(own.consumers)
    ]
    estimation = weight_estimation(ctx.engine, ctx.leader, own)
    return [*(ConsumerWorker(c) for c in consumers), outbox, *([estimation] if estimation else [])]


def weight_estimation(engine: Engine, leader: Leader, own: IdentitySettings) -> Periodic | None:
    """With ``TESSERA_IDENTITY_ESTIMATE_INTERVAL`` set, singleton work on the leader that
    re-estimates every probabilistic tenant's match weights and only PROPOSES them; a person
    applies a proposal (``tessera identity apply TENANT``). Off (``None``) by default."""
    if own.estimate_interval_seconds <= 0:
        return None
    store, weights = IdentityStore(engine), WeightsStore(engine)
    return Periodic(
        "identity weight estimation",
        own.estimate_interval_seconds,
        lambda: propose_all(store, weights, tenancy.tenant_ids(engine)),
        leader=leader,
    )


def definition() -> ServiceDefinition[IdentitySettings]:
    return ServiceDefinition(
        name="identity",
        grpc_services=[SERVICE_NAME],
        settings_type=IdentitySettings,
        register=register,
        migrations=MIGRATIONS,
    )
