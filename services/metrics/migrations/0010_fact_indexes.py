"""The facts' indexes, fitted to what reads them. A customer's legs (the contacts part, re-derived
on every new leg) are found by (profile, kind) in the index, not by reading every fact of the
customer and dropping the surveys and messages; the index on event time, which nothing reads,
is dropped (one index fewer on every fact written).

Revision ID: metrics_0010
Revises: metrics_0009
Create Date: 2026-12-07
"""

from __future__ import annotations

from alembic import op

revision = "metrics_0010"
down_revision = "metrics_0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE INDEX facts_profile_kind ON metrics.facts (tenant_id, profile_id, kind);
        DROP INDEX metrics.facts_profile;
        DROP INDEX metrics.facts_at;
        """
    )


def downgrade() -> None:
    op.execute(
        """
        CREATE INDEX facts_at ON metrics.facts (tenant_id, at);
        CREATE INDEX facts_profile ON metrics.facts (tenant_id, profile_id);
        DROP INDEX metrics.facts_profile_kind;
        """
    )
