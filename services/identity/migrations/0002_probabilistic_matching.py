"""Probabilistic matching: the trait records profiles hold, their blocking keys, and suggestions.

Revision ID: identity_0002
Revises: identity_0001
Create Date: 2026-11-24
"""

from __future__ import annotations

from alembic import op

revision = "identity_0002"
down_revision = "identity_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        -- One normalized trait record per Identify event (when matching is on), and the profile
        -- it belongs to now (kept current through merges and splits).
        CREATE TABLE identity.match_records (
            tenant_id   text        NOT NULL,
            event_id    text        NOT NULL,
            profile_id  uuid        NOT NULL,
            record      jsonb       NOT NULL,
            created_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant_id, event_id)
        );
        CREATE INDEX match_records_profile ON identity.match_records (tenant_id, profile_id);

        -- Blocking: a record is compared only with records sharing one of its keys.
        CREATE TABLE identity.match_blocks (
            tenant_id  text NOT NULL,
            block_key  text NOT NULL,
            event_id   text NOT NULL,
            PRIMARY KEY (tenant_id, block_key, event_id)
        );

        -- Probable matches between the review and auto-merge thresholds, for a person to decide.
        -- state is the tessera.v1.MatchSuggestionState number. A pair is suggested once, ever:
        -- a rejected pair is not proposed again.
        CREATE TABLE identity.match_suggestions (
            tenant_id      text        NOT NULL,
            suggestion_id  bigint      GENERATED ALWAYS AS IDENTITY,
            profile_a      uuid        NOT NULL,
            profile_b      uuid        NOT NULL,
            score          float8      NOT NULL,
            evidence       jsonb       NOT NULL DEFAULT '{}',
            state          smallint    NOT NULL DEFAULT 1,
            event_id       text        NOT NULL DEFAULT '',
            reason         text        NOT NULL DEFAULT '',
            merge_id       bigint,
            created_at     timestamptz NOT NULL DEFAULT now(),
            reviewed_at    timestamptz,
            PRIMARY KEY (tenant_id, suggestion_id)
        );
        CREATE UNIQUE INDEX match_suggestions_pair ON identity.match_suggestions
            (tenant_id, LEAST(profile_a, profile_b), GREATEST(profile_a, profile_b));
        CREATE INDEX match_suggestions_state
            ON identity.match_suggestions (tenant_id, state, score DESC, suggestion_id);
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP TABLE identity.match_suggestions;
        DROP TABLE identity.match_blocks;
        DROP TABLE identity.match_records;
        """
    )
