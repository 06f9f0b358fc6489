"""Planner statistics kept fresh by the service itself (services/core/db.py ``StaleStatistics``):
with autovacuum off, as on this machine's server, a table filled after its last analyze is
planned as if empty. Real PostgreSQL."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from services.core import db
from services.core.server import start_server
from services.core.settings import Settings
from services.metrics import app as metrics_app
from tests.support.profile import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def schema(engine: Engine) -> Iterator[str]:
    name = f"stats_{secrets.token_hex(4)}"
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {name}"))
        conn.execute(sa.text(f"CREATE TABLE {name}.grown (tenant_id text, k text, PRIMARY KEY (tenant_id, k))"))
        conn.execute(sa.text(f"CREATE TABLE {name}.quiet (k text PRIMARY KEY)"))
        for table in ("grown", "quiet"):  # as if autovacuum were off, wherever the test runs
            conn.execute(sa.text(f"ALTER TABLE {name}.{table} SET (autovacuum_enabled = false)"))
        conn.execute(sa.text(f"ANALYZE {name}.grown, {name}.quiet"))
    yield name
    with engine.begin() as conn:
        conn.execute(sa.text(f"DROP SCHEMA {name} CASCADE"))


def _analyzed(engine: Engine, schema: str) -> dict[str, float]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT relname, greatest(coalesce(extract(epoch FROM last_analyze), 0), "
                "coalesce(extract(epoch FROM last_autoanalyze), 0)) FROM pg_stat_user_tables WHERE schemaname = :s"
            ),
            {"s": schema},
        )
        return {r[0]: float(r[1]) for r in rows}


def test_a_table_grown_by_more_than_a_tenth_since_its_last_analyze_is_analyzed_and_no_other(
    engine: Engine, schema: str
) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text(f"INSERT INTO {schema}.grown SELECT 't', 'k' || g FROM generate_series(1, 5000) g"))
        conn.execute(sa.text(f"INSERT INTO {schema}.quiet VALUES ('only')"))
    before = _analyzed(engine, schema)
    keeper = db.StaleStatistics(engine, schema)
    # The counters reach the statistics within a second or so.
    assert wait_until(keeper, 10, "the grown table analyzed") == [f"{schema}.grown"]
    after = _analyzed(engine, schema)
    assert after["grown"] > before["grown"]
    assert after["quiet"] == before["quiet"]
    with engine.connect() as conn:
        assert conn.execute(
            sa.text("SELECT reltuples FROM pg_class WHERE oid = :t ::regclass"), {"t": f"{schema}.grown"}
        ).scalar_one() == pytest.approx(5000)
    # Analyzed: nothing is stale until the table changes by a tenth again.
    assert keeper() == []
    with engine.begin() as conn:
        conn.execute(sa.text(f"INSERT INTO {schema}.grown SELECT 't', 'n' || g FROM generate_series(1, 1500) g"))
    assert wait_until(keeper, 10, "the grown table analyzed again") == [f"{schema}.grown"]
    assert keeper() == []


def test_a_service_leader_analyzes_its_schema_on_its_own(settings: Settings, engine: Engine) -> None:
    """The bootstrap gives every service with a schema the job, on its leader: rows written to a
    metrics table are analyzed without anyone asking, and a setting of 0 leaves it to autovacuum."""
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE metrics.applied_changes SET (autovacuum_enabled = false)"))
    tenant = f"stats-{secrets.token_hex(4)}"
    running = start_server(metrics_app.definition(), settings.with_overrides(analyze_seconds=0.2), port=0)
    try:
        assert any(getattr(w, "name", "") == "metrics statistics" for w in running.workers)
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO metrics.applied_changes (tenant_id, change_key) "
                    "SELECT :t, 'k' || g FROM generate_series(1, 20000) g"
                ),
                {"t": tenant},
            )
        wrote = time.time()
        wait_until(lambda: _analyzed(engine, "metrics")["applied_changes"] >= wrote, 30, "applied_changes analyzed")
    finally:
        running.shutdown(grace=1)
        with engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM metrics.applied_changes WHERE tenant_id = :t"), {"t": tenant})
            conn.execute(sa.text("ALTER TABLE metrics.applied_changes RESET (autovacuum_enabled)"))
    off = start_server(metrics_app.definition(), settings.with_overrides(analyze_seconds=0), port=0)
    try:
        assert not any(getattr(w, "name", "") == "metrics statistics" for w in off.workers)
    finally:
        off.shutdown(grace=1)
