"""Every service of this build, and what the composition root needs of each: its definition,
its port and its migrations. Services not written yet are skipped, so ``tessera up`` runs what exists."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # kept out of the import path: `tessera --help` should not load gRPC and Alembic
    from sqlalchemy.engine import Engine

    from services.core.migrate import MigrationSet
    from services.core.server import HttpServiceDefinition, ServiceDefinition

#: The contract's services, in start order (later ones read what earlier ones write).
SERVICES: tuple[str, ...] = ("ingest", "identity", "profile", "metrics", "gateway")


#: Services that serve HTTP, not gRPC: no gRPC health, no schema, their own server loop.
HTTP_SERVICES: frozenset[str] = frozenset({"gateway"})


def grpc_available() -> list[str]:
    """The available services that are gRPC servers on the core bootstrap (every one but the gateway)."""
    return [s for s in available() if s not in HTTP_SERVICES]


def available() -> list[str]:
    """Services that exist in this build."""
    return [
        s
        for s in SERVICES
        if importlib.util.find_spec(f"services.{s}") is not None
        and importlib.util.find_spec(f"services.{s}.app") is not None
    ]


def definition(service: str) -> ServiceDefinition[Any] | HttpServiceDefinition[Any]:
    if service not in SERVICES:
        raise KeyError(service)
    module = importlib.import_module(f"services.{service}.app")
    found: ServiceDefinition[Any] | HttpServiceDefinition[Any] = module.definition()
    return found


def grpc_definition(service: str) -> ServiceDefinition[Any]:
    """The definition of a gRPC service on the core bootstrap (KeyError for the HTTP ones)."""
    from services.core.server import ServiceDefinition

    found = definition(service)
    if not isinstance(found, ServiceDefinition):
        raise KeyError(f"{service} is not a gRPC service")
    return found


def port(service: str, environ: Mapping[str, str] | None = None) -> int:
    """The port ``service`` listens on: its ``TESSERA_<SERVICE>_PORT``, else its default."""
    own = definition(service).settings_type.from_env(environ)
    value: int = own.port  # type: ignore[attr-defined]
    return value


def migration_sets() -> list[MigrationSet]:
    """Tenancy first, then every available service's schema, in start order."""
    from services.core.migrate import TENANCY

    sets = [TENANCY]
    for service in available():
        found = definition(service).migrations
        if found is not None:
            sets.append(found)
    return sets


def migrate_all(engine: Engine) -> list[str]:
    from services.core.migrate import migrate

    return migrate(engine, migration_sets())
