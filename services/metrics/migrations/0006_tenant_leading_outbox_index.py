"""The outbox's age index leads with ``tenant_id`` (every index does, for Citus): the relay's
sweep finds the tenants that have rows, then each tenant's oldest rows (services/core/outbox.py).

The new index is built before the old one is dropped, so the table's exclusive lock (for the
drop) is held only for the moment before the commit. The table holds only unpublished rows.

Revision ID: metrics_0006
Revises: metrics_0005
Create Date: 2026-12-03
"""

from __future__ import annotations

from alembic import op

revision = "metrics_0006"
down_revision = "metrics_0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE INDEX outbox_tenant_created ON metrics.outbox (tenant_id, created_at, seq);
        DROP INDEX metrics.outbox_created;
        """
    )


def downgrade() -> None:
    op.execute(
        """
        CREATE INDEX outbox_created ON metrics.outbox (created_at);
        DROP INDEX metrics.outbox_tenant_created;
        """
    )
