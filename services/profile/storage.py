"""The profile schema: applying resolved events and identity's changes, and the reads behind the API.

Writers serialize per profile on its ``profiles`` row: every transaction that changes a profile
first upserts its row (which locks it, in ascending id order), so two consumers, a merge and an
``UpdateTraits`` never interleave on one profile. What they then read of the profile's rows cannot
change until they commit, so new state is computed in Python by the pure rollups and written
back whole. Every event is recorded in the timeline in the same transaction as its effects; an
event already there has no second effect. A deadlock (a redirect discovered after locking) rolls
back and retries.

Merges and splits rebuild the affected profiles from their timelines with the same derivation the
consumer uses, so "traits combine by policy, computed traits and timelines join" holds by
construction, and a split leaves each side exactly what its events say.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import sqlalchemy as sa
from psycopg2 import errorcodes
from sqlalchemy.engine import Engine

from services.core import db
from services.profile import computed
from services.profile.events import Effects, ProfileEvent, effects, from_event
from services.profile.rollup import (
    CaseRow,
    InteractionRow,
    SummaryKey,
    add_case,
    add_leg,
    add_messages,
    add_observations,
    add_points,
)
from services.profile.tenant_settings import DEFAULT, ProfileConfig, from_json, to_json
from services.profile.traits import Observation, Summary, canonical, choose, plain, search_text, value_hash
from tessera.v1 import event_pb2, profile_pb2

log = logging.getLogger(__name__)

ACTIVE: Final = 0
MERGED: Final = 1
ERASED: Final = 2
EVENT_ORIGIN: Final = 0
UPDATE_ORIGIN: Final = 1
CREATED: Final = profile_pb2.PROFILE_EVENT_KIND_CREATED
UPDATED: Final = profile_pb2.PROFILE_EVENT_KIND_UPDATED
FEED_MERGED: Final = profile_pb2.PROFILE_EVENT_KIND_MERGED
FEED_SPLIT: Final = profile_pb2.PROFILE_EVENT_KIND_SPLIT
FEED_ERASED: Final = profile_pb2.PROFILE_EVENT_KIND_ERASED
RETRIES: Final = 6
_RETRYABLE = frozenset({errorcodes.DEADLOCK_DETECTED, errorcodes.SERIALIZATION_FAILURE})
SEP: Final = "\x1f"
#: The erasure "request" that collects dropped events of erased people not known at erasure time.
ORPHANS: Final = "00000000-0000-0000-0000-000000000000"


def suppression_hash(tenant_id: str, id_type: str, value: str) -> bytes:
    """The key of a suppressed identifier: keyed by tenant, and never the value itself."""
    return hashlib.sha256(SEP.join((tenant_id, id_type, value)).encode()).digest()[:16]


class _Retry(Exception):
    """The profile a batch targets was merged away after it was looked up: start again."""


@dataclass
class Applied:
    """What a batch did, for counting and for the caches."""

    applied: int = 0
    redelivered: int = 0
    suppressed: int = 0
    dropped: int = 0  # for erased profiles
    touched: set[str] = field(default_factory=set)
    moved_identifiers: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class _Existing:
    """The rows of the touched profiles that new effects combine with."""

    summaries: dict[tuple[str, int], dict[SummaryKey, Summary]] = field(default_factory=lambda: defaultdict(dict))
    removals: dict[str, dict[str, dt.datetime]] = field(default_factory=lambda: defaultdict(dict))
    chosen: dict[str, dict[str, tuple[str, str]]] = field(default_factory=lambda: defaultdict(dict))
    states: dict[tuple[str, str], computed.State] = field(default_factory=dict)
    distinct: dict[tuple[str, str], set[str]] = field(default_factory=lambda: defaultdict(set))
    interactions: dict[tuple[str, str], InteractionRow] = field(default_factory=dict)
    cases: dict[tuple[str, str], CaseRow] = field(default_factory=dict)


def _ts(raw: Any) -> dt.datetime | None:
    if raw is None:
        return None
    if isinstance(raw, dt.datetime):
        return raw
    return dt.datetime.fromisoformat(raw)


def _json_text(value: Any) -> str:
    return canonical(value)


_PROFILE_ROWS = db.Prepared(
    "profile_rows",
    """
                SELECT
                  (SELECT row_to_json(p) FROM (SELECT profile_id, state, merged_into, version, event_count, first_seen,
                          last_seen, updated_at FROM profile.profiles
                          WHERE tenant_id = %(t)s AND profile_id = %(p)s) p),
                  (SELECT coalesce(json_agg(i ORDER BY i.id_type, i.id_value), '[]') FROM (SELECT id_type, id_value,
                          first_seen, last_seen, source, first_event_id FROM profile.identifiers
                          WHERE tenant_id = %(t)s AND profile_id = %(p)s) i),
                  (SELECT coalesce(json_agg(t ORDER BY t.trait_key), '[]') FROM (SELECT trait_key, value, source,
                          event_id, observed_at, policy, observations FROM profile.traits
                          WHERE tenant_id = %(t)s AND profile_id = %(p)s) t),
                  (SELECT coalesce(json_agg(s), '[]') FROM (SELECT * FROM profile.computed_state
                          WHERE tenant_id = %(t)s AND profile_id = %(p)s) s),
                  (SELECT coalesce(json_agg(w), '[]') FROM (
                          SELECT trait_key, count(*) AS n, count(num) AS num_n, coalesce(sum(num), 0) AS total,
                                 min(num) AS low, max(num) AS high,
                                 (array_agg(value ORDER BY at, event_id))[1] AS first_value,
                                 (array_agg(value ORDER BY at DESC, event_id DESC))[1] AS last_value,
                                 count(DISTINCT value_hash) AS distinct_n
                          FROM profile.computed_points c
                          JOIN unnest(%(wk)s::text[], %(ws)s::timestamptz[]) AS w(k, s)
                            ON c.trait_key = w.k AND c.at > w.s
                          WHERE c.tenant_id = %(t)s AND c.profile_id = %(p)s GROUP BY trait_key) w),
                  (SELECT coalesce(json_agg(i ORDER BY i.start_time DESC, i.interaction_id), '[]') FROM (
                          SELECT * FROM profile.interactions WHERE tenant_id = %(t)s AND profile_id = %(p)s
                          ORDER BY start_time DESC, interaction_id LIMIT %(n)s) i),
                  (SELECT coalesce(json_agg(c ORDER BY c.update_time DESC), '[]') FROM (
                          SELECT * FROM profile.cases WHERE tenant_id = %(t)s AND profile_id = %(p)s
                          AND status IN (1, 2) ORDER BY update_time DESC LIMIT 50) c),
                  (SELECT json_build_array(count(*) FILTER (WHERE start_time > %(d7)s), count(*))
                          FROM profile.interactions WHERE tenant_id = %(t)s AND profile_id = %(p)s
                          AND start_time > %(d30)s)
""",
)

_RESOLVE = db.Prepared(
    "profile_resolve",
    "SELECT state, coalesce(merged_into, profile_id)::text FROM profile.profiles "
    "WHERE tenant_id = %(t)s AND profile_id = %(p)s",
)
_LOCATE_IDENTIFIER = db.Prepared(
    "profile_locate_identifier",
    "SELECT i.profile_id::text, p.state, coalesce(p.merged_into, p.profile_id)::text, "
    "coalesce(s.state, p.state) FROM profile.identifiers i "
    "JOIN profile.profiles p ON p.tenant_id = i.tenant_id AND p.profile_id = i.profile_id "
    "LEFT JOIN profile.profiles s ON s.tenant_id = p.tenant_id AND s.profile_id = p.merged_into "
    "WHERE i.tenant_id = %(t)s AND i.id_type = %(k)s AND i.id_value = %(v)s",
)


Hold = Callable[[str, Sequence[str], Sequence[tuple[str, str]]], None]


class ProfileStore:
    def __init__(
        self,
        engine: Engine,
        clock: Callable[[], float] = time.time,
        hold: Hold | None = None,
        reader: Engine | None = None,
    ) -> None:
        self.engine = engine
        # Reads are single statements (each its own snapshot under READ COMMITTED anyway): on an
        # autocommit engine's connections they cost one round trip, not BEGIN, SELECT and COMMIT.
        self.reader = reader or engine
        self.clock = clock
        # Called inside every writing transaction, just before it commits, with the profiles and
        # identifiers it changes: the caches stop answering for them until the commit is published
        # (ContextCache.hold), so no read after the commit can see what was cached before it.
        self.hold = hold

    def now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.clock(), dt.UTC)

    # ------------------------------------------------------------------------------------------
    # Settings.

    def config(self, tenant_id: str) -> ProfileConfig:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.text("SELECT spec, updated_at FROM profile.settings WHERE tenant_id = :t"), {"t": tenant_id}
            ).first()
        return from_json(row.spec, row.updated_at) if row else DEFAULT

    def save_config(self, tenant_id: str, config: ProfileConfig) -> ProfileConfig:
        with db.transaction(self.engine) as conn:
            row = conn.execute(
                sa.text(
                    "INSERT INTO profile.settings (tenant_id, spec) VALUES (:t, CAST(:s AS jsonb)) "
                    "ON CONFLICT (tenant_id) DO UPDATE SET spec = excluded.spec, updated_at = now() "
                    "RETURNING spec, updated_at"
                ),
                {"t": tenant_id, "s": json.dumps(to_json(config))},
            ).one()
        return from_json(row.spec, row.updated_at)

    # ------------------------------------------------------------------------------------------
    # The consumer: resolved events.

    def apply_events(self, tenant_id: str, events: Sequence[ProfileEvent], config: ProfileConfig) -> Applied:
        """Apply one tenant's resolved events in one transaction; idempotent per event id."""
        return self._retrying(
            tenant_id,
            "profile apply events",
            len(events),
            lambda cur: self._apply_events(cur, tenant_id, events, config),
        )

    def holding(self, tenant_id: str, profile_ids: Sequence[str], moved: Sequence[tuple[str, str]] = ()) -> None:
        if self.hold is not None and (profile_ids or moved):
            self.hold(tenant_id, profile_ids, moved)

    def _retrying(self, tenant_id: str, span: str, rows: int, fn: Callable[[Any], Applied]) -> Applied:
        for attempt in range(RETRIES):
            try:
                with db.raw_transaction(self.engine, span, rows) as (cur, _info):
                    out = fn(cur)
                    self.holding(tenant_id, sorted(out.touched), out.moved_identifiers)
                    return out
            except _Retry:
                continue
            except sa.exc.DBAPIError as exc:
                code = getattr(exc.orig, "pgcode", None)
                if code in _RETRYABLE and attempt < RETRIES - 1:
                    time.sleep(0.005 * (attempt + 1))
                    continue
                raise
        raise RuntimeError("profile transaction kept conflicting")  # pragma: no cover - RETRIES exhausted

    def _apply_events(self, cur: Any, tenant_id: str, events: Sequence[ProfileEvent], config: ProfileConfig) -> Applied:
        out = Applied()
        if not events:
            return out
        hashes = {e.event_id: [suppression_hash(tenant_id, t, v) for t, v in e.identifiers] for e in events}
        all_hashes = sorted({h for hs in hashes.values() for h in hs})
        stamped = sorted({e.profile_id for e in events})
        cur.execute(
            """
            SELECT 's', encode(id_hash, 'hex'), NULL, NULL::smallint FROM profile.suppressions
             WHERE tenant_id = %(t)s AND id_hash = ANY(%(h)s::bytea[])
            UNION ALL
            SELECT 'm', event_id, profile_id::text, NULL::smallint FROM profile.pending_moves
             WHERE tenant_id = %(t)s AND event_id = ANY(%(e)s)
            UNION ALL
            SELECT 'p', profile_id::text, merged_into::text, state FROM profile.profiles
             WHERE tenant_id = %(t)s AND profile_id = ANY(%(p)s::uuid[])
            """,
            {"t": tenant_id, "h": all_hashes, "e": [e.event_id for e in events], "p": stamped},
        )
        suppressed: set[str] = set()
        moves: dict[str, str] = {}
        states: dict[str, tuple[int, str | None]] = {}
        for tag, a, b, c in cur.fetchall():
            if tag == "s":
                suppressed.add(a)
            elif tag == "m":
                moves[a] = b
            else:
                states[a] = (int(c), b)
        keep: list[tuple[ProfileEvent, str]] = []
        gone: list[str] = []  # events of erased people: ingest's copies are purged by the erasure
        for e in events:
            if suppressed and any(h.hex() in suppressed for h in hashes[e.event_id]):
                out.suppressed += 1
                gone.append(e.event_id)
                continue
            pid = moves.get(e.event_id, e.profile_id)
            state, merged_into = states.get(pid, (ACTIVE, None))
            if state == MERGED and merged_into:
                pid = merged_into
            elif state == ERASED:
                out.dropped += 1
                gone.append(e.event_id)
                continue
            keep.append((e, pid))
        if not keep:
            self._orphans(cur, tenant_id, gone)
            return out
        locked = self._lock(cur, tenant_id, sorted({pid for _, pid in keep}))
        if any(state == MERGED for state, _ in locked.values()):
            raise _Retry()
        erased = {pid for pid, (state, _) in locked.items() if state == ERASED}
        created = {pid for pid, (_, new) in locked.items() if new}
        if erased:
            out.dropped += sum(1 for _, pid in keep if pid in erased)
            gone.extend(e.event_id for e, pid in keep if pid in erased)
            keep = [(e, pid) for e, pid in keep if pid not in erased]
        self._orphans(cur, tenant_id, gone)
        out.touched = {pid for _, pid in keep}
        new_ids = self._record_timeline(cur, tenant_id, keep)
        fresh: dict[str, list[ProfileEvent]] = defaultdict(list)
        seen: set[str] = set()
        for e, pid in keep:
            if e.event_id in new_ids and e.event_id not in seen:
                seen.add(e.event_id)
                fresh[pid].append(e)
        out.applied = len(seen)
        out.redelivered = len(keep) - out.applied
        per_profile = {pid: effects(evs, config) for pid, evs in fresh.items()}
        statements = db.Statements(cur)
        changed = self._write(cur, statements, tenant_id, per_profile, config, counters="add")
        # A profile whose events were all here already (a redelivered batch) did not change: no
        # feed entry, so a watcher sees each change once.
        feed = [
            (CREATED if pid in created else UPDATED, pid, None, sorted(changed.get(pid, ())))
            for pid in sorted(out.touched)
            if pid in created or pid in fresh
        ]
        self._feed(statements, tenant_id, feed)
        statements.run()
        return out

    @staticmethod
    def _orphans(cur: Any, tenant_id: str, event_ids: Sequence[str]) -> None:
        """Remember events dropped because their person was erased, for the erasure to purge."""
        if event_ids:
            cur.execute(
                "INSERT INTO profile.erasure_events (tenant_id, request_id, event_id) "
                "SELECT %s, %s, e FROM unnest(%s::text[]) AS e ON CONFLICT DO NOTHING",
                (tenant_id, ORPHANS, list(event_ids)),
            )

    def _lock(self, cur: Any, tenant_id: str, profile_ids: Sequence[str]) -> dict[str, tuple[int, bool]]:
        """Upsert and lock profile rows in ascending order: (state, created now) per id."""
        cur.execute(
            "INSERT INTO profile.profiles AS p (tenant_id, profile_id) "
            "SELECT %s, x FROM unnest(%s::uuid[]) AS x ORDER BY x "
            "ON CONFLICT (tenant_id, profile_id) DO UPDATE SET version = p.version + 1, updated_at = now() "
            "RETURNING profile_id::text, state, (xmax = 0)",
            (tenant_id, list(profile_ids)),
        )
        return {pid: (int(state), bool(new)) for pid, state, new in cur.fetchall()}

    def _record_timeline(self, cur: Any, tenant_id: str, keep: Sequence[tuple[ProfileEvent, str]]) -> set[str]:
        cur.execute(
            "INSERT INTO profile.timeline "
            "(tenant_id, received_at, event_id, profile_id, event_time, channel, kind, payload) "
            "SELECT %s, r, e, p, t, c, k, b FROM unnest(%s::timestamptz[], %s::text[], %s::uuid[], "
            "%s::timestamptz[], %s::int2[], %s::text[], %s::bytea[]) AS x(r, e, p, t, c, k, b) "
            "ON CONFLICT DO NOTHING RETURNING event_id",
            (
                tenant_id,
                [e.received_at for e, _ in keep],
                [e.event_id for e, _ in keep],
                [pid for _, pid in keep],
                [e.at for e, _ in keep],
                [e.channel for e, _ in keep],
                [e.kind for e, _ in keep],
                [_stamped(e, pid) for e, pid in keep],
            ),
        )
        return {r[0] for r in cur.fetchall()}

    # ------------------------------------------------------------------------------------------
    # Writing effects.

    def _load(
        self,
        cur: Any,
        tenant_id: str,
        per_profile: Mapping[str, Effects],
        config: ProfileConfig,
        all_keys: bool = False,
    ) -> _Existing:
        """The rows new effects combine with, in one round trip. ``all_keys``: every trait of the
        profiles (a rebuild), else only the traits the effects observe."""
        pairs = sorted({(pid, o.key) for pid, eff in per_profile.items() for o in eff.observations})
        profiles = sorted(per_profile)
        all_time = [d.key for d in config.computed_traits if not d.windowed]
        distinct_keys = [
            d.key for d in config.computed_traits if not d.windowed and d.aggregation == computed.DISTINCT_COUNT
        ]
        dpairs = sorted(
            {
                (pid, k, p.value_hash)
                for pid, eff in per_profile.items()
                for k in distinct_keys
                for p in eff.points.get(k, ())
            }
        )
        ipairs = sorted(
            {(pid, leg.interaction_id) for pid, eff in per_profile.items() for leg in eff.legs}
            | {(pid, iid) for pid, eff in per_profile.items() for iid in eff.messages}
        )
        cpairs = sorted({(pid, c.case_id) for pid, eff in per_profile.items() for c in eff.cases})
        trait_filter = (
            "t.profile_id = ANY(%(profiles)s::uuid[])"
            if all_keys
            else "(t.profile_id, t.trait_key) IN (SELECT * FROM unnest(%(tp)s::uuid[], %(tk)s::text[]))"
        )
        cur.execute(
            f"""
            SELECT 'v', row_to_json(t)::text FROM profile.trait_values t
             WHERE t.tenant_id = %(t)s AND {trait_filter}
            UNION ALL
            SELECT 'r', row_to_json(t)::text FROM profile.trait_removals t
             WHERE t.tenant_id = %(t)s AND {trait_filter}
            UNION ALL
            SELECT 'c', json_build_array(t.profile_id, t.trait_key, t.value, t.source)::text FROM profile.traits t
             WHERE t.tenant_id = %(t)s AND {trait_filter}
            UNION ALL
            SELECT 's', row_to_json(s)::text FROM profile.computed_state s
             WHERE s.tenant_id = %(t)s AND s.profile_id = ANY(%(profiles)s::uuid[]) AND s.trait_key = ANY(%(keys)s)
            UNION ALL
            SELECT 'd', json_build_array(d.profile_id, d.trait_key, d.value_hash)::text FROM profile.computed_distinct d
             WHERE d.tenant_id = %(t)s AND (d.profile_id, d.trait_key, d.value_hash) IN
                   (SELECT * FROM unnest(%(dp)s::uuid[], %(dk)s::text[], %(dh)s::text[]))
            UNION ALL
            SELECT 'i', row_to_json(i)::text FROM profile.interactions i
             WHERE i.tenant_id = %(t)s AND (i.profile_id, i.interaction_id) IN
                   (SELECT * FROM unnest(%(ip)s::uuid[], %(ii)s::text[]))
            UNION ALL
            SELECT 'k', row_to_json(c)::text FROM profile.cases c
             WHERE c.tenant_id = %(t)s AND (c.profile_id, c.case_id) IN
                   (SELECT * FROM unnest(%(cp)s::uuid[], %(ci)s::text[]))
            """,  # noqa: S608
            {
                "t": tenant_id,
                "profiles": profiles,
                "tp": [p for p, _ in pairs],
                "tk": [k for _, k in pairs],
                "keys": all_time,
                "dp": [p for p, _, _ in dpairs],
                "dk": [k for _, k, _ in dpairs],
                "dh": [h for _, _, h in dpairs],
                "ip": [p for p, _ in ipairs],
                "ii": [i for _, i in ipairs],
                "cp": [p for p, _ in cpairs],
                "ci": [c for _, c in cpairs],
            },
        )
        ex = _Existing()
        for tag, raw in cur.fetchall():
            row = json.loads(raw)
            if tag == "v":
                s = Summary(
                    row["trait_key"],
                    row["value"],
                    row["source"],
                    int(row["observations"]),
                    _ts(row["first_at"]),  # type: ignore[arg-type]
                    _ts(row["last_at"]),  # type: ignore[arg-type]
                    row["last_event"],
                    row["first_event"],
                )
                ex.summaries[(row["profile_id"], int(row["origin"]))][(s.key, row["value_hash"], s.source)] = s
            elif tag == "r":
                ex.removals[row["profile_id"]][row["trait_key"]] = _ts(row["removed_at"])  # type: ignore[assignment]
            elif tag == "c":
                pid, key, value, source = row
                ex.chosen[pid][key] = (value_hash(value), source)
            elif tag == "s":
                ex.states[(row["profile_id"], row["trait_key"])] = state_of_row(row)
            elif tag == "d":
                ex.distinct[(row[0], row[1])].add(row[2])
            elif tag == "i":
                ex.interactions[(row["profile_id"], row["interaction_id"])] = _interaction(row)
            else:
                ex.cases[(row["profile_id"], row["case_id"])] = CaseRow(
                    row["case_id"],
                    int(row["status"]),
                    row["reason"],
                    row["interaction_id"],
                    _ts(row["open_time"]),  # type: ignore[arg-type]
                    _ts(row["update_time"]),  # type: ignore[arg-type]
                    row["update_event"],
                )
        return ex

    def _write(
        self,
        cur: Any,
        out: db.Statements,
        tenant_id: str,
        per_profile: Mapping[str, Effects],
        config: ProfileConfig,
        *,
        counters: str,
        origin: int = EVENT_ORIGIN,
        existing: _Existing | None = None,
        rechoose_all: bool = False,
    ) -> dict[str, set[str]]:
        """Queue the writes of ``per_profile``'s effects on ``out``; returns the trait keys whose
        chosen value changed, per profile. ``counters`` "add" (new events) or "set" (a rebuild)."""
        if not per_profile:
            return {}
        ex = existing if existing is not None else self._load(cur, tenant_id, per_profile, config)
        now = self.now()
        changed: dict[str, set[str]] = defaultdict(set)
        value_rows: list[tuple[Any, ...]] = []
        trait_rows: list[tuple[Any, ...]] = []
        state_rows: list[tuple[Any, ...]] = []
        distinct_rows: list[tuple[str, str, str]] = []
        point_rows: list[tuple[Any, ...]] = []
        interaction_rows: list[tuple[str, InteractionRow]] = []
        case_rows: list[tuple[str, CaseRow]] = []
        ident_rows: dict[tuple[str, str], tuple[str, dt.datetime, dt.datetime, str, str]] = {}
        count_rows: list[tuple[Any, ...]] = []
        for pid, eff in per_profile.items():
            # traits
            mine = ex.summaries[(pid, origin)]
            updates = add_observations(mine, eff.observations, ex.removals.get(pid, {}))
            for (key, h, source), s in updates.items():
                mine[(key, h, source)] = s
                value_rows.append(
                    (
                        pid,
                        key,
                        h,
                        source,
                        origin,
                        _json_text(s.value),
                        s.count,
                        s.first_at,
                        s.first_event_id,
                        s.last_at,
                        s.last_event_id,
                    )
                )
            keys = {k for k, _, _ in updates}
            if rechoose_all:
                keys |= {k for (p, _o), sums in ex.summaries.items() if p == pid for (k, _, _) in sums}
            rank = config.source_rank
            for key in sorted(keys):
                every = [
                    s for (p, _o), sums in ex.summaries.items() if p == pid for (k, _, _), s in sums.items() if k == key
                ]
                best = choose(every, config.policy(key), rank)
                if best is None:
                    continue
                trait_rows.append(
                    (
                        pid,
                        key,
                        _json_text(best.value),
                        search_text(best.value),
                        best.source,
                        best.event_id,
                        best.at,
                        best.policy,
                        best.observations,
                    )
                )
                if ex.chosen[pid].get(key) != (value_hash(best.value), best.source):
                    changed[pid].add(key)
            # computed
            for d in config.computed_traits:
                pts = eff.points.get(d.key, ())
                if not pts:
                    continue
                if d.windowed:
                    since = now - dt.timedelta(seconds=d.window_seconds)
                    point_rows.extend(
                        (pid, d.key, p.at, p.event_id, p.num, _json_text(p.value), p.value_hash)
                        for p in pts
                        if p.at > since
                    )
                    continue
                known = ex.distinct[(pid, d.key)]
                track = d.aggregation == computed.DISTINCT_COUNT
                state, fresh = add_points(ex.states.get((pid, d.key)), pts, known if track else set())
                if not track:
                    state = computed.State(
                        state.n, state.num_n, state.total, state.low, state.high, state.first, state.last, 0
                    )
                ex.states[(pid, d.key)] = state
                state_rows.append((pid, d.key, state))
                distinct_rows.extend((pid, d.key, h) for h in fresh if track)
            # interactions and cases
            touched_i: dict[str, InteractionRow] = {}
            for leg in eff.legs:
                k = (pid, leg.interaction_id)
                row = add_leg(touched_i.get(leg.interaction_id) or ex.interactions.get(k), leg)
                touched_i[leg.interaction_id] = row
            for iid, n in eff.messages.items():
                row = add_messages(
                    touched_i.get(iid) or ex.interactions.get((pid, iid)), iid, n, eff.message_first[iid]
                )
                touched_i[iid] = row
            for iid, row in touched_i.items():
                ex.interactions[(pid, iid)] = row
                interaction_rows.append((pid, row))
            touched_c: dict[str, CaseRow] = {}
            for u in eff.cases:
                crow = add_case(touched_c.get(u.case_id) or ex.cases.get((pid, u.case_id)), u)
                touched_c[u.case_id] = crow
            case_rows.extend((pid, c) for c in touched_c.values())
            # identifiers and counters
            for ident, (first, last, source, first_event) in eff.identifiers.items():
                prev = ident_rows.get(ident)
                if prev is None or (first, first_event) < (prev[1], prev[4]):
                    ident_rows[ident] = (pid, first, last if prev is None else max(last, prev[2]), source, first_event)
            count_rows.append((pid, eff.count, eff.first_seen, eff.last_seen))
        self._queue_values(out, tenant_id, value_rows)
        self._queue_traits(out, tenant_id, trait_rows)
        self._queue_states(out, tenant_id, state_rows)
        if distinct_rows:
            out.add(
                "INSERT INTO profile.computed_distinct (tenant_id, profile_id, trait_key, value_hash) "
                "SELECT %s, p, k, h FROM unnest(%s::uuid[], %s::text[], %s::text[]) AS x(p, k, h) ON "
                "CONFLICT DO NOTHING",
                (tenant_id, *map(list, zip(*distinct_rows, strict=True))),
            )
        if point_rows:
            cols = list(zip(*point_rows, strict=True))
            out.add(
                "INSERT INTO profile.computed_points (tenant_id, profile_id, trait_key, at, "
                "event_id, num, value, value_hash) "
                "SELECT %s, p, k, a, e, n, v::jsonb, h FROM unnest(%s::uuid[], %s::text[], "
                "%s::timestamptz[], %s::text[], "
                "%s::float8[], %s::text[], %s::text[]) AS x(p, k, a, e, n, v, h) ON CONFLICT DO NOTHING",
                (tenant_id, *map(list, cols)),
            )
        self._queue_interactions(out, tenant_id, interaction_rows)
        self._queue_cases(out, tenant_id, case_rows)
        if ident_rows:
            items = sorted(ident_rows.items())
            out.add(
                "INSERT INTO profile.identifiers AS i "
                "(tenant_id, id_type, id_value, profile_id, first_seen, last_seen, source, first_event_id) "
                "SELECT %s, t, v, p, f, l, s, e FROM unnest(%s::text[], %s::text[], %s::uuid[], %s::timestamptz[], "
                "%s::timestamptz[], %s::text[], %s::text[]) AS x(t, v, p, f, l, s, e) "
                "ON CONFLICT (tenant_id, id_type, id_value) DO UPDATE SET "
                "last_seen = greatest(i.last_seen, excluded.last_seen), "
                "source = CASE WHEN excluded.first_seen < i.first_seen THEN excluded.source ELSE i.source END, "
                "first_event_id = CASE WHEN excluded.first_seen < i.first_seen THEN excluded.first_event_id "
                "ELSE i.first_event_id END, "
                "first_seen = least(i.first_seen, excluded.first_seen)",
                (
                    tenant_id,
                    [k[0] for k, _ in items],
                    [k[1] for k, _ in items],
                    [v[0] for _, v in items],
                    [v[1] for _, v in items],
                    [v[2] for _, v in items],
                    [v[3] for _, v in items],
                    [v[4] for _, v in items],
                ),
            )
        if count_rows and counters == "add":
            out.add(
                "UPDATE profile.profiles p SET event_count = p.event_count + x.n, "
                "first_seen = least(p.first_seen, x.f), last_seen = greatest(p.last_seen, x.l) "
                "FROM unnest(%s::uuid[], %s::int8[], %s::timestamptz[], %s::timestamptz[]) AS x(id, n, f, l) "
                "WHERE p.tenant_id = %s AND p.profile_id = x.id",
                (*map(list, zip(*count_rows, strict=True)), tenant_id),
            )
        elif count_rows and counters == "set":
            out.add(
                "UPDATE profile.profiles p SET event_count = x.n, first_seen = x.f, last_seen = x.l "
                "FROM unnest(%s::uuid[], %s::int8[], %s::timestamptz[], %s::timestamptz[]) AS x(id, n, f, l) "
                "WHERE p.tenant_id = %s AND p.profile_id = x.id",
                (*map(list, zip(*count_rows, strict=True)), tenant_id),
            )
        return changed

    @staticmethod
    def _queue_values(out: db.Statements, tenant_id: str, rows: Sequence[tuple[Any, ...]]) -> None:
        if not rows:
            return
        out.add(
            "INSERT INTO profile.trait_values (tenant_id, profile_id, trait_key, value_hash, source, origin, value, "
            "observations, first_at, first_event, last_at, last_event) "
            "SELECT %s, p, k, h, s, o, v::jsonb, n, fa, fe, la, le FROM unnest(%s::uuid[], %s::text[], %s::text[], "
            "%s::text[], %s::int2[], %s::text[], %s::int8[], %s::timestamptz[], %s::text[], "
            "%s::timestamptz[], %s::text[]) "
            "AS x(p, k, h, s, o, v, n, fa, fe, la, le) "
            "ON CONFLICT (tenant_id, profile_id, trait_key, value_hash, source, origin) DO UPDATE SET "
            "observations = excluded.observations, first_at = excluded.first_at, first_event = excluded.first_event, "
            "last_at = excluded.last_at, last_event = excluded.last_event",
            (tenant_id, *map(list, zip(*rows, strict=True))),
        )

    @staticmethod
    def _queue_traits(out: db.Statements, tenant_id: str, rows: Sequence[tuple[Any, ...]]) -> None:
        if not rows:
            return
        out.add(
            "INSERT INTO profile.traits (tenant_id, profile_id, trait_key, value, search_text, source, event_id, "
            "observed_at, policy, observations) "
            "SELECT %s, p, k, v::jsonb, st, s, e, a, po, n FROM unnest(%s::uuid[], %s::text[], %s::text[], %s::text[], "
            "%s::text[], %s::text[], %s::timestamptz[], %s::int2[], %s::int8[]) AS x(p, k, v, st, s, e, a, po, n) "
            "ON CONFLICT (tenant_id, profile_id, trait_key) DO UPDATE SET value = excluded.value, "
            "search_text = excluded.search_text, source = excluded.source, event_id = excluded.event_id, "
            "observed_at = excluded.observed_at, policy = excluded.policy, observations = excluded.observations",
            (tenant_id, *map(list, zip(*rows, strict=True))),
        )

    @staticmethod
    def _queue_states(out: db.Statements, tenant_id: str, rows: Sequence[tuple[str, str, computed.State]]) -> None:
        if not rows:
            return

        def pt(p: computed.Point | None, part: str) -> Any:
            if p is None:
                return None
            return {"at": p.at, "event": p.event_id, "value": _json_text(p.value)}[part]

        out.add(
            "INSERT INTO profile.computed_state AS c (tenant_id, profile_id, trait_key, n, num_n, total, low, high, "
            "first_at, first_event, first_value, last_at, last_event, last_value, distinct_n) "
            "SELECT %s, p, k, n, nn, tot, lo, hi, fa, fe, fv::jsonb, la, le, lv::jsonb, dn FROM unnest(%s::uuid[], "
            "%s::text[], %s::int8[], %s::int8[], %s::float8[], %s::float8[], %s::float8[], "
            "%s::timestamptz[], %s::text[], "
            "%s::text[], %s::timestamptz[], %s::text[], %s::text[], %s::int8[]) "
            "AS x(p, k, n, nn, tot, lo, hi, fa, fe, fv, la, le, lv, dn) "
            "ON CONFLICT (tenant_id, profile_id, trait_key) DO UPDATE SET n = excluded.n, num_n = excluded.num_n, "
            "total = excluded.total, low = excluded.low, high = excluded.high, first_at = excluded.first_at, "
            "first_event = excluded.first_event, first_value = excluded.first_value, last_at = excluded.last_at, "
            "last_event = excluded.last_event, last_value = excluded.last_value, distinct_n = excluded.distinct_n",
            (
                tenant_id,
                [p for p, _, _ in rows],
                [k for _, k, _ in rows],
                [s.n for _, _, s in rows],
                [s.num_n for _, _, s in rows],
                [s.total for _, _, s in rows],
                [s.low for _, _, s in rows],
                [s.high for _, _, s in rows],
                [pt(s.first, "at") for _, _, s in rows],
                [pt(s.first, "event") for _, _, s in rows],
                [pt(s.first, "value") for _, _, s in rows],
                [pt(s.last, "at") for _, _, s in rows],
                [pt(s.last, "event") for _, _, s in rows],
                [pt(s.last, "value") for _, _, s in rows],
                [s.distinct for _, _, s in rows],
            ),
        )

    @staticmethod
    def _queue_interactions(out: db.Statements, tenant_id: str, rows: Sequence[tuple[str, InteractionRow]]) -> None:
        if not rows:
            return
        names = (
            "interaction_id", "channel", "direction", "queue", "agent_id", "reason", "disposition", "case_id",
            "case_status", "start_time", "end_time", "handle_seconds", "legs", "transferred", "abandoned", "messages",
            "last_leg_at", "last_leg_event",
        )  # fmt: skip
        types = (
            "text", "int2", "int2", "text", "text", "text", "text", "text", "int2", "timestamptz", "timestamptz",
            "float8", "int4", "bool", "bool", "int4", "timestamptz", "text",
        )  # fmt: skip
        arrays = ", ".join(f"%s::{t}[]" for t in types)
        assignments = ", ".join(f"{n} = excluded.{n}" for n in names[1:])
        out.add(
            f"INSERT INTO profile.interactions (tenant_id, profile_id, {', '.join(names)}) "  # noqa: S608
            f"SELECT %s, * FROM unnest(%s::uuid[], {arrays}) "
            f"ON CONFLICT (tenant_id, profile_id, interaction_id) DO UPDATE SET {assignments}",
            (tenant_id, [p for p, _ in rows], *([getattr(r, n) for _, r in rows] for n in names)),
        )

    @staticmethod
    def _queue_cases(out: db.Statements, tenant_id: str, rows: Sequence[tuple[str, CaseRow]]) -> None:
        if not rows:
            return
        out.add(
            "INSERT INTO profile.cases (tenant_id, profile_id, case_id, status, reason, interaction_id, open_time, "
            "update_time, update_event) SELECT %s, * FROM unnest(%s::uuid[], %s::text[], %s::int2[], %s::text[], "
            "%s::text[], %s::timestamptz[], %s::timestamptz[], %s::text[]) "
            "ON CONFLICT (tenant_id, profile_id, case_id) DO UPDATE SET status = excluded.status, "
            "reason = excluded.reason, interaction_id = excluded.interaction_id, open_time = excluded.open_time, "
            "update_time = excluded.update_time, update_event = excluded.update_event",
            (
                tenant_id,
                [p for p, _ in rows],
                [c.case_id for _, c in rows],
                [c.status for _, c in rows],
                [c.reason for _, c in rows],
                [c.interaction_id for _, c in rows],
                [c.open_time for _, c in rows],
                [c.update_time for _, c in rows],
                [c.update_event for _, c in rows],
            ),
        )

    @staticmethod
    def _feed(out: db.Statements, tenant_id: str, rows: Sequence[tuple[int, str, str | None, Sequence[str]]]) -> None:
        """Append to the tenant's change feed; queued last, so the head row is locked only until
        the commit that follows: seq order is commit order, with no gaps."""
        if not rows:
            return
        n = len(rows)
        out.add(
            "WITH h AS (INSERT INTO profile.feed_heads AS f (tenant_id, seq) VALUES (%(t)s, %(n)s) "
            "ON CONFLICT (tenant_id) DO UPDATE SET seq = f.seq + %(n)s RETURNING seq) "
            "INSERT INTO profile.feed (tenant_id, seq, kind, profile_id, other_profile, changed) "
            "SELECT %(t)s, h.seq - %(n)s + x.i, x.k, x.p, x.o, "
            "CASE WHEN x.c = '' THEN '{}'::text[] ELSE string_to_array(x.c, chr(31)) END "
            "FROM h, unnest(%(k)s::int2[], %(p)s::uuid[], %(o)s::uuid[], %(c)s::text[]) WITH "
            "ORDINALITY AS x(k, p, o, c, i)",
            {
                "t": tenant_id,
                "n": n,
                "k": [k for k, _, _, _ in rows],
                "p": [p for _, p, _, _ in rows],
                "o": [o for _, _, o, _ in rows],
                "c": [SEP.join(c) for _, _, _, c in rows],
            },
        )

    # ------------------------------------------------------------------------------------------
    # Identity's changes.

    def apply_created(self, tenant_id: str, profile_id: str) -> Applied:
        def run(cur: Any) -> Applied:
            locked = self._lock(cur, tenant_id, [profile_id])
            _state, new = locked[profile_id]
            # A profile its events created already changes nothing: its cache stays valid.
            out = Applied(touched={profile_id} if new else set())
            if new:
                statements = db.Statements(cur)
                self._feed(statements, tenant_id, [(CREATED, profile_id, None, ())])
                statements.run()
            return out

        return self._retrying(tenant_id, "profile created", 1, run)

    def apply_merge(self, tenant_id: str, survivor: str, absorbed: str, key: str, config: ProfileConfig) -> Applied:
        """``absorbed`` joins ``survivor``: ids, timeline and UpdateTraits values move, the survivor
        is rebuilt from the joined timeline, and the absorbed id redirects from now on."""

        def run(cur: Any) -> Applied:
            out = Applied(touched={survivor, absorbed})
            if not self._first_time(cur, tenant_id, key):
                return out
            target = self._final(cur, tenant_id, survivor)
            if target is None or target == absorbed:
                target = survivor
            locked = self._lock(cur, tenant_id, sorted({target, absorbed}))
            if locked[target][0] == MERGED:
                # Merged on itself while we waited for its lock (another replica applied a later
                # merge of the chain): read whom it joined, under the lock this time.
                raise _Retry()
            state_a, _ = locked[absorbed]
            if locked[target][0] == ERASED:
                return out
            if state_a == ERASED:
                return out
            out.touched = {target, absorbed}
            statements = db.Statements(cur)
            cur.execute(
                "UPDATE profile.identifiers SET profile_id = %(s)s WHERE tenant_id = %(t)s AND profile_id = %(a)s "
                "RETURNING id_type, id_value",
                {"t": tenant_id, "s": target, "a": absorbed},
            )
            out.moved_identifiers = [(t, v) for t, v in cur.fetchall()]
            params = {"t": tenant_id, "s": target, "a": absorbed}
            statements.add(
                "UPDATE profile.profiles SET state = 1, merged_into = %(s)s, event_count = 0 "
                "WHERE tenant_id = %(t)s AND profile_id = %(a)s",
                params,
            )
            statements.add(
                "UPDATE profile.profiles SET merged_into = %(s)s WHERE tenant_id = %(t)s AND merged_into = %(a)s",
                params,
            )
            statements.add(
                "UPDATE profile.timeline SET profile_id = %(s)s WHERE tenant_id = %(t)s AND profile_id = %(a)s", params
            )
            statements.add(
                "UPDATE profile.pending_moves SET profile_id = %(s)s WHERE tenant_id = %(t)s AND profile_id = %(a)s",
                params,
            )
            # UpdateTraits values and removals are not in the timeline: they move, combined.
            statements.add(
                "INSERT INTO profile.trait_values AS v SELECT tenant_id, %(s)s, trait_key, value_hash, source, origin, "
                "value, observations, first_at, first_event, last_at, last_event FROM profile.trait_values "
                "WHERE tenant_id = %(t)s AND profile_id = %(a)s AND origin = 1 "
                "ON CONFLICT (tenant_id, profile_id, trait_key, value_hash, source, origin) DO UPDATE SET "
                "observations = v.observations + excluded.observations, "
                "first_event = CASE WHEN excluded.first_at < v.first_at THEN excluded.first_event "
                "ELSE v.first_event END, "
                "first_at = least(v.first_at, excluded.first_at), "
                "last_event = CASE WHEN excluded.last_at > v.last_at THEN excluded.last_event ELSE v.last_event END, "
                "last_at = greatest(v.last_at, excluded.last_at)",
                params,
            )
            statements.add(
                "INSERT INTO profile.trait_removals AS r SELECT tenant_id, %(s)s, trait_key, removed_at "
                "FROM profile.trait_removals WHERE tenant_id = %(t)s AND profile_id = %(a)s "
                "ON CONFLICT (tenant_id, profile_id, trait_key) DO UPDATE SET "
                "removed_at = greatest(r.removed_at, excluded.removed_at)",
                params,
            )
            # A removal on either side hides the other side's older values too.
            statements.add(
                "DELETE FROM profile.trait_values v USING profile.trait_removals r WHERE v.tenant_id = %(t)s "
                "AND v.profile_id = %(s)s AND r.tenant_id = %(t)s AND r.profile_id = %(s)s "
                "AND r.trait_key = v.trait_key AND v.last_at <= r.removed_at",
                params,
            )
            self._clear(statements, tenant_id, [absorbed], derived_only=False, keep_profile=True)
            statements.run()
            self._rebuild(cur, tenant_id, [target], config)
            statements = db.Statements(cur)
            self._feed(statements, tenant_id, [(FEED_MERGED, target, absorbed, ())])
            statements.run()
            return out

        return self._retrying(tenant_id, "profile merge", 1, run)

    def apply_split(
        self,
        tenant_id: str,
        source: str,
        new_profile: str,
        moved_events: Sequence[str],
        moved_identifiers: Sequence[tuple[str, str]],
        key: str,
        config: ProfileConfig,
    ) -> Applied:
        """Identity split ``new_profile`` off ``source``: its identifiers and events move, and both
        profiles are rebuilt from their events. Events not here yet move when they arrive."""

        def run(cur: Any) -> Applied:
            out = Applied(touched={source, new_profile})
            if not self._first_time(cur, tenant_id, key):
                return out
            # Either side may have been merged on since (a later change another replica applied
            # first): the move goes between whom they are now, resolved again under the locks.
            target = self._final(cur, tenant_id, source) or source
            dest = self._final(cur, tenant_id, new_profile) or new_profile
            locked = self._lock(cur, tenant_id, sorted({target, dest}))
            if locked[target][0] == MERGED or locked[dest][0] == MERGED:
                raise _Retry()
            if target == dest or locked[target][0] == ERASED or locked[dest][0] == ERASED:
                return out
            out.touched = {target, dest}
            out.moved_identifiers = list(moved_identifiers)
            statements = db.Statements(cur)
            if moved_identifiers:
                first = self.now()
                statements.add(
                    "INSERT INTO profile.identifiers AS i (tenant_id, id_type, id_value, profile_id, "
                    "first_seen, last_seen) "
                    "SELECT %s, t, v, %s, %s, %s FROM unnest(%s::text[], %s::text[]) AS x(t, v) "
                    "ON CONFLICT (tenant_id, id_type, id_value) DO UPDATE SET profile_id = excluded.profile_id",
                    (
                        tenant_id,
                        dest,
                        first,
                        first,
                        [t for t, _ in moved_identifiers],
                        [v for _, v in moved_identifiers],
                    ),
                )
            statements.run()
            cur.execute(
                "UPDATE profile.timeline SET profile_id = %s WHERE tenant_id = %s AND event_id = "
                "ANY(%s) RETURNING event_id",
                (dest, tenant_id, list(moved_events)),
            )
            here = {r[0] for r in cur.fetchall()}
            later = [e for e in moved_events if e not in here]
            statements = db.Statements(cur)
            if later:
                statements.add(
                    "INSERT INTO profile.pending_moves (tenant_id, event_id, profile_id) "
                    "SELECT %s, e, %s FROM unnest(%s::text[]) AS e "
                    "ON CONFLICT (tenant_id, event_id) DO UPDATE SET profile_id = excluded.profile_id",
                    (tenant_id, dest, later),
                )
            statements.run()
            self._rebuild(cur, tenant_id, [target, dest], config)
            statements = db.Statements(cur)
            feed: list[tuple[int, str, str | None, Sequence[str]]] = []
            if locked[dest][1]:
                feed.append((CREATED, dest, None, ()))
            feed.append((FEED_SPLIT, target, dest, ()))
            self._feed(statements, tenant_id, feed)
            statements.run()
            return out

        return self._retrying(tenant_id, "profile split", 1, run)

    def apply_erased(self, tenant_id: str, profile_ids: Sequence[str]) -> Applied:
        """Forget everything about these profiles; they answer NOT_FOUND and drop later events."""

        def run(cur: Any) -> Applied:
            ids = sorted(set(profile_ids))
            out = Applied(touched=set(ids))
            locked = self._lock(cur, tenant_id, ids)
            cur.execute(
                "DELETE FROM profile.identifiers WHERE tenant_id = %s AND profile_id = ANY(%s::uuid[]) "
                "RETURNING id_type, id_value",
                (tenant_id, ids),
            )
            out.moved_identifiers = [(t, v) for t, v in cur.fetchall()]
            statements = db.Statements(cur)
            self._clear(statements, tenant_id, ids, derived_only=False, keep_profile=True)
            statements.add(
                "UPDATE profile.profiles SET state = 2, merged_into = NULL, event_count = 0, first_seen = NULL, "
                "last_seen = NULL WHERE tenant_id = %s AND profile_id = ANY(%s::uuid[])",
                (tenant_id, ids),
            )
            newly = [pid for pid, (state, _) in locked.items() if state != ERASED]
            self._feed(statements, tenant_id, [(FEED_ERASED, pid, None, ()) for pid in sorted(newly)])
            statements.run()
            return out

        return self._retrying(tenant_id, "profile erased", len(profile_ids), run)

    def _first_time(self, cur: Any, tenant_id: str, key: str) -> bool:
        cur.execute(
            "INSERT INTO profile.applied_changes (tenant_id, change_key) VALUES (%s, %s) "
            "ON CONFLICT DO NOTHING RETURNING 1",
            (tenant_id, key),
        )
        return cur.fetchone() is not None

    @staticmethod
    def _final(cur: Any, tenant_id: str, profile_id: str) -> str | None:
        cur.execute(
            "SELECT coalesce(merged_into, profile_id)::text FROM profile.profiles WHERE tenant_id = "
            "%s AND profile_id = %s",
            (tenant_id, profile_id),
        )
        row = cur.fetchone()
        return row[0] if row else None

    @staticmethod
    def _clear(
        out: db.Statements, tenant_id: str, ids: Sequence[str], *, derived_only: bool, keep_profile: bool
    ) -> None:
        """Delete what the profiles derive from events (and, unless ``derived_only``, their timeline,
        UpdateTraits values and everything else they hold)."""
        params = (tenant_id, list(ids))
        where = "tenant_id = %s AND profile_id = ANY(%s::uuid[])"
        tables = ["traits", "computed_state", "computed_distinct", "computed_points", "interactions", "cases"]
        out.add(f"DELETE FROM profile.trait_values WHERE {where}" + (" AND origin = 0" if derived_only else ""), params)  # noqa: S608
        if not derived_only:
            tables += ["trait_removals", "timeline", "pending_moves"]
        for table in tables:
            out.add(f"DELETE FROM profile.{table} WHERE {where}", params)  # noqa: S608

    def _rebuild(self, cur: Any, tenant_id: str, ids: Sequence[str], config: ProfileConfig) -> None:
        """Recompute what the profiles derive from events, from their timelines."""
        statements = db.Statements(cur)
        self._clear(statements, tenant_id, ids, derived_only=True, keep_profile=True)
        statements.run()
        cur.execute(
            "SELECT profile_id::text, payload FROM profile.timeline WHERE tenant_id = %s AND "
            "profile_id = ANY(%s::uuid[])",
            (tenant_id, list(ids)),
        )
        grouped: dict[str, list[ProfileEvent]] = {pid: [] for pid in ids}
        for pid, payload in cur.fetchall():
            grouped[pid].append(from_event(event_pb2.Event.FromString(bytes(payload))))
        per_profile = {pid: effects(evs, config) for pid, evs in grouped.items()}
        for eff in per_profile.values():
            eff.identifiers.clear()  # identifiers are identity's to move, not the timeline's
        existing = self._load(cur, tenant_id, per_profile, config, all_keys=True)
        statements = db.Statements(cur)
        self._write(
            cur, statements, tenant_id, per_profile, config, counters="set", existing=existing, rechoose_all=True
        )
        statements.run()

    # ------------------------------------------------------------------------------------------
    # UpdateTraits.

    def update_traits(
        self,
        tenant_id: str,
        profile_id: str,
        values: Mapping[str, Any],
        removed: Sequence[str],
        source: str,
        config: ProfileConfig,
    ) -> Applied:
        """Set and remove traits from a system of record, now. A removal hides every earlier
        observation of the trait (late events included); later ones count again."""

        def run(cur: Any) -> Applied:
            locked = self._lock(cur, tenant_id, [profile_id])
            if locked[profile_id][0] != ACTIVE:
                raise _Retry()
            now = self.now()
            statements = db.Statements(cur)
            if removed:
                params = (tenant_id, profile_id, list(removed))
                statements.add(
                    "DELETE FROM profile.trait_values WHERE tenant_id = %s AND profile_id = %s AND trait_key = ANY(%s)",
                    params,
                )
                statements.add(
                    "DELETE FROM profile.traits WHERE tenant_id = %s AND profile_id = %s AND trait_key = ANY(%s)",
                    params,
                )
                statements.add(
                    "INSERT INTO profile.trait_removals AS r (tenant_id, profile_id, trait_key, removed_at) "
                    "SELECT %s, %s, k, %s FROM unnest(%s::text[]) AS k ON CONFLICT (tenant_id, profile_id, trait_key) "
                    "DO UPDATE SET removed_at = greatest(r.removed_at, excluded.removed_at)",
                    (tenant_id, profile_id, now, list(removed)),
                )
                statements.run()
            eff = Effects(observations=[Observation(k, plain(v), source, "", now) for k, v in values.items()])
            changed = self._write(
                cur, statements, tenant_id, {profile_id: eff}, config, counters="none", origin=UPDATE_ORIGIN
            )
            keys = sorted(changed.get(profile_id, set()) | set(removed))
            if keys:
                self._feed(statements, tenant_id, [(UPDATED, profile_id, None, keys)])
            statements.run()
            return Applied(touched={profile_id})

        return self._retrying(tenant_id, "profile update traits", 1, run)

    # ------------------------------------------------------------------------------------------
    # Reads.

    def resolve(self, tenant_id: str, profile_id: str) -> tuple[int, str] | None:
        """(state, final id) of a profile id, or None if never seen."""
        with db.raw_transaction(self.reader, "profile resolve") as (cur, info):
            _RESOLVE.execute(cur, info, {"t": tenant_id, "p": profile_id})
            row = cur.fetchone()
        return (int(row[0]), row[1]) if row else None

    def locate_identifier(self, tenant_id: str, id_type: str, value: str) -> tuple[str, int, str, int] | None:
        """In one statement: the identifier's owner, its state, the id it resolves to (its survivor
        when merged) and that one's state; None when no profile has the identifier."""
        with db.raw_transaction(self.reader, "profile locate identifier") as (cur, info):
            _LOCATE_IDENTIFIER.execute(cur, info, {"t": tenant_id, "k": id_type, "v": value})
            row = cur.fetchone()
        return (row[0], int(row[1]), row[2], int(row[3])) if row else None

    def profile_rows(
        self, tenant_id: str, profile_id: str, config: ProfileConfig, *, interactions: int = 0
    ) -> dict[str, Any] | None:
        """Everything a profile (and, with ``interactions``, a customer context) shows, in one round
        trip: the row, identifiers, traits, computed traits, recent contacts, open cases, counts."""
        now = self.now()
        windowed = config.windowed
        with db.raw_transaction(self.reader, "profile read") as (cur, info):
            _PROFILE_ROWS.execute(
                cur,
                info,
                {
                    "t": tenant_id,
                    "p": profile_id,
                    "wk": [d.key for d in windowed],
                    "ws": [now - dt.timedelta(seconds=d.window_seconds) for d in windowed],
                    "n": interactions,
                    "d7": now - dt.timedelta(days=7),
                    "d30": now - dt.timedelta(days=30),
                },
            )
            row = cur.fetchone()
        if row is None or row[0] is None:
            return None
        names = ("profile", "identifiers", "traits", "computed", "windowed", "interactions", "cases", "counts")
        return dict(zip(names, row, strict=True)) | {"now": now}

    def timeline(
        self,
        tenant_id: str,
        profile_id: str,
        limit: int,
        after: tuple[dt.datetime, str] | None,
        channels: Sequence[int],
        kinds: Sequence[str],
        start: dt.datetime | None,
        end: dt.datetime | None,
    ) -> list[bytes]:
        """Payloads, newest first (event time, then event id), after ``after``."""
        clauses = ["tenant_id = %(t)s", "profile_id = %(p)s"]
        params: dict[str, Any] = {"t": tenant_id, "p": profile_id, "n": limit}
        if after is not None:
            clauses.append("(event_time, event_id) < (%(at)s, %(id)s)")
            params |= {"at": after[0], "id": after[1]}
        if channels:
            clauses.append("channel = ANY(%(ch)s::int2[])")
            params["ch"] = list(channels)
        if kinds:
            clauses.append("kind = ANY(%(k)s)")
            params["k"] = list(kinds)
        if start is not None:
            clauses.append("event_time >= %(s)s")
            params["s"] = start
        if end is not None:
            clauses.append("event_time < %(e)s")
            params["e"] = end
        with db.raw_transaction(self.reader, "profile timeline") as (cur, _):
            cur.execute(
                f"SELECT payload FROM profile.timeline WHERE {' AND '.join(clauses)} "  # noqa: S608
                "ORDER BY event_time DESC, event_id DESC LIMIT %(n)s",
                params,
            )
            return [bytes(r[0]) for r in cur.fetchall()]

    def search_traits(
        self, tenant_id: str, key: str, text: str, prefix: bool, limit: int, after: str | None
    ) -> list[str]:
        op = "search_text >= %(v)s AND search_text < %(hi)s" if prefix else "search_text = %(v)s"
        with db.raw_transaction(self.reader, "profile search traits") as (cur, _):
            cur.execute(
                f"SELECT profile_id::text FROM profile.traits WHERE tenant_id = %(t)s AND trait_key = %(k)s AND {op} "  # noqa: S608
                "AND (%(a)s::uuid IS NULL OR profile_id > %(a)s::uuid) ORDER BY profile_id LIMIT %(n)s",
                {"t": tenant_id, "k": key, "v": text, "hi": text + "\U0010ffff", "a": after, "n": limit},
            )
            return [r[0] for r in cur.fetchall()]

    def search_identifiers(
        self, tenant_id: str, id_type: str, value: str, prefix: bool, limit: int, after: tuple[str, str] | None
    ) -> list[tuple[str, str]]:
        """(profile id, identifier value) pairs, ordered by value."""
        op = "id_value >= %(v)s AND id_value < %(hi)s" if prefix else "id_value = %(v)s"
        with db.raw_transaction(self.reader, "profile search identifiers") as (cur, _):
            cur.execute(
                f"SELECT profile_id::text, id_value FROM profile.identifiers WHERE tenant_id = %(t)s "  # noqa: S608
                f"AND id_type = %(k)s "
                f"AND {op} AND (%(a)s::text IS NULL OR id_value > %(a)s) ORDER BY id_value LIMIT %(n)s",
                {
                    "t": tenant_id,
                    "k": id_type,
                    "v": value,
                    "hi": value + "\U0010ffff",
                    "a": after[1] if after else None,
                    "n": limit,
                },
            )
            return [(r[0], r[1]) for r in cur.fetchall()]

    def feed_after(self, tenant_id: str, seq: int, limit: int) -> tuple[list[tuple[Any, ...]], int, int]:
        """Feed rows after ``seq``, the head and the last pruned seq."""
        with db.raw_transaction(self.reader, "profile feed") as (cur, _):
            cur.execute(
                "SELECT coalesce((SELECT seq FROM profile.feed_heads WHERE tenant_id = %(t)s), 0), "
                "coalesce((SELECT pruned_through FROM profile.feed_heads WHERE tenant_id = %(t)s), 0)",
                {"t": tenant_id},
            )
            head, pruned = cur.fetchone()
            cur.execute(
                "SELECT seq, kind, profile_id::text, other_profile::text, changed, at FROM profile.feed "
                "WHERE tenant_id = %s AND seq > %s ORDER BY seq LIMIT %s",
                (tenant_id, seq, limit),
            )
            return list(cur.fetchall()), int(head), int(pruned)

    # ------------------------------------------------------------------------------------------
    # Upkeep.

    def upkeep(self, feed_retention_seconds: float, months_ahead: int = 3, batch: int = 10_000) -> dict[str, int]:
        """Timeline partitions ahead; expired windowed points, feed rows, idempotency records. It
        runs on the leader; the partitions are made under a transaction lock of its own, so two
        leaders overlapping for a moment take turns (two CREATE TABLEs of one partition would
        otherwise collide). The expiries go tenant by tenant over indexes leading with tenant_id,
        in transactions of at most ``batch`` rows; two leaders running them at once delete each
        row once."""
        now = self.now()
        with db.transaction(self.engine) as conn:
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtextextended('tessera.profile.upkeep', 0))"))
            made = conn.execute(
                sa.text("SELECT profile.ensure_timeline_partitions(:d, :n)"), {"d": now.date(), "n": months_ahead}
            ).scalar_one()
            configs = conn.execute(sa.text("SELECT tenant_id, spec FROM profile.settings")).all()
            feed_tenants = list(conn.execute(sa.text("SELECT tenant_id FROM profile.feed_heads")).scalars())
        points = 0
        for tenant_id, spec in configs:
            for d in from_json(spec).windowed:
                points += self._in_batches(
                    _EXPIRE_POINTS,
                    {"t": tenant_id, "k": d.key, "s": now - dt.timedelta(seconds=d.window_seconds), "n": batch},
                )
        cutoff = now - dt.timedelta(seconds=feed_retention_seconds)
        pruned = 0
        for tenant_id in feed_tenants:
            if self._in_batches(_PRUNE_FEED, {"t": tenant_id, "c": cutoff, "n": batch}):
                pruned += 1
        with db.transaction(self.engine) as conn:
            conn.execute(
                sa.text("DELETE FROM profile.applied_changes WHERE applied_at < :c"), {"c": now - dt.timedelta(days=30)}
            )
            conn.execute(
                sa.text("DELETE FROM profile.pending_moves WHERE created_at < :c"), {"c": now - dt.timedelta(days=30)}
            )
        return {"timeline_partitions_created": int(made), "points_expired": points, "feed_tenants_pruned": pruned}

    def _in_batches(self, sql: str, params: dict[str, Any]) -> int:
        """Run a statement deleting at most ``params["n"]`` rows and returning how many, one
        transaction each, until it deletes fewer; returns the total."""
        total = 0
        while True:
            with db.raw_transaction(self.engine, "profile upkeep") as (cur, _):
                cur.execute(sql, params)
                n = int(cur.fetchone()[0])
            total += n
            if n < params["n"]:
                return total


# Upkeep's expiries: one tenant (and trait key) and at most n rows a statement, over an index
# leading with tenant_id; each returns how many rows it deleted.
_EXPIRE_POINTS = """
WITH gone AS (
    DELETE FROM profile.computed_points WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM profile.computed_points
        WHERE tenant_id = %(t)s AND trait_key = %(k)s AND at <= %(s)s LIMIT %(n)s))
    RETURNING 1
)
SELECT count(*) FROM gone
"""
# Oldest first, so the head's last pruned seq (a watcher behind it learns what it missed) grows
# batch by batch as the oldest rows go.
_PRUNE_FEED = """
WITH gone AS (
    DELETE FROM profile.feed WHERE tenant_id = %(t)s AND seq = ANY(ARRAY(
        SELECT seq FROM profile.feed WHERE tenant_id = %(t)s AND at < %(c)s ORDER BY at LIMIT %(n)s))
    RETURNING seq
), head AS (
    UPDATE profile.feed_heads h SET pruned_through = greatest(h.pruned_through, (SELECT max(seq) FROM gone))
    WHERE h.tenant_id = %(t)s AND EXISTS (SELECT 1 FROM gone)
)
SELECT count(*) FROM gone
"""


def _stamped(e: ProfileEvent, profile_id: str) -> bytes:
    if e.event.profile_id == profile_id:
        return e.payload
    ev = event_pb2.Event()
    ev.CopyFrom(e.event)
    ev.profile_id = profile_id
    return ev.SerializeToString()


def state_of_row(row: Mapping[str, Any]) -> computed.State:
    def point(prefix: str) -> computed.Point | None:
        at = _ts(row[f"{prefix}_at"])
        if at is None:
            return None
        value = row[f"{prefix}_value"]
        num = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
        return computed.Point(at, row[f"{prefix}_event"], value, num)

    return computed.State(
        n=int(row["n"]),
        num_n=int(row["num_n"]),
        total=float(row["total"]),
        low=row["low"],
        high=row["high"],
        first=point("first"),
        last=point("last"),
        distinct=int(row["distinct_n"]),
    )


def _interaction(row: Mapping[str, Any]) -> InteractionRow:
    return InteractionRow(
        interaction_id=row["interaction_id"],
        channel=int(row["channel"]),
        direction=int(row["direction"]),
        queue=row["queue"],
        agent_id=row["agent_id"],
        reason=row["reason"],
        disposition=row["disposition"],
        case_id=row["case_id"],
        case_status=int(row["case_status"]),
        start_time=_ts(row["start_time"]),
        end_time=_ts(row["end_time"]),
        handle_seconds=float(row["handle_seconds"]),
        legs=int(row["legs"]),
        transferred=bool(row["transferred"]),
        abandoned=bool(row["abandoned"]),
        messages=int(row["messages"]),
        last_leg_at=_ts(row["last_leg_at"]),
        last_leg_event=row["last_leg_event"],
    )


def iter_chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
