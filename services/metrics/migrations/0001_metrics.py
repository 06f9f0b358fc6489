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


def upgrade() -> None:
    op.execute(
        """
        -- A tenant's settings (services/metrics/tenant_settings.py).
        CREATE TABLE metrics.settings (
            tenant_id   text        PRIMARY KEY,
            spec        jsonb       NOT NULL,
            updated_at  timestamptz NOT NULL DEFAULT now()
        );

        -- kind: 1 leg, 2 survey, 3 message; body: the fact's fields (services/metrics/facts.py).
        CREATE TABLE metrics.facts (
            tenant_id       text        NOT NULL,
            fact_key        text        NOT NULL,
            kind            smallint    NOT NULL,
            event_id        text        NOT NULL,
            profile_id      text        NOT NULL,
            interaction_id  text        NOT NULL,
            at              timestamptz NOT NULL,
            body            jsonb       NOT NULL,
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
            body        jsonb   NOT NULL,
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

        -- Per local hour (its start as an instant) of the tenant's time zone.
        -- grouping: which dimensions the row keeps (bits: 1 channel, 2 queue, 4 agent, 8 reason,
        -- 16 source; the others are 0/''). Kept: see services/metrics/query.py (DAY_/HOUR_GROUPINGS).
        CREATE TABLE metrics.rollup_hour (
            tenant_id   text     NOT NULL,
            grouping    smallint NOT NULL,
            bucket      timestamptz NOT NULL,
            channel     smallint NOT NULL,
            queue       text     NOT NULL,
            agent       text     NOT NULL,
            reason      text     NOT NULL,
            source      text     NOT NULL,
            offered              bigint           NOT NULL DEFAULT 0,
            handled              bigint           NOT NULL DEFAULT 0,
            abandoned            bigint           NOT NULL DEFAULT 0,
            transferred          bigint           NOT NULL DEFAULT 0,
            answered_sl          bigint           NOT NULL DEFAULT 0,
            wait_ms              bigint           NOT NULL DEFAULT 0,
            repeats              bigint           NOT NULL DEFAULT 0,
            fcr_handled          bigint           NOT NULL DEFAULT 0,
            fcr_repeated         bigint           NOT NULL DEFAULT 0,
            legs_handled         bigint           NOT NULL DEFAULT 0,
            handle_ms            bigint           NOT NULL DEFAULT 0,
            cases_resolved       bigint           NOT NULL DEFAULT 0,
            cases_single         bigint           NOT NULL DEFAULT 0,
            bot_contacts         bigint           NOT NULL DEFAULT 0,
            contained            bigint           NOT NULL DEFAULT 0,
            handoffs             bigint           NOT NULL DEFAULT 0,
            nps_n                bigint           NOT NULL DEFAULT 0,
            nps_promoters        bigint           NOT NULL DEFAULT 0,
            nps_detractors       bigint           NOT NULL DEFAULT 0,
            csat_n               bigint           NOT NULL DEFAULT 0,
            csat_top2            bigint           NOT NULL DEFAULT 0,
            csat_sum             bigint           NOT NULL DEFAULT 0,
            ces_n                bigint           NOT NULL DEFAULT 0,
            ces_agree            bigint           NOT NULL DEFAULT 0,
            ces_sum              bigint           NOT NULL DEFAULT 0,
            sentiment_n          bigint           NOT NULL DEFAULT 0,
            sentiment_sum        bigint           NOT NULL DEFAULT 0,
            sentiment_positive   bigint           NOT NULL DEFAULT 0,
            sentiment_negative   bigint           NOT NULL DEFAULT 0,
            handle_sq            double precision NOT NULL DEFAULT 0,
            csat_sq              double precision NOT NULL DEFAULT 0,
            ces_sq               double precision NOT NULL DEFAULT 0,
            sentiment_sq         double precision NOT NULL DEFAULT 0,
            hist                 bigint[]         NOT NULL DEFAULT '{}',
            PRIMARY KEY (tenant_id, grouping, bucket, channel, queue, agent, reason, source)
        ) WITH (fillfactor = 80);  -- room for HOT updates: every delta rewrites a row

        -- Per local day of the tenant's time zone (weeks, months and ranges sum days).
        -- grouping: which dimensions the row keeps (bits: 1 channel, 2 queue, 4 agent, 8 reason,
        -- 16 source; the others are 0/''). Kept: see services/metrics/query.py (DAY_/HOUR_GROUPINGS).
        CREATE TABLE metrics.rollup_day (
            tenant_id   text     NOT NULL,
            grouping    smallint NOT NULL,
            bucket      date        NOT NULL,
            channel     smallint NOT NULL,
            queue       text     NOT NULL,
            agent       text     NOT NULL,
            reason      text     NOT NULL,
            source      text     NOT NULL,
            offered              bigint           NOT NULL DEFAULT 0,
            handled              bigint           NOT NULL DEFAULT 0,
            abandoned            bigint           NOT NULL DEFAULT 0,
            transferred          bigint           NOT NULL DEFAULT 0,
            answered_sl          bigint           NOT NULL DEFAULT 0,
            wait_ms              bigint           NOT NULL DEFAULT 0,
            repeats              bigint           NOT NULL DEFAULT 0,
            fcr_handled          bigint           NOT NULL DEFAULT 0,
            fcr_repeated         bigint           NOT NULL DEFAULT 0,
            legs_handled         bigint           NOT NULL DEFAULT 0,
            handle_ms            bigint           NOT NULL DEFAULT 0,
            cases_resolved       bigint           NOT NULL DEFAULT 0,
            cases_single         bigint           NOT NULL DEFAULT 0,
            bot_contacts         bigint           NOT NULL DEFAULT 0,
            contained            bigint           NOT NULL DEFAULT 0,
            handoffs             bigint           NOT NULL DEFAULT 0,
            nps_n                bigint           NOT NULL DEFAULT 0,
            nps_promoters        bigint           NOT NULL DEFAULT 0,
            nps_detractors       bigint           NOT NULL DEFAULT 0,
            csat_n               bigint           NOT NULL DEFAULT 0,
            csat_top2            bigint           NOT NULL DEFAULT 0,
            csat_sum             bigint           NOT NULL DEFAULT 0,
            ces_n                bigint           NOT NULL DEFAULT 0,
            ces_agree            bigint           NOT NULL DEFAULT 0,
            ces_sum              bigint           NOT NULL DEFAULT 0,
            sentiment_n          bigint           NOT NULL DEFAULT 0,
            sentiment_sum        bigint           NOT NULL DEFAULT 0,
            sentiment_positive   bigint           NOT NULL DEFAULT 0,
            sentiment_negative   bigint           NOT NULL DEFAULT 0,
            handle_sq            double precision NOT NULL DEFAULT 0,
            csat_sq              double precision NOT NULL DEFAULT 0,
            ces_sq               double precision NOT NULL DEFAULT 0,
            sentiment_sq         double precision NOT NULL DEFAULT 0,
            hist                 bigint[]         NOT NULL DEFAULT '{}',
            PRIMARY KEY (tenant_id, grouping, bucket, channel, queue, agent, reason, source)
        ) WITH (fillfactor = 80);  -- room for HOT updates: every delta rewrites a row

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
