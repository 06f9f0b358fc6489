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


def test_metrics_0007_rescales_stored_squares_to_exact_integers_and_back(scratch: Engine) -> None:
    """Rollups and contributions written with float squares (seconds², compound²) read the same
    after the upgrade to integer squares (ms², 1/10,000²)."""
    import json

    from services.metrics.stats import SQUARE_SLOT, Stats

    sets = registry.migration_sets()
    migrate(scratch, sets)
    [metrics] = [m for m in sets if m.schema == "metrics"]
    cfg = alembic_config(metrics)
    assert cfg is not None
    with scratch.connect() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "metrics_0006")
        conn.commit()
        conn.execute(
            sa.text(
                "INSERT INTO metrics.rollup_day (tenant_id, grouping, bucket, channel, queue, agent, reason, source, "
                "legs_handled, handle_ms, handle_sq, sentiment_n, sentiment_sum, sentiment_sq) "
                "VALUES ('t', 0, '2026-11-02', 0, '', '', '', '', 2, 150500, 11350.25, 2, 2000, 0.08)"
            )
        )
        # [hour, channel, queue, agent, reason, source, counts, squares, hist]
        body = [[1793620800, 0, "", "", "", "", [[9, 2]], [[0, 11350.25], [3, 0.08]], []]]
        conn.execute(
            sa.text("INSERT INTO metrics.contributions (tenant_id, profile_id, body) VALUES ('t', 'p', :b)"),
            {"b": json.dumps(body)},
        )
        conn.commit()
        command.upgrade(cfg, "metrics_0007")
        conn.commit()
        row = conn.execute(sa.text("SELECT handle_sq, sentiment_sq FROM metrics.rollup_day")).one()
        assert (int(row[0]), int(row[1])) == (11_350_250_000, 8_000_000)
        stored = json.loads(conn.execute(sa.text("SELECT body FROM metrics.contributions")).scalar_one())
        assert stored[0][7] == [[0, 11_350_250_000], [3, 8_000_000]]
        s = Stats({SQUARE_SLOT + i: v for i, v in stored[0][7]})
        assert (s.square("handle_sq"), s.square("sentiment_sq")) == (11350.25, 0.08)
        command.downgrade(cfg, "metrics_0006")
        conn.commit()
        row = conn.execute(sa.text("SELECT handle_sq, sentiment_sq FROM metrics.rollup_day")).one()
        assert row == (11350.25, 0.08)


def test_metrics_0009_sums_a_customers_parts_into_one_row_going_down(scratch: Engine) -> None:
    """Rolled back below parts, each customer's parts become the one whole contribution the
    older code reads (key by key, counts added), and anonymous rows stay anonymous."""
    import json

    sets = registry.migration_sets()
    migrate(scratch, sets)
    [metrics] = [m for m in sets if m.schema == "metrics"]
    cfg = alembic_config(metrics)
    assert cfg is not None
    # [hour, channel, queue, agent, reason, source, counts, squares, hist]
    contacts = [[3600, 6, "q", "a", "billing", "", [[0, 1], [1, 2]], [[0, 9]], [[4, 1]]]]
    survey = [
        [3600, 6, "q", "a", "billing", "", [[1, 3]], [], [[4, 2]]],
        [7200, 1, "", "", "", "email", [[5, 1]], [], []],
    ]
    insert = sa.text(
        "INSERT INTO metrics.contributions (tenant_id, profile_id, part, anonymous, body) VALUES ('t', :p, :k, :a, :b)"
    )
    with scratch.connect() as conn:
        for p, k, a, b in (
            ("p", "contacts", False, contacts),
            ("p", "survey:s1", False, survey),
            ("x", "contacts", True, contacts),
        ):
            conn.execute(insert, {"p": p, "k": k, "a": a, "b": json.dumps(b)})
        conn.commit()
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "metrics_0008")
        conn.commit()
        rows = conn.execute(sa.text("SELECT profile_id, anonymous, body FROM metrics.contributions ORDER BY 1")).all()
        assert [(p, a, json.loads(b)) for p, a, b in rows] == [
            (
                "p",
                False,
                [
                    [3600, 6, "q", "a", "billing", "", [[0, 1], [1, 5]], [[0, 9]], [[4, 3]]],
                    [7200, 1, "", "", "", "email", [[5, 1]], [], []],
                ],
            ),
            ("x", True, contacts),
        ]
        command.upgrade(cfg, "metrics_0009")
        conn.commit()
        parts = conn.execute(sa.text("SELECT profile_id, part FROM metrics.contributions ORDER BY 1")).all()
        assert [tuple(r) for r in parts] == [("p", ""), ("x", "")]
