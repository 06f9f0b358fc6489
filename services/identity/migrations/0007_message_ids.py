"""The client's message_id beside each evidence event id, so explanations name what the client knows.

``identifiers.first_message_id`` goes with ``first_event_id``, ``merges.message_id`` with
``event_id``. Both live on the rows kept forever (not on event_links, which retention drops).
Rows written before this revision have none (NULL): explanations then name only the event id.

Revision ID: identity_0007
Revises: identity_0006
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "identity_0007"
down_revision = "identity_0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable with no default: a catalog-only change, no table rewrite.
    op.execute("ALTER TABLE identity.identifiers ADD COLUMN first_message_id text")
    op.execute("ALTER TABLE identity.merges ADD COLUMN message_id text")


def downgrade() -> None:
    op.execute("ALTER TABLE identity.merges DROP COLUMN message_id")
    op.execute("ALTER TABLE identity.identifiers DROP COLUMN first_message_id")
