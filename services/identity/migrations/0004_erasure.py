"""Privacy erasure: a profile can be marked forgotten.

Revision ID: identity_0004
Revises: identity_0003
Create Date: 2026-11-24
"""

from __future__ import annotations

from alembic import op

revision = "identity_0004"
down_revision = "identity_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE identity.profiles ADD COLUMN erased_at timestamptz")


def downgrade() -> None:
    op.execute("ALTER TABLE identity.profiles DROP COLUMN erased_at")
