"""The event log in PostgreSQL: one round trip writes a whole batch.

A single statement inserts the dedupe keys, the events that won their key, and their
outbox rows (data-modifying CTEs over ``unnest`` arrays), so a batch costs one
statement and one commit however many events it holds.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import psycopg2
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from services.core import db, streams
from services.core.outbox import Pending
from services.ingest.prepare import NewEvent, dedupe_key
from services.ingest.suppression import Suppression, SuppressionChanges, TypeNormalizer

# Prepared once per connection: planning this statement costs PostgreSQL about as much as
# running it. $1 tenant, $2 received_at, $3 traceparent, $4 today (UTC day of received_at),
# $5 the first day to write keys for ($4, or the day before just after midnight), $6 the first
# day of the tenant's dedupe window, then one array per column ($7 the dedupe keys).
#
# Dedupe has two levels (see migration ingest_0002): today's keys are inserted into today's small
# hot partition, where a conflict is a duplicate; the window's earlier days are probed, once per
# event, in the cold table (and in a hot day the upkeep has not moved yet).
#
# Why two days just after midnight: a key is unique per day's partition, so two writers of one
# message id on either side of midnight would not conflict. A writer within the grace after
# midnight therefore also writes the key for the day before, and wins only if it is new on both:
# its insert there waits for, then conflicts with, a writer still in flight from before midnight.
_WRITE_BATCH_TEMPLATE = (
    "PREPARE {name} "
    """(text, timestamptz, text, date, date, date, uuid[], uuid[], text[], float8[], int2[], text[], bytea, int4[]) AS
WITH {batch}, seen AS (
    SELECT w.key_hash FROM ingest.dedupe_window w
    WHERE w.tenant_id = $1 AND w.key_hash = ANY($7) AND w.day >= $6
    UNION ALL
    SELECT k.key_hash FROM ingest.dedupe_keys k
    WHERE k.tenant_id = $1 AND k.key_hash = ANY($7) AND k.day >= $6 AND k.day < $5
), {keys}
), stored AS (
    INSERT INTO ingest.events (tenant_id, received_at, event_id, message_id, occurred_at, channel, kind, payload)
    SELECT $1, $2, b.event_id, b.message_id, to_timestamp(b.occurred), b.channel, b.kind, b.payload
    FROM batch b JOIN won w USING (event_id)
    RETURNING event_id
), outbox AS (
    INSERT INTO ingest.outbox (tenant_id, received_at, event_ids, traceparent)
    SELECT $1, $2, array_agg(event_id ORDER BY event_id), $3 FROM stored HAVING count(*) > 0
    RETURNING seq
)
SELECT s.event_id::text, o.seq FROM stored s CROSS JOIN outbox o;
"""
)
# The batch's rows from its column parameters (see batch_columns): $7 keys, $8 event ids,
# $9 message ids, $10 occurred, $11 channels, $12 kinds, then the payloads as one blob ($13) and
# their lengths ($14): one parameter instead of a hundred.
BATCH_CTE = """cut AS (
    SELECT n, len, sum(len) OVER (ORDER BY n) - len + 1 AS start
    FROM unnest($14) WITH ORDINALITY AS l(len, n)
), batch AS (
    SELECT b.key_hash, b.event_id, b.message_id, b.occurred, b.channel, b.kind,
           substring($13 FROM c.start::int FOR c.len) AS payload
    FROM unnest($7, $8, $9, $10, $11, $12) WITH ORDINALITY
        AS b(key_hash, event_id, message_id, occurred, channel, kind, n)
    JOIN cut c USING (n)
)"""
# Almost always: the keys are written for today only, and a conflict there is a duplicate.
_ONE_DAY_KEYS = """keys AS (
    INSERT INTO ingest.dedupe_keys (tenant_id, key_hash, day, event_id, received_at)
    SELECT $1, b.key_hash, $4, b.event_id, $2 FROM batch b
    WHERE b.key_hash NOT IN (SELECT key_hash FROM seen)
    ON CONFLICT DO NOTHING
    RETURNING event_id
), won AS (
    SELECT event_id FROM keys"""
# Within the grace after midnight: for yesterday ($5) and today ($4); new only if new on both.
_TWO_DAY_KEYS = """keys AS (
    INSERT INTO ingest.dedupe_keys (tenant_id, key_hash, day, event_id, received_at)
    SELECT $1, b.key_hash, d.day, b.event_id, $2
    FROM batch b CROSS JOIN (VALUES ($5), ($4)) AS d(day)
    WHERE b.key_hash NOT IN (SELECT key_hash FROM seen)
    ON CONFLICT DO NOTHING
    RETURNING event_id
), won AS (
    SELECT event_id FROM keys GROUP BY event_id HAVING count(*) = 2"""
#: (statement name, PREPARE text) for one day's keys, then for two.
_WRITE_BATCH = {
    days: (name, _WRITE_BATCH_TEMPLATE.replace("{name}", name).replace("{keys}", keys).replace("{batch}", BATCH_CTE))
    for days, name, keys in (
        (1, "tessera_ingest_write_batch_v2", _ONE_DAY_KEYS),
        (2, "tessera_ingest_write_batch_v2_midnight", _TWO_DAY_KEYS),
    )
}
_EXECUTE_WRITE_BATCH = (
    "EXECUTE {name} (%(tenant)s, %(received_at)s, %(traceparent)s, %(today)s, %(first_day)s, "
    "%(window_start)s, %(key_hashes)s, %(event_ids)s, %(message_ids)s, %(occurred)s, %(channels)s, %(kinds)s, "
    "%(payloads)s, %(lengths)s)"
)

# Every remembered sighting of some message ids within a window, hot and cold: (key, day,
# event_id, received_at). A key's first sighting in the window is its original event.
_SIGHTINGS = """
SELECT k.key_hash::text, k.day, k.event_id::text, k.received_at FROM ingest.dedupe_keys k
WHERE k.tenant_id = %(tenant)s AND k.key_hash = ANY(%(key_hashes)s::uuid[]) AND k.day >= %(window_start)s
UNION ALL
SELECT w.key_hash::text, w.day, w.event_id::text, w.received_at FROM ingest.dedupe_window w
WHERE w.tenant_id = %(tenant)s AND w.key_hash = ANY(%(key_hashes)s::uuid[]) AND w.day >= %(window_start)s
"""

# Just after midnight (UTC) a batch also writes its keys for the day before; see _WRITE_BATCH.
MIDNIGHT_GRACE = dt.timedelta(minutes=5)
# No batch statement may outlive the grace (its clock could be a minute off, too).
MAX_STATEMENT_SECONDS = 60.0


def dedupe_days(received_at: dt.datetime, window_days: int) -> tuple[dt.date, dt.date, dt.date]:
    """(today, first day to write the keys for, first day of the window) for a batch."""
    today = received_at.astimezone(dt.UTC).date()
    first = (received_at - MIDNIGHT_GRACE).astimezone(dt.UTC).date()
    return today, first, today - dt.timedelta(days=window_days)


_CLAIM_OUTBOX = """
SELECT tenant_id, seq, received_at, event_ids::text[], traceparent
FROM ingest.outbox
WHERE created_at < clock_timestamp() - make_interval(secs => %(min_age)s)
ORDER BY tenant_id, seq
LIMIT %(limit)s
FOR UPDATE SKIP LOCKED
"""

_OUTBOX_PAYLOADS = """
SELECT payload FROM ingest.events
WHERE tenant_id = %(tenant)s AND received_at = %(received_at)s AND event_id = ANY(%(event_ids)s::uuid[])
ORDER BY event_id
"""

# seq is unique on its own (one sequence); the tenant list lets the primary key serve the lookup.
_DELETE_OUTBOX = """
DELETE FROM ingest.outbox
WHERE tenant_id = ANY(%(tenants)s) AND seq = ANY(%(seqs)s)
RETURNING seq
"""

PARTITION_LOCK_KEY = 0x7E55E7B

# The tenants with cold keys, one index probe each.
_COLD_TENANTS = db.with_tenants_of("ingest.dedupe_window", "SELECT tenant_id FROM tenants WHERE tenant_id IS NOT NULL")

# PurgeEvents: each id with its receive-time range (an event id's time is its received_at, to the
# millisecond), so each look-up is a short range of the primary key in one partition: a nested
# loop over the ids, each probing only the partition its range falls in (run-time pruning). The
# planner cannot estimate those ranges and would rather hash the tenant's whole history, so the
# transaction turns hash and merge joins off (and JIT, which the resulting estimate would start).
_PURGE_PLAN = "SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off; SET LOCAL jit = off"
_PURGE_EVENTS = """
DELETE FROM ingest.events e
USING unnest(%(ids)s::uuid[], %(lo)s::timestamptz[], %(hi)s::timestamptz[]) AS p(event_id, lo, hi)
WHERE e.tenant_id = %(tenant)s AND e.received_at >= p.lo AND e.received_at < p.hi AND e.event_id = p.event_id
  AND e.received_at >= %(min_lo)s AND e.received_at < %(max_hi)s
"""
# The purged ids leave the outbox rows still naming them (their bytes were the event's); a row
# left naming nothing is deleted, so no relay publishes it.
_PURGE_OUTBOX = """
WITH named AS (
    SELECT o.seq, ARRAY(SELECT x FROM unnest(o.event_ids) AS x WHERE x <> ALL(%(ids)s::uuid[]) ORDER BY x) AS kept
    FROM ingest.outbox o
    WHERE o.tenant_id = %(tenant)s AND o.event_ids && %(ids)s::uuid[]
    FOR UPDATE
), emptied AS (
    DELETE FROM ingest.outbox o USING named n
    WHERE o.tenant_id = %(tenant)s AND o.seq = n.seq AND cardinality(n.kept) = 0
    RETURNING o.seq
), trimmed AS (
    UPDATE ingest.outbox o SET event_ids = n.kept FROM named n
    WHERE o.tenant_id = %(tenant)s AND o.seq = n.seq AND cardinality(n.kept) > 0
    RETURNING o.seq
)
SELECT (SELECT count(*) FROM emptied), (SELECT count(*) FROM trimmed)
"""


@dataclass(frozen=True)
class WriteResult:
    # The outbox row of this batch (None when nothing was new) and the events it stored.
    outbox_seq: int | None
    accepted: set[str]
    # message_id -> event_id of the first commit, for the ones already stored.
    duplicates: dict[str, str]


def batch_columns(events: Sequence[NewEvent]) -> dict[str, Any]:
    """The parameters of :data:`BATCH_CTE`: each column as one array literal (adapting a list
    element by element costs psycopg2 about a microsecond each), the payloads as one blob."""
    return {
        "key_hashes": db.array_literal([e.key_hash for e in events]),
        "event_ids": db.array_literal([e.event_id for e in events]),
        "message_ids": db.text_array_literal([e.message_id for e in events]),
        "occurred": db.array_literal([repr(e.occurred) for e in events]),
        "channels": db.array_literal([e.channel for e in events]),
        "kinds": db.text_array_literal([e.kind for e in events]),
        "payloads": psycopg2.Binary(b"".join(e.payload for e in events)),
        "lengths": db.array_literal([len(e.payload) for e in events]),
    }


# The parameters after $6, as they follow BATCH_CTE's numbering.
BATCH_PARAMS = (
    "%(key_hashes)s, %(event_ids)s, %(message_ids)s, %(occurred)s, %(channels)s, %(kinds)s, %(payloads)s, %(lengths)s"
)


def _first_sightings(
    cursor: Any, tenant_id: str, key_hashes: Sequence[str], window_start: dt.date
) -> dict[str, tuple[str, dt.datetime]]:
    """key (32 hex digits) -> (event_id, received_at) of its first sighting within the window."""
    cursor.execute(_SIGHTINGS, {"tenant": tenant_id, "key_hashes": list(key_hashes), "window_start": window_start})
    first: dict[str, tuple[dt.date, str, dt.datetime]] = {}
    for key, day, event_id, received_at in cursor.fetchall():
        hexkey = key.replace("-", "")
        if hexkey not in first or day < first[hexkey][0]:
            first[hexkey] = (day, event_id, received_at)
    return {k: (eid, at) for k, (_day, eid, at) in first.items()}


class StoredEvent(NamedTuple):
    """An event as the log holds it: the bytes the stream carries, and its place in the log."""

    received_at: dt.datetime
    event_id: str
    payload: bytes


class EventLogOutbox:
    """``ingest.outbox``: one row per committed batch, naming its events in the event log, so an
    event's bytes are written once. The write-batch statement inserts the rows; the core
    :class:`~services.core.outbox.Outbox` publishes and deletes them."""

    name = "ingest.outbox"

    def claim(self, cur: Any, min_age_seconds: float, limit: int) -> list[Pending]:
        """Lock the oldest unpublished batches (skipping ones another relay holds), with their events."""
        cur.execute(_CLAIM_OUTBOX, {"min_age": min_age_seconds, "limit": limit})
        out = []
        for tenant_id, seq, received_at, event_ids, traceparent in cur.fetchall():
            cur.execute(_OUTBOX_PAYLOADS, {"tenant": tenant_id, "received_at": received_at, "event_ids": event_ids})
            payloads = [bytes(r[0]) for r in cur.fetchall()]
            envelopes = streams.event_envelopes(tenant_id, traceparent, payloads)
            out.append(Pending(tenant_id, streams.EVENTS.name, (int(seq),), envelopes))
        return out

    def delete(self, cur: Any, keys: Sequence[tuple[str, int]]) -> set[int]:
        """Delete rows and return the seqs this transaction removed. A row another relay is
        sweeping is locked; once that sweep commits the row is gone, so it is not returned."""
        if not keys:
            return set()
        cur.execute(_DELETE_OUTBOX, {"tenants": sorted({k[0] for k in keys}), "seqs": [k[1] for k in keys]})
        return {int(row[0]) for row in cur.fetchall()}


class EventStore:
    def __init__(self, engine: Engine, autocommit_engine: Engine | None = None) -> None:
        self.engine = engine
        self.autocommit = autocommit_engine or engine.execution_options(isolation_level="AUTOCOMMIT")

    def write_batch(
        self,
        tenant_id: str,
        events: Sequence[NewEvent],
        received_at: dt.datetime,
        traceparent: str = "",
        timeout_seconds: float | None = None,
        window_days: int = 7,
    ) -> WriteResult:
        """Commit a batch; returns once it is durable. A message id seen within the tenant's dedupe
        window (``window_days`` whole days) is not stored again: it answers DUPLICATE.

        One round trip: the statement runs in autocommit, so it is its own transaction, and
        the statement timeout rides in the same query string. Safe to retry: dedupe keys make
        a second attempt answer DUPLICATE for what the first one committed.
        """
        today, first_day, window_start = dedupe_days(received_at, window_days)
        params = {
            "tenant": tenant_id,
            "received_at": received_at,
            "traceparent": traceparent,
            "today": today,
            "first_day": first_day,
            "window_start": window_start,
            **batch_columns(events),
        }
        limit = MAX_STATEMENT_SECONDS if timeout_seconds is None else min(timeout_seconds, MAX_STATEMENT_SECONDS)
        name, prepare = _WRITE_BATCH[1 if first_day == today else 2]
        execute = db.statement_timeout_sql(limit) + _EXECUTE_WRITE_BATCH.replace("{name}", name)

        def write() -> WriteResult:
            with db.raw_transaction(self.autocommit, "INSERT ingest.events", len(events)) as (cursor, info):
                if name in info:
                    cursor.execute(execute, params)
                else:  # first use of this connection: prepare in the same round trip
                    cursor.execute(prepare.replace("%", "%%") + execute, params)
                    info[name] = True
                rows = cursor.fetchall()
                accepted = {event_id for event_id, _ in rows}
                seq = rows[0][1] if rows else None
                duplicates: dict[str, str] = {}
                if len(accepted) < len(events):
                    missing = [e for e in events if e.event_id not in accepted]
                    first = _first_sightings(cursor, tenant_id, [e.key_hash for e in missing], window_start)
                    duplicates = {e.message_id: first[e.key_hash][0] for e in missing if e.key_hash in first}
            return WriteResult(seq, accepted, duplicates)

        return db.retry_on_disconnect(write)

    def list_events(
        self, tenant_id: str, limit: int, after: tuple[str, str] | None, message_ids: Sequence[str] = ()
    ) -> list[StoredEvent]:
        """Newest first; ``after`` is the (received_at, event_id) the previous page ended on."""
        clauses = ["e.tenant_id = %(tenant)s"]
        params: dict[str, object] = {"tenant": tenant_id, "limit": limit}
        if message_ids:
            # Found through their dedupe keys, so only within the retained dedupe window.
            with db.raw_transaction(self.engine, "SELECT ingest.dedupe_keys") as (cursor, _):
                found = _first_sightings(cursor, tenant_id, [dedupe_key(m) for m in message_ids], dt.date.min)
            if not found:
                return []
            clauses.append(
                "(e.received_at, e.event_id) IN (SELECT * FROM unnest(%(at)s::timestamptz[], %(ids)s::uuid[]))"
            )
            clauses.append("e.message_id = ANY(%(message_ids)s)")
            params["at"] = [at for _eid, at in found.values()]
            params["ids"] = [eid for eid, _at in found.values()]
            params["message_ids"] = list(message_ids)
        if after is not None:
            clauses.append("(e.received_at, e.event_id) < (%(after_ts)s::timestamptz, %(after_id)s::uuid)")
            params["after_ts"], params["after_id"] = after
        sql = (
            "SELECT e.received_at, e.event_id::text, e.payload FROM ingest.events e "  # noqa: S608
            f"WHERE {' AND '.join(clauses)} ORDER BY e.received_at DESC, e.event_id DESC LIMIT %(limit)s"
        )
        with self.engine.connect() as conn:
            return [StoredEvent(r[0], r[1], bytes(r[2])) for r in conn.exec_driver_sql(sql, params).all()]

    def purge(self, tenant_id: str, event_ids: Sequence[str], ranges: Sequence[tuple[dt.datetime, dt.datetime]]) -> int:
        """Delete the tenant's events with these ids (each within its receive-time range) from the
        event log, and from the outbox rows that still name them, in one transaction; returns how
        many events this call deleted. Another tenant's events are never touched."""
        if not event_ids:
            return 0
        params = {
            "tenant": tenant_id,
            "ids": list(event_ids),
            "lo": [lo for lo, _ in ranges],
            "hi": [hi for _, hi in ranges],
            "min_lo": min(lo for lo, _ in ranges),
            "max_hi": max(hi for _, hi in ranges),
        }

        def purge() -> int:
            with db.raw_transaction(self.engine, "DELETE ingest.events", len(event_ids)) as (cursor, _):
                cursor.execute(_PURGE_PLAN)
                cursor.execute(_PURGE_EVENTS, params)
                purged = int(cursor.rowcount)
                cursor.execute(_PURGE_OUTBOX, params)
            return purged

        return db.retry_on_disconnect(purge)

    def outbox_backlog(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.exec_driver_sql("SELECT count(*) FROM ingest.outbox").scalar_one())

    def _drop_partitions(self, parent: str, prefix: str, cutoff: dt.date) -> list[str]:
        """Drop the partitions of ``parent`` whose range ends on or before ``cutoff``."""
        dropped: list[str] = []
        with self.engine.begin() as conn:
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": PARTITION_LOCK_KEY})
            rows = conn.execute(
                sa.text(
                    "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
                    "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = CAST(:p AS regclass)"
                ),
                {"p": parent},
            ).all()
            for name, bound in rows:
                if not name.startswith(prefix) or "TO ('" not in bound:
                    continue  # the default partition has no bound
                upper = dt.date.fromisoformat(bound.split("TO ('", 1)[1][:10])
                if upper <= cutoff:
                    conn.exec_driver_sql(f'DROP TABLE ingest."{name}"')
                    dropped.append(name)
        return sorted(dropped)

    def drop_partitions_before(self, cutoff: dt.date) -> list[str]:
        """Retention: drop the monthly event partitions that end on or before ``cutoff``. (Dedupe keys
        have their own, shorter life: see :meth:`upkeep`.)"""
        return self._drop_partitions("ingest.events", "events_", cutoff)

    def upkeep(self, keep_dedupe_days: int, months_ahead: int = 3, days_ahead: int = 7) -> dict[str, int]:
        """Partition and dedupe upkeep, safe from every replica at once (each step takes the partition
        lock and is idempotent):

        - create the coming months' event partitions and the coming days' hot dedupe partitions;
        - move every finished hot day into the cold table, then drop its partition;
        - delete the cold keys that every tenant's window (``keep_dedupe_days``, the longest) has
          left behind.
        """
        now = dt.datetime.now(dt.UTC)
        today = now.date()
        with self.engine.begin() as conn:
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": PARTITION_LOCK_KEY})
            months = conn.execute(
                sa.text("SELECT ingest.ensure_event_partitions(:d, :n)"), {"d": today, "n": months_ahead}
            ).scalar_one()
            days = conn.execute(
                sa.text("SELECT ingest.ensure_dedupe_partitions(:d, :n)"), {"d": today, "n": days_ahead + 1}
            ).scalar_one()
        # A day is finished once no write can still be made for it: past the midnight grace, and
        # past the longest a write may run.
        finished_before = (now - MIDNIGHT_GRACE - dt.timedelta(seconds=MAX_STATEMENT_SECONDS)).date()
        moved = self.compact(finished_before)
        expired = self.expire(today - dt.timedelta(days=keep_dedupe_days))
        return {
            "event_partitions_created": int(months),
            "dedupe_partitions_created": int(days),
            "dedupe_days_moved_cold": moved,
            "dedupe_keys_expired": expired,
        }

    def _hot_days(self) -> list[tuple[str, dt.date | None]]:
        """The hot dedupe partitions: (table name, its day), None for the default partition."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
                    "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'ingest.dedupe_keys'::regclass"
                )
            ).all()
        out: list[tuple[str, dt.date | None]] = []
        for name, bound in rows:
            day = dt.date.fromisoformat(bound.split("FROM ('", 1)[1][:10]) if "FROM ('" in bound else None
            out.append((name, day))
        return sorted(out, key=lambda r: (r[1] is None, r[1] or dt.date.min))

    def compact(self, finished_before: dt.date, chunks: int = 16) -> int:
        """Move the hot days before ``finished_before`` (and the default partition's finished rows)
        into the cold table, in key-range chunks so no transaction is long, keeping each key's
        latest sighting; then drop those days' partitions. Returns the days moved."""
        moved = 0
        step = 256 // chunks
        for name, day in self._hot_days():
            if day is not None and day >= finished_before:
                continue
            for n in range(chunks):
                lo = f"{n * step:02x}" + "0" * 30
                hi = f"{(n + 1) * step:02x}" + "0" * 30 if n + 1 < chunks else None
                with db.raw_transaction(self.engine, "INSERT ingest.dedupe_window") as (cur, _):
                    cur.execute("SET LOCAL synchronous_commit = off")  # redone from the hot rows if lost
                    cur.execute(
                        f"INSERT INTO ingest.dedupe_window (tenant_id, key_hash, day, event_id, received_at) "  # noqa: S608
                        f"SELECT DISTINCT ON (tenant_id, key_hash) tenant_id, key_hash, day, event_id, received_at "
                        f'FROM ingest."{name}" WHERE key_hash >= %(lo)s::uuid '
                        + ("AND key_hash < %(hi)s::uuid " if hi else "")
                        + ("AND day < %(before)s " if day is None else "")
                        + "ORDER BY tenant_id, key_hash, day DESC "
                        "ON CONFLICT (tenant_id, key_hash) DO UPDATE SET day = EXCLUDED.day, "
                        "event_id = EXCLUDED.event_id, received_at = EXCLUDED.received_at "
                        "WHERE ingest.dedupe_window.day < EXCLUDED.day",
                        {"lo": lo, "hi": hi, "before": finished_before},
                    )
            with self.engine.begin() as conn:
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": PARTITION_LOCK_KEY})
                if day is None:
                    conn.execute(
                        sa.text("DELETE FROM ingest.dedupe_keys_default WHERE day < :d"), {"d": finished_before}
                    )
                else:
                    conn.exec_driver_sql(f'DROP TABLE IF EXISTS ingest."{name}"')
                    moved += 1
        if moved:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("ANALYZE ingest.dedupe_window")  # plans probe it by index, not by scan
        return moved

    def expire(self, window_start: dt.date, chunk: int = 50_000) -> int:
        """Delete cold keys first seen before ``window_start``, tenant by tenant (the day index
        leads with tenant_id), in transactions of at most ``chunk`` keys; returns how many."""
        with self.engine.connect() as conn:
            tenant_ids = list(conn.exec_driver_sql(_COLD_TENANTS).scalars())
        total = 0
        for tenant_id in tenant_ids:
            while True:
                with db.raw_transaction(self.engine, "DELETE ingest.dedupe_window") as (cur, _):
                    cur.execute(
                        "DELETE FROM ingest.dedupe_window WHERE ctid = ANY(ARRAY("
                        "SELECT ctid FROM ingest.dedupe_window WHERE tenant_id = %s AND day < %s LIMIT %s))",
                        (tenant_id, window_start, chunk),
                    )
                    n = int(cur.rowcount)
                total += n
                if n < chunk:
                    break
        return total


_BUMP_VERSION = """
INSERT INTO ingest.suppression_versions AS v (tenant_id, version) VALUES (%(tenant)s, 1)
ON CONFLICT (tenant_id) DO UPDATE SET version = v.version + 1, updated_at = now()
RETURNING version
"""
_ADD_SUPPRESSIONS = """
INSERT INTO ingest.suppressions (tenant_id, id_hash, id_type, erasure_request, version)
SELECT %(tenant)s, h, t, %(request)s, %(version)s FROM unnest(%(hashes)s::bytea[], %(types)s::text[]) AS s(h, t)
ON CONFLICT (tenant_id, id_hash) DO NOTHING
"""
_UPSERT_NORMALIZERS = """
INSERT INTO ingest.suppression_normalizers AS n (tenant_id, id_type, normalizer, default_region)
SELECT %(tenant)s, t, m, %(region)s FROM unnest(%(types)s::text[], %(normalizers)s::text[]) AS s(t, m)
ON CONFLICT (tenant_id, id_type) DO UPDATE
SET normalizer = EXCLUDED.normalizer, default_region = EXCLUDED.default_region, updated_at = now()
WHERE (n.normalizer, n.default_region) IS DISTINCT FROM (EXCLUDED.normalizer, EXCLUDED.default_region)
"""


class SuppressionStore:
    """The suppression list in PostgreSQL (migration ingest_0003); the source of
    :class:`services.ingest.suppression.SuppressionCache`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def add(self, tenant_id: str, suppression: Suppression) -> int:
        """Add the hashes and upsert the normalizers; returns how many hashes are new. A call that
        changes nothing (a retry) is rolled back, so the list's version, and every replica's copy,
        stay as they were."""

        def add() -> int:
            with db.raw_transaction(self.engine, "INSERT ingest.suppressions", len(suppression.entries)) as (cur, _):
                cur.execute(_BUMP_VERSION, {"tenant": tenant_id})  # also locks the tenant's list
                version = int(cur.fetchone()[0])
                added = 0
                if suppression.entries:
                    cur.execute(
                        _ADD_SUPPRESSIONS,
                        {
                            "tenant": tenant_id,
                            "request": suppression.erasure_request,
                            "version": version,
                            "hashes": [psycopg2.Binary(h) for _t, h in suppression.entries],
                            "types": [t for t, _h in suppression.entries],
                        },
                    )
                    added = int(cur.rowcount)
                changed = 0
                if suppression.normalizers:
                    items = sorted(suppression.normalizers.items())
                    cur.execute(
                        _UPSERT_NORMALIZERS,
                        {
                            "tenant": tenant_id,
                            # one region per call: every normalizer of a call carries the same
                            "region": items[0][1].default_region,
                            "types": [t for t, _n in items],
                            "normalizers": [n.normalizer for _t, n in items],
                        },
                    )
                    changed = int(cur.rowcount)
                if not added and not changed:
                    cur.connection.rollback()
            return added

        return db.retry_on_disconnect(add)

    def suppression_versions(self) -> dict[str, int]:
        with db.raw_transaction(self.engine, "SELECT ingest.suppression_versions") as (cur, _):
            cur.execute("SELECT tenant_id, version FROM ingest.suppression_versions")
            return {t: int(v) for t, v in cur.fetchall()}

    def suppression_changes(self, tenant_id: str, after_version: int) -> SuppressionChanges:
        """The version is read first: whatever a later version added is seen next time."""
        with db.raw_transaction(self.engine, "SELECT ingest.suppressions") as (cur, _):
            cur.execute("SELECT version FROM ingest.suppression_versions WHERE tenant_id = %s", (tenant_id,))
            row = cur.fetchone()
            version = int(row[0]) if row else 0
            cur.execute(
                "SELECT id_type, id_hash FROM ingest.suppressions WHERE tenant_id = %s AND version > %s",
                (tenant_id, after_version),
            )
            entries = [(t, bytes(h)) for t, h in cur.fetchall()]
            cur.execute(
                "SELECT id_type, normalizer, default_region FROM ingest.suppression_normalizers WHERE tenant_id = %s",
                (tenant_id,),
            )
            normalizers = {t: TypeNormalizer(n, r) for t, n, r in cur.fetchall()}
        return SuppressionChanges(version, entries, normalizers)
