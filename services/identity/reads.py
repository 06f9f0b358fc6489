"""Typed reads of the identity graph, for the servicer: named, frozen views instead of storage rows.

The servicer reads through :class:`IdentityReads` and writes through the
:class:`~services.identity.resolver.Resolver`; it never sees storage or its tuples. An empty
``message_id`` means the event carried none, or was recorded before identity kept message ids.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from services.identity.stitching import Key
from services.identity.storage import IdentityStore


@dataclass(frozen=True, slots=True)
class Owner:
    """Who holds an identifier now, where its merge path starts, and the event that brought it."""

    profile_id: str
    origin_profile_id: str
    first_event_id: str
    first_message_id: str


@dataclass(frozen=True, slots=True)
class IdentifierView:
    type: str
    value: str
    first_seen: dt.datetime
    last_seen: dt.datetime
    source: str
    first_event_id: str
    first_message_id: str
    origin_profile_id: str


@dataclass(frozen=True, slots=True)
class MergeView:
    """A recorded merge or split (see ``tessera.v1.Merge``)."""

    merge_id: int
    kind: int
    survivor_profile_id: str
    absorbed_profile_id: str
    identifiers: tuple[Key, ...]
    event_id: str
    message_id: str
    rule: str
    reason: str
    created_at: dt.datetime
    score: float
    evidence: dict[str, float]
    scored: ScoreView | None = None


@dataclass(frozen=True, slots=True)
class FieldView:
    """One field's part in a probabilistic score (see ``tessera.v1.FieldEvidence``)."""

    field: str
    level: str
    weight_bits: float
    tf_adjustment_bits: float
    counted: bool


@dataclass(frozen=True, slots=True)
class ScoreView:
    """The evidence stored with a scored merge or suggestion: each field, the prior and the total
    in bits, and why it was held back from an auto-merge ("" when it was not)."""

    fields: tuple[FieldView, ...]
    prior_bits: float
    total_bits: float
    held_back: str
    raw: dict[str, Any]


@dataclass(frozen=True, slots=True)
class SuggestionView:
    """A probable match for review (see ``tessera.v1.MatchSuggestion``)."""

    suggestion_id: int
    profile_a: str
    profile_b: str
    score: float
    evidence: dict[str, float]
    state: int
    created_at: dt.datetime
    scored: ScoreView | None = None


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _evidence(value: Any) -> tuple[dict[str, float], ScoreView | None]:
    """Evidence as stored: {"fields": {field: {level, bits, tf_bits, counted}}, "prior_bits",
    "total_bits", "conflicts", "held_back"}, or (older facts) {field: bits}. Returns the
    field -> bits map and, for the newer form, the full view."""
    data = _json(value) or {}
    if not isinstance(data.get("fields"), dict):
        return {str(k): float(v) for k, v in data.items() if isinstance(v, int | float)}, None
    fields = tuple(
        FieldView(
            str(name),
            str(f.get("level", "")),
            float(f.get("bits", 0.0)),
            float(f.get("tf_bits", 0.0)),
            bool(f.get("counted", True)),
        )
        for name, f in data["fields"].items()
    )
    view = ScoreView(
        fields,
        float(data.get("prior_bits", 0.0)),
        float(data.get("total_bits", 0.0)),
        str(data.get("held_back", "")),
        dict(data),
    )
    return {f.field: f.weight_bits for f in fields}, view


def merge_view(row: Sequence[Any]) -> MergeView:
    """A merge row as :class:`IdentityStore` selects it."""
    merge_id, kind, survivor, absorbed, idents, event_id, rule, reason, created_at, score, evidence, message_id = row
    contributions, scored = _evidence(evidence)
    return MergeView(
        merge_id=int(merge_id),
        kind=int(kind),
        survivor_profile_id=survivor,
        absorbed_profile_id=absorbed,
        identifiers=tuple((str(t), str(v)) for t, v in _json(idents) or ()),
        event_id=event_id,
        message_id=message_id,
        rule=rule,
        reason=reason,
        created_at=created_at,
        score=float(score),
        evidence=contributions,
        scored=scored,
    )


def suggestion_view(row: Sequence[Any]) -> SuggestionView:
    """A suggestion row as :class:`IdentityStore` selects (or updates and returns) it."""
    suggestion_id, a, b, score, evidence, state, created_at = row
    contributions, scored = _evidence(evidence)
    return SuggestionView(int(suggestion_id), a, b, float(score), contributions, int(state), created_at, scored)


class IdentityReads:
    """The identity graph's read queries, each scoped by tenant, answering with views."""

    def __init__(self, store: IdentityStore) -> None:
        self._store = store

    def survivor(self, tenant_id: str, profile_id: str) -> str | None:
        """The active profile a (possibly merged-away) id resolves to; None if the tenant has no such id."""
        return self._store.survivor(tenant_id, profile_id)

    def owners(self, tenant_id: str, keys: Sequence[Key]) -> dict[Key, Owner]:
        """The known identifiers among ``keys``, each with its owner."""
        return {k: Owner(*row) for k, row in self._store.identifier_rows(tenant_id, keys).items()}

    def identifiers(self, tenant_id: str, profile_id: str) -> list[IdentifierView]:
        """A profile's identifiers, by type and value."""
        return [
            IdentifierView(t, v, first, last, source, event_id, message_id, origin)
            for t, v, first, last, source, event_id, origin, message_id in self._store.identifiers(
                tenant_id, profile_id
            )
        ]

    def merges(
        self,
        tenant_id: str,
        *,
        profile_ids: Sequence[str] | None = None,
        limit: int = 1000,
        before: int | None = None,
    ) -> list[MergeView]:
        """Merge facts newest first, ids below ``before``; with ``profile_ids``, those touching them
        (or any profile ever merged into them)."""
        rows = self._store.merges(tenant_id, profile_ids=profile_ids, limit=limit, before=before)
        return [merge_view(r) for r in rows]

    def merge(self, tenant_id: str, merge_id: int) -> MergeView:
        """One merge fact, just recorded (so it exists)."""
        (view,) = self.merges(tenant_id, limit=1, before=merge_id + 1)
        return view

    def merge_path(self, tenant_id: str, start: str) -> list[MergeView]:
        """The merges that carried profile ``start`` into its final survivor, in order."""
        return [merge_view(r) for r in self._store.merge_path(tenant_id, start)]

    def suggestions(
        self, tenant_id: str, state: int, limit: int, after: tuple[float, int] | None = None
    ) -> list[SuggestionView]:
        """Suggestions in ``state``, highest score first, after the (score, id) a previous page ended on."""
        return [suggestion_view(r) for r in self._store.suggestions(tenant_id, state, limit, after)]
