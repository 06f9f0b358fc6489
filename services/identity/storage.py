"""The identity graph in PostgreSQL, and the locking that keeps it correct under concurrency.

Locking protocol (advisory transaction locks, one 64-bit key per identifier and per profile):
- an identifier's owner changes only while its own lock or its owner's lock is held;
- a profile's identifier set and state change only while its lock is held.

A writer reads which profiles its identifiers belong to, locks identifiers and profiles in one
pass in ascending key order, and reads again. If the second read names a profile it did not
lock (someone merged or split in between), it rolls back to a savepoint, which releases those
locks, and takes the larger set, again in order. Every acquisition is one sorted pass with
nothing held, so there are no deadlocks, and nothing it read can change until it commits.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Engine

from services.core import db
from services.core.ids import canonical_uuid
from services.identity.matching import TF_FIELDS
from services.identity.stitching import Graph, Key, MergeFact, MergeRecord, Profile
from tessera.v1 import identity_pb2

KEY_SEP = "\x1f"


@dataclass(frozen=True, slots=True)
class Processed:
    """An event identity applied before: its profile now, and the identifiers it links by."""

    profile_id: str | None
    identifiers: tuple[Key, ...] = ()


def key_of(text: str) -> Key:
    type_, _, value = text.partition(KEY_SEP)
    return (type_, value)


def key_text(key: Key) -> str:
    return f"{key[0]}{KEY_SEP}{key[1]}"


def lock_id(tenant_id: str, kind: str, *parts: str) -> int:
    """A signed 64-bit advisory lock key; the tenant is part of it, so tenants never contend."""
    digest = hashlib.blake2b(KEY_SEP.join((tenant_id, kind, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


# The working set's statements probe an index once per identifier, profile or event id. Written as
# plain joins, the planner hashes the tenant's whole table instead whenever its statistics lag a
# fast-growing table (a new tenant, a first import), so each batch cost grew with the tenant. The
# LATERAL subqueries with LIMIT 1 (primary keys: at most one row anyway) or OFFSET 0 keep them probes.
_OWNERS_CTE = """
WITH k AS (SELECT t, v FROM unnest(%(types)s::text[], %(values)s::text[]) AS k(t, v)),
owners AS (
    SELECT i.profile_id FROM k CROSS JOIN LATERAL (
        SELECT i.profile_id FROM identity.identifiers i
        WHERE i.tenant_id = %(tenant)s AND i.id_type = k.t AND i.id_value = k.v LIMIT 1
    ) i
    UNION
    SELECT coalesce(p.merged_into, p.profile_id) FROM identity.profiles p
    WHERE p.tenant_id = %(tenant)s AND p.profile_id = ANY(%(pids)s::uuid[]) AND p.erased_at IS NULL
)"""

# Which profiles to lock: read without locks, so only the ids.
_OWNERS = _OWNERS_CTE + "SELECT profile_id::text FROM owners"  # noqa: S608 - constants only

# The working set, read again under the locks: the profiles and all their identifiers.
_LOAD = (
    _OWNERS_CTE  # noqa: S608 - constants only
    + """
SELECT o.profile_id::text, (extract(epoch FROM p.created_at) * 1000000)::bigint, i.id_type, i.id_value
FROM owners o
CROSS JOIN LATERAL (
    SELECT p.created_at FROM identity.profiles p
    WHERE p.tenant_id = %(tenant)s AND p.profile_id = o.profile_id LIMIT 1
) p
LEFT JOIN LATERAL (
    SELECT i.id_type, i.id_value FROM identity.identifiers i
    WHERE i.tenant_id = %(tenant)s AND i.profile_id = o.profile_id OFFSET 0
) i ON true
"""
)

_LOCK = "SELECT count(pg_advisory_xact_lock(k)) FROM unnest(%s::bigint[]) AS k"

_PROCESSED = """
SELECT l.event_id, coalesce(p.merged_into, p.profile_id)::text, l.identifiers
FROM unnest(%(ids)s::text[]) AS x(id)
CROSS JOIN LATERAL (
    SELECT l.event_id, l.profile_id, l.identifiers FROM identity.event_links l
    WHERE l.tenant_id = %(tenant)s AND l.event_id = x.id LIMIT 1
) l
LEFT JOIN identity.profiles p ON p.tenant_id = %(tenant)s AND p.profile_id = l.profile_id
"""

# Merged-away profiles, then the profiles merged into them earlier, point at the final survivor.
# The "= ANY" repeats the join as an index condition, so the planner probes instead of hashing.
_REPOINT = (
    "UPDATE identity.profiles p SET merged_into = m.s, merged_at = coalesce(p.merged_at, %(now)s) "
    "FROM unnest(%(a)s::uuid[], %(s)s::uuid[]) AS m(a, s) "
    "WHERE p.tenant_id = %(t)s AND p.profile_id = ANY(%(a)s::uuid[]) AND p.profile_id = m.a",
    "UPDATE identity.profiles p SET merged_into = m.s, merged_at = coalesce(p.merged_at, %(now)s) "
    "FROM unnest(%(a)s::uuid[], %(s)s::uuid[]) AS m(a, s) "
    "WHERE p.tenant_id = %(t)s AND p.merged_into = ANY(%(a)s::uuid[]) AND p.merged_into = m.a",
    # Trait records follow their profile, so matching compares against the survivor.
    "UPDATE identity.match_records r SET profile_id = m.s FROM unnest(%(a)s::uuid[], %(s)s::uuid[]) AS m(a, s) "
    "WHERE r.tenant_id = %(t)s AND r.profile_id = ANY(%(a)s::uuid[]) AND r.profile_id = m.a",
)


#: (event id, profile id or None when no identifier could link, linking identifiers, occurred at).
EventLink = tuple[str, str | None, Sequence[Key], dt.datetime]


@dataclass
class KeySeen:
    """When and where an event saw an identifier: first_seen/source for new ones, last_seen for all."""

    at: dt.datetime
    source: str
    event_id: str
    message_id: str = ""  # the client's message_id of that event, when it carried one


@dataclass
class Changes:
    """What a transaction did to the graph, for writing back and for the changes stream."""

    graph: Graph
    # New identifiers -> (origin profile, when/where first seen).
    new_keys: dict[Key, tuple[str, KeySeen]] = field(default_factory=dict)
    # Existing identifiers the events saw: last_seen moves forward.
    seen: dict[Key, dt.datetime] = field(default_factory=dict)
    merges: list[MergeRecord] = field(default_factory=list)
    # Identifiers whose origin becomes another profile (a split).
    new_origin: dict[Key, str] = field(default_factory=dict)
    # Event id -> the client's message_id, for the merge facts those events caused.
    message_ids: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RecordedMerge:
    merge_id: int
    fact: MergeFact
    kind: int


class IdentityStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # ------------------------------------------------------------------------------------------
    # Locked working sets.

    def lock_working_set(
        self,
        cur: Any,
        tenant_id: str,
        rules: Any,
        keys: Iterable[Key],
        profile_ids: Iterable[str] = (),
        *,
        block_keys: Sequence[str] = (),
        record_keys: Iterable[Key] = (),
        with_candidates: bool = False,
    ) -> tuple[Graph, list[tuple[str, str, Any]]]:
        """Lock ``keys``, the profiles that own them and the survivors of ``profile_ids``; return
        them as a graph that nobody else can change until this transaction ends.

        With ``with_candidates`` (probabilistic matching) the tenant's matching lock is taken too,
        so matching batches of one tenant run one at a time and each sees every record committed
        before it; every stored record of the profiles that have a record sharing ``block_keys``,
        and of the profiles owning ``record_keys`` (the identifiers of the events that carry trait
        records: their own profiles, for the merge's consistency check), is returned, and those
        profiles are part of the locked working set."""
        keys = sorted(set(keys))
        asked = sorted({c for c in map(canonical_uuid, profile_ids) if c is not None})
        args = {
            "tenant": tenant_id,
            "types": [k[0] for k in keys],
            "values": [k[1] for k in keys],
            "pids": asked,
        }
        cur.execute(_OWNERS, args)
        profiles = {row[0] for row in cur.fetchall()} | set(asked)
        key_locks = [lock_id(tenant_id, "k", *k) for k in keys]
        if with_candidates:
            key_locks.append(lock_id(tenant_id, "matching"))
            profiles |= set(self.match_candidate_profiles(cur, tenant_id, block_keys))
        candidates: list[tuple[str, str, Any]] = []
        wanted = set(record_keys)
        start = b"SAVEPOINT working_set"
        while True:
            locks = sorted(set(key_locks) | {lock_id(tenant_id, "p", p) for p in profiles})
            # Every profile to lock is read too (candidates of matching have no key of ours).
            load = cur.mogrify(_LOAD, {**args, "pids": sorted(profiles)})
            # Savepoint, locks and read in one round trip: this is where other workers wait.
            cur.execute(b";\n".join((start, cur.mogrify(_LOCK, (locks,)), load)))
            rows = cur.fetchall()
            found = {row[0] for row in rows}
            if with_candidates:
                own = {row[0] for row in rows if (row[2], row[3]) in wanted}
                candidates = self.match_candidates(cur, tenant_id, block_keys, sorted(own))
                found |= {c[1] for c in candidates}
            if found <= profiles:
                break
            start = b"ROLLBACK TO SAVEPOINT working_set"  # releases the locks; the savepoint stays
            profiles |= found
        loaded: dict[str, Profile] = {}
        for pid, created, id_type, id_value in rows:
            p = loaded.setdefault(pid, Profile(pid, int(created)))
            if id_type is not None:
                p.keys.add((id_type, id_value))
        return Graph(rules, loaded.values()), candidates

    @staticmethod
    def processed(cur: Any, tenant_id: str, event_ids: Sequence[str]) -> dict[str, Processed]:
        """Events already applied, with the profile they belong to now and their linking identifiers."""
        if not event_ids:
            return {}
        cur.execute(_PROCESSED, {"tenant": tenant_id, "ids": list(event_ids)})
        return {eid: Processed(pid, tuple(key_of(k) for k in keys or ())) for eid, pid, keys in cur.fetchall()}

    # ------------------------------------------------------------------------------------------
    # Writing back.

    def write(
        self, cur: Any, tenant_id: str, changes: Changes, now: dt.datetime, links: Sequence[EventLink] = ()
    ) -> list[RecordedMerge]:
        """Write what a working set changed: new profiles, merged-away profiles (pointing at their
        final survivor), identifier owners, event links, merge facts. A handful of statements,
        whatever the size, sent in one or two round trips (the locks are held meanwhile)."""
        graph = changes.graph
        out = db.Statements(cur)
        new = graph.new_profiles()
        if new:
            out.add(
                "INSERT INTO identity.profiles (tenant_id, profile_id, created_at) "
                "SELECT %s, p, to_timestamp(c / 1000000.0) FROM unnest(%s::uuid[], %s::int8[]) AS m(p, c)",
                (tenant_id, [p.profile_id for p in new], [p.created for p in new]),
            )
        if graph.absorbed:
            absorbed = sorted(graph.absorbed)
            finals = [graph.final(a) for a in absorbed]
            # Anything that pointed at an absorbed profile now points at the final survivor too. Two
            # statements, each an index probe per absorbed id: an OR of the two joins makes the planner
            # compare every absorbed id with every profile of the tenant. The row sets are disjoint (an
            # absorbed profile was active, merged_into NULL; a final survivor is never absorbed).
            for sql in _REPOINT:
                out.add(sql, {"now": now, "a": absorbed, "s": finals, "t": tenant_id})
        if changes.new_keys:
            items = sorted(changes.new_keys.items())
            out.add(
                "INSERT INTO identity.identifiers (tenant_id, id_type, id_value, profile_id, origin_profile_id, "
                "first_seen, last_seen, source, first_event_id, first_message_id) "
                "SELECT %s, t, v, p::uuid, o::uuid, s, s, src, e, nullif(mid, '') "
                "FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::timestamptz[], %s::text[], "
                "%s::text[], %s::text[]) AS m(t, v, p, o, s, src, e, mid)",
                (
                    tenant_id,
                    [k[0] for k, _ in items],
                    [k[1] for k, _ in items],
                    [graph.owner[k] for k, _ in items],
                    [origin for _, (origin, _) in items],
                    [seen.at for _, (_, seen) in items],
                    [seen.source for _, (_, seen) in items],
                    [seen.event_id for _, (_, seen) in items],
                    [seen.message_id for _, (_, seen) in items],
                ),
            )
        existing = sorted((graph.dirty_keys | changes.seen.keys()) - changes.new_keys.keys())
        if existing:
            # An upsert on rows that exist (they are locked): ON CONFLICT probes the primary key
            # once per row, where an UPDATE ... FROM unnest may hash the tenant's whole table when
            # statistics lag a fast-growing one. The insert values are never used.
            out.add(
                "INSERT INTO identity.identifiers AS i (tenant_id, id_type, id_value, profile_id, origin_profile_id, "
                "first_seen, last_seen) "
                "SELECT %s, t, v, p::uuid, coalesce(o, p)::uuid, coalesce(s, now()), coalesce(s, '-infinity') "
                "FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::timestamptz[]) AS m(t, v, p, o, s) "
                "ON CONFLICT (tenant_id, id_type, id_value) DO UPDATE SET profile_id = EXCLUDED.profile_id, "
                "origin_profile_id = CASE WHEN %s THEN EXCLUDED.origin_profile_id ELSE i.origin_profile_id END, "
                "last_seen = greatest(i.last_seen, EXCLUDED.last_seen)",
                (
                    tenant_id,
                    [k[0] for k in existing],
                    [k[1] for k in existing],
                    [graph.owner[k] for k in existing],
                    [changes.new_origin.get(k) for k in existing],
                    [changes.seen.get(k) for k in existing],
                    bool(changes.new_origin),
                ),
            )
        if links:
            self.link_events(out, tenant_id, links)
        return self._record_merges(out, tenant_id, changes.merges, changes.message_ids)

    @staticmethod
    def _record_merges(
        out: db.Statements, tenant_id: str, merges: Sequence[MergeRecord], message_ids: Mapping[str, str]
    ) -> list[RecordedMerge]:
        """All of a write's merge facts in one statement (a consumer batch can merge dozens of pairs),
        ids assigned in the given order; a (survivor, absorbed) pair names its row in the answer.
        ``message_ids`` gives the client's message_id of each causing event that carried one."""
        pairs = [(uuid.UUID(m.fact.survivor), uuid.UUID(m.fact.absorbed)) for m in merges] if len(merges) > 1 else []
        if pairs and len(set(pairs)) == len(pairs):
            rows = out.run(
                "INSERT INTO identity.merges (tenant_id, kind, survivor_id, absorbed_id, identifiers, event_id, "
                "message_id, rule, reason, score, evidence) "
                "SELECT %s, k, s, a, i::jsonb, e, mid, r, why, sc, ev::jsonb "
                "FROM unnest(%s::int2[], %s::uuid[], %s::uuid[], %s::text[], %s::text[], %s::text[], %s::text[], "
                "%s::text[], %s::float8[], %s::text[]) WITH ORDINALITY AS m(k, s, a, i, e, mid, r, why, sc, ev, n) "
                "ORDER BY n "
                "RETURNING merge_id, survivor_id::text, absorbed_id::text",
                (
                    tenant_id,
                    [m.kind for m in merges],
                    [m.fact.survivor for m in merges],
                    [m.fact.absorbed for m in merges],
                    [json.dumps([list(k) for k in m.fact.keys]) for m in merges],
                    [m.fact.event_id for m in merges],
                    [message_ids.get(m.fact.event_id) for m in merges],
                    [m.rule for m in merges],
                    [m.reason for m in merges],
                    [m.score for m in merges],
                    [json.dumps(m.evidence) for m in merges],
                ),
            )
            ids = {(uuid.UUID(s), uuid.UUID(a)): int(mid) for mid, s, a in rows}
            return [RecordedMerge(ids[pair], m.fact, m.kind) for pair, m in zip(pairs, merges, strict=True)]
        if not merges:
            out.run()
            return []
        recorded: list[RecordedMerge] = []
        for m in merges:  # one merge (the usual manual case), or a pair that repeats
            (row,) = out.run(
                "INSERT INTO identity.merges (tenant_id, kind, survivor_id, absorbed_id, identifiers, event_id, "
                "message_id, rule, reason, score, evidence) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                "RETURNING merge_id",
                (
                    tenant_id,
                    m.kind,
                    m.fact.survivor,
                    m.fact.absorbed,
                    json.dumps([list(k) for k in m.fact.keys]),
                    m.fact.event_id,
                    message_ids.get(m.fact.event_id),
                    m.rule,
                    m.reason,
                    m.score,
                    json.dumps(m.evidence),
                ),
            )
            recorded.append(RecordedMerge(int(row[0]), m.fact, m.kind))
        return recorded

    @staticmethod
    def link_events(out: db.Statements, tenant_id: str, links: Sequence[EventLink]) -> None:
        """Record applied events (the idempotency record) with their profile and linking identifiers."""
        if not links:
            return
        out.add(
            "INSERT INTO identity.event_links (tenant_id, event_id, profile_id, identifiers, occurred_at) "
            "SELECT %s, e, p::uuid, string_to_array(k, %s), o "
            "FROM unnest(%s::text[], %s::text[], %s::text[], %s::timestamptz[]) AS m(e, p, k, o) "
            "ON CONFLICT DO NOTHING",
            (
                tenant_id,
                "\x1e",
                [e for e, _, _, _ in links],
                [p for _, p, _, _ in links],
                ["\x1e".join(key_text(k) for k in keys) for _, _, keys, _ in links],
                [o for _, _, _, o in links],
            ),
        )

    # ------------------------------------------------------------------------------------------
    # Rules.

    def load_rules(self, tenant_id: str) -> tuple[dict[str, Any] | None, dict[str, Any], dt.datetime | None]:
        with db.raw_transaction(self.engine, "SELECT identity.rules") as (cur, _):
            cur.execute("SELECT spec, probabilistic, updated_at FROM identity.rules WHERE tenant_id = %s", (tenant_id,))
            row = cur.fetchone()
        if row is None:
            return None, {}, None
        return row[0], row[1], row[2]

    def save_rules(self, tenant_id: str, spec: dict[str, Any], probabilistic: dict[str, Any]) -> dt.datetime:
        with db.raw_transaction(self.engine, "UPSERT identity.rules") as (cur, _):
            cur.execute(
                "INSERT INTO identity.rules (tenant_id, spec, probabilistic, updated_at) VALUES (%s, %s, %s, now()) "
                "ON CONFLICT (tenant_id) DO UPDATE SET spec = EXCLUDED.spec, "
                "probabilistic = EXCLUDED.probabilistic, updated_at = EXCLUDED.updated_at RETURNING updated_at",
                (tenant_id, json.dumps(spec), json.dumps(probabilistic)),
            )
            updated: dt.datetime = cur.fetchone()[0]
        return updated

    # ------------------------------------------------------------------------------------------
    # Reads.

    def survivor(self, tenant_id: str, profile_id: str, cur: Any = None) -> str | None:
        """The active profile a (possibly merged-away) id resolves to; None if the tenant has no such id."""
        canonical = canonical_uuid(profile_id)
        if canonical is None:
            return None
        profile_id = canonical
        sql = (
            "SELECT coalesce(merged_into, profile_id)::text FROM identity.profiles "
            "WHERE tenant_id = %s AND profile_id = %s AND erased_at IS NULL"
        )
        if cur is not None:
            cur.execute(sql, (tenant_id, profile_id))
            row = cur.fetchone()
        else:
            with db.raw_transaction(self.engine, "SELECT identity.profiles") as (own, _):
                own.execute(sql, (tenant_id, profile_id))
                row = own.fetchone()
        return row[0] if row else None

    def identifiers(self, tenant_id: str, profile_id: str) -> list[tuple[Any, ...]]:
        with db.raw_transaction(self.engine, "SELECT identity.identifiers") as (cur, _):
            cur.execute(
                "SELECT id_type, id_value, first_seen, last_seen, source, first_event_id, origin_profile_id::text, "
                "coalesce(first_message_id, '') "
                "FROM identity.identifiers WHERE tenant_id = %s AND profile_id = %s ORDER BY id_type, id_value",
                (tenant_id, profile_id),
            )
            return list(cur.fetchall())

    def identifier_rows(self, tenant_id: str, keys: Sequence[Key]) -> dict[Key, tuple[str, str, str, str]]:
        """(owner, origin, first_event_id, first_message_id or "") of each known identifier: one
        primary-key probe each."""
        with db.raw_transaction(self.engine, "SELECT identity.identifiers") as (cur, _):
            cur.execute(
                "SELECT k.t, k.v, i.profile_id::text, i.origin_profile_id::text, i.first_event_id, "
                "coalesce(i.first_message_id, '') "
                "FROM unnest(%s::text[], %s::text[]) AS k(t, v) CROSS JOIN LATERAL ("
                "  SELECT * FROM identity.identifiers i"
                "  WHERE i.tenant_id = %s AND i.id_type = k.t AND i.id_value = k.v LIMIT 1"
                ") i",
                ([k[0] for k in keys], [k[1] for k in keys], tenant_id),
            )
            return {(t, v): (p, o, e, mid) for t, v, p, o, e, mid in cur.fetchall()}

    def merges(
        self,
        tenant_id: str,
        *,
        profile_ids: Sequence[str] | None = None,
        limit: int = 1000,
        before: int | None = None,
    ) -> list[tuple[Any, ...]]:
        """Merge facts newest first; with ``profile_ids``, those touching any of them (the ids
        given plus every profile ever merged into them)."""
        sql = (
            "SELECT merge_id, kind, survivor_id::text, absorbed_id::text, identifiers, event_id, rule, reason, "
            "created_at, score, evidence, coalesce(message_id, '') FROM identity.merges m WHERE tenant_id = %(tenant)s"
        )
        args: dict[str, Any] = {"tenant": tenant_id, "limit": limit, "before": before}
        if profile_ids is not None:
            sql += (
                " AND (survivor_id = ANY(%(pids)s::uuid[]) OR absorbed_id = ANY(%(pids)s::uuid[])"
                " OR survivor_id IN (SELECT profile_id FROM identity.profiles WHERE tenant_id = %(tenant)s"
                " AND merged_into = ANY(%(pids)s::uuid[])))"
            )
            args["pids"] = list(profile_ids)
        if before is not None:
            sql += " AND merge_id < %(before)s"
        sql += " ORDER BY merge_id DESC LIMIT %(limit)s"
        with db.raw_transaction(self.engine, "SELECT identity.merges") as (cur, _):
            cur.execute(sql, args)
            return list(cur.fetchall())

    def merge_path(self, tenant_id: str, start: str) -> list[tuple[Any, ...]]:
        """The merges that carried ``start`` into its final survivor, in order (walking up the tree)."""
        with db.raw_transaction(self.engine, "SELECT identity.merges path") as (cur, _):
            cur.execute(
                """
                WITH RECURSIVE up AS (
                    SELECT m.*, 1 AS depth FROM identity.merges m
                    WHERE m.tenant_id = %(tenant)s AND m.absorbed_id = %(start)s AND m.kind <> %(unmerge)s
                    UNION ALL
                    SELECT m.*, up.depth + 1 FROM identity.merges m JOIN up
                      ON m.tenant_id = up.tenant_id AND m.absorbed_id = up.survivor_id AND m.kind <> %(unmerge)s
                    WHERE up.depth < 10000
                )
                SELECT merge_id, kind, survivor_id::text, absorbed_id::text, identifiers, event_id, rule, reason,
                       created_at, score, evidence, coalesce(message_id, '')
                FROM up ORDER BY depth
                """,
                {"tenant": tenant_id, "start": start, "unmerge": identity_pb2.MERGE_KIND_UNMERGE},
            )
            return list(cur.fetchall())

    # ------------------------------------------------------------------------------------------
    # Probabilistic matching.

    @staticmethod
    def match_candidates(
        cur: Any, tenant_id: str, block_keys: Sequence[str], profile_ids: Sequence[str] = ()
    ) -> list[tuple[str, str, Any]]:
        """(event id, current profile, record) of every stored record of each profile that has a
        record sharing a blocking key, and of ``profile_ids``: a profile is matched as a whole.
        Identical records of one profile (repeated Identify calls) come once."""
        if not block_keys and not profile_ids:
            return []
        cur.execute(
            "WITH hit AS ("
            "  SELECT r.profile_id FROM identity.match_blocks b "
            "  JOIN identity.match_records r ON r.tenant_id = b.tenant_id AND r.event_id = b.event_id "
            "  WHERE b.tenant_id = %(t)s AND b.block_key = ANY(%(k)s::text[]) "
            "  UNION SELECT unnest(%(p)s::uuid[])"
            ") "
            "SELECT min(r.event_id), r.profile_id::text, r.record FROM hit "
            "CROSS JOIN LATERAL (SELECT r.event_id, r.profile_id, r.record FROM identity.match_records r "
            "  WHERE r.tenant_id = %(t)s AND r.profile_id = hit.profile_id OFFSET 0) r "
            "GROUP BY r.profile_id, r.record",
            {"t": tenant_id, "k": list(block_keys), "p": list(profile_ids)},
        )
        return list(cur.fetchall())

    @staticmethod
    def match_candidate_profiles(cur: Any, tenant_id: str, block_keys: Sequence[str]) -> list[str]:
        """The profiles holding a record that shares a blocking key: which profiles to lock (their
        records are read under the locks, by ``match_candidates``)."""
        if not block_keys:
            return []
        cur.execute(
            "SELECT DISTINCT r.profile_id::text FROM identity.match_blocks b "
            "JOIN identity.match_records r ON r.tenant_id = b.tenant_id AND r.event_id = b.event_id "
            "WHERE b.tenant_id = %s AND b.block_key = ANY(%s::text[])",
            (tenant_id, list(block_keys)),
        )
        return [row[0] for row in cur.fetchall()]

    @staticmethod
    def value_counts(cur: Any, tenant_id: str, keys: Sequence[tuple[str, str]]) -> list[tuple[str, str, int]]:
        """(field, value, count) of the tenant's trait records for ``keys`` (value "": the field's total)."""
        if not keys:
            return []
        cur.execute(
            "SELECT c.field, c.value, c.n FROM unnest(%s::text[], %s::text[]) AS k(f, v) "
            "CROSS JOIN LATERAL (SELECT field, value, n FROM identity.match_value_counts c "
            "  WHERE c.tenant_id = %s AND c.field = k.f AND c.value = k.v LIMIT 1) c",
            ([k[0] for k in keys], [k[1] for k in keys], tenant_id),
        )
        return [(str(f), str(v), int(n)) for f, v, n in cur.fetchall()]

    @staticmethod
    def add_value_counts(cur: Any, tenant_id: str, deltas: Sequence[tuple[str, str, int]]) -> None:
        """Add a batch's (field, value, increment) to the tenant's value counts in one statement."""
        if not deltas:
            return
        cur.execute(
            "INSERT INTO identity.match_value_counts AS c (tenant_id, field, value, n) "
            "SELECT %s, f, v, n FROM unnest(%s::text[], %s::text[], %s::int8[]) AS d(f, v, n) "
            "ON CONFLICT (tenant_id, field, value) DO UPDATE SET n = c.n + EXCLUDED.n",
            (tenant_id, [d[0] for d in deltas], [d[1] for d in deltas], [d[2] for d in deltas]),
        )

    @staticmethod
    def add_match_records(
        cur: Any, tenant_id: str, rows: Sequence[tuple[str, str, dict[str, str], Sequence[str]]]
    ) -> None:
        """Store (event id, profile, record, blocking keys) for later events to match against."""
        if not rows:
            return
        cur.execute(
            "INSERT INTO identity.match_records (tenant_id, event_id, profile_id, record) "
            "SELECT %s, e, p::uuid, r::jsonb FROM unnest(%s::text[], %s::text[], %s::text[]) AS m(e, p, r) "
            "ON CONFLICT DO NOTHING",
            (tenant_id, [r[0] for r in rows], [r[1] for r in rows], [json.dumps(r[2]) for r in rows]),
        )
        blocks = [(key, r[0]) for r in rows for key in r[3]]
        cur.execute(
            "INSERT INTO identity.match_blocks (tenant_id, block_key, event_id) "
            "SELECT %s, k, e FROM unnest(%s::text[], %s::text[]) AS m(k, e) ON CONFLICT DO NOTHING",
            (tenant_id, [b[0] for b in blocks], [b[1] for b in blocks]),
        )

    @staticmethod
    def add_suggestions(cur: Any, tenant_id: str, rows: Sequence[tuple[str, str, float, dict[str, float], str]]) -> int:
        """(profile a, profile b, score, evidence, event id); a pair already suggested is skipped."""
        added = 0
        for a, b, score, evidence, event_id in rows:
            cur.execute(
                "INSERT INTO identity.match_suggestions (tenant_id, profile_a, profile_b, score, evidence, event_id) "
                "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                (tenant_id, a, b, score, json.dumps(evidence), event_id),
            )
            added += cur.rowcount
        return added

    def suggestions(
        self, tenant_id: str, state: int, limit: int, after: tuple[float, int] | None
    ) -> list[tuple[Any, ...]]:
        """Highest score first; ``after`` is the (score, id) the previous page ended on."""
        sql = (
            "SELECT suggestion_id, profile_a::text, profile_b::text, score, evidence, state, created_at "
            "FROM identity.match_suggestions WHERE tenant_id = %(tenant)s AND state = %(state)s"
        )
        if after is not None:
            sql += " AND (score, -suggestion_id) < (%(score)s, -%(id)s)"
        sql += " ORDER BY score DESC, suggestion_id LIMIT %(limit)s"
        args = {"tenant": tenant_id, "state": state, "limit": limit}
        if after is not None:
            args.update(score=after[0], id=after[1])
        with db.raw_transaction(self.engine, "SELECT identity.match_suggestions") as (cur, _):
            cur.execute(sql, args)
            return list(cur.fetchall())

    @staticmethod
    def suggestion_for_update(cur: Any, tenant_id: str, suggestion_id: int) -> tuple[Any, ...] | None:
        cur.execute(
            "SELECT suggestion_id, profile_a::text, profile_b::text, score, evidence, state, created_at "
            "FROM identity.match_suggestions WHERE tenant_id = %s AND suggestion_id = %s FOR UPDATE",
            (tenant_id, suggestion_id),
        )
        row: tuple[Any, ...] | None = cur.fetchone()
        return row

    @staticmethod
    def review_suggestion(
        cur: Any, tenant_id: str, suggestion_id: int, state: int, reason: str, merge_id: int | None
    ) -> tuple[Any, ...]:
        cur.execute(
            "UPDATE identity.match_suggestions SET state = %s, reason = %s, merge_id = %s, reviewed_at = now() "
            "WHERE tenant_id = %s AND suggestion_id = %s "
            "RETURNING suggestion_id, profile_a::text, profile_b::text, score, evidence, state, created_at",
            (state, reason, merge_id, tenant_id, suggestion_id),
        )
        row: tuple[Any, ...] = cur.fetchone()
        return row

    @staticmethod
    def erase(cur: Any, tenant_id: str, profile_id: str) -> tuple[int, list[str]]:
        """Forget a (locked, active) profile: its identifiers, trait records, suggestions, the
        identifier values in its merge facts and event links, and its merge facts' client message
        ids. Returns (identifiers deleted, ids erased: the profile and every id merged into it)."""
        cur.execute(
            "UPDATE identity.profiles SET erased_at = now() "
            "WHERE tenant_id = %(t)s AND (profile_id = %(p)s OR merged_into = %(p)s) RETURNING profile_id::text",
            {"t": tenant_id, "p": profile_id},
        )
        ids = sorted(row[0] for row in cur.fetchall())
        args = {"t": tenant_id, "p": profile_id, "ids": ids}
        cur.execute("DELETE FROM identity.identifiers WHERE tenant_id = %(t)s AND profile_id = %(p)s", args)
        deleted = int(cur.rowcount)
        cur.execute(
            "DELETE FROM identity.match_blocks b USING identity.match_records r "
            "WHERE b.tenant_id = %(t)s AND r.tenant_id = %(t)s AND b.event_id = r.event_id AND r.profile_id = %(p)s",
            args,
        )
        # The erased records' values leave the value counts (a rare surname must not outlive its
        # person there); counts that reach 0 go.
        cur.execute(
            "WITH gone AS (DELETE FROM identity.match_records WHERE tenant_id = %(t)s AND profile_id = %(p)s "
            "  RETURNING record), "
            "v AS (SELECT kv.key AS f, kv.value AS v, count(*) AS n FROM gone, jsonb_each_text(gone.record) kv "
            "  WHERE kv.key = ANY(%(tf)s::text[]) GROUP BY kv.key, kv.value), "
            "d AS (SELECT f, v, n FROM v UNION ALL SELECT f, '', sum(n)::int8 FROM v GROUP BY f) "
            "UPDATE identity.match_value_counts c SET n = c.n - d.n FROM d "
            "WHERE c.tenant_id = %(t)s AND c.field = d.f AND c.value = d.v",
            {**args, "tf": list(TF_FIELDS)},
        )
        cur.execute("DELETE FROM identity.match_value_counts WHERE tenant_id = %(t)s AND n <= 0", args)
        cur.execute(
            "DELETE FROM identity.match_suggestions WHERE tenant_id = %(t)s "
            "AND (profile_a = ANY(%(ids)s::uuid[]) OR profile_b = ANY(%(ids)s::uuid[]))",
            args,
        )
        cur.execute(
            "UPDATE identity.merges SET identifiers = '[]', evidence = '{}', message_id = NULL WHERE tenant_id = %(t)s "
            "AND (survivor_id = ANY(%(ids)s::uuid[]) OR absorbed_id = ANY(%(ids)s::uuid[]))",
            args,
        )
        # The event ids stay (they keep redeliveries idempotent); the identifier values go.
        cur.execute(
            "UPDATE identity.event_links SET identifiers = '{}' "
            "WHERE tenant_id = %(t)s AND profile_id = ANY(%(ids)s::uuid[])",
            args,
        )
        return deleted, ids

    def reattribute(self, cur: Any, tenant_id: str, profile_id: str, moved: Sequence[Key], target: str) -> list[str]:
        """Events of ``profile_id`` (or profiles merged into it) linked only by ``moved`` identifiers
        now belong to ``target``; returns their ids."""
        cur.execute(
            "UPDATE identity.event_links SET profile_id = %(target)s "
            "WHERE tenant_id = %(tenant)s AND identifiers <@ %(moved)s::text[] AND cardinality(identifiers) > 0 "
            "AND (profile_id = %(pid)s OR profile_id IN (SELECT profile_id FROM identity.profiles "
            "WHERE tenant_id = %(tenant)s AND merged_into = %(pid)s)) RETURNING event_id",
            {"tenant": tenant_id, "pid": profile_id, "target": target, "moved": [key_text(k) for k in moved]},
        )
        events = [row[0] for row in cur.fetchall()]
        cur.execute(
            "UPDATE identity.match_records SET profile_id = %s WHERE tenant_id = %s AND event_id = ANY(%s)",
            (target, tenant_id, events),
        )
        return events
