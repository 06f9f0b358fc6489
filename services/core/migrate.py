"""Alembic per service schema, run in a fixed order under one advisory lock.

The lock lets a Helm hook Job, ``tessera up`` and several replicas all call migrate at
once without racing each other.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Engine

log = logging.getLogger(__name__)

SERVICES_DIR = Path(__file__).resolve().parent.parent
# (schema, package directory holding a migrations/ folder), in dependency order.
MIGRATION_SETS: tuple[tuple[str, str], ...] = (
    ("tenancy", "core"),
    ("ingest", "ingest"),
    ("identity", "identity"),
    ("profile", "profile"),
    ("metrics", "metrics"),
)
MIGRATION_LOCK_KEY = 0x7E55E7A  # one cluster-wide advisory lock id for "tessera migrate"


def alembic_config(schema: str, package: str) -> Config | None:
    versions = SERVICES_DIR / package / "migrations"
    if not versions.is_dir() or not any(versions.glob("*.py")):
        return None
    cfg = Config()
    cfg.set_main_option("script_location", str(SERVICES_DIR / "core" / "alembic"))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("version_locations", str(versions))
    cfg.attributes["schema"] = schema
    return cfg


def migrate(engine: Engine, revision: str = "heads") -> list[str]:
    """Upgrade every schema that has migrations; returns the schemas migrated."""
    done: list[str] = []
    with engine.connect() as conn:
        conn.exec_driver_sql(f"SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})")
        conn.commit()
        try:
            for schema, package in MIGRATION_SETS:
                cfg = alembic_config(schema, package)
                if cfg is None:
                    continue
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, revision)
                conn.commit()
                done.append(schema)
                log.info("migrated", extra={"schema": schema})
        finally:
            conn.exec_driver_sql(f"SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})")
            conn.commit()
    return done
