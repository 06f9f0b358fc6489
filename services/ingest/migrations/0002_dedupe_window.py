"""Dedupe keys kept for a window, not forever: partitioned by day, with a compact fixed-size key.

Before, every (tenant, message_id) ever seen stayed in one B-tree, so each insert landed on a
random page of an index that grew with history. Now a key lives in the partition of the UTC day
it was received, and a batch inserts into today's partition (small and hot) and only probes the
days of its tenant's window; partitions older than every tenant's window are dropped by the
ingest upkeep. The key is the first 16 bytes of SHA-256 over the message id (UTF-8), computed by
PostgreSQL itself, so clients, migrations and benchmarks all derive the same one.

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
        ALTER TABLE ingest.dedupe_keys RENAME TO dedupe_keys_unbounded;

        -- One row per key per day it was written for (see services/ingest/storage.py for why a key
        -- written just after midnight UTC is also written for the day before). Within a partition
        -- `day` is constant, so the primary key makes (tenant, key_hash) unique per day.
        CREATE TABLE ingest.dedupe_keys (
            tenant_id    text        NOT NULL,
            key_hash     bytea       NOT NULL,
            day          date        NOT NULL,
            event_id     uuid        NOT NULL,
            received_at  timestamptz NOT NULL,
            PRIMARY KEY (tenant_id, key_hash, day)
        ) PARTITION BY RANGE (day);

        -- Catch-all, so an insert never fails if partition upkeep fell behind.
        CREATE TABLE ingest.dedupe_keys_default PARTITION OF ingest.dedupe_keys DEFAULT;

        -- Creates the daily partitions from `from_day` for `days` days; idempotent.
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

        -- Partitions from the oldest key carried over to a week ahead.
        DO $$
        DECLARE
            today date := (now() AT TIME ZONE 'UTC')::date;
            first_day date := coalesce(
                (SELECT min(received_at AT TIME ZONE 'UTC')::date FROM ingest.dedupe_keys_unbounded
                 WHERE received_at > now() - interval '90 days'),
                today);
        BEGIN
            PERFORM ingest.ensure_dedupe_partitions(first_day, today + 8 - first_day);
        END $$;

        INSERT INTO ingest.dedupe_keys (tenant_id, key_hash, day, event_id, received_at)
        SELECT tenant_id, substring(sha256(convert_to(message_id, 'UTF8')) FROM 1 FOR 16),
               (received_at AT TIME ZONE 'UTC')::date, event_id, received_at
        FROM ingest.dedupe_keys_unbounded
        WHERE received_at > now() - interval '90 days'
        ON CONFLICT DO NOTHING;

        DROP TABLE ingest.dedupe_keys_unbounded;
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP TABLE ingest.dedupe_keys;
        DROP FUNCTION ingest.ensure_dedupe_partitions(date, int);
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
