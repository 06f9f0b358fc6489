"""Each schema's newest migration goes down and up again on a freshly migrated database of its
own, and leaves the same tables and indexes: a deploy rolled back by one revision can roll
forward again."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy.engine import Engine

from services.cli import registry
from services.core import db
from services.core.migrate import alembic_config, migrate

pytestmark = pytest.mark.integration

_INDEXES = sa.text(
    "SELECT schemaname || '.' || indexname || ': ' || indexdef FROM pg_indexes WHERE schemaname = ANY(:s) ORDER BY 1"
)


@pytest.fixture
def scratch(database_url: str) -> Iterator[Engine]:
    name = f"tessera_downgrade_{secrets.token_hex(4)}"
    db.ensure_database(database_url, name)
    engine = db.make_engine(db.with_database(database_url, name), application_name="test", instrument=False)
    try:
        yield engine
    finally:
        engine.dispose()
        db.drop_database(database_url, name)


def test_the_newest_migration_of_every_schema_goes_down_and_up_again(scratch: Engine) -> None:
    sets = registry.migration_sets()
    schemas = [m.schema for m in sets]
    migrate(scratch, sets)
    with scratch.connect() as conn:
        before = list(conn.execute(_INDEXES, {"s": schemas}).scalars())
    for migrations in reversed(sets):
        cfg = alembic_config(migrations)
        if cfg is None:
            continue
        with scratch.connect() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "-1")
            conn.commit()
    with scratch.connect() as conn:
        down = list(conn.execute(_INDEXES, {"s": schemas}).scalars())
    assert down != before
    migrate(scratch, sets)
    with scratch.connect() as conn:
        assert list(conn.execute(_INDEXES, {"s": schemas}).scalars()) == before
