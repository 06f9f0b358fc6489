"""Deterministic stitching on an in-memory identity graph. Pure: no I/O.

The storage layer loads the part of the graph a batch can touch (under locks, so nobody else
changes it meanwhile), this module decides what every event does to it, and storage writes back
what changed. Keeping the decisions here means the rules (who survives a merge, what merge
protection drops, when a limit is broken) are unit-tested without a database, and every replica
decides the same way.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.core.identity_rules import IdentityRules

#: An identifier as identity keeps it: (type, normalized value).
Key = tuple[str, str]

MERGE_PROTECTION = "MERGE_PROTECTION"


@dataclass(slots=True)
class Profile:
    """An active profile in the working set. ``created`` (epoch microseconds, exact: a float would
    let two profiles of one batch round to the same instant) orders survivors."""

    profile_id: str
    created: int
    keys: set[Key] = field(default_factory=set)
    new: bool = False


@dataclass(frozen=True, slots=True)
class MergeFact:
    """One profile absorbed into another, and the event identifiers that joined them."""

    survivor: str
    absorbed: str
    keys: tuple[Key, ...]
    event_id: str = ""


@dataclass(frozen=True)
class MergeRecord:
    """A merge fact as it is recorded: why (kind, rule, reason) and, when scored, the evidence."""

    fact: MergeFact
    kind: int
    rule: str
    reason: str = ""
    score: float = 0.0
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Dropped:
    key: Key
    reason: str


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one event did: the profile it belongs to (at the time), and every change it caused."""

    event_id: str
    profile_id: str
    created: bool
    linked: tuple[Key, ...]  # identifiers the event is attributed by
    attached: tuple[Key, ...]  # identifiers new to the graph, now on profile_id
    merges: tuple[MergeFact, ...]
    dropped: tuple[Dropped, ...]


class LimitBroken(Exception):
    """A change would give a profile more values of a type than the rules allow."""

    def __init__(self, type_name: str, limit: int, count: int) -> None:
        super().__init__(
            f"identifier type {type_name!r} allows {limit} value(s) per profile; the result would hold {count}"
        )
        self.type_name = type_name
        self.limit = limit
        self.count = count


class Graph:
    """The locked working set: which profile owns each identifier, and those profiles' identifiers.

    It records what it changes (``dirty_keys``, ``absorbed``, new profiles) so storage writes back
    only that.
    """

    def __init__(self, rules: IdentityRules, profiles: Iterable[Profile] = ()) -> None:
        self.rules = rules
        self.profiles: dict[str, Profile] = {}
        self.owner: dict[Key, str] = {}
        for p in profiles:
            self.add_profile(p)
        self.dirty_keys: set[Key] = set()
        #: Every profile created here, in order, including ones absorbed again before the end.
        self.created: list[Profile] = []
        #: absorbed profile id -> its survivor (followed transitively by :meth:`final`).
        self.absorbed: dict[str, str] = {}

    def add_profile(self, profile: Profile) -> None:
        self.profiles[profile.profile_id] = profile
        for k in profile.keys:
            self.owner[k] = profile.profile_id

    def final(self, profile_id: str) -> str:
        """Where a profile id points after every merge made in this working set."""
        while profile_id in self.absorbed:
            profile_id = self.absorbed[profile_id]
        return profile_id

    def new_profiles(self) -> list[Profile]:
        """Profiles created in this working set, absorbed or not: all of them must be stored,
        since events and merge facts name them."""
        return list(self.created)

    # ------------------------------------------------------------------------------------------
    # Limits.

    def _priority(self, key: Key) -> tuple[int, str, str]:
        t = self.rules.types.get(key[0])
        return (-(t.priority if t else 0), key[0], key[1])

    def _broken(
        self, profile_ids: Iterable[str], extra: Iterable[Key], exempt: frozenset[str] = frozenset()
    ) -> LimitBroken | None:
        """The first type whose count in the union would exceed its limit.

        A profile already over a limit (the limit was lowered later) is not broken further by an
        event that adds no value of that type: the bar is the larger of the limit and the count
        one profile already holds.
        """
        counts: dict[str, int] = {}
        most: dict[str, int] = {}
        seen: set[Key] = set()
        for pid in profile_ids:
            per: dict[str, int] = {}
            for k in self.profiles[pid].keys:
                per[k[0]] = per.get(k[0], 0) + 1
                seen.add(k)
            for t, n in per.items():
                counts[t] = counts.get(t, 0) + n
                most[t] = max(most.get(t, 0), n)
        for k in extra:
            if k not in seen:
                seen.add(k)
                counts[k[0]] = counts.get(k[0], 0) + 1
        for t in sorted(counts, key=lambda name: self._priority((name, ""))):
            if t in exempt:
                continue
            rule = self.rules.types.get(t)
            limit = rule.max_per_profile if rule else 0
            if counts[t] > max(limit, most.get(t, 0)):
                return LimitBroken(t, limit, counts[t])
        return None

    # ------------------------------------------------------------------------------------------
    # Events.

    def resolve(self, event_id: str, keys: Sequence[Key], new_profile_id: Callable[[], str], now: float) -> Outcome:
        """Attach, create or merge for one event's (normalized, allowed) identifiers.

        Merge protection: while the union would break a limit, the lowest-priority identifier
        (ties by type, then new before known, then value) is dropped from the event and the rest
        tried again. One
        identifier alone never breaks a limit, so at least one always links.
        """
        if not keys:
            raise ValueError("an event needs at least one identifier to resolve")
        # Within one type, values new to the graph are dropped before values that already link.
        candidate = sorted(set(keys), key=lambda k: (*self._priority(k)[:2], k not in self.owner, k[1]))
        dropped: list[Dropped] = []
        while True:
            owners = sorted({self.owner[k] for k in candidate if k in self.owner})
            new = [k for k in candidate if k not in self.owner]
            broken = self._broken(owners, new) if len(candidate) > 1 else None
            if broken is None:
                break
            lowest = candidate.pop()
            dropped.append(Dropped(lowest, f"{MERGE_PROTECTION}: {broken}"))
        created = not owners
        if created:
            survivor = self._create(new_profile_id(), now).profile_id
        else:
            survivor = min(owners, key=lambda pid: (self.profiles[pid].created, pid))
        merges = []
        for other in owners:
            if other == survivor:
                continue
            evidence = tuple(k for k in candidate if self.owner.get(k) in (survivor, other))
            merges.append(self._absorb(survivor, other, evidence, event_id))
        for k in new:
            self._attach(survivor, k)
        return Outcome(event_id, survivor, created, tuple(candidate), tuple(new), tuple(merges), tuple(dropped))

    # ------------------------------------------------------------------------------------------
    # Manual changes.

    def merge(
        self, survivor: str, absorbed: str, event_id: str = "", exempt: frozenset[str] = frozenset()
    ) -> MergeFact:
        """A requested merge; raises :class:`LimitBroken` instead of dropping anything. The limits
        of the ``exempt`` types do not hold it back."""
        if survivor == absorbed:
            raise ValueError("a profile cannot be merged into itself")
        broken = self._broken((survivor, absorbed), (), exempt)
        if broken is not None:
            raise broken
        return self._absorb(survivor, absorbed, (), event_id)

    def split(self, profile_id: str, keys: Iterable[Key], new_profile_id: str, now: float) -> Profile:
        """Move ``keys`` off ``profile_id`` into a new profile; they must belong to it and not be all of it."""
        source = self.profiles[profile_id]
        moving = set(keys)
        if not moving:
            raise ValueError("name at least one identifier to split off")
        if not moving <= source.keys:
            raise ValueError("every identifier to split off must belong to the profile")
        if moving == source.keys:
            raise ValueError("a split must leave at least one identifier on the profile")
        target = self._create(new_profile_id, now)
        for k in sorted(moving):
            source.keys.discard(k)
            self._attach(target.profile_id, k)
        return target

    # ------------------------------------------------------------------------------------------

    def _create(self, profile_id: str, now: float) -> Profile:
        # Profiles created in one working set get increasing microseconds, so "oldest survives"
        # follows the order of the events that created them.
        profile = Profile(profile_id, int(now * 1_000_000) + len(self.created), set(), new=True)
        self.profiles[profile_id] = profile
        self.created.append(profile)
        return profile

    def _attach(self, profile_id: str, key: Key) -> None:
        self.profiles[profile_id].keys.add(key)
        self.owner[key] = profile_id
        self.dirty_keys.add(key)

    def _absorb(self, survivor: str, absorbed: str, evidence: tuple[Key, ...], event_id: str) -> MergeFact:
        gone = self.profiles.pop(absorbed)
        for k in gone.keys:
            self._attach(survivor, k)
        self.absorbed[absorbed] = survivor
        return MergeFact(survivor, absorbed, evidence, event_id)


def components(events: Iterable[Sequence[Key]]) -> list[frozenset[Key]]:
    """Connected components of the identifier graph (identifiers joined when one event carries them).

    The reference the concurrency property checks against: with no limits in play, the final
    partition of identifiers must equal these, whatever the order and number of workers.
    """
    parent: dict[Key, Key] = {}

    def find(k: Key) -> Key:
        parent.setdefault(k, k)
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for event_keys in events:
        keys = list(event_keys)
        for k in keys:
            find(k)
        for a, b in itertools.pairwise(keys):
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    groups: dict[Key, set[Key]] = {}
    for k in parent:
        groups.setdefault(find(k), set()).add(k)
    return sorted((frozenset(g) for g in groups.values()), key=min)


def partition(owner: Mapping[Key, str]) -> list[frozenset[Key]]:
    """Identifiers grouped by the profile that owns them, in the order :func:`components` uses."""
    groups: dict[str, set[Key]] = {}
    for k, pid in owner.items():
        groups.setdefault(pid, set()).add(k)
    return sorted((frozenset(g) for g in groups.values()), key=min)
