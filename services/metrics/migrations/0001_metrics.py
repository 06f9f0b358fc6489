"""CX facts and their rollups.

``facts`` holds one row per interaction leg, survey answer and message (what the rollups are
recomputed from); ``contributions`` what each customer adds to the rollups (the consumer
adds the difference when a customer changes); ``open_contacts`` the handled contacts whose FCR
window may still be open; ``rollup_hour`` / ``rollup_day`` the sufficient statistics per local
hour or day of the tenant's time zone and dimension. Every key leads with ``tenant_id``.

Revision ID: metrics_0001
Revises:
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "metrics_0001"
down_revision = None
branch_labels = None
depends_on = None


#: The sufficient statistics of a rollup row, in services/metrics/stats.py's order (a test checks).
COUNTERS = (
    "offered",
    "handled",
    "abandoned",
    "transferred",
    "answered_sl",
    "wait_ms",
    "repeats",
    "fcr_handled",
    "fcr_repeated",
    "legs_handled",
    "handle_ms",
    "cases_resolved",
    "cases_single",
    "bot_contacts",
    "contained",
    "handoffs",
    "nps_n",
    "nps_promoters",
    "nps_detractors",
    "csat_n",
    "csat_top2",
    "csat_sum",
    "ces_n",
    "ces_agree",
    "ces_sum",
    "sentiment_n",
    "sentiment_sum",
    "sentiment_positive",
    "sentiment_negative",
)
SQUARES = ("handle_sq", "csat_sq", "ces_sq", "sentiment_sq")


def rollup_table(name: str, bucket: str, what: str) -> str:
    """A rollup: sufficient statistics per bucket, dimension subset and dimension values.
    grouping: which dimensions the row keeps (bits: 1 channel, 2 queue, 4 agent, 8 reason,
    16 source; the others are 0 or ''), see services/metrics/query.py."""
    stats = ",\n".join(
        [f"    {c} bigint NOT NULL DEFAULT 0" for c in COUNTERS]
        + [f"    {c} double precision NOT NULL DEFAULT 0" for c in SQUARES]
    )
    return f"""
        -- {what}
        CREATE TABLE metrics.{name} (
            tenant_id   text     NOT NULL,
            grouping    smallint NOT NULL,
            bucket      {bucket} NOT NULL,
            channel     smallint NOT NULL,
            queue       text     NOT NULL,
            agent       text     NOT NULL,
            reason      text     NOT NULL,
            source      text     NOT NULL,
{stats},
            hist        bigint[] NOT NULL DEFAULT '{{}}',
            PRIMARY KEY (tenant_id, grouping, bucket, channel, queue, agent, reason, source)
        ) WITH (fillfactor = 80);  -- room for HOT updates: every delta rewrites a row
    """


def upgrade() -> None:
    op.execute(
        """
        -- A tenant's settings (services/metrics/tenant_settings.py).
        CREATE TABLE metrics.settings (
            tenant_id   text        PRIMARY KEY,
            spec        jsonb       NOT NULL,
            updated_at  timestamptz NOT NULL DEFAULT now()
        );

        -- One row per services.metrics.facts.Fact, its fields in its order. kind: 1 leg, 2 survey,
        -- 3 message; at: event time; started_at: a leg's start, when it said.
        CREATE TABLE metrics.facts (
            tenant_id       text             NOT NULL,
            fact_key        text             NOT NULL,
            kind            smallint         NOT NULL,
            event_id        text             NOT NULL,
            profile_id      text             NOT NULL,
            at              timestamptz      NOT NULL,
            channel         smallint         NOT NULL,
            source          text             NOT NULL,
            interaction_id  text             NOT NULL,
            queue           text             NOT NULL,
            agent           text             NOT NULL,
            reason          text             NOT NULL,
            case_id         text             NOT NULL,
            case_status     smallint         NOT NULL,
            started_at      timestamptz,
            talk            double precision NOT NULL,
            hold            double precision NOT NULL,
            acw             double precision NOT NULL,
            wait            double precision NOT NULL,
            transferred     boolean          NOT NULL,
            abandoned       boolean          NOT NULL,
            leg_id          text             NOT NULL,
            survey_type     smallint         NOT NULL,
            score           smallint,
            author          smallint         NOT NULL,
            compound        double precision NOT NULL,
            PRIMARY KEY (tenant_id, fact_key)
        );
        CREATE INDEX facts_profile ON metrics.facts (tenant_id, profile_id);
        CREATE INDEX facts_interaction ON metrics.facts (tenant_id, interaction_id) WHERE interaction_id <> '';
        CREATE INDEX facts_event ON metrics.facts (tenant_id, event_id);
        CREATE INDEX facts_at ON metrics.facts (tenant_id, at);

        -- A merged-away profile and its survivor; an erased one.
        CREATE TABLE metrics.aliases (
            tenant_id   text NOT NULL,
            profile_id  text NOT NULL,
            survivor    text NOT NULL,
            PRIMARY KEY (tenant_id, profile_id)
        );
        CREATE INDEX aliases_survivor ON metrics.aliases (tenant_id, survivor);
        CREATE TABLE metrics.erased (
            tenant_id   text        NOT NULL,
            profile_id  text        NOT NULL,
            erased_at   timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant_id, profile_id)
        );

        -- What each customer adds to the rollups (services/metrics/derive.py), as last applied.
        -- anonymous: an erased customer's, kept as counts that name no one.
        CREATE TABLE metrics.contributions (
            tenant_id   text    NOT NULL,
            profile_id  text    NOT NULL,
            anonymous   boolean NOT NULL DEFAULT false,
            body        text    NOT NULL,  -- JSON (services/metrics/codec.py), read only by the code
            PRIMARY KEY (tenant_id, profile_id)
        );

        -- Handled contacts with a reason and no repeat yet: pending while started_at + window > now.
        CREATE TABLE metrics.open_contacts (
            tenant_id       text        NOT NULL,
            profile_id      text        NOT NULL,
            interaction_id  text        NOT NULL,
            started_at      timestamptz NOT NULL,
            hour            timestamptz NOT NULL,
            day             date        NOT NULL,
            channel         smallint    NOT NULL,
            queue           text        NOT NULL,
            agent           text        NOT NULL,
            reason          text        NOT NULL,
            PRIMARY KEY (tenant_id, profile_id, interaction_id)
        );
        CREATE INDEX open_contacts_started ON metrics.open_contacts (tenant_id, started_at);

        """
    )
    op.execute(
        rollup_table(
            "rollup_hour", "timestamptz", "Per local hour of the tenant's time zone (its start as an instant)."
        )
    )
    op.execute(
        rollup_table(
            "rollup_day", "date", "Per local day of the tenant's time zone (weeks, months and ranges sum days)."
        )
    )
    op.execute(
        """
        CREATE FUNCTION metrics.add_hist(a bigint[], b bigint[]) RETURNS bigint[]
        LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
            SELECT coalesce(array_agg(coalesce(a[i], 0) + coalesce(b[i], 0) ORDER BY i), '{}')
            FROM generate_series(1, greatest(coalesce(array_length(a, 1), 0), coalesce(array_length(b, 1), 0))) i
        $$;
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP TABLE metrics.rollup_day, metrics.rollup_hour, metrics.open_contacts, metrics.contributions,
            metrics.erased, metrics.aliases, metrics.facts, metrics.settings;
        DROP FUNCTION metrics.add_hist(bigint[], bigint[]);
        """
    )
