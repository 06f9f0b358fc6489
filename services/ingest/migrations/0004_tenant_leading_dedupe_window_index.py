"""The cold dedupe keys' age index leads with ``tenant_id`` (every index does, for Citus): expiry
deletes each tenant's keys older than the window, in bounded batches (services/ingest/storage.py).

A B-tree on (tenant_id, day) replaces the BRIN on (day). The BRIN relied on rows lying in day
order, which the upkeep's updates and the reuse of freed space wear away; the B-tree is exact
and stays small, since every key of one tenant and day shares one index key (deduplicated into
posting lists). Ingest only reads this table and only the upkeep writes it, so building the
index under CREATE INDEX's share lock holds back no ingest; it is built before the BRIN is
dropped, so the drop's exclusive lock lasts only until the commit right after it.

Revision ID: ingest_0004
Revises: ingest_0003
Create Date: 2026-12-03
"""

from __future__ import annotations

from alembic import op

revision = "ingest_0004"
down_revision = "ingest_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE INDEX dedupe_window_tenant_day ON ingest.dedupe_window (tenant_id, day);
        DROP INDEX ingest.dedupe_window_day;
        """
    )


def downgrade() -> None:
    op.execute(
        """
        CREATE INDEX dedupe_window_day ON ingest.dedupe_window USING brin (day);
        DROP INDEX ingest.dedupe_window_tenant_day;
        """
    )
