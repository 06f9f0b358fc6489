"""Identity's merges and splits are applied once each: a change that comes again (a publish
retried across a Redis failover, a redelivery after a crash) is recognised by its key
(services/core/streams.py ``change_key``) and skipped, as the profile service already does.
Replaying an old split after the profiles merged back would otherwise move events again.

Revision ID: metrics_0008
Revises: metrics_0007
Create Date: 2026-12-06
"""

from __future__ import annotations

from alembic import op

revision = "metrics_0008"
down_revision = "metrics_0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE metrics.applied_changes (
            tenant_id   text        NOT NULL,
            change_key  text        NOT NULL,
            applied_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant_id, change_key)
        );
        CREATE INDEX applied_changes_age ON metrics.applied_changes (tenant_id, applied_at);
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE metrics.applied_changes")
