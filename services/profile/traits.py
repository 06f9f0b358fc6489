"""Trait values by policy: which of a trait's observations is its current value. Pure, no I/O.

Every observation of a trait (from an Identify event or an ``UpdateTraits`` call) is kept, summarized
per (value, source): how often it was seen, when first and last (by event time, never arrival),
and by which event last. A trait's current value is a function of those summaries and its policy,
so events may arrive late, out of order or twice (the consumer records each event once) and the
result is the same; and a merge is the union of two profiles' summaries.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tessera.v1 import profile_pb2

LATEST = profile_pb2.TRAIT_POLICY_LATEST
FIRST = profile_pb2.TRAIT_POLICY_FIRST
MOST_FREQUENT = profile_pb2.TRAIT_POLICY_MOST_FREQUENT
SOURCE_PRIORITY = profile_pb2.TRAIT_POLICY_SOURCE_PRIORITY
POLICIES = (LATEST, FIRST, MOST_FREQUENT, SOURCE_PRIORITY)

MAX_TRAIT_KEY = 128
MAX_TRAITS_PER_EVENT = 200


def plain(value: Any) -> Any:
    """A JSON value as traits keep it: whole floats (every number from a protobuf Struct is a
    double) become ints, so ``30`` shows as 30 and equals 30 sent as text by another source."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def canonical(value: Any) -> str:
    """The JSON text two equal values share (key order and float spelling normalized)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def value_hash(value: Any) -> str:
    """A fixed-size key for a value, so summaries are keyed without storing big values twice."""
    return hashlib.blake2b(canonical(value).encode(), digest_size=12).hexdigest()


@dataclass(frozen=True)
class Observation:
    """One value of one trait, as an event or an update said it."""

    key: str
    value: Any  # a JSON value, never None (a removal is not an observation)
    source: str
    event_id: str
    at: dt.datetime


@dataclass(frozen=True)
class Summary:
    """All observations of one (trait, value, source): the unit a policy chooses from."""

    key: str
    value: Any
    source: str
    count: int
    first_at: dt.datetime
    last_at: dt.datetime
    # The event of the latest observation (ties on time broken by event id, so order never matters).
    last_event_id: str
    first_event_id: str


@dataclass(frozen=True)
class Chosen:
    key: str
    value: Any
    source: str
    event_id: str
    at: dt.datetime
    policy: int
    observations: int


def summarize(observations: Iterable[Observation]) -> list[Summary]:
    """Summaries of a set of observations (what the storage keeps, computed in memory)."""
    acc: dict[tuple[str, str, str], Summary] = {}
    for o in observations:
        k = (o.key, value_hash(o.value), o.source)
        acc[k] = combine(acc.get(k), summary_of(o))  # type: ignore[arg-type]
    return list(acc.values())


def summary_of(o: Observation) -> Summary:
    return Summary(o.key, o.value, o.source, 1, o.at, o.at, o.event_id, o.event_id)


def combine(a: Summary | None, b: Summary) -> Summary:
    """Two summaries of the same (trait, value, source) as one (also how a merge joins profiles)."""
    if a is None:
        return b
    first = min((a.first_at, a.first_event_id), (b.first_at, b.first_event_id))
    last = max((a.last_at, a.last_event_id), (b.last_at, b.last_event_id))
    return Summary(a.key, a.value, a.source, a.count + b.count, first[0], last[0], last[1], first[1])


def choose(summaries: Sequence[Summary], policy: int, source_rank: Mapping[str, int] | None = None) -> Chosen | None:
    """The current value of one trait from its summaries; None when it has none (or was removed)."""
    if not summaries:
        return None
    ranks = source_rank or {}
    worst = len(ranks)

    def latest(s: Summary) -> tuple[dt.datetime, str]:
        return (s.last_at, s.last_event_id)

    if policy == FIRST:
        best = min(summaries, key=lambda s: (s.first_at, s.first_event_id))
        chosen = Chosen(best.key, best.value, best.source, best.first_event_id, best.first_at, policy, 0)
    elif policy == MOST_FREQUENT:
        counts: dict[str, int] = {}
        newest: dict[str, Summary] = {}
        for s in summaries:
            h = value_hash(s.value)
            counts[h] = counts.get(h, 0) + s.count
            if h not in newest or latest(s) > latest(newest[h]):
                newest[h] = s
        h = max(counts, key=lambda v: (counts[v], latest(newest[v])))
        best = newest[h]
        chosen = Chosen(best.key, best.value, best.source, best.last_event_id, best.last_at, policy, counts[h])
    elif policy == SOURCE_PRIORITY:
        # The most trusted source present, then the latest of its summaries (as LATEST orders them).
        top = min(ranks.get(s.source, worst) for s in summaries)
        best = max((s for s in summaries if ranks.get(s.source, worst) == top), key=latest)
        chosen = Chosen(best.key, best.value, best.source, best.last_event_id, best.last_at, policy, 0)
    else:
        best = max(summaries, key=latest)
        chosen = Chosen(best.key, best.value, best.source, best.last_event_id, best.last_at, LATEST, 0)
    if chosen.observations == 0:
        chosen = Chosen(
            chosen.key,
            chosen.value,
            chosen.source,
            chosen.event_id,
            chosen.at,
            chosen.policy,
            sum(s.count for s in summaries),
        )
    return chosen


def policy_of(key: str, policies: Mapping[str, int], default: int) -> int:
    return policies.get(key, default or LATEST)


def observations_of(traits: Mapping[str, Any], source: str, event_id: str, at: dt.datetime) -> list[Observation]:
    """An Identify event's traits as observations (nested values are kept whole; a null value
    says nothing, so it is not one)."""
    return [Observation(str(k), plain(v), source, event_id, at) for k, v in traits.items() if v is not None]


def search_text(value: Any) -> str:
    """What SearchProfiles compares: strings lower-cased, anything else as canonical JSON."""
    text = value if isinstance(value, str) else canonical(value)
    return text.lower()[:512]
