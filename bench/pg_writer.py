"""The bare-PostgreSQL baseline of ``tessera bench ingest``: the same durable work with nothing else.

Each client thread holds one psycopg2 connection and writes the same 100-event batches as the
gRPC clients send (the demo events, each with a message id never used before) into the same
tables, with the same dedupe key and window probe, under the server's own ``synchronous_commit``,
one autocommitted statement per batch. No gRPC, no validation, no outbox row, no Redis: what is
left is what PostgreSQL must do for a durable, deduplicated event, which is the ceiling Tessera is
measured against.

It also pre-fills dedupe keys (``--existing-keys``) so both can be measured against history.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import psycopg2

from services.ingest.prepare import NewEvent, dedupe_key, new_event_ids
from services.ingest.storage import BATCH_CTE, BATCH_PARAMS, batch_columns
from tessera.v1 import event_pb2

log = logging.getLogger("bench.pg_writer")

_NAME = "tessera_bench_baseline"
# $1 tenant, $2 received_at, $3 (unused), $4 today, $5 today, $6 window start, then the batch's
# columns as ingest passes them (BATCH_CTE). The same probe and insert as ingest's write, minus
# the outbox row and the midnight shadow write (a run across midnight is flagged).
_PREPARE = (
    f"PREPARE {_NAME} "
    "(text, timestamptz, text, date, date, date, uuid[], uuid[], text[], float8[], int2[], text[], bytea, int4[]) "
    "AS WITH "
    + BATCH_CTE
    + """, seen AS (
    SELECT w.key_hash FROM ingest.dedupe_window w
    WHERE w.tenant_id = $1 AND w.key_hash = ANY($7) AND w.day >= $6
    UNION ALL
    SELECT k.key_hash FROM ingest.dedupe_keys k
    WHERE k.tenant_id = $1 AND k.key_hash = ANY($7) AND k.day >= $6 AND k.day < $5
), keys AS (
    INSERT INTO ingest.dedupe_keys (tenant_id, key_hash, day, event_id, received_at)
    SELECT $1, b.key_hash, $4, b.event_id, $2 FROM batch b
    WHERE b.key_hash NOT IN (SELECT key_hash FROM seen)
    ON CONFLICT DO NOTHING
    RETURNING event_id
), stored AS (
    INSERT INTO ingest.events (tenant_id, received_at, event_id, message_id, occurred_at, channel, kind, payload)
    SELECT $1, $2, b.event_id, b.message_id, to_timestamp(b.occurred), b.channel, b.kind, b.payload
    FROM batch b JOIN keys k USING (event_id)
    RETURNING 1
)
SELECT count(*) FROM stored"""
)
_EXECUTE = f"EXECUTE {_NAME} (%(tenant)s, %(received_at)s, '', %(today)s, %(today)s, %(window_start)s, {BATCH_PARAMS})"


@dataclass(frozen=True)
class Template:
    """A demo event as the baseline stores it (no message id; the client gives each one a fresh id)."""

    payload: bytes
    channel: int
    kind: str


def templates_of(serialized: Sequence[bytes]) -> list[Template]:
    out = []
    for raw in serialized:
        ev = event_pb2.Event.FromString(raw)
        out.append(Template(raw, int(ev.channel), str(ev.WhichOneof("payload"))))
    return out


def libpq_url(url: str) -> str:
    """psycopg2 wants ``postgresql://``, not SQLAlchemy's ``postgresql+psycopg2://``."""
    return url.replace("postgresql+psycopg2://", "postgresql://", 1)


class BaselineWriter:
    """One client of the baseline: one connection, one prepared statement, one batch per call."""

    def __init__(
        self, database_url: str, tenant_id: str, tag: str, batch_size: int, templates: Sequence[Template], offset: int
    ) -> None:
        self.conn = psycopg2.connect(libpq_url(database_url), application_name="tessera-bench-baseline")
        self.conn.autocommit = True
        self.tenant_id = tenant_id
        self.tag = tag
        self.size = batch_size
        self.templates = list(templates)
        self.offset = offset
        self.window_days = 7
        with self.conn.cursor() as cur:
            cur.execute(_PREPARE)

    def write(self, seq: int) -> int:
        """Write batch ``seq``; returns how many events were new (stored)."""
        received = dt.datetime.now(dt.UTC)
        today = received.date()
        n = len(self.templates)
        start = self.offset + seq * self.size
        now_s = received.timestamp()
        ids = new_event_ids(self.size, int(now_s * 1000))
        events = []
        for i in range(self.size):
            t = self.templates[(start + i) % n]
            mid = f"{self.tag}-{seq:09d}-{i:03d}"
            events.append(NewEvent(ids[i], dedupe_key(mid), mid, now_s, t.channel, t.kind, t.payload))
        params = {
            "tenant": self.tenant_id,
            "received_at": received,
            "today": today,
            "window_start": today - dt.timedelta(days=self.window_days),
            **batch_columns(events),
        }
        with self.conn.cursor() as cur:
            cur.execute(_EXECUTE, params)
            row = cur.fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        self.conn.close()


def prefill_keys(database_url: str, tenant_id: str, count: int, days: int = 6) -> float:
    """``count`` dedupe keys for ``tenant_id``, first seen over the ``days`` days before today: in the
    cold table, where the upkeep leaves a finished day, and inside a 7-day window, so every probe of
    a new batch must consult them. Returns the seconds taken."""
    started = time.monotonic()
    today = dt.datetime.now(dt.UTC).date()
    conn = psycopg2.connect(libpq_url(database_url), application_name="tessera-bench-prefill")
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            per_day = count // days
            for d in range(1, days + 1):
                day = today - dt.timedelta(days=d)
                n = per_day + (count % days if d == days else 0)
                # Random-looking keys, as the SHA-256 of random message ids are; sorted, as the
                # upkeep moves a day in.
                cur.execute(
                    "INSERT INTO ingest.dedupe_window (tenant_id, key_hash, day, event_id, received_at) "
                    "SELECT %s, md5(%s || g::text)::uuid AS k, %s, gen_random_uuid(), %s "
                    "FROM generate_series(1, %s) AS g ORDER BY k ON CONFLICT DO NOTHING",
                    (tenant_id, f"prefill-{d}-", day, dt.datetime.combine(day, dt.time(12), dt.UTC), n),
                )
            # As the table would be in steady state: vacuumed and analyzed, so no autovacuum of the
            # new rows runs during the measured phases (it would be counted as PostgreSQL's CPU).
            cur.execute("VACUUM (ANALYZE) ingest.dedupe_window")
            # ...and its writes checkpointed: otherwise the checkpoint of 20 M inserted rows (and the
            # full-page images after it) lands in the measured phases.
            try:
                cur.execute("CHECKPOINT")
            except psycopg2.Error:
                log.warning("could not CHECKPOINT (needs superuser or pg_checkpoint); figures may include one")
    finally:
        conn.close()
    return time.monotonic() - started
