"""Term frequencies for probabilistic matching: how many of a tenant's trait records carry each
value of the names and places compared (value "" holds the field's total), so a shared common value
weighs less than a rare one. Kept by the resolver's batch (one read, one upsert per batch), and
decremented when a person is erased. Tenants that matched before start from zero: their frequencies
are the field averages until records arrive (``TF_PRIOR_RECORDS`` in services/identity/matching.py).

Revision ID: identity_0009
Revises: identity_0008
Create Date: 2026-12-03
"""

from __future__ import annotations

from alembic import op

revision = "identity_0009"
down_revision = "identity_0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE identity.match_value_counts (
            tenant_id  text   NOT NULL,
            field      text   NOT NULL,
            value      text   NOT NULL,
            n          bigint NOT NULL,
            PRIMARY KEY (tenant_id, field, value)
        );
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE identity.match_value_counts;")
