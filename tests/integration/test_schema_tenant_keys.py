"""Every primary key and every index in Tessera's schemas leads with ``tenant_id``, so the tables
can be distributed by tenant with Citus (``create_distributed_table(..., 'tenant_id')``, all
colocated): a unique constraint or a lookup that does not start with the distribution column
cannot be enforced or routed on one shard. Tables that are global by nature (no tenant, or the
tenant registry itself) are listed below with why; they become Citus reference tables.

The check reads the catalog of a database that went through every migration (the session's
test database), so a new migration that breaks the rule fails here."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from services.cli import registry
from services.core.migrate import TENANCY

pytestmark = pytest.mark.integration

TENANT = "tenant_id"

#: Tables whose keys need not lead with tenant_id, and why. Keys are "schema.table".
GLOBAL_TABLES: dict[str, str] = {
    # Alembic's bookkeeping, one per schema: one row, the schema's revision; no tenant in it.
    **{f"{m.schema}.alembic_version": "migration bookkeeping" for m in registry.migration_sets()},
    # Authentication finds a key by its hash before it knows the tenant (UNIQUE (key_hash)), so
    # the table cannot be sharded by tenant: a Citus reference table (small, read-mostly).
    "tenancy.api_keys": "API keys are looked up by hash before the tenant is known",
}

#: Single indexes that do not lead with tenant_id on tables that otherwise do, and why:
#: "schema.index_name" -> reason. None today: the sweeps that once had such indexes (outbox relay
#: by age, retention, upkeep, due erasures) go tenant by tenant over tenant-leading ones.
ALLOWED_INDEXES: dict[str, str] = {}


_KEYS = sa.text(
    """
    SELECT n.nspname AS schema,
           t.relname AS table_name,
           i.relname AS index_name,
           x.indisprimary AS is_primary,
           pg_get_indexdef(x.indexrelid) AS definition,
           (SELECT a.attname FROM pg_attribute a
             WHERE a.attrelid = x.indrelid AND a.attnum = x.indkey[0]) AS first_column
      FROM pg_index x
      JOIN pg_class i ON i.oid = x.indexrelid
      JOIN pg_class t ON t.oid = x.indrelid
      JOIN pg_namespace n ON n.oid = t.relnamespace
     WHERE n.nspname = ANY(:schemas)
       -- A partition's own indexes are copies of its parent's (checked there); partitions are
       -- relispartition, and so are the indexes attached to the parent's partitioned index.
       AND NOT t.relispartition
     ORDER BY 1, 2, 3
    """
)

_TABLES = sa.text(
    """
    SELECT n.nspname AS schema, c.relname AS table_name,
           EXISTS (SELECT 1 FROM pg_attribute a
                    WHERE a.attrelid = c.oid AND a.attname = :tenant AND NOT a.attisdropped) AS has_tenant,
           EXISTS (SELECT 1 FROM pg_index x WHERE x.indrelid = c.oid AND x.indisprimary) AS has_primary_key
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = ANY(:schemas) AND c.relkind IN ('r', 'p') AND NOT c.relispartition
     ORDER BY 1, 2
    """
)


def _schemas() -> list[str]:
    return [m.schema for m in registry.migration_sets()]


def test_every_service_schema_is_checked(engine: Engine) -> None:
    schemas = _schemas()
    assert TENANCY.schema in schemas
    assert set(registry.grpc_available()) <= set(schemas), "a service's schema is missing from the check"
    with engine.connect() as conn:
        tables = conn.execute(_TABLES, {"schemas": schemas, "tenant": TENANT}).all()
    found = {row.schema for row in tables}
    assert found == set(schemas), f"migrated schemas {found} differ from {schemas}"


def test_every_primary_key_and_index_leads_with_tenant_id(engine: Engine) -> None:
    with engine.connect() as conn:
        rows = conn.execute(_KEYS, {"schemas": _schemas()}).all()
    assert len(rows) > 20, "no indexes found: is the database migrated?"
    offenders = []
    for row in rows:
        table = f"{row.schema}.{row.table_name}"
        if table in GLOBAL_TABLES or f"{row.schema}.{row.index_name}" in ALLOWED_INDEXES:
            continue
        if row.first_column != TENANT:
            kind = "primary key" if row.is_primary else "index"
            offenders.append(f"{table}: {kind} {row.definition}")
    assert not offenders, "keys that do not lead with tenant_id:\n" + "\n".join(offenders)


def test_every_tenant_table_has_a_primary_key_and_a_tenant_id(engine: Engine) -> None:
    """Citus distributes a table by a column it has, and keeps uniqueness through a key that
    contains it; a table without either would have to stay global."""
    with engine.connect() as conn:
        tables = conn.execute(_TABLES, {"schemas": _schemas(), "tenant": TENANT}).all()
    problems = []
    for row in tables:
        name = f"{row.schema}.{row.table_name}"
        if name in GLOBAL_TABLES:
            continue
        if not row.has_tenant:
            problems.append(f"{name}: no {TENANT} column")
        if not row.has_primary_key:
            problems.append(f"{name}: no primary key")
    assert not problems, "\n".join(problems)


def test_the_allowlists_name_only_tables_and_indexes_that_exist(engine: Engine) -> None:
    """A stale allowlist entry hides nothing today but would hide a real offender tomorrow."""
    with engine.connect() as conn:
        tables = {
            f"{r.schema}.{r.table_name}" for r in conn.execute(_TABLES, {"schemas": _schemas(), "tenant": TENANT})
        }
        indexes = {f"{r.schema}.{r.index_name}" for r in conn.execute(_KEYS, {"schemas": _schemas()})}
    assert set(GLOBAL_TABLES) <= tables, set(GLOBAL_TABLES) - tables
    assert set(ALLOWED_INDEXES) <= indexes, set(ALLOWED_INDEXES) - indexes
