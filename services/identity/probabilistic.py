"""Probabilistic matching inside a resolution batch (off by default, per tenant).

After an event is stitched deterministically, its Identify traits are compared with the trait
records of other profiles that share a blocking key: stored ones (loaded and locked with the
working set) and the batch's own. Above the auto-merge threshold the two profiles merge, recorded
with the score and per-field evidence; between the review threshold and it, a suggestion is made
for a person to accept or reject. The scoring itself is :mod:`services.identity.matching`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.identity.matching import (
    DEFAULT_AUTO_MERGE_THRESHOLD,
    DEFAULT_REVIEW_THRESHOLD,
    MatchRecord,
    best_match,
    blocking_keys,
    record_from_traits,
)
from services.identity.stitching import Graph, LimitBroken, MergeRecord
from tessera.v1 import identity_pb2


@dataclass(frozen=True)
class Thresholds:
    auto_merge: float
    review: float

    @classmethod
    def of(cls, settings: Mapping[str, Any]) -> Thresholds:
        auto = float(settings.get("auto_merge_threshold") or 0.0) or DEFAULT_AUTO_MERGE_THRESHOLD
        review = float(settings.get("review_threshold") or 0.0) or min(DEFAULT_REVIEW_THRESHOLD, auto)
        return cls(auto, review)


@dataclass
class BatchMatcher:
    thresholds: Thresholds
    #: This batch's records and their blocking keys, by event id.
    records: dict[str, MatchRecord] = field(default_factory=dict)
    keys: dict[str, list[str]] = field(default_factory=dict)
    #: Every known record (stored or from this batch): event id -> (profile at load, record).
    _known: dict[str, tuple[str, MatchRecord]] = field(default_factory=dict)
    _index: dict[str, list[str]] = field(default_factory=dict)
    suggestions: list[tuple[str, str, float, dict[str, float], str]] = field(default_factory=list)

    @classmethod
    def for_events(cls, thresholds: Thresholds, traits: Iterable[tuple[str, Mapping[str, Any] | None]]) -> BatchMatcher:
        m = cls(thresholds)
        for event_id, t in traits:
            rec = record_from_traits(t) if t else None
            if rec is not None:
                m.records[event_id] = rec
                m.keys[event_id] = blocking_keys(rec)
        return m

    def block_keys(self) -> list[str]:
        return sorted({k for keys in self.keys.values() for k in keys})

    def load(self, rows: Sequence[tuple[str, str, str, Any]]) -> None:
        """Stored candidates: (block key, event id, profile, record JSON)."""
        for key, event_id, profile_id, record in rows:
            if event_id not in self._known:
                self._known[event_id] = (profile_id, MatchRecord.from_json(record))
            self._index.setdefault(key, []).append(event_id)

    def match(self, graph: Graph, event_id: str, profile_id: str) -> MergeRecord | None:
        """Score this event's record against other profiles; merge or suggest. The record then
        joins the index, so later events in the batch can match it."""
        rec = self.records.get(event_id)
        if rec is None:
            return None
        me = graph.final(profile_id)
        candidates: dict[str, list[MatchRecord]] = {}
        seen: set[str] = set()
        for key in self.keys[event_id]:
            for other in self._index.get(key, ()):
                if other in seen:
                    continue
                seen.add(other)
                pid, other_rec = self._known[other]
                final = graph.final(pid)
                if final != me and final in graph.profiles:
                    candidates.setdefault(final, []).append(other_rec)
        merge: MergeRecord | None = None
        best = best_match(rec, candidates) if candidates else None
        if best is not None:
            other_pid, score, evidence = best
            if score >= self.thresholds.auto_merge:
                survivor, absorbed = sorted((me, other_pid), key=lambda p: (graph.profiles[p].created, p))
                try:
                    fact = graph.merge(survivor, absorbed, event_id)
                except LimitBroken:
                    self.suggestions.append((me, other_pid, score, evidence, event_id))
                else:
                    rule = f"probabilistic: score {score:.3f} >= auto-merge threshold {self.thresholds.auto_merge}"
                    merge = MergeRecord(fact, identity_pb2.MERGE_KIND_PROBABILISTIC, rule, "", score, evidence)
            elif score >= self.thresholds.review:
                self.suggestions.append((me, other_pid, score, evidence, event_id))
        self._known[event_id] = (graph.final(me), rec)
        for key in self.keys[event_id]:
            self._index.setdefault(key, []).append(event_id)
        return merge

    def new_records(self, graph: Graph, applied: Iterable[str]) -> list[tuple[str, str, dict[str, str], list[str]]]:
        """Rows to store for the records of the applied events, on their final profiles."""
        return [
            (e, graph.final(self._known[e][0]), self.records[e].to_json(), self.keys[e])
            for e in applied
            if e in self.records and e in self._known
        ]

    def suggestion_rows(self, graph: Graph) -> list[tuple[str, str, float, dict[str, float], str]]:
        """Suggestions between profiles that are still apart at the end of the batch."""
        out = []
        for a, b, score, evidence, event_id in self.suggestions:
            fa, fb = graph.final(a), graph.final(b)
            if fa != fb:
                out.append((fa, fb, score, evidence, event_id))
        return out
