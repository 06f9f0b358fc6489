"""Probabilistic matching inside a resolution batch (off by default, per tenant).

After an event is stitched deterministically, its Identify traits are compared with every trait
record of each other profile that shares a blocking key with it: stored ones (loaded and locked
with the working set, all the records of those profiles) and the batch's own. A profile is scored
as a whole (:func:`~services.identity.matching.compare_profile`), and a merge must be consistent
with every record of both profiles (no strong conflict: birth dates years apart, different national
ids). Above the auto-merge threshold and consistent, the two profiles merge, recorded with the
score and per-field evidence; otherwise, above the review threshold, a suggestion is made for a
person to accept or reject.

The tenant's value frequencies (term-frequency adjustment) come from the batch's one read of the
counts of the values its records carry; the batch counts its own records in memory as it goes and
its increments are written back in one statement (see :meth:`BatchMatcher.count_deltas`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from services.identity.matching import (
    DEFAULT_AUTO_MERGE_THRESHOLD,
    DEFAULT_REVIEW_THRESHOLD,
    REVIEW,
    TF_FIELDS,
    MatchRecord,
    ValueCounts,
    blocking_keys,
    decide,
    record_from_traits,
)
from services.identity.stitching import Graph, LimitBroken, MergeRecord
from services.identity.weights import Weights
from tessera.v1 import identity_pb2

#: Identifier types that name a browser or a device, not a person: their per-profile limits keep
#: deterministic stitching from chaining strangers through one shared cookie, but a person who
#: matched on their own record (and passed every conflict rule) may well have used more browsers
#: than the limit, so these limits do not hold a probabilistic merge back. The person-level types
#: (user_id, email, phone, custom ids) still do.
SESSION_TYPES: Final = frozenset({"anonymous_id", "device_id"})

#: Merges one record may make: its best profile, then fragments of the same person that the joined
#: profile now matches (bounded, so one record never sweeps up a crowd).
MAX_MERGES_PER_RECORD: Final = 4

#: (profile a, profile b, score, evidence JSON, event id)
Suggestion = tuple[str, str, float, dict[str, Any], str]


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
    #: The tenant's value frequencies: the stored counts of this batch's values, plus this batch.
    counts: ValueCounts = field(default_factory=ValueCounts)
    _deltas: dict[tuple[str, str], int] = field(default_factory=dict)
    #: Every known record (stored or from this batch): event id -> (profile when added, record).
    _known: dict[str, tuple[str, MatchRecord]] = field(default_factory=dict)
    #: Block key -> event ids of known records carrying it.
    _index: dict[str, list[str]] = field(default_factory=dict)
    #: Profile -> event ids of its records (keyed by the profile they were added under; see _records_of).
    _by_profile: dict[str, list[str]] = field(default_factory=dict)
    _absorbed_seen: int = 0
    suggestions: list[Suggestion] = field(default_factory=list)
    #: The tenant's active weights, read with its settings once per batch; None: the frozen defaults.
    weights: Weights | None = None

    @classmethod
    def for_events(
        cls,
        thresholds: Thresholds,
        traits: Iterable[tuple[str, Mapping[str, Any] | None]],
        weights: Weights | None = None,
    ) -> BatchMatcher:
        m = cls(thresholds, weights=weights)
        for event_id, t in traits:
            rec = record_from_traits(t) if t else None
            if rec is not None:
                m.records[event_id] = rec
                m.keys[event_id] = blocking_keys(rec)
        return m

    def block_keys(self) -> list[str]:
        return sorted({k for keys in self.keys.values() for k in keys})

    def count_keys(self) -> list[tuple[str, str]]:
        """The (field, value) pairs whose stored counts this batch needs (field totals are ("f", ""))."""
        pairs = {(name, v) for rec in self.records.values() for name in TF_FIELDS if (v := getattr(rec, name))}
        return sorted(pairs | {(name, "") for name in TF_FIELDS})

    def load_counts(self, rows: Iterable[tuple[str, str, int]]) -> None:
        """Stored (field, value, count) rows; value "" is the field's total."""
        for name, value, n in rows:
            if value:
                self.counts.counts[(name, value)] = int(n)
            else:
                self.counts.totals[name] = int(n)

    def load(self, rows: Sequence[tuple[str, str, Any]]) -> None:
        """Stored records: (event id, current profile, record JSON), every record of each profile
        that shares a blocking key with the batch or is part of its working set."""
        for event_id, profile_id, record in rows:
            if event_id in self._known:
                continue
            rec = MatchRecord.from_json(record)
            self._add(event_id, profile_id, rec, blocking_keys(rec))

    def _add(self, event_id: str, profile_id: str, rec: MatchRecord, keys: Sequence[str]) -> None:
        self._known[event_id] = (profile_id, rec)
        self._by_profile.setdefault(profile_id, []).append(event_id)
        for key in keys:
            self._index.setdefault(key, []).append(event_id)

    def _rekey(self, graph: Graph) -> None:
        """Record lists follow merges (deterministic ones happen outside the matcher)."""
        if len(graph.absorbed) == self._absorbed_seen:
            return
        self._absorbed_seen = len(graph.absorbed)
        for pid in list(self._by_profile):
            final = graph.final(pid)
            if final != pid:
                self._by_profile.setdefault(final, []).extend(self._by_profile.pop(pid))

    def _records_of(self, profile_id: str) -> list[MatchRecord]:
        return [self._known[e][1] for e in self._by_profile.get(profile_id, ())]

    def match(self, graph: Graph, event_id: str, profile_id: str) -> list[MergeRecord]:
        """Score this event's record against other profiles as wholes; merge or suggest. After a
        merge the joined profile is matched again, so a record that ties together two fragments of
        one person (an earlier record that could not join) reunites them, each merge checked
        against everything the joined profile holds. The record then joins its profile, so later
        events in the batch can match it."""
        rec = self.records.get(event_id)
        if rec is None:
            return []
        self._rekey(graph)
        for counted in self.counts.add(rec):
            self._deltas[counted] = self._deltas.get(counted, 0) + 1
        merges: list[MergeRecord] = []
        for round_ in range(MAX_MERGES_PER_RECORD):
            merge = self._match_once(graph, event_id, rec, graph.final(profile_id), suggest=round_ == 0)
            self._rekey(graph)
            if merge is None:
                break
            merges.append(merge)
        self._add(event_id, graph.final(profile_id), rec, self.keys[event_id])
        return merges

    def _match_once(
        self, graph: Graph, event_id: str, rec: MatchRecord, me: str, *, suggest: bool
    ) -> MergeRecord | None:
        """One decision for the record's profile ``me``: a merge, or (when ``suggest``: the first
        decision only, so a reunion adds no second suggestion about the same people) a suggestion."""
        candidates: dict[str, list[MatchRecord]] = {}
        for key in self.keys[event_id]:
            for other in self._index.get(key, ()):
                final = graph.final(self._known[other][0])
                if final != me and final in graph.profiles and final not in candidates:
                    candidates[final] = self._records_of(final)
        found = decide(
            rec,
            self._records_of(me),
            candidates,
            self.thresholds.auto_merge,
            self.thresholds.review,
            self.counts,
            self.weights,
        )
        if found is None or found.action is None:
            return None
        other_pid, score, evidence = found.profile_id, found.match.probability, found.match.to_json()
        if found.action == REVIEW:
            if not suggest:
                return None
            if found.conflicts and score >= self.thresholds.auto_merge:
                evidence["held_back"] = "strong conflict: " + "; ".join(found.conflicts)
            self.suggestions.append((me, other_pid, score, evidence, event_id))
            return None
        survivor, absorbed = sorted((me, other_pid), key=lambda p: (graph.profiles[p].created, p))
        try:
            fact = graph.merge(survivor, absorbed, event_id, exempt=SESSION_TYPES)
        except LimitBroken as exc:
            if suggest:
                evidence["held_back"] = f"merge protection: {exc}"
                self.suggestions.append((me, other_pid, score, evidence, event_id))
            return None
        rule = f"probabilistic: score {score:.3f} >= auto-merge threshold {self.thresholds.auto_merge}"
        return MergeRecord(fact, identity_pb2.MERGE_KIND_PROBABILISTIC, rule, "", score, evidence)

    def count_deltas(self) -> list[tuple[str, str, int]]:
        """(field, value, increment) for the records this batch counted, field totals as value ""."""
        totals: dict[str, int] = {}
        for (name, _value), n in self._deltas.items():
            totals[name] = totals.get(name, 0) + n
        rows = [(name, value, n) for (name, value), n in sorted(self._deltas.items())]
        return rows + [(name, "", n) for name, n in sorted(totals.items())]

    def new_records(self, graph: Graph, applied: Iterable[str]) -> list[tuple[str, str, dict[str, str], list[str]]]:
        """Rows to store for the records of the applied events, on their final profiles."""
        return [
            (e, graph.final(self._known[e][0]), self.records[e].to_json(), self.keys[e])
            for e in applied
            if e in self.records and e in self._known
        ]

    def suggestion_rows(self, graph: Graph) -> list[Suggestion]:
        """Suggestions between profiles that are still apart at the end of the batch."""
        out = []
        for a, b, score, evidence, event_id in self.suggestions:
            fa, fb = graph.final(a), graph.final(b)
            if fa != fb:
                out.append((fa, fb, score, evidence, event_id))
        return out
