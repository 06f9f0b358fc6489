"""The indexes of profile's sweeps lead with ``tenant_id`` (every index does, for Citus); the
sweeps go tenant by tenant (services/profile/storage.py, erasure_store.py):

- windowed computed points expire per (tenant, trait key), so that is the index's prefix;
- the change feed's retention deletes each tenant's rows older than the cutoff;
- the erasure worker claims the most overdue running request among each tenant's due ones.

Each new index is built before the old one is dropped, so the drop's exclusive lock lasts only
until the commit right after it; while an index is built, writes to its table wait.

Revision ID: profile_0002
Revises: profile_0001
Create Date: 2026-12-03
"""

from __future__ import annotations

from alembic import op

revision = "profile_0002"
down_revision = "profile_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE INDEX computed_points_tenant_age ON profile.computed_points (tenant_id, trait_key, at);
        DROP INDEX profile.computed_points_age;
        CREATE INDEX feed_tenant_age ON profile.feed (tenant_id, at);
        DROP INDEX profile.feed_age;
        CREATE INDEX erasure_tenant_due ON profile.erasure_requests (tenant_id, next_try_at) WHERE state = 1;
        DROP INDEX profile.erasure_due;
        """
    )


def downgrade() -> None:
    op.execute(
        """
        CREATE INDEX erasure_due ON profile.erasure_requests (next_try_at) WHERE state = 1;
        DROP INDEX profile.erasure_tenant_due;
        CREATE INDEX feed_age ON profile.feed (at);
        DROP INDEX profile.feed_tenant_age;
        CREATE INDEX computed_points_age ON profile.computed_points (at);
        DROP INDEX profile.computed_points_tenant_age;
        """
    )
