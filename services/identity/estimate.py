"""Re-estimating a tenant's Fellegi-Sunter weights from its own records, without labels.

The frozen constants in :mod:`services.identity.matching` were estimated on FEBRL4; a tenant's
people differ (common names, shared household phones, how carefully its channels key data). This
module is the one label-free procedure, used both by ``tessera identity estimate TENANT`` on a
tenant's stored match records and by the FEBRL benchmark that produced the constants
(``bench.identity_accuracy_offline --estimate``). It is the Splink recipe, plus one correction a
small data set needs (see :func:`estimate`). Pure: no I/O; deterministic for a given seed.

:func:`effect` says what a change of weights would do before it takes effect: over the tenant's
blocked candidate pairs, how many auto-merge, go to review or do not match under each.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Final

from services.identity.matching import (
    M_U,
    MISSING,
    PRIOR_MATCH,
    MatchRecord,
    blocking_keys,
    compare,
    comparison_levels,
    level_name,
)
from services.identity.weights import Weights

#: The frozen FEBRL4 estimate, as the matcher uses it when a tenant has no active weights.
DEFAULT_WEIGHTS: Final = Weights(M_U, PRIOR_MATCH)

#: Below this many records a tenant's level frequencies are noise.
MIN_RECORDS: Final = 50
#: Below this many blocked candidate pairs EM has nothing to learn m from.
MIN_CANDIDATE_PAIRS: Final = 20
#: EM must find at least this many matches (sum of posteriors) among the candidate pairs, else its
#: "m" describes nothing in particular.
MIN_MATCHES: Final = 5.0
#: A field seen in fewer random or candidate pairs than this keeps its previous m and u.
MIN_FIELD_PAIRS: Final = 20

DEFAULT_SEED: Final = 20240601
DEFAULT_RANDOM_PAIRS: Final = 400_000

_FIELD_NAMES: Final = tuple(f.name for f in fields(MatchRecord))


class EstimationError(ValueError):
    """The records cannot support an estimate (too few records, pairs or matches)."""


@dataclass(frozen=True)
class Estimate:
    """Estimated weights and what they were estimated from. ``kept`` are the fields with too little
    data, whose m and u are the previous weights' (``fallback``); ``matches`` is EM's expected
    number of true matches among the candidate pairs; ``warnings`` name fields whose exact agreement
    came out as weaker evidence than disagreement, which a person should look at before applying;
    ``unseen`` the levels (``field: level``) no pair landed on, which keep the previous weight."""

    weights: Weights
    records: int
    candidate_pairs: int
    random_pairs: int
    matches: float
    kept: tuple[str, ...]
    warnings: tuple[str, ...]
    unseen: tuple[str, ...] = ()


def candidate_pairs(records: Sequence[MatchRecord]) -> list[tuple[int, int]]:
    """Every pair of records (by index, smaller first) that shares a blocking key, once, sorted:
    the pairs the matcher would ever compare."""
    index: dict[str, list[int]] = defaultdict(list)
    for i, rec in enumerate(records):
        for key in blocking_keys(rec):
            index[key].append(i)
    return sorted({(a, b) for ids in index.values() for x, a in enumerate(ids) for b in ids[x + 1 :]})


def _vector(a: MatchRecord, b: MatchRecord) -> tuple[int, ...]:
    levels = comparison_levels(a, b)
    return tuple(levels[name] for name in _FIELD_NAMES)


def _random_pairs(n: int, wanted: int, rng: random.Random) -> Iterable[tuple[int, int]]:
    """Uniformly random distinct pairs; every pair exactly once when there are no more than ``wanted``."""
    if n * (n - 1) // 2 <= wanted:
        return itertools.combinations(range(n), 2)
    return (tuple(rng.sample(range(n), 2)) for _ in range(wanted))  # type: ignore[misc]


def estimate(
    records: Sequence[MatchRecord],
    *,
    seed: int = DEFAULT_SEED,
    random_pairs: int = DEFAULT_RANDOM_PAIRS,
    rounds: int = 3,
    iterations: int = 100,
    fallback: Weights = DEFAULT_WEIGHTS,
    pairs: Sequence[tuple[int, int]] | None = None,
) -> Estimate:
    """Fellegi-Sunter m/u probabilities and the prior from ``records``, without labels:

    1. u (level frequencies among non-matches) from uniformly random record pairs (all pairs when
       there are no more than ``random_pairs``).
    2. Candidate pairs: every pair of records sharing a blocking key.
    3. m by expectation-maximisation over the candidate pairs with u held fixed and conditional
       independence between fields; a missing field is left out of both steps. EM also estimates
       the share of matches among candidate pairs, which is only a means to that end.
    4. Random pairs are not quite all non-matches: with 10,000 records about 1 in 10,000 is a
       match, as often as strangers share a national id. So the matches EM found (sum of
       posteriors) give the match rate among random pairs, their expected level counts (rate x m)
       are taken out of the u counts, and steps 3-4 repeat ``rounds`` times.
    5. The prior returned is that match rate among random pairs (Splink's "probability two random
       records match"), not the share among candidate pairs: a score is a property of two records
       and must not change when the blocking keys do.

    Add-one smoothing keeps every probability positive and :class:`Weights` clamps them away from
    0 and 1, so no level is ever an absolute veto. Fields with too little data (fewer than
    ``MIN_FIELD_PAIRS`` random or candidate pairs where both sides have it, such as phone on
    FEBRL) keep ``fallback``'s values. Raises :class:`EstimationError` when the records cannot
    support an estimate. Deterministic for a given ``seed`` and order of ``records``. ``pairs``:
    the records' ``candidate_pairs`` when the caller has them already.
    """
    n = len(records)
    if n < MIN_RECORDS:
        raise EstimationError(f"too few match records to estimate weights: {n}, at least {MIN_RECORDS} needed")
    rng = random.Random(seed)
    n_levels = [len(fallback.m_u[name]) for name in _FIELD_NAMES]

    raw_u = [[0.0] * k for k in n_levels]
    sampled = 0
    for i, j in _random_pairs(n, random_pairs, rng):
        sampled += 1
        for k, lvl in enumerate(_vector(records[i], records[j])):
            if lvl != MISSING:
                raw_u[k][lvl] += 1.0

    pairs = candidate_pairs(records) if pairs is None else pairs
    if len(pairs) < MIN_CANDIDATE_PAIRS:
        raise EstimationError(
            f"too few candidate pairs to estimate weights: {len(pairs)} pairs of records share a blocking key, "
            f"at least {MIN_CANDIDATE_PAIRS} needed"
        )
    patterns = sorted(Counter(_vector(records[i], records[j]) for i, j in pairs).items())
    present = [sum(c for v, c in patterns if v[k] != MISSING) for k in range(len(_FIELD_NAMES))]
    learned = [present[k] >= MIN_FIELD_PAIRS and sum(raw_u[k]) >= MIN_FIELD_PAIRS for k in range(len(_FIELD_NAMES))]
    total = float(len(pairs))
    all_pairs = n * (n - 1) / 2

    m = [
        [(k - i) / (k * (k + 1) / 2) for i in range(k)] if learned[f] else [p for p, _ in fallback.m_u[name]]
        for f, (k, name) in enumerate(zip(n_levels, _FIELD_NAMES, strict=True))
    ]
    prior, random_match_rate, matches = 0.1, 0.0, 0.0
    u: list[list[float]] = []
    sums = [[0.0] * k for k in n_levels]
    for _ in range(rounds):
        u = []
        for k, counts in enumerate(raw_u):
            if not learned[k]:
                u.append([q for _, q in fallback.m_u[_FIELD_NAMES[k]]])
                continue
            seen = sum(counts)
            nonmatch = [max(c - random_match_rate * seen * mk, 0.0) + 1.0 for c, mk in zip(counts, m[k], strict=True)]
            u.append([x / sum(nonmatch) for x in nonmatch])
        for _ in range(iterations):
            log_m = [[math.log(x) for x in row] for row in m]
            log_u = [[math.log(x) for x in row] for row in u]
            base = math.log(prior / (1 - prior))
            sums = [[0.0] * k for k in n_levels]
            matches = 0.0
            for vector, count in patterns:
                log_odds = base
                for k, lvl in enumerate(vector):
                    if lvl != MISSING:
                        log_odds += log_m[k][lvl] - log_u[k][lvl]
                p = 1.0 / (1.0 + math.exp(-min(max(log_odds, -700.0), 700.0)))
                matches += p * count
                for k, lvl in enumerate(vector):
                    if lvl != MISSING:
                        sums[k][lvl] += p * count
            m = [[(x + 1.0) / (sum(row) + len(row)) for x in row] if learned[k] else m[k] for k, row in enumerate(sums)]
            prior = min(max(matches / total, 1e-9), 1 - 1e-9)
        random_match_rate = matches / all_pairs

    if matches < MIN_MATCHES:
        raise EstimationError(
            f"the records hold too few likely matches to estimate weights: about {matches:.1f} among "
            f"{len(pairs)} candidate pairs, at least {MIN_MATCHES:.0f} needed"
        )
    # A level no pair landed on (no likely match, no random pair) has only smoothing behind its m and
    # u, whose ratio is then the ratio of the two sample sizes: evidence made of nothing. It keeps
    # the previous weight instead (u is set to give it; the amounts involved are tiny).
    unseen: list[str] = []
    m_u: dict[str, tuple[tuple[float, float], ...]] = {}
    for k, name in enumerate(_FIELD_NAMES):
        if not learned[k]:
            m_u[name] = fallback.m_u[name]
            continue
        levels = []
        for lvl, (mk, uk) in enumerate(zip(m[k], u[k], strict=True)):
            if sums[k][lvl] < 0.5 and raw_u[k][lvl] == 0:
                fm, fu = fallback.m_u[name][lvl]
                unseen.append(f"{name}: {level_name(name, lvl)}")
                levels.append((float(mk), float(mk * fu / fm)))
            else:
                levels.append((float(mk), float(uk)))
        m_u[name] = tuple(levels)
    weights = Weights(m_u, random_match_rate)
    warnings = tuple(
        f"{name}: exact agreement weighs {weights.bits[name][0]:+.1f} bits, less than disagreement "
        f"({weights.bits[name][-1]:+.1f})"
        for k, name in enumerate(_FIELD_NAMES)
        if learned[k] and weights.bits[name][0] <= weights.bits[name][-1]
    )
    kept = tuple(name for k, name in enumerate(_FIELD_NAMES) if not learned[k])
    return Estimate(weights, n, len(pairs), sampled, matches, kept, warnings, tuple(unseen))


# --------------------------------------------------------------------------------------------------
# What a change of weights would do
# --------------------------------------------------------------------------------------------------

MERGE: Final = "merge"
REVIEW: Final = "review"
NO_MATCH: Final = "no match"


@dataclass(frozen=True)
class Outcomes:
    merge: int = 0
    review: int = 0
    no_match: int = 0


@dataclass(frozen=True)
class Effect:
    """Decisions over the candidate pairs under the old and the new weights. ``lost_merges``: pairs
    that auto-merge today and would not under the new weights; ``new_merges`` the other way."""

    pairs: int
    old: Outcomes
    new: Outcomes
    lost_merges: int
    new_merges: int


def decision(a: MatchRecord, b: MatchRecord, weights: Weights, auto_merge: float, review: float) -> str:
    """What the matcher would do with one pair under ``weights`` (no term-frequency adjustment): a
    strong conflict holds back an auto-merge, as in ``matching.decide``."""
    m = compare(a, b, None, weights)
    if m.probability >= auto_merge and not m.conflicts:
        return MERGE
    return REVIEW if m.probability >= review else NO_MATCH


def effect(
    records: Sequence[MatchRecord],
    old: Weights,
    new: Weights,
    auto_merge: float,
    review: float,
    pairs: Sequence[tuple[int, int]] | None = None,
) -> Effect:
    """Each candidate pair (``candidate_pairs`` unless given) decided under ``old`` and ``new``."""
    pairs = candidate_pairs(records) if pairs is None else pairs
    tally: dict[str, Counter[str]] = {"old": Counter(), "new": Counter()}
    lost = gained = 0
    for i, j in pairs:
        before = decision(records[i], records[j], old, auto_merge, review)
        after = decision(records[i], records[j], new, auto_merge, review)
        tally["old"][before] += 1
        tally["new"][after] += 1
        lost += before == MERGE and after != MERGE
        gained += before != MERGE and after == MERGE
    out = {k: Outcomes(c[MERGE], c[REVIEW], c[NO_MATCH]) for k, c in tally.items()}
    return Effect(len(pairs), out["old"], out["new"], lost, gained)


@dataclass(frozen=True)
class WeightChange:
    """One row of the diff: a field's level (or the prior, field "prior") in bits, old and new."""

    field: str
    level: str
    old_bits: float
    new_bits: float


def weight_changes(old: Weights, new: Weights) -> list[WeightChange]:
    """The prior, then every field's levels best first: ``log2(m / u)`` under each."""
    rows = [WeightChange("prior", "log-odds", old.prior_bits, new.prior_bits)]
    for name in _FIELD_NAMES:
        for lvl, (before, after) in enumerate(zip(old.bits[name], new.bits[name], strict=True)):
            rows.append(WeightChange(name, level_name(name, lvl), before, after))
    return rows
