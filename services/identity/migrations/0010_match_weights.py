"""A tenant's own Fellegi-Sunter weights for probabilistic matching, re-estimated from its records
without labels (``tessera identity estimate TENANT``, services/identity/estimate.py). One row per
state: ``proposed`` (estimated, not used yet) and ``active`` (what the matcher uses; without it the
frozen defaults in services/identity/matching.py). ``summary`` keeps what the estimate was made
from (records, candidate pairs, the seed) for the record. Beside ``identity.rules``, not in it, so
an ``UpdateIdentityRules`` from a replica with a stale rules cache can never drop an estimate.

Revision ID: identity_0010
Revises: identity_0009
Create Date: 2026-12-03
"""

from __future__ import annotations

from alembic import op

revision = "identity_0010"
down_revision = "identity_0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE identity.match_weights (
            tenant_id   text        NOT NULL,
            state       text        NOT NULL CHECK (state IN ('proposed', 'active')),
            weights     jsonb       NOT NULL,
            summary     jsonb       NOT NULL DEFAULT '{}',
            updated_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant_id, state)
        );
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE identity.match_weights;")
