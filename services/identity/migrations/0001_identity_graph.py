"""The identity graph: profiles, identifiers, merge facts, event attributions and rules.

Revision ID: identity_0001
Revises:
Create Date: 2026-11-24
"""

from __future__ import annotations

from alembic import op

revision = "identity_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        -- A tenant's identity rules, in the JSON form services.core.identity_rules validates.
        CREATE TABLE identity.rules (
            tenant_id     text        PRIMARY KEY,
            spec          jsonb       NOT NULL,
            probabilistic jsonb       NOT NULL DEFAULT '{}',
            updated_at    timestamptz NOT NULL DEFAULT now()
        );

        -- Every profile ever created. A merged-away profile points at its survivor (kept
        -- compressed: always the final one), so an old id keeps resolving.
        CREATE TABLE identity.profiles (
            tenant_id    text        NOT NULL,
            profile_id   uuid        NOT NULL,
            created_at   timestamptz NOT NULL,
            merged_into  uuid,
            merged_at    timestamptz,
            PRIMARY KEY (tenant_id, profile_id)
        );
        CREATE INDEX profiles_merged_into ON identity.profiles (tenant_id, merged_into)
            WHERE merged_into IS NOT NULL;

        -- One row per normalized identifier: it belongs to exactly one active profile.
        -- origin_profile_id is the profile it first joined (or was split into), so a link can
        -- be explained by walking merges from there.
        CREATE TABLE identity.identifiers (
            tenant_id          text        NOT NULL,
            id_type            text        NOT NULL,
            id_value           text        NOT NULL,
            profile_id         uuid        NOT NULL,
            origin_profile_id  uuid        NOT NULL,
            first_seen         timestamptz NOT NULL,
            last_seen          timestamptz NOT NULL,
            source             text        NOT NULL DEFAULT '',
            first_event_id     text        NOT NULL DEFAULT '',
            PRIMARY KEY (tenant_id, id_type, id_value)
        );
        CREATE INDEX identifiers_profile ON identity.identifiers (tenant_id, profile_id);

        -- Merges and splits: facts, kept forever, that explain and can be reversed.
        -- kind is the tessera.v1.MergeKind number.
        CREATE TABLE identity.merges (
            tenant_id     text        NOT NULL,
            merge_id      bigint      GENERATED ALWAYS AS IDENTITY,
            kind          smallint    NOT NULL,
            survivor_id   uuid        NOT NULL,
            absorbed_id   uuid        NOT NULL,
            identifiers   jsonb       NOT NULL DEFAULT '[]',
            event_id      text        NOT NULL DEFAULT '',
            rule          text        NOT NULL DEFAULT '',
            reason        text        NOT NULL DEFAULT '',
            score         float8      NOT NULL DEFAULT 0,
            evidence      jsonb       NOT NULL DEFAULT '{}',
            created_at    timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant_id, merge_id)
        );
        CREATE INDEX merges_survivor ON identity.merges (tenant_id, survivor_id);
        CREATE INDEX merges_absorbed ON identity.merges (tenant_id, absorbed_id);

        -- Each event identity has applied, written in the same transaction as its effect, so a
        -- redelivered event has no second effect. It also says which profile the event belongs
        -- to and by which identifiers ("type\\x1fvalue"), so an unmerge can re-attribute it.
        CREATE TABLE identity.event_links (
            tenant_id    text        NOT NULL,
            event_id     text        NOT NULL,
            profile_id   uuid,
            identifiers  text[]      NOT NULL,
            occurred_at  timestamptz NOT NULL,
            processed_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant_id, event_id)
        );
        CREATE INDEX event_links_profile ON identity.event_links (tenant_id, profile_id);
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP TABLE identity.event_links;
        DROP TABLE identity.merges;
        DROP TABLE identity.identifiers;
        DROP TABLE identity.profiles;
        DROP TABLE identity.rules;
        """
    )
