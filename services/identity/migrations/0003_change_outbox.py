"""An outbox for profile lifecycle changes, so a crash between commit and publish loses none.

Revision ID: identity_0003
Revises: identity_0002
Create Date: 2026-11-24
"""

from __future__ import annotations

from alembic import op

revision = "identity_0003"
down_revision = "identity_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        -- Changes (created, merged, split) committed with the graph change that caused them and
        -- deleted once on the changes stream. Rows live for milliseconds unless Redis is down or a
        -- process died between its commit and its publish; the sweeper then publishes them.
        CREATE TABLE identity.outbox (
            tenant_id   text        NOT NULL,
            seq         bigint      GENERATED ALWAYS AS IDENTITY,
            stream      text        NOT NULL,
            fields      jsonb       NOT NULL,
            created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
            PRIMARY KEY (tenant_id, seq)
        );
        CREATE INDEX outbox_created ON identity.outbox (created_at);
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE identity.outbox")
