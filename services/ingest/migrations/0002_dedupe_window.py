"""Dedupe keys kept for a window, not forever, in two levels whose cost does not grow with history.

Before, every (tenant, message_id) ever seen stayed in one B-tree, so each insert landed on a
random page of an index that grew with history. Now:

- ``ingest.dedupe_keys`` (hot): partitioned by the UTC day a key was received. A batch inserts
  only into today's partition, which stays small; its conflicts are the dedupe check for today.
- ``ingest.dedupe_window`` (cold): one table of the window's older keys. A batch probes it once
  per event. The ingest upkeep moves each finished day into it shortly after midnight (sorted,
  in chunks) and deletes keys older than every tenant's window, so it holds one window of keys.

The key is 16 bytes of SHA-256 over the message id's UTF-8, kept as a ``uuid`` (fixed size,
compared with memcmp): ingest computes it; ``dedupe_key`` here computes the same one in SQL.
Keys received within the last 90 days are carried over; older ones are dropped.

Revision ID: ingest_0002
Revises: ingest_0001
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "ingest_0002"
down_revision = "ingest_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION ingest.dedupe_key(message_id text) RETURNS uuid
        LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
        AS $$ SELECT encode(substring(sha256(convert_to(message_id, 'UTF8')) FROM 1 FOR 16), 'hex')::uuid $$;

        ALTER TABLE ingest.dedupe_keys RENAME TO dedupe_keys_unbounded;

        -- Hot: within a partition `day` is constant, so the key makes (tenant, key_hash) unique per
        -- day. (A key written just after midnight UTC is also written for the day before: see
        -- services/ingest/storage.py.)
        CREATE TABLE ingest.dedupe_keys (
            tenant_id    text        NOT NULL,
            key_hash     uuid        NOT NULL,
            day          date        NOT NULL,
            event_id     uuid        NOT NULL,
            received_at  timestamptz NOT NULL,
            PRIMARY KEY (tenant_id, key_hash, day)
        ) PARTITION BY RANGE (day);
        -- Catch-all, so an insert never fails if partition upkeep fell behind.
        CREATE TABLE ingest.dedupe_keys_default PARTITION OF ingest.dedupe_keys DEFAULT;

        -- Cold: the window's finished days, one key per (tenant, key_hash); `day` says when it was
        -- first seen. Rows arrive in day order, so a BRIN index finds the expired ones cheaply.
        CREATE TABLE ingest.dedupe_window (
            tenant_id    text        NOT NULL,
            key_hash     uuid        NOT NULL,
            day          date        NOT NULL,
            event_id     uuid        NOT NULL,
            received_at  timestamptz NOT NULL,
            PRIMARY KEY (tenant_id, key_hash)
        );
        CREATE INDEX dedupe_window_day ON ingest.dedupe_window USING brin (day);

        -- Creates the daily hot partitions from `from_day` for `days` days; idempotent.
        CREATE FUNCTION ingest.ensure_dedupe_partitions(from_day date, days int) RETURNS int
        LANGUAGE plpgsql AS $$
        DECLARE
            d date := from_day;
            created int := 0;
            name text;
        BEGIN
            FOR i IN 0 .. days - 1 LOOP
                name := format('dedupe_keys_%s', to_char(d, 'YYYY_MM_DD'));
                IF to_regclass(format('ingest.%I', name)) IS NULL THEN
                    EXECUTE format(
                        'CREATE TABLE ingest.%I PARTITION OF ingest.dedupe_keys FOR VALUES FROM (%L) TO (%L)',
                        name, d, d + 1);
                    created := created + 1;
                END IF;
                d := d + 1;
            END LOOP;
            RETURN created;
        END $$;

        SELECT ingest.ensure_dedupe_partitions((now() AT TIME ZONE 'UTC')::date - 1, 9);

        -- Today's keys stay hot; the earlier ones of the last 90 days go cold, first sighting kept.
        INSERT INTO ingest.dedupe_keys (tenant_id, key_hash, day, event_id, received_at)
        SELECT tenant_id, ingest.dedupe_key(message_id), (received_at AT TIME ZONE 'UTC')::date, event_id, received_at
        FROM ingest.dedupe_keys_unbounded
        WHERE (received_at AT TIME ZONE 'UTC')::date >= (now() AT TIME ZONE 'UTC')::date
        ON CONFLICT DO NOTHING;
        INSERT INTO ingest.dedupe_window (tenant_id, key_hash, day, event_id, received_at)
        SELECT tenant_id, ingest.dedupe_key(message_id), (received_at AT TIME ZONE 'UTC')::date, event_id, received_at
        FROM ingest.dedupe_keys_unbounded
        WHERE received_at > now() - interval '90 days'
          AND (received_at AT TIME ZONE 'UTC')::date < (now() AT TIME ZONE 'UTC')::date
        ORDER BY received_at
        ON CONFLICT DO NOTHING;

        DROP TABLE ingest.dedupe_keys_unbounded;
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP TABLE ingest.dedupe_keys;
        DROP TABLE ingest.dedupe_window;
        DROP FUNCTION ingest.ensure_dedupe_partitions(date, int);
        DROP FUNCTION ingest.dedupe_key(text);
        CREATE TABLE ingest.dedupe_keys (
            tenant_id    text        NOT NULL,
            message_id   text        NOT NULL,
            event_id     uuid        NOT NULL,
            received_at  timestamptz NOT NULL,
            PRIMARY KEY (tenant_id, message_id)
        );
        INSERT INTO ingest.dedupe_keys (tenant_id, message_id, event_id, received_at)
        SELECT tenant_id, message_id, event_id, received_at FROM ingest.events
        ON CONFLICT DO NOTHING;
        """
    )
