"""The metrics schema: facts, per-customer contributions, open FCR contacts and the rollups.

Every change to a customer (new facts, a merge, a split) runs the same three steps in one
transaction, holding that customer's advisory lock: write the facts, derive again the parts of
the customer's contribution the change touched (:func:`services.metrics.derive.derive`; all of
them after a merge or a split), and add the difference from the parts last applied to the
rollups. So redelivered events change nothing, late ones correct past buckets, and the rollups
always equal the sum of every customer's derivation. A batch of messages or surveys re-derives
their conversations and surveys, not the customer's every fact; a leg re-derives the customer's
contacts and everything, anyone's, that names its interaction (its attribution changed).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any

from psycopg2.extras import execute_values
from sqlalchemy.engine import Engine

from services.core import db
from services.metrics import codec
from services.metrics.definitions import DIMENSIONS
from services.metrics.derive import (
    CONTACTS,
    CONVERSATION,
    Attribution,
    Derived,
    Key,
    accumulate,
    attributions,
    day_of,
    derive,
    hour_of,
    part_of,
)
from services.metrics.facts import LEG, SURVEY, Fact
from services.metrics.query import DAY_GROUPINGS, HOUR_GROUPINGS
from services.metrics.stats import COUNTERS, HIST_BUCKETS, HIST_SLOT, SQUARES, Stats
from services.metrics.tenant_settings import MetricsConfig

ALL_DIMS = 31
_KEY_COLUMNS = ("tenant_id", "grouping", "bucket", *DIMENSIONS)
_STAT_COLUMNS = (*COUNTERS, *SQUARES)


def _merge_sql(table: str) -> str:
    """Add the staged deltas (``pg_temp.<table>_delta``) to the rollup, in key order."""
    sets = ", ".join(f"{c} = r.{c} + EXCLUDED.{c}" for c in _STAT_COLUMNS)
    keys = ", ".join(_KEY_COLUMNS)
    return (
        f"INSERT INTO metrics.{table} AS r SELECT * FROM pg_temp.{table}_delta ORDER BY {keys} "  # noqa: S608
        f"ON CONFLICT ({keys}) DO UPDATE SET {sets}, "
        "hist = CASE WHEN EXCLUDED.hist = '{}' THEN r.hist ELSE metrics.add_hist(r.hist, EXCLUDED.hist) END"
    )


_MERGE = {t: _merge_sql(t) for t in ("rollup_hour", "rollup_day")}
_FACT_COLUMNS = ", ".join(("tenant_id", "fact_key", *[f.name for f in fields(Fact)][1:]))
_MERGE_FACTS = (
    "INSERT INTO metrics.facts AS f SELECT * FROM pg_temp.facts_delta ORDER BY fact_key "  # noqa: S608
    "ON CONFLICT (tenant_id, fact_key) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in _FACT_COLUMNS.split(", ")[2:])
    + " WHERE (EXCLUDED.at, EXCLUDED.event_id) > (f.at, f.event_id)"
)
#: The facts' columns, as a Fact takes them.
FACT_SELECT = "SELECT " + _FACT_COLUMNS.removeprefix("tenant_id, ") + " FROM metrics.facts "  # noqa: S608
_ZERO_STATS = ["0"] * HIST_SLOT
_CONTRIBUTIONS = "tenant_id, profile_id, part, body"
_MERGE_CONTRIBUTIONS = (
    f"INSERT INTO metrics.contributions AS c ({_CONTRIBUTIONS}) SELECT {_CONTRIBUTIONS} "  # noqa: S608
    "FROM pg_temp.contributions_delta ORDER BY profile_id, part "
    "ON CONFLICT (tenant_id, profile_id, part) DO UPDATE SET body = EXCLUDED.body"
)
#: A customer's parts to derive again (:func:`services.metrics.derive.part_of`); None: all of them.
Scope = dict[str, set[str] | None]


def _rollup_line(tenant: str, key: tuple[Any, ...], s: Stats) -> str:
    """One rollup delta row in COPY's text format: the key, the counters, the squares, the histogram."""
    grouping, bucket, channel, queue, agent, reason, source = key
    values = _ZERO_STATS.copy()
    hist: list[int] | None = None
    for slot, x in s.values.items():
        if slot < HIST_SLOT:
            values[slot] = str(x)
        else:
            if hist is None:
                hist = [0] * HIST_BUCKETS
            hist[slot - HIST_SLOT] = int(x)
    return "\t".join(
        (
            tenant,
            str(grouping),
            bucket.isoformat(),
            str(channel),
            queue.translate(db.COPY_ESCAPES),
            agent.translate(db.COPY_ESCAPES),
            reason.translate(db.COPY_ESCAPES),
            source.translate(db.COPY_ESCAPES),
            *values,
            "{" + ",".join(map(str, hist)) + "}" if hist else "{}",
        )
    )


_FACT_LINE_ORDER = [
    "key",
    "kind",
    "event_id",
    "profile_id",
    "at",
    "channel",
    "source",
    "interaction_id",
    "queue",
    "agent",
    "reason",
    "case_id",
    "case_status",
    "started_at",
    "talk",
    "hold",
    "acw",
    "wait",
    "transferred",
    "abandoned",
    "leg_id",
    "survey_type",
    "score",
    "author",
    "compound",
    "ended_at",
    "team",
]
if [f.name for f in fields(Fact)] != _FACT_LINE_ORDER:  # pragma: no cover - caught at import by every test
    raise RuntimeError("_fact_line writes the columns in another order than Fact declares them")


def _fact_line(tenant: str, f: Fact) -> str:
    """One fact in COPY's text format, in :class:`Fact`'s field order (a test reads them back)."""
    e = db.COPY_ESCAPES
    started = f.started_at.isoformat() if f.started_at is not None else db.COPY_NULL
    score = db.COPY_NULL if f.score is None else str(f.score)
    ended = f.ended_at.isoformat() if f.ended_at is not None else db.COPY_NULL
    return (
        f"{tenant}\t{f.key.translate(e)}\t{f.kind}\t{f.event_id.translate(e)}\t{f.profile_id.translate(e)}\t"
        f"{f.at.isoformat()}\t{f.channel}\t{f.source.translate(e)}\t{f.interaction_id.translate(e)}\t"
        f"{f.queue.translate(e)}\t{f.agent.translate(e)}\t{f.reason.translate(e)}\t{f.case_id.translate(e)}\t"
        f"{f.case_status}\t{started}\t{f.talk!r}\t{f.hold!r}\t{f.acw!r}\t{f.wait!r}\t"
        f"{'t' if f.transferred else 'f'}\t{'t' if f.abandoned else 'f'}\t{f.leg_id.translate(e)}\t"
        f"{f.survey_type}\t{score}\t{f.author}\t{f.compound!r}\t{ended}\t{f.team.translate(e)}\n"
    )


def mask(dims: tuple[int, str, str, str, str], grouping: int) -> tuple[int, str, str, str, str]:
    return (
        dims[0] if grouping & 1 else 0,
        dims[1] if grouping & 2 else "",
        dims[2] if grouping & 4 else "",
        dims[3] if grouping & 8 else "",
        dims[4] if grouping & 16 else "",
    )


@dataclass
class Applied:
    written: int = 0
    unchanged: int = 0
    dropped: int = 0
    profiles: int = 0


def lock_customers(cur: Any, tenant_id: str, profiles: Iterable[str]) -> None:
    """Serialize work on these customers across consumers and replicas (in one order: no deadlock)."""
    keys = sorted({f"{tenant_id}:{p}" for p in profiles})
    if keys:
        cur.execute(
            "SELECT pg_advisory_xact_lock(k) FROM (SELECT hashtextextended(x, 7) AS k FROM unnest(%s::text[]) x "
            "ORDER BY 1) s",
            (keys,),
        )


def first_time(cur: Any, tenant_id: str, key: str) -> bool:
    """Record that the change ``key`` is applied (in the caller's transaction); False if it was already."""
    cur.execute(
        "INSERT INTO metrics.applied_changes (tenant_id, change_key) VALUES (%s, %s) "
        "ON CONFLICT DO NOTHING RETURNING 1",
        (tenant_id, key),
    )
    return cur.fetchone() is not None


def lock_with_survivors(cur: Any, tenant_id: str, profiles: Sequence[str]) -> dict[str, str]:
    """Lock the customers and whom they were merged into, then return their aliases (merged-away
    id -> survivor) as they stand under the lock. Trusting aliases read without it would let a
    merge commit between the read and the write, leaving the write under the merged-away id,
    where no later merge would move it."""
    alias = _aliases(cur, tenant_id, profiles)
    locked = set(profiles) | set(alias.values())
    lock_customers(cur, tenant_id, locked)
    alias = _aliases(cur, tenant_id, profiles)
    if not set(alias.values()) <= locked:  # merged again meanwhile: lock the new survivors too
        lock_customers(cur, tenant_id, set(alias.values()))
    return alias


def lock_final_survivor(cur: Any, tenant_id: str, survivor: str, absorbed: str) -> str:
    """Whom ``absorbed`` really joins: ``survivor``, or whom ``survivor`` was itself merged into
    since (locked too). Replicas apply a chain of merges in any order; taking the survivor at
    its word would leave a later-delivered earlier merge's data under a merged-away id."""
    target, seen = survivor, {survivor, absorbed}
    while True:
        nxt = _aliases(cur, tenant_id, [target]).get(target)
        if nxt is None or nxt in seen:
            return target
        lock_customers(cur, tenant_id, (nxt,))
        seen.add(nxt)
        target = nxt


def with_survivors(cur: Any, tenant_id: str, profiles: Iterable[str]) -> set[str]:
    """The customers and whom they were merged into (no locks: for reads whose writes a later
    merge re-examines anyway)."""
    named = sorted(set(profiles))
    return set(named) | set(_aliases(cur, tenant_id, named).values())


def _aliases(cur: Any, tenant_id: str, profiles: Sequence[str]) -> dict[str, str]:
    """Merged-away customer id -> survivor, for those of ``profiles`` that were merged."""
    cur.execute(
        "SELECT profile_id, survivor FROM metrics.aliases WHERE tenant_id = %s AND profile_id = ANY(%s)",
        (tenant_id, list(profiles)),
    )
    return dict(cur.fetchall())


class MetricsStore:
    def __init__(self, engine: Engine, reader: Engine | None = None) -> None:
        self.engine = engine
        self.reader = reader or engine

    # -- settings ------------------------------------------------------------------------------

    def config(self, tenant_id: str) -> MetricsConfig:
        with db.raw_transaction(self.reader, "metrics.config") as (cur, _):
            cur.execute("SELECT spec FROM metrics.settings WHERE tenant_id = %s", (tenant_id,))
            row = cur.fetchone()
        return MetricsConfig.from_json(row[0]) if row else MetricsConfig()

    def save_config(self, tenant_id: str, config: MetricsConfig) -> None:
        """Store the settings; when the derivation changes, rebuild the tenant's rollups."""
        with db.raw_transaction(self.engine, "metrics.save_config") as (cur, _):
            cur.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 8))", (tenant_id,))
            cur.execute("SELECT spec FROM metrics.settings WHERE tenant_id = %s FOR UPDATE", (tenant_id,))
            row = cur.fetchone()
            old = MetricsConfig.from_json(row[0]) if row else MetricsConfig()
            cur.execute(
                "INSERT INTO metrics.settings (tenant_id, spec) VALUES (%s, %s) ON CONFLICT (tenant_id) "
                "DO UPDATE SET spec = EXCLUDED.spec, updated_at = now()",
                (tenant_id, json.dumps(config.to_json())),
            )
            if old.derivation_changed(config):
                self._rebuild(cur, tenant_id, config)

    def _rebuild(self, cur: Any, tenant_id: str, config: MetricsConfig) -> None:
        """Derive every customer again and rebuild the rollups from the sums. Erased customers'
        anonymous contributions are kept as they were derived."""
        cur.execute("SELECT DISTINCT profile_id FROM metrics.facts WHERE tenant_id = %s", (tenant_id,))
        profiles = [r[0] for r in cur.fetchall()]
        lock_customers(cur, tenant_id, profiles)
        cur.execute("SELECT body FROM metrics.contributions WHERE tenant_id = %s AND anonymous", (tenant_id,))
        anonymous = [codec.contribution(json.loads(r[0])) for r in cur.fetchall()]
        for table in ("rollup_hour", "rollup_day"):
            cur.execute(f"DELETE FROM metrics.{table} WHERE tenant_id = %s", (tenant_id,))  # noqa: S608
        cur.execute("DELETE FROM metrics.contributions WHERE tenant_id = %s AND NOT anonymous", (tenant_id,))
        cur.execute(
            "DELETE FROM metrics.open_contacts WHERE tenant_id = %s AND profile_id = ANY(%s)", (tenant_id, profiles)
        )
        delta: dict[Key, Stats] = {}
        for contrib in anonymous:
            accumulate(delta, contrib, 1)
        self._apply_rollups(cur, tenant_id, delta, config)
        for i in range(0, len(profiles), 500):
            self._recompute(cur, tenant_id, profiles[i : i + 500], config)

    # -- the consumer's writes -----------------------------------------------------------------

    def apply_facts(self, tenant_id: str, facts: Sequence[Fact], config: MetricsConfig) -> Applied:
        out = Applied()
        newest: dict[str, Fact] = {}
        for f in facts:
            seen = newest.get(f.key)
            if seen is None or f.newer_than(seen):
                newest[f.key] = f
        out.unchanged += len(facts) - len(newest)
        with db.raw_transaction(self.engine, "metrics.apply_facts", len(newest)) as (cur, _):
            profiles = sorted({f.profile_id for f in newest.values()})
            alias = lock_with_survivors(cur, tenant_id, profiles)
            cur.execute(
                "SELECT profile_id FROM metrics.erased WHERE tenant_id = %s AND profile_id = ANY(%s)",
                (tenant_id, sorted({alias.get(p, p) for p in profiles})),
            )
            erased = {r[0] for r in cur.fetchall()}
            cur.execute(
                "SELECT fact_key, profile_id, at, event_id FROM metrics.facts "
                "WHERE tenant_id = %s AND fact_key = ANY(%s)",
                (tenant_id, list(newest)),
            )
            existing = {r[0]: (r[1], r[2], r[3]) for r in cur.fetchall()}
            write: list[Fact] = []
            affected: set[str] = set()
            for f in newest.values():
                owner = alias.get(f.profile_id, f.profile_id)
                if owner in erased:
                    out.dropped += 1
                    continue
                old = existing.get(f.key)
                if old is not None and (f.at, f.event_id) <= (old[1], old[2]):
                    out.unchanged += 1
                    continue
                write.append(f if owner == f.profile_id else f.with_profile(owner))
                affected.add(owner)
                if old is not None:
                    affected.add(old[0])
            if not write:
                return out
            leg_iids = sorted({f.interaction_id for f in write if f.kind == LEG})
            if leg_iids:  # surveys and messages elsewhere that these legs attribute
                cur.execute(
                    "SELECT DISTINCT profile_id FROM metrics.facts WHERE tenant_id = %s AND interaction_id = ANY(%s) "
                    "AND interaction_id <> '' AND kind <> 1",
                    (tenant_id, leg_iids),
                )
                affected.update(r[0] for r in cur.fetchall())
            lock_customers(cur, tenant_id, affected)
            tenant = db.copy_value(tenant_id)
            rows = "".join(_fact_line(tenant, f) for f in sorted(write, key=lambda f: f.key))
            db.copy_merge(cur, "metrics.facts", rows, _MERGE_FACTS)
            out.written = len(write)
            out.profiles = len(affected)
            touched: dict[str, set[str]] = {}
            for f in write:
                part = part_of(f)
                touched.setdefault(f.profile_id, set()).add(part)
                old = existing.get(f.key)
                if old is not None and old[0] != f.profile_id:  # the fact moved: out of its old part
                    touched.setdefault(old[0], set()).add(part)
            self._rederive(
                cur,
                tenant_id,
                dict(touched),
                config,
                affected,
                iids=leg_iids,
                surveys=[f for f in write if f.kind == SURVEY],
            )
        return out

    def apply_merge(self, tenant_id: str, survivor: str, absorbed: str, config: MetricsConfig, key: str = "") -> None:
        """``absorbed``'s facts become ``survivor``'s; a change ``key`` already applied changes nothing."""
        with db.raw_transaction(self.engine, "metrics.apply_merge") as (cur, _):
            lock_customers(cur, tenant_id, (survivor, absorbed))
            if key and not first_time(cur, tenant_id, key):
                return
            target = lock_final_survivor(cur, tenant_id, survivor, absorbed)
            cur.execute(
                "INSERT INTO metrics.aliases (tenant_id, profile_id, survivor) VALUES (%s, %s, %s) "
                "ON CONFLICT (tenant_id, profile_id) DO UPDATE SET survivor = EXCLUDED.survivor",
                (tenant_id, absorbed, target),
            )
            cur.execute(
                "UPDATE metrics.aliases SET survivor = %s WHERE tenant_id = %s AND survivor = %s",
                (target, tenant_id, absorbed),
            )
            cur.execute(
                "UPDATE metrics.facts SET profile_id = %s WHERE tenant_id = %s AND profile_id = %s",
                (target, tenant_id, absorbed),
            )
            self._recompute(cur, tenant_id, sorted({absorbed, survivor, target}), config)

    def apply_split(
        self,
        tenant_id: str,
        profile_id: str,
        new_profile_id: str,
        moved_event_ids: Sequence[str],
        config: MetricsConfig,
        key: str = "",
    ) -> None:
        """The moved events' facts become ``new_profile_id``'s; a change ``key`` already applied changes nothing."""
        with db.raw_transaction(self.engine, "metrics.apply_split") as (cur, _):
            lock_customers(cur, tenant_id, (profile_id, new_profile_id))
            if key and not first_time(cur, tenant_id, key):
                return
            # Either side may have been merged on since (a later change another replica applied first).
            source = lock_final_survivor(cur, tenant_id, profile_id, new_profile_id)
            target = lock_final_survivor(cur, tenant_id, new_profile_id, profile_id)
            cur.execute(
                "UPDATE metrics.facts SET profile_id = %s WHERE tenant_id = %s AND profile_id = %s "
                "AND event_id = ANY(%s)",
                (target, tenant_id, source, list(moved_event_ids)),
            )
            self._recompute(cur, tenant_id, sorted({profile_id, new_profile_id, source, target}), config)

    def erase(self, tenant_id: str, profile_ids: Sequence[str]) -> int:
        """Forget the customers' facts; their contributions stay in the rollups as anonymous counts
        (and their open FCR contacts under a random id), so aggregates do not jump."""
        ids = sorted(set(profile_ids))
        with db.raw_transaction(self.engine, "metrics.erase") as (cur, _):
            lock_customers(cur, tenant_id, ids)
            cur.execute("DELETE FROM metrics.facts WHERE tenant_id = %s AND profile_id = ANY(%s)", (tenant_id, ids))
            erased = int(cur.rowcount)
            cur.execute(
                "UPDATE metrics.contributions SET profile_id = gen_random_uuid()::text, anonymous = true "
                "WHERE tenant_id = %s AND profile_id = ANY(%s)",
                (tenant_id, ids),
            )
            cur.execute(
                "UPDATE metrics.open_contacts SET profile_id = gen_random_uuid()::text, interaction_id = '' "
                "WHERE tenant_id = %s AND profile_id = ANY(%s)",
                (tenant_id, ids),
            )
            cur.execute(
                "DELETE FROM metrics.aliases WHERE tenant_id = %s AND (profile_id = ANY(%s) OR survivor = ANY(%s))",
                (tenant_id, ids, ids),
            )
            execute_values(
                cur,
                "INSERT INTO metrics.erased (tenant_id, profile_id) VALUES %s ON CONFLICT DO NOTHING",
                [(tenant_id, p) for p in ids],
            )
        return erased

    def _recompute(self, cur: Any, tenant_id: str, profiles: Sequence[str], config: MetricsConfig) -> None:
        """Derive the customers again in full (a merge, a split, a rebuild)."""
        self._rederive(cur, tenant_id, dict.fromkeys(profiles), config, profiles)

    def _rederive(
        self,
        cur: Any,
        tenant_id: str,
        scope: Scope,
        config: MetricsConfig,
        locked: Collection[str],
        iids: Iterable[str] = (),
        surveys: Iterable[Fact] = (),
    ) -> None:
        """Derive the parts in ``scope`` again and add their difference from the stored parts to
        the rollups. ``locked``: the customers the caller holds the locks of. ``iids``: interactions
        whose legs changed, so every survey and conversation naming them (anyone's) is attributed
        again; ``surveys``: surveys just written whose parts the scope names (found by their key,
        attributed by their interaction's legs)."""
        full = sorted(p for p, parts in scope.items() if parts is None)
        legs_of = sorted(p for p, parts in scope.items() if parts is not None and CONTACTS in parts)
        named = set(iids)
        for parts in scope.values():
            for part in parts or ():
                if part.startswith(CONVERSATION):
                    named.add(part.removeprefix(CONVERSATION))
        keys = sorted({f.key for f in surveys})
        named.update(f.interaction_id for f in surveys)
        named.discard("")
        cur.execute(
            FACT_SELECT + "WHERE tenant_id = %(t)s AND (profile_id = ANY(%(full)s) "
            "OR (profile_id = ANY(%(legs)s) AND kind = 1) OR (interaction_id = ANY(%(iids)s) AND interaction_id <> '') "
            "OR fact_key = ANY(%(keys)s))",
            {"t": tenant_id, "full": full, "legs": legs_of, "iids": sorted(named), "keys": keys},
        )
        facts: dict[str, list[Fact]] = {}
        attributed: list[Fact] = []  # every leg of the interactions in ``named``
        for row in cur.fetchall():
            f = Fact(*row)
            facts.setdefault(f.profile_id, []).append(f)
            if f.kind == LEG and f.interaction_id in named:
                attributed.append(f)
        changed = set(iids)
        for p, fs in facts.items():  # whoever names an interaction whose legs changed is attributed again
            if p in scope and scope[p] is None:
                continue
            extra = {part_of(f) for f in fs if f.kind != LEG and f.interaction_id in changed}
            if extra:
                scope[p] = (scope.get(p) or set()) | extra
        unlocked = [p for p in scope if p not in locked]
        if unlocked:  # named the interaction after the caller looked (in another consumer's commit)
            lock_customers(cur, tenant_id, unlocked)
        # Full customers' surveys and messages on interactions with none of their legs and
        # outside ``named`` (whose legs are all here already): those interactions' legs, whoever's.
        others = attributions(attributed)
        others.update(self._others(cur, tenant_id, {p: facts.get(p, []) for p in full}, known=named))

        partial = sorted(p for p, parts in scope.items() if parts is not None)
        # Every part of these customers, by one index lookup each (a join on the wanted (customer,
        # part) pairs was planned as a scan of the tenant's parts), decoding only those wanted.
        cur.execute(
            "SELECT profile_id, part, body FROM metrics.contributions WHERE tenant_id = %s AND NOT anonymous "
            "AND profile_id = ANY(%s)",
            (tenant_id, sorted(scope)),
        )
        stored: dict[str, dict[str, dict[Key, Stats]]] = {}
        for p, part, body in cur.fetchall():
            wanted = scope.get(p)
            if wanted is None or part == "" or part in wanted:
                stored.setdefault(p, {})[part] = codec.contribution(json.loads(body))
        legacy = [p for p in partial if "" in stored.get(p, {})]
        if legacy:  # a whole contribution stored before parts: derive that customer in full
            for p in legacy:
                scope.pop(p)
            self._rederive(cur, tenant_id, dict.fromkeys(legacy), config, legacy)

        delta: dict[Key, Stats] = {}
        keep: list[str] = []
        gone: list[tuple[str, str]] = []
        open_rows: list[tuple[Any, ...]] = []
        reopened: list[str] = []
        now = dt.datetime.now(dt.UTC)
        window = dt.timedelta(days=config.fcr_window_days)
        tz = config.tz
        tenant = db.copy_value(tenant_id)
        e = db.COPY_ESCAPES
        for p, parts in scope.items():
            derived = derive(facts.get(p, []), others, config, parts)
            old_parts = stored.get(p, {})
            for part in derived.parts.keys() | old_parts.keys():
                new, had = derived.parts.get(part, {}), part in old_parts
                if not _difference(delta, old_parts.get(part, {}), new) and had:
                    continue
                if new:
                    body = json.dumps(codec.contribution_body(new), separators=(",", ":"))
                    keep.append(f"{tenant}\t{p.translate(e)}\t{part.translate(e)}\t{body.translate(e)}\n")
                elif had:
                    gone.append((p, part))
            if parts is None or CONTACTS in parts:
                reopened.append(p)
                for c in derived.unrepeated:
                    if c.start + window > now:
                        hour = hour_of(c.start, tz)
                        open_rows.append((tenant_id, p, c.interaction_id, c.start, hour, day_of(hour, tz), *c.dims[:4]))
        if keep:
            db.copy_merge(cur, "metrics.contributions", "".join(sorted(keep)), _MERGE_CONTRIBUTIONS, _CONTRIBUTIONS)
        if gone:
            cur.execute(
                "DELETE FROM metrics.contributions WHERE tenant_id = %s AND NOT anonymous AND profile_id = ANY(%s) "
                "AND (profile_id, part) IN (SELECT * FROM unnest(%s::text[], %s::text[]))",
                (tenant_id, sorted({p for p, _ in gone}), [p for p, _ in gone], [k for _, k in gone]),
            )
        if reopened:
            cur.execute(
                "DELETE FROM metrics.open_contacts WHERE tenant_id = %s AND profile_id = ANY(%s)",
                (tenant_id, reopened),
            )
        if open_rows:
            execute_values(
                cur,
                "INSERT INTO metrics.open_contacts (tenant_id, profile_id, interaction_id, started_at, hour, day, "
                "channel, queue, agent, reason) VALUES %s",
                open_rows,
                page_size=1000,
            )
        self._apply_rollups(cur, tenant_id, delta, config)

    def _apply_rollups(self, cur: Any, tenant_id: str, delta: dict[Key, Stats], config: MetricsConfig) -> None:
        tz = config.tz
        tenant = db.copy_value(tenant_id)
        hours: dict[tuple[Any, ...], Stats] = {}
        days: dict[tuple[Any, ...], Stats] = {}
        day_cache: dict[dt.datetime, dt.date] = {}
        for (hour, *dims), s in delta.items():
            if s.is_zero():
                continue
            day = day_cache.get(hour)
            if day is None:
                day = day_cache[hour] = day_of(hour, tz)
            for table, bucket, groupings in ((hours, hour, HOUR_GROUPINGS), (days, day, DAY_GROUPINGS)):
                for g in groupings:
                    key = (g, bucket, *mask(tuple(dims), g))  # type: ignore[arg-type]
                    found = table.get(key)
                    if found is None:
                        table[key] = s.copy()
                    else:
                        found.merge(s)
        for name, table in (("rollup_hour", hours), ("rollup_day", days)):
            lines = [_rollup_line(tenant, key, s) for key, s in table.items() if not s.is_zero()]
            if lines:
                db.copy_merge(cur, f"metrics.{name}", "\n".join(lines) + "\n", _MERGE[name])

    @staticmethod
    def _facts(cur: Any, tenant_id: str, profiles: Sequence[str]) -> dict[str, list[Fact]]:
        cur.execute(FACT_SELECT + "WHERE tenant_id = %s AND profile_id = ANY(%s)", (tenant_id, list(profiles)))
        out: dict[str, list[Fact]] = {}
        for row in cur.fetchall():
            out.setdefault(row[3], []).append(Fact(*row))
        return out

    @staticmethod
    def _others(
        cur: Any, tenant_id: str, facts: dict[str, list[Fact]], known: Collection[str] = ()
    ) -> dict[str, Attribution]:
        """The interactions the surveys and messages name whose legs are not their customer's own
        (all of the interaction's legs, whoever's they are), but for those in ``known``."""
        missing: set[str] = set()
        for fs in facts.values():
            own = {f.interaction_id for f in fs if f.kind == LEG}
            missing.update(f.interaction_id for f in fs if f.kind != LEG and f.interaction_id not in own)
        missing.discard("")
        named = sorted(missing.difference(known))
        if not named:
            return {}
        cur.execute(FACT_SELECT + "WHERE tenant_id = %s AND interaction_id = ANY(%s) AND kind = 1", (tenant_id, named))
        return attributions(Fact(*r) for r in cur.fetchall())

    # -- reads -----------------------------------------------------------------------------------

    def survivor(self, tenant_id: str, profile_id: str) -> str | None:
        """The profile's survivor (itself when not merged away), or None when it was erased."""
        with db.raw_transaction(self.reader, "metrics.survivor") as (cur, _):
            cur.execute(
                "SELECT (SELECT survivor FROM metrics.aliases WHERE tenant_id = %(t)s AND profile_id = %(p)s), "
                "EXISTS (SELECT 1 FROM metrics.erased WHERE tenant_id = %(t)s AND profile_id = %(p)s)",
                {"t": tenant_id, "p": profile_id},
            )
            survivor, erased = cur.fetchone()
        if erased:
            return None
        return survivor or profile_id

    def customer(self, tenant_id: str, profile_id: str) -> tuple[list[Fact], dict[str, Attribution]]:
        with db.raw_transaction(self.reader, "metrics.customer") as (cur, _):
            facts = self._facts(cur, tenant_id, [profile_id])
            return facts.get(profile_id, []), self._others(cur, tenant_id, facts)

    def rollups(self, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        """A query the read side built over the rollup tables (its parameters bound)."""
        with db.raw_transaction(self.reader, "metrics.query") as (cur, _):
            cur.execute(sql, params)
            return list(cur.fetchall())

    def derived_total(self, tenant_id: str) -> dict[Key, Stats]:
        """Every customer's stored contribution summed (what the rollups must equal)."""
        with db.raw_transaction(self.reader, "metrics.contributions") as (cur, _):
            cur.execute("SELECT body FROM metrics.contributions WHERE tenant_id = %s", (tenant_id,))
            out: dict[Key, Stats] = {}
            for (body,) in cur.fetchall():
                accumulate(out, codec.contribution(json.loads(body)), 1)
        return out

    def all_facts(self, tenant_id: str) -> dict[str, list[Fact]]:
        with db.raw_transaction(self.reader, "metrics.all_facts") as (cur, _):
            cur.execute("SELECT DISTINCT profile_id FROM metrics.facts WHERE tenant_id = %s", (tenant_id,))
            return self._facts(cur, tenant_id, [r[0] for r in cur.fetchall()])

    def upkeep(self, longest_window_days: int = 90) -> int:
        """Drop open contacts whose window closed under any setting, and the keys of changes applied
        more than 30 days ago (no redelivery comes that late: streams are trimmed sooner)."""
        with db.raw_transaction(self.engine, "metrics.upkeep") as (cur, _):
            cur.execute("DELETE FROM metrics.applied_changes WHERE applied_at < now() - interval '30 days'")
            cur.execute(
                "DELETE FROM metrics.open_contacts WHERE started_at < now() - make_interval(days => %s)",
                (longest_window_days,),
            )
            return int(cur.rowcount)


def _difference(into: dict[Key, Stats], old: dict[Key, Stats], new: dict[Key, Stats]) -> bool:
    """Add ``new - old`` to ``into``, key by key, skipping the keys that did not change (most of a
    customer's, when one event arrives); whether anything changed."""
    changed = False
    for key in old.keys() | new.keys():
        before, after = old.get(key), new.get(key)
        if before == after:
            continue
        changed = True
        found = into.get(key)
        if found is None:
            found = into[key] = Stats.zero()
        if after is not None:
            found.merge(after)
        if before is not None:
            found.merge(before, -1)
    return changed


__all__ = ["ALL_DIMS", "Applied", "Derived", "MetricsStore", "mask"]
