"""Erasure requests in the profile schema: creating one (profile's own part is done in the same
transaction), claiming the next due step with a lease, recording progress.

A request keeps the person's identifiers only until ingest has them on its suppression list, and
their event ids only until ingest has purged them and the streams are scrubbed; what remains is
the request itself (profile ids, types, counts, the reason) as the audit trail.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from dataclasses import dataclass
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from services.core import db
from services.profile.storage import ACTIVE, ERASED, FEED_ERASED, ORPHANS, ProfileStore, suppression_hash

RUNNING: Final = 1
DONE: Final = 2
#: The steps after profile's own, in order. Each is idempotent.
STEPS: Final = ("suppress", "settle", "drain", "identity", "metrics", "purge", "streams")
SERVICE_OF: Final = {
    "profile": "profile",
    "suppress": "ingest",
    "settle": "ingest",
    "drain": "identity",
    "identity": "identity",
    "metrics": "metrics",
    "purge": "ingest",
    "streams": "streams",
}


@dataclass
class Request:
    tenant_id: str
    request_id: str
    profile_id: str
    member_ids: list[str]
    identifiers: list[tuple[str, str]]
    state: int
    steps: list[dict[str, Any]]
    reason: str
    marks: dict[str, Any]
    attempts: int
    created_at: dt.datetime
    done_at: dt.datetime | None

    def next_step(self) -> dict[str, Any] | None:
        return next((s for s in self.steps if not s["done"]), None)

    @property
    def types(self) -> list[str]:
        return sorted({t for t, _ in self.identifiers}) or list(self.marks.get("types", []))


def _row(r: Any) -> Request:
    return Request(
        tenant_id=r.tenant_id,
        request_id=str(r.request_id),
        profile_id=str(r.profile_id),
        member_ids=[str(x) for x in r.member_ids],
        identifiers=[(t, v) for t, v in r.identifiers],
        state=int(r.state),
        steps=list(r.steps),
        reason=r.reason,
        marks=dict(r.marks),
        attempts=int(r.attempts),
        created_at=r.created_at,
        done_at=r.done_at,
    )


_COLUMNS = (
    "tenant_id, request_id, profile_id, member_ids, identifiers, state, steps, reason, marks, attempts, "
    "created_at, done_at"
)

#: How many of the most overdue requests a claim considers: as many workers as this can claim at
#: once without one finding only requests that others hold.
_CLAIM_CANDIDATES: Final = 16
# The most overdue running request nobody holds. The due index leads with tenant_id, so the
# candidates come tenant by tenant (only tenants with running requests are visited), then one is
# locked; the conditions are stated again so a row another worker leased meanwhile is passed over.
_MOST_OVERDUE = (
    f"SELECT {_COLUMNS} FROM profile.erasure_requests r WHERE (tenant_id, request_id) IN ("  # noqa: S608 - constants
    "SELECT d.tenant_id, d.request_id FROM tenants t CROSS JOIN LATERAL ("
    "SELECT tenant_id, request_id, next_try_at FROM profile.erasure_requests "
    "WHERE tenant_id = t.tenant_id AND state = 1 AND next_try_at <= now() ORDER BY next_try_at LIMIT :k) d "
    "WHERE t.tenant_id IS NOT NULL ORDER BY d.next_try_at LIMIT :k) "
    "AND state = 1 AND next_try_at <= now() "
    "ORDER BY next_try_at LIMIT 1 FOR UPDATE OF r SKIP LOCKED"
)
_CLAIM = sa.text(db.with_tenants_of("profile.erasure_requests", _MOST_OVERDUE, "state = 1"))


class ErasureStore:
    def __init__(self, engine: Engine, profiles: ProfileStore) -> None:
        self.engine = engine
        self.profiles = profiles

    def create(self, tenant_id: str, profile_id: str, reason: str) -> tuple[Request, list[str], list[tuple[str, str]]]:
        """Start erasing a person, or return the erasure already running for them. Profile's own
        data goes now, in this transaction: from the commit on, every RPC answers NOT_FOUND and
        resolved events carrying their identifiers are dropped. Returns the request, and the
        profile ids and identifiers whose caches must go."""
        with db.raw_transaction(self.engine, "profile erase person") as (cur, _):
            cur.execute(
                f"SELECT {_COLUMNS} FROM profile.erasure_requests WHERE tenant_id = %s AND profile_id "  # noqa: S608
                f"= %s AND state = 1",
                (tenant_id, profile_id),
            )
            existing = cur.fetchone()
            if existing is not None:
                return _row(_Named(cur, existing)), [], []
            locked = self.profiles._lock(cur, tenant_id, [profile_id])
            if locked[profile_id][0] != ACTIVE:
                raise LookupError(profile_id)
            cur.execute(
                "SELECT profile_id::text FROM profile.profiles WHERE tenant_id = %s AND merged_into = %s",
                (tenant_id, profile_id),
            )
            members = sorted({profile_id, *(r[0] for r in cur.fetchall())})
            cur.execute(
                "SELECT id_type, id_value FROM profile.identifiers WHERE tenant_id = %s AND profile_id = %s "
                "ORDER BY id_type, id_value",
                (tenant_id, profile_id),
            )
            identifiers = [(t, v) for t, v in cur.fetchall()]
            request_id = str(uuid.uuid4())
            steps = [{"step": "profile", "done": True, "detail": ""}] + [
                {"step": s, "done": False, "detail": "waiting"} for s in STEPS
            ]
            cur.execute(
                "INSERT INTO profile.erasure_events (tenant_id, request_id, event_id) "
                "SELECT tenant_id, %s, event_id FROM profile.timeline WHERE tenant_id = %s AND profile_id = %s "
                "ON CONFLICT DO NOTHING",
                (request_id, tenant_id, profile_id),
            )
            events = cur.rowcount
            cur.execute(
                "SELECT count(*) FROM profile.interactions WHERE tenant_id = %s AND profile_id = %s",
                (tenant_id, profile_id),
            )
            interactions = cur.fetchone()[0]
            steps[0]["detail"] = (
                f"profile data removed: {events} timeline events, {len(identifiers)} identifiers, "
                f"{interactions} interactions, {len(members)} profile ids"
            )
            out = db.Statements(cur)
            hashes = [suppression_hash(tenant_id, t, v) for t, v in identifiers]
            if hashes:
                out.add(
                    "INSERT INTO profile.suppressions (tenant_id, id_hash, request_id) "
                    "SELECT %s, h, %s FROM unnest(%s::bytea[]) AS h ON CONFLICT DO NOTHING",
                    (tenant_id, request_id, hashes),
                )
            self.profiles._clear(out, tenant_id, members, derived_only=False, keep_profile=True)
            out.add(
                "DELETE FROM profile.identifiers WHERE tenant_id = %s AND profile_id = ANY(%s::uuid[])",
                (tenant_id, members),
            )
            out.add(
                "UPDATE profile.profiles SET state = 2, merged_into = NULL, event_count = 0, first_seen = NULL, "
                "last_seen = NULL WHERE tenant_id = %s AND profile_id = ANY(%s::uuid[])",
                (tenant_id, members),
            )
            out.add(
                "INSERT INTO profile.erasure_requests (tenant_id, request_id, profile_id, member_ids, identifiers, "
                "normalizers, steps, reason, marks) VALUES (%s, %s, %s, %s::uuid[], %s::jsonb, '{}', "
                "%s::jsonb, %s, %s::jsonb)",
                (
                    tenant_id,
                    request_id,
                    profile_id,
                    members,
                    json.dumps(identifiers),
                    json.dumps(steps),
                    reason,
                    json.dumps({"types": sorted({t for t, _ in identifiers}), "identifiers": len(identifiers)}),
                ),
            )
            self.profiles._feed(out, tenant_id, [(FEED_ERASED, profile_id, None, ())])
            out.run()
            self.profiles.holding(tenant_id, members, identifiers)
            cur.execute(
                f"SELECT {_COLUMNS} FROM profile.erasure_requests WHERE tenant_id = %s AND request_id = %s",  # noqa: S608
                (tenant_id, request_id),
            )
            created = _row(_Named(cur, cur.fetchone()))
        return created, members, identifiers

    def get(self, tenant_id: str, request_id: str) -> Request | None:
        with self.engine.connect() as conn:
            r = conn.execute(
                sa.text(f"SELECT {_COLUMNS} FROM profile.erasure_requests WHERE tenant_id = :t AND request_id = :r"),  # noqa: S608
                {"t": tenant_id, "r": request_id},
            ).first()
        return _row(r) if r else None

    def running(self, tenant_id: str, *, profile_id: str = "", id_hash: bytes = b"") -> Request | None:
        """The running request that erases ``profile_id`` (the survivor or a member), or one of
        the identifiers whose suppression hash is ``id_hash``."""
        with self.engine.connect() as conn:
            r = conn.execute(
                sa.text(
                    f"SELECT {_COLUMNS} FROM profile.erasure_requests WHERE tenant_id = :t AND state = 1 AND "  # noqa: S608
                    "(CAST(:p AS uuid) = ANY(member_ids) OR request_id IN "
                    "(SELECT request_id FROM profile.suppressions WHERE tenant_id = :t AND id_hash = :h)) LIMIT 1"
                ),
                {"t": tenant_id, "p": profile_id or None, "h": id_hash},
            ).first()
        return _row(r) if r else None

    def claim(self, lease_seconds: float) -> Request | None:
        """The next due running request, leased to this worker for ``lease_seconds`` (another
        replica's worker skips it meanwhile; after a crash the lease runs out and it is taken again)."""
        with db.transaction(self.engine) as conn:
            r = conn.execute(_CLAIM, {"k": _CLAIM_CANDIDATES}).first()
            if r is None:
                return None
            conn.execute(
                sa.text(
                    "UPDATE profile.erasure_requests SET next_try_at = now() + make_interval(secs => :s) "
                    "WHERE tenant_id = :t AND request_id = :r"
                ),
                {"s": lease_seconds, "t": r.tenant_id, "r": r.request_id},
            )
        return _row(r)

    def save(
        self, req: Request, *, delay_seconds: float = 0.0, failed: bool = False, forget_identifiers: bool = False
    ) -> None:
        done = all(s["done"] for s in req.steps)
        with db.transaction(self.engine) as conn:
            conn.execute(
                sa.text(
                    "UPDATE profile.erasure_requests SET steps = CAST(:steps AS jsonb), marks = CAST(:marks AS jsonb), "
                    "state = :state, attempts = CASE WHEN :failed THEN attempts + 1 ELSE 0 END, "
                    "next_try_at = now() + make_interval(secs => :d), done_at = CASE WHEN :done THEN now() END, "
                    "identifiers = CASE WHEN :forget THEN '[]'::jsonb ELSE identifiers END "
                    "WHERE tenant_id = :t AND request_id = :r"
                ),
                {
                    "steps": json.dumps(req.steps),
                    "marks": json.dumps(req.marks),
                    "state": DONE if done else RUNNING,
                    "failed": failed,
                    "d": delay_seconds,
                    "done": done,
                    "forget": forget_identifiers,
                    "t": req.tenant_id,
                    "r": req.request_id,
                },
            )
        if forget_identifiers:
            req.identifiers = []
        if done:
            req.state = DONE

    def event_ids(self, tenant_id: str, request_id: str, limit: int, *, purged: bool | None = None) -> list[str]:
        """Event ids to purge: the request's and the tenant's orphans."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT event_id FROM profile.erasure_events WHERE tenant_id = :t AND request_id IN (:r, :o) "
                    "ORDER BY event_id LIMIT :n"
                ),
                {"t": tenant_id, "r": request_id, "o": ORPHANS, "n": limit},
            ).all()
        return [r[0] for r in rows]

    def forget_events(self, tenant_id: str, request_id: str, event_ids: list[str]) -> None:
        with db.transaction(self.engine) as conn:
            conn.execute(
                sa.text(
                    "DELETE FROM profile.erasure_events WHERE tenant_id = :t AND request_id IN (:r, :o) "
                    "AND event_id = ANY(:e)"
                ),
                {"t": tenant_id, "r": request_id, "o": ORPHANS, "e": event_ids},
            )


class _Named:
    """A psycopg2 row with attribute access, like SQLAlchemy's."""

    def __init__(self, cur: Any, row: Any) -> None:
        for col, value in zip((d[0] for d in cur.description), row, strict=True):
            setattr(self, col, value)


__all__ = ["DONE", "ERASED", "RUNNING", "SERVICE_OF", "STEPS", "ErasureStore", "Request"]
