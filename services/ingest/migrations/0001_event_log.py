"""The event log (partitioned by month), dedupe keys and the publish outbox.

Revision ID: ingest_0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

from alembic import op

revision = "ingest_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        -- The system of record: every accepted event, as the protobuf the stream carries.
        CREATE TABLE ingest.events (
            tenant_id    text        NOT NULL,
            received_at  timestamptz NOT NULL,
            event_id     uuid        NOT NULL,
            message_id   text        NOT NULL,
            occurred_at  timestamptz NOT NULL,
            channel      smallint    NOT NULL,
            kind         text        NOT NULL,
            payload      bytea       NOT NULL,
            PRIMARY KEY (tenant_id, received_at, event_id)
        ) PARTITION BY RANGE (received_at);

        -- Catch-all, so an insert never fails if partition upkeep fell behind.
        CREATE TABLE ingest.events_default PARTITION OF ingest.events DEFAULT;

        -- (tenant, message_id) is stored once, ever: retries and replays yield DUPLICATE.
        CREATE TABLE ingest.dedupe_keys (
            tenant_id    text        NOT NULL,
            message_id   text        NOT NULL,
            event_id     uuid        NOT NULL,
            received_at  timestamptz NOT NULL,
            PRIMARY KEY (tenant_id, message_id)
        );

        -- Committed batches not yet on the Redis stream: one row per batch, not per event, so the
        -- outbox costs one insert and one delete per batch. Rows live for milliseconds unless
        -- Redis is down.
        CREATE TABLE ingest.outbox (
            tenant_id    text        NOT NULL,
            seq          bigserial   NOT NULL,
            received_at  timestamptz NOT NULL,
            event_ids    uuid[]      NOT NULL,
            traceparent  text        NOT NULL DEFAULT '',
            created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
            PRIMARY KEY (tenant_id, seq)
        );

        -- Creates the monthly partitions from `from_month` for `months` months; idempotent.
        CREATE FUNCTION ingest.ensure_event_partitions(from_month date, months int) RETURNS int
        LANGUAGE plpgsql AS $$
        DECLARE
            m date := date_trunc('month', from_month)::date;
            created int := 0;
            name text;
        BEGIN
            FOR i IN 0 .. months - 1 LOOP
                name := format('events_%s', to_char(m, 'YYYY_MM'));
                IF to_regclass(format('ingest.%I', name)) IS NULL THEN
                    EXECUTE format(
                        'CREATE TABLE ingest.%I PARTITION OF ingest.events FOR VALUES FROM (%L) TO (%L)',
                        name, m, (m + interval '1 month')::date);
                    created := created + 1;
                END IF;
                m := (m + interval '1 month')::date;
            END LOOP;
            RETURN created;
        END $$;

        SELECT ingest.ensure_event_partitions((now() - interval '1 month')::date, 4);
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP FUNCTION ingest.ensure_event_partitions(date, int);
        DROP TABLE ingest.outbox;
        DROP TABLE ingest.dedupe_keys;
        DROP TABLE ingest.events;
        """
    )
