"""Alembic per service schema, run in a fixed order under one advisory lock.

Each service owns one schema and a ``migrations/`` folder; the composition root passes the list,
so this module knows no service. The lock lets a Helm hook Job, ``tessera up`` and several
replicas all call migrate at once without racing each other.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Engine

log = logging.getLogger(__name__)

ALEMBIC_DIR = Path(__file__).resolve().parent / "alembic"
MIGRATION_LOCK_KEY = 0x7E55E7A  # one cluster-wide advisory lock id for "tessera migrate"


@dataclass(frozen=True)
class MigrationSet:
    """A schema and the folder of Alembic revisions that build it."""

    schema: str
    versions: Path


#: Tenants and API keys: every service authenticates against them, so they migrate first.
TENANCY = MigrationSet("tenancy", Path(__file__).resolve().parent / "migrations")


def alembic_config(migrations: MigrationSet) -> Config | None:
    if not migrations.versions.is_dir() or not any(migrations.versions.glob("*.py")):
        return None
    cfg = Config()
    cfg.set_main_option("script_location", str(ALEMBIC_DIR))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("version_locations", str(migrations.versions))
    cfg.attributes["schema"] = migrations.schema
    return cfg


def migrate(engine: Engine, sets: Sequence[MigrationSet], revision: str = "heads") -> list[str]:
    """Upgrade every schema in ``sets`` (in that order); returns the schemas migrated."""
    done: list[str] = []
    with engine.connect() as conn:
        conn.exec_driver_sql(f"SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})")
        conn.commit()
        try:
            for migrations in sets:
                cfg = alembic_config(migrations)
                if cfg is None:
                    continue
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, revision)
                conn.commit()
                done.append(migrations.schema)
                log.info("migrated", extra={"schema": migrations.schema})
        finally:
            conn.exec_driver_sql(f"SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})")
            conn.commit()
    return done
