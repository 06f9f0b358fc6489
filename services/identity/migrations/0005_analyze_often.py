"""Keep planner statistics fresh on the identity tables, which grow fast (a new tenant, an import).

Stale row counts make the planner hash a tenant's whole table where it should probe an index; the
default (analyze after 10 % growth) lags far behind a table that doubles in a minute.

Revision ID: identity_0005
Revises: identity_0004
Create Date: 2026-11-24
"""

from __future__ import annotations

from alembic import op

revision = "identity_0005"
down_revision = "identity_0004"
branch_labels = None
depends_on = None

TABLES = ("identifiers", "profiles", "event_links", "merges", "match_records", "match_blocks")


def upgrade() -> None:
    for table in TABLES:
        op.execute(
            f"ALTER TABLE identity.{table} SET "
            "(autovacuum_analyze_scale_factor = 0.02, autovacuum_analyze_threshold = 1000)"
        )


def downgrade() -> None:
    for table in TABLES:
        op.execute(
            f"ALTER TABLE identity.{table} RESET (autovacuum_analyze_scale_factor, autovacuum_analyze_threshold)"
        )
