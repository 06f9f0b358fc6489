"""A tenant's own dedupe window (days); NULL means the ingest service's default.

Revision ID: tenancy_0002
Revises: tenancy_0001
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "tenancy_0002"
down_revision = "tenancy_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "ALTER TABLE tenancy.tenants ADD COLUMN dedupe_window_days integer CHECK (dedupe_window_days BETWEEN 1 AND 90)"
    )


def downgrade() -> None:
    op.execute("ALTER TABLE tenancy.tenants DROP COLUMN dedupe_window_days")
