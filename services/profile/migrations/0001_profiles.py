"""Profiles: identifiers, traits with provenance, computed traits, the timeline, interactions and
cases, the change feed, erasure requests and the suppression list.

Every primary key and index leads with ``tenant_id``. The timeline grows with history, so it is
partitioned by month of receipt (retention drops a partition); the other tables hold one row per
profile, trait, interaction or case, not per event. Identifier values and trait search text use
the "C" collation, so a prefix search is an index range scan.

Revision ID: profile_0001
Revises:
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "profile_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        -- A tenant's trait policies, source priorities and computed-trait definitions (validated
        -- JSON, see services/profile/tenant_settings.py).
        CREATE TABLE profile.settings (
            tenant_id   text        PRIMARY KEY,
            spec        jsonb       NOT NULL,
            updated_at  timestamptz NOT NULL DEFAULT now()
        );

        -- state: 0 active, 1 merged away (merged_into: its final survivor), 2 erased.
        -- version grows with every committed change; the context cache is keyed by it.
        CREATE TABLE profile.profiles (
            tenant_id    text        NOT NULL,
            profile_id   uuid        NOT NULL,
            state        smallint    NOT NULL DEFAULT 0,
            merged_into  uuid,
            version      bigint      NOT NULL DEFAULT 1,
            event_count  bigint      NOT NULL DEFAULT 0,
            first_seen   timestamptz,
            last_seen    timestamptz,
            created_at   timestamptz NOT NULL DEFAULT now(),
            updated_at   timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant_id, profile_id)
        );
        CREATE INDEX profiles_merged_into ON profile.profiles (tenant_id, merged_into)
            WHERE merged_into IS NOT NULL;

        -- Who owns each normalized identifier, as identity linked it.
        CREATE TABLE profile.identifiers (
            tenant_id       text        NOT NULL,
            id_type         text        NOT NULL,
            id_value        text        COLLATE "C" NOT NULL,
            profile_id      uuid        NOT NULL,
            first_seen      timestamptz NOT NULL,
            last_seen       timestamptz NOT NULL,
            source          text        NOT NULL DEFAULT '',
            first_event_id  text        NOT NULL DEFAULT '',
            PRIMARY KEY (tenant_id, id_type, id_value)
        );
        CREATE INDEX identifiers_profile ON profile.identifiers (tenant_id, profile_id);

        -- Every observation of a trait, summarized per (value, source, origin): origin 0 events
        -- (rebuilt from the timeline on a split), 1 UpdateTraits (kept on the profile).
        CREATE TABLE profile.trait_values (
            tenant_id     text        NOT NULL,
            profile_id    uuid        NOT NULL,
            trait_key     text        NOT NULL,
            value_hash    text        NOT NULL,
            source        text        NOT NULL,
            origin        smallint    NOT NULL,
            value         jsonb       NOT NULL,
            observations  bigint      NOT NULL,
            first_at      timestamptz NOT NULL,
            first_event   text        NOT NULL,
            last_at       timestamptz NOT NULL,
            last_event    text        NOT NULL,
            PRIMARY KEY (tenant_id, profile_id, trait_key, value_hash, source, origin)
        );

        -- A trait removed by UpdateTraits: observations at or before removed_at no longer count.
        CREATE TABLE profile.trait_removals (
            tenant_id   text        NOT NULL,
            profile_id  uuid        NOT NULL,
            trait_key   text        NOT NULL,
            removed_at  timestamptz NOT NULL,
            PRIMARY KEY (tenant_id, profile_id, trait_key)
        );

        -- The current value of each trait, chosen by its policy from trait_values.
        CREATE TABLE profile.traits (
            tenant_id     text        NOT NULL,
            profile_id    uuid        NOT NULL,
            trait_key     text        NOT NULL,
            value         jsonb       NOT NULL,
            search_text   text        COLLATE "C" NOT NULL,
            source        text        NOT NULL,
            event_id      text        NOT NULL,
            observed_at   timestamptz NOT NULL,
            policy        smallint    NOT NULL,
            observations  bigint      NOT NULL,
            PRIMARY KEY (tenant_id, profile_id, trait_key)
        );
        CREATE INDEX traits_search ON profile.traits (tenant_id, trait_key, search_text);

        -- All-time computed traits, kept as running aggregates.
        CREATE TABLE profile.computed_state (
            tenant_id    text        NOT NULL,
            profile_id   uuid        NOT NULL,
            trait_key    text        NOT NULL,
            n            bigint      NOT NULL DEFAULT 0,
            num_n        bigint      NOT NULL DEFAULT 0,
            total        double precision NOT NULL DEFAULT 0,
            low          double precision,
            high         double precision,
            first_at     timestamptz,
            first_event  text,
            first_value  jsonb,
            last_at      timestamptz,
            last_event   text,
            last_value   jsonb,
            distinct_n   bigint      NOT NULL DEFAULT 0,
            PRIMARY KEY (tenant_id, profile_id, trait_key)
        );
        CREATE TABLE profile.computed_distinct (
            tenant_id   text NOT NULL,
            profile_id  uuid NOT NULL,
            trait_key   text NOT NULL,
            value_hash  text NOT NULL,
            PRIMARY KEY (tenant_id, profile_id, trait_key, value_hash)
        );
        -- Windowed computed traits: the matching events inside the longest window, aggregated at
        -- read time over the window that ends now (so values expire as time passes).
        CREATE TABLE profile.computed_points (
            tenant_id   text        NOT NULL,
            profile_id  uuid        NOT NULL,
            trait_key   text        NOT NULL,
            at          timestamptz NOT NULL,
            event_id    text        NOT NULL,
            num         double precision,
            value       jsonb,
            value_hash  text,
            PRIMARY KEY (tenant_id, profile_id, trait_key, at, event_id)
        );
        CREATE INDEX computed_points_age ON profile.computed_points (at);

        -- Every event of every profile, as ingest stored it.
        CREATE TABLE profile.timeline (
            tenant_id    text        NOT NULL,
            received_at  timestamptz NOT NULL,
            event_id     text        NOT NULL,
            profile_id   uuid        NOT NULL,
            event_time   timestamptz NOT NULL,
            channel      smallint    NOT NULL,
            kind         text        NOT NULL,
            payload      bytea       NOT NULL,
            PRIMARY KEY (tenant_id, received_at, event_id)
        ) PARTITION BY RANGE (received_at);
        CREATE INDEX timeline_profile ON profile.timeline (tenant_id, profile_id, event_time DESC, event_id DESC);
        CREATE INDEX timeline_event ON profile.timeline (tenant_id, event_id);
        CREATE TABLE profile.timeline_default PARTITION OF profile.timeline DEFAULT;

        CREATE FUNCTION profile.ensure_timeline_partitions(from_month date, months int) RETURNS int
        LANGUAGE plpgsql AS $$
        DECLARE
            m date := date_trunc('month', from_month)::date;
            created int := 0;
            name text;
        BEGIN
            FOR i IN 0 .. months - 1 LOOP
                name := format('timeline_%s', to_char(m, 'YYYY_MM'));
                IF to_regclass(format('profile.%I', name)) IS NULL THEN
                    EXECUTE format(
                        'CREATE TABLE profile.%I PARTITION OF profile.timeline FOR VALUES FROM (%L) TO (%L)',
                        name, m, (m + interval '1 month')::date);
                    created := created + 1;
                END IF;
                m := (m + interval '1 month')::date;
            END LOOP;
            RETURN created;
        END $$;
        SELECT profile.ensure_timeline_partitions((now() - interval '1 month')::date, 4);

        -- Events identity moved to a new profile by a split that arrived before the event did.
        CREATE TABLE profile.pending_moves (
            tenant_id   text        NOT NULL,
            event_id    text        NOT NULL,
            profile_id  uuid        NOT NULL,
            created_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant_id, event_id)
        );

        -- Changes already applied (the changes stream's idempotency record).
        CREATE TABLE profile.applied_changes (
            tenant_id   text        NOT NULL,
            change_key  text        NOT NULL,
            applied_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant_id, change_key)
        );

        -- One row per contact (all legs of a transferred one together).
        CREATE TABLE profile.interactions (
            tenant_id       text        NOT NULL,
            profile_id      uuid        NOT NULL,
            interaction_id  text        NOT NULL,
            channel         smallint    NOT NULL DEFAULT 0,
            direction       smallint    NOT NULL DEFAULT 0,
            queue           text        NOT NULL DEFAULT '',
            agent_id        text        NOT NULL DEFAULT '',
            reason          text        NOT NULL DEFAULT '',
            disposition     text        NOT NULL DEFAULT '',
            case_id         text        NOT NULL DEFAULT '',
            case_status     smallint    NOT NULL DEFAULT 0,
            start_time      timestamptz NOT NULL,
            end_time        timestamptz,
            handle_seconds  double precision NOT NULL DEFAULT 0,
            legs            int         NOT NULL DEFAULT 0,
            transferred     boolean     NOT NULL DEFAULT false,
            abandoned       boolean     NOT NULL DEFAULT false,
            messages        int         NOT NULL DEFAULT 0,
            last_leg_at     timestamptz,
            last_leg_event  text        NOT NULL DEFAULT '',
            PRIMARY KEY (tenant_id, profile_id, interaction_id)
        );
        CREATE INDEX interactions_recent ON profile.interactions (tenant_id, profile_id, start_time DESC);

        -- Each case's latest status (by event time).
        CREATE TABLE profile.cases (
            tenant_id       text        NOT NULL,
            profile_id      uuid        NOT NULL,
            case_id         text        NOT NULL,
            status          smallint    NOT NULL,
            reason          text        NOT NULL DEFAULT '',
            interaction_id  text        NOT NULL DEFAULT '',
            open_time       timestamptz NOT NULL,
            update_time     timestamptz NOT NULL,
            update_event    text        NOT NULL,
            PRIMARY KEY (tenant_id, profile_id, case_id)
        );

        -- The change feed WatchProfiles serves: seq is dense per tenant, allocated under the
        -- tenant's head row lock at the end of each transaction, so seq order is commit order.
        CREATE TABLE profile.feed_heads (
            tenant_id       text   PRIMARY KEY,
            seq             bigint NOT NULL,
            pruned_through  bigint NOT NULL DEFAULT 0
        );
        CREATE TABLE profile.feed (
            tenant_id      text        NOT NULL,
            seq            bigint      NOT NULL,
            kind           smallint    NOT NULL,
            profile_id     uuid        NOT NULL,
            other_profile  uuid,
            changed        text[]      NOT NULL DEFAULT '{}',
            at             timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant_id, seq)
        );
        CREATE INDEX feed_age ON profile.feed (at);

        -- Erasures and their progress; identifiers are kept only until ingest has them on its
        -- suppression list, event ids only until ingest has purged them.
        CREATE TABLE profile.erasure_requests (
            tenant_id     text        NOT NULL,
            request_id    uuid        NOT NULL,
            profile_id    uuid        NOT NULL,
            member_ids    uuid[]      NOT NULL,
            identifiers   jsonb       NOT NULL,
            normalizers   jsonb       NOT NULL,
            state         smallint    NOT NULL DEFAULT 1,
            steps         jsonb       NOT NULL,
            reason        text        NOT NULL,
            marks         jsonb       NOT NULL DEFAULT '{}',
            attempts      int         NOT NULL DEFAULT 0,
            next_try_at   timestamptz NOT NULL DEFAULT now(),
            created_at    timestamptz NOT NULL DEFAULT now(),
            done_at       timestamptz,
            PRIMARY KEY (tenant_id, request_id)
        );
        CREATE UNIQUE INDEX erasure_running ON profile.erasure_requests (tenant_id, profile_id) WHERE state = 1;
        CREATE INDEX erasure_due ON profile.erasure_requests (next_try_at) WHERE state = 1;
        CREATE TABLE profile.erasure_events (
            tenant_id   text NOT NULL,
            request_id  uuid NOT NULL,
            event_id    text NOT NULL,
            PRIMARY KEY (tenant_id, request_id, event_id)
        );

        -- Keyed hashes of erased people's identifiers: resolved events carrying one are dropped.
        CREATE TABLE profile.suppressions (
            tenant_id   text        NOT NULL,
            id_hash     bytea       NOT NULL,
            request_id  uuid        NOT NULL,
            created_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant_id, id_hash)
        );
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP TABLE profile.suppressions, profile.erasure_events, profile.erasure_requests, profile.feed,
            profile.feed_heads, profile.cases, profile.interactions, profile.applied_changes,
            profile.pending_moves, profile.timeline, profile.computed_points, profile.computed_distinct,
            profile.computed_state, profile.traits, profile.trait_removals, profile.trait_values,
            profile.identifiers, profile.profiles, profile.settings;
        DROP FUNCTION profile.ensure_timeline_partitions(date, int);
        """
    )
