"""The outbox's age index leads with ``tenant_id`` (every index does, for Citus): the relay's
sweep finds the tenants that have rows, then each tenant's oldest rows (services/core/outbox.py).

The new index is built before the old one is dropped, so the table's exclusive lock (for the
drop) is held only for the moment before the commit. The table holds only unpublished rows.

Revision ID: identity_0008
Revises: identity_0007
Create Date: 2026-12-03
"""

from __future__ import annotations

from alembic import op

revision = "identity_0008"
down_revision = "identity_0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE INDEX outbox_tenant_created ON identity.outbox (tenant_id, created_at, seq);
        DROP INDEX identity.outbox_created;
        """
    )


def downgrade() -> None:
    op.execute(
        """
        CREATE INDEX outbox_created ON identity.outbox (created_at);
        DROP INDEX identity.outbox_tenant_created;
        """
    )
