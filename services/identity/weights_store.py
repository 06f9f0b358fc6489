"""A tenant's stored match weights (``identity.match_weights``: one row per state, proposed and
active) and the match records they are estimated from. Every statement names the tenant."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Engine

from services.core import db
from services.core.errors import FailedPrecondition
from services.identity.estimate import DEFAULT_WEIGHTS
from services.identity.matching import MatchRecord
from services.identity.weights import ACTIVE, PROPOSED, Weights


@dataclass(frozen=True)
class StoredWeights:
    weights: Weights
    summary: dict[str, Any]
    updated_at: dt.datetime


class NothingProposed(FailedPrecondition):
    """``apply`` found no proposed weights for the tenant."""


def _stored(row: tuple[Any, ...]) -> StoredWeights:
    weights, summary, updated = row
    return StoredWeights(Weights.from_json(weights, DEFAULT_WEIGHTS), dict(summary or {}), updated)


class WeightsStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def records(self, tenant_id: str) -> list[MatchRecord]:
        """The tenant's match records, each distinct record of a profile once (repeated Identify
        calls with the same traits are one observation of a person, not many), ordered by content,
        so an estimate with a given seed depends on what the records say, not on their ids."""
        with db.raw_transaction(self.engine, "SELECT identity.match_records") as (cur, _):
            cur.execute(
                "SELECT record FROM identity.match_records WHERE tenant_id = %s "
                "GROUP BY profile_id, record ORDER BY record::text",
                (tenant_id,),
            )
            rows = cur.fetchall()
        return [MatchRecord.from_json(record) for (record,) in rows]

    def load(self, tenant_id: str) -> dict[str, StoredWeights]:
        """State (``proposed``, ``active``) -> the stored weights; absent states are left out."""
        with db.raw_transaction(self.engine, "SELECT identity.match_weights") as (cur, _):
            cur.execute(
                "SELECT state, weights, summary, updated_at FROM identity.match_weights WHERE tenant_id = %s",
                (tenant_id,),
            )
            rows = cur.fetchall()
        return {str(row[0]): _stored(row[1:]) for row in rows}

    def active(self, tenant_id: str) -> Weights | None:
        """The weights the matcher uses for the tenant; ``None``: the frozen defaults."""
        with db.raw_transaction(self.engine, "SELECT identity.match_weights") as (cur, _):
            cur.execute(
                "SELECT weights FROM identity.match_weights WHERE tenant_id = %s AND state = %s",
                (tenant_id, ACTIVE),
            )
            row = cur.fetchone()
        return None if row is None else Weights.from_json(row[0], DEFAULT_WEIGHTS)

    def propose(self, tenant_id: str, weights: Weights, summary: dict[str, Any]) -> dt.datetime:
        """Store ``weights`` as the tenant's proposed weights (replacing an earlier proposal)."""
        with db.raw_transaction(self.engine, "UPSERT identity.match_weights") as (cur, _):
            cur.execute(
                "INSERT INTO identity.match_weights (tenant_id, state, weights, summary, updated_at) "
                "VALUES (%s, %s, %s, %s, now()) ON CONFLICT (tenant_id, state) DO UPDATE SET "
                "weights = EXCLUDED.weights, summary = EXCLUDED.summary, updated_at = EXCLUDED.updated_at "
                "RETURNING updated_at",
                (tenant_id, PROPOSED, json.dumps(weights.to_json()), json.dumps(summary)),
            )
            updated: dt.datetime = cur.fetchone()[0]
        return updated

    def apply(self, tenant_id: str) -> StoredWeights:
        """Make the proposed weights active, in one transaction; the proposal is used up. Raises
        :class:`NothingProposed` when there is none."""
        with db.raw_transaction(self.engine, "APPLY identity.match_weights") as (cur, _):
            cur.execute(
                "DELETE FROM identity.match_weights WHERE tenant_id = %s AND state = %s "
                "RETURNING weights, summary, updated_at",
                (tenant_id, PROPOSED),
            )
            row = cur.fetchone()
            if row is None:
                raise NothingProposed(
                    f"tenant {tenant_id!r} has no proposed weights: run `tessera identity estimate {tenant_id}` first",
                    type_="WEIGHTS_PROPOSED",
                    subject=tenant_id,
                )
            cur.execute(
                "INSERT INTO identity.match_weights (tenant_id, state, weights, summary, updated_at) "
                "VALUES (%s, %s, %s, %s, now()) ON CONFLICT (tenant_id, state) DO UPDATE SET "
                "weights = EXCLUDED.weights, summary = EXCLUDED.summary, updated_at = EXCLUDED.updated_at",
                (tenant_id, ACTIVE, json.dumps(row[0]), json.dumps(row[1])),
            )
        return _stored(row)
