"""Pending re-evaluations: a new form version or a changed category asks for every ended
interaction the form applies to to be evaluated again. The work runs in the background, in
batches, resumable after a restart (``after``: the last interaction done), so the RPC that
asked returns at once whatever the tenant's size.

Revision ID: metrics_0005
Revises: metrics_0004
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "metrics_0005"
down_revision = "metrics_0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE metrics.reevaluations (
            tenant_id    text        NOT NULL,
            form_id      text        NOT NULL,
            after        text        NOT NULL DEFAULT '',
            requested_at timestamptz NOT NULL DEFAULT clock_timestamp(),
            PRIMARY KEY (tenant_id, form_id)
        );
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE metrics.reevaluations")
