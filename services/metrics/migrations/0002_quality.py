"""Quality: categories, versioned evaluation forms, transcripts, evaluations and people's answers.

``messages`` keeps each conversation's text (the categories read it; erasure deletes it with the
customer); ``evaluations`` one row per interaction and form, its body the serialized
``tessera.v1.Evaluation``; ``overrides`` the answers people gave in place of automatic ones.
``facts`` gains a leg's ``ended_at`` (an interaction is evaluated once a leg says it ended) and
its agent's ``team``.

Revision ID: metrics_0002
Revises: metrics_0001
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "metrics_0002"
down_revision = "metrics_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE metrics.facts ADD COLUMN ended_at timestamptz, ADD COLUMN team text NOT NULL DEFAULT '';
        CREATE TABLE metrics.categories (
            tenant_id   text        NOT NULL,
            category_id text        NOT NULL,
            spec        bytea       NOT NULL,
            updated_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant_id, category_id)
        );
        CREATE TABLE metrics.forms (
            tenant_id  text        NOT NULL,
            form_id    text        NOT NULL,
            version    integer     NOT NULL,
            spec       bytea       NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant_id, form_id, version)
        );
        CREATE TABLE metrics.messages (
            tenant_id      text             NOT NULL,
            event_id       text             NOT NULL,
            interaction_id text             NOT NULL,
            profile_id     text             NOT NULL,
            at             timestamptz      NOT NULL,
            offset_seconds double precision,
            author         smallint         NOT NULL,
            compound       double precision NOT NULL,
            text           text             NOT NULL,
            PRIMARY KEY (tenant_id, event_id)
        );
        CREATE INDEX messages_by_interaction ON metrics.messages (tenant_id, interaction_id);
        CREATE INDEX messages_by_profile ON metrics.messages (tenant_id, profile_id);
        CREATE TABLE metrics.evaluations (
            tenant_id      text             NOT NULL,
            interaction_id text             NOT NULL,
            form_id        text             NOT NULL,
            form_version   integer          NOT NULL,
            profile_id     text             NOT NULL,
            score          double precision,
            auto_failed    boolean          NOT NULL,
            started_at     timestamptz      NOT NULL,
            body           bytea            NOT NULL,
            evaluated_at   timestamptz      NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant_id, interaction_id, form_id)
        );
        CREATE INDEX evaluations_by_profile ON metrics.evaluations (tenant_id, profile_id, started_at DESC);
        CREATE INDEX evaluations_by_form ON metrics.evaluations (tenant_id, form_id);
        CREATE TABLE metrics.overrides (
            tenant_id       text        NOT NULL,
            interaction_id  text        NOT NULL,
            form_id         text        NOT NULL,
            question_id     text        NOT NULL,
            value           text        NOT NULL,
            not_applicable  boolean     NOT NULL,
            automatic_value text        NOT NULL,
            automatic       boolean     NOT NULL,
            reviewer        text        NOT NULL,
            reason          text        NOT NULL,
            at              timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant_id, interaction_id, form_id, question_id)
        );
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP TABLE metrics.overrides, metrics.evaluations, metrics.messages, metrics.forms, metrics.categories;
        ALTER TABLE metrics.facts DROP COLUMN ended_at, DROP COLUMN team;
        """
    )
