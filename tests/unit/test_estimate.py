"""The label-free weight estimator (services/identity/estimate.py), the Weights value and the
matcher's optional weights: recovers known m/u from records generated with known error rates,
is deterministic by seed, refuses data that cannot support an estimate, and the weights it returns
change the matcher's decision only where they are passed."""

from __future__ import annotations

import random

import pytest

from services.identity.estimate import (
    DEFAULT_WEIGHTS,
    MIN_RECORDS,
    EstimationError,
    candidate_pairs,
    effect,
    estimate,
    weight_changes,
)
from services.identity.matching import M_U, MERGE, PRIOR_MATCH, MatchRecord, compare, decide
from services.identity.probabilistic import BatchMatcher, Thresholds
from services.identity.weights import EPSILON, Weights
from tests.support.synthetic_people import CITIES, DUPLICATED, ERROR_RATES, synthetic, word


@pytest.fixture(scope="module")
def records() -> list[MatchRecord]:
    return synthetic()


@pytest.fixture(scope="module")
def estimated(records: list[MatchRecord]):  # type: ignore[no-untyped-def]
    return estimate(records, seed=1, random_pairs=30_000)


def test_recovers_known_m_from_known_error_rates(estimated) -> None:  # type: ignore[no-untyped-def]
    m_u = estimated.weights.m_u
    for name, rate in ERROR_RATES.items():
        m_exact, m_typo = m_u[name][0][0], m_u[name][1][0]
        assert m_exact == pytest.approx(1 - rate, abs=0.06), name
        assert m_typo == pytest.approx(rate, abs=0.06), name
    # Copied exactly in every duplicate: nearly all of m on "exact".
    for name in ("date_of_birth", "postcode", "national_id", "city"):
        assert m_u[name][0][0] > 0.95, name
    # EM found the duplicates, no more and no fewer (within a few).
    assert estimated.matches == pytest.approx(DUPLICATED, rel=0.05)


def test_recovers_u_and_the_prior(estimated, records) -> None:  # type: ignore[no-untyped-def]
    m_u = estimated.weights.m_u
    assert m_u["city"][0][1] == pytest.approx(1 / CITIES, abs=0.01)  # chance agreement of one city in 20
    assert m_u["state"][0][1] == pytest.approx(1 / 4, abs=0.03)
    assert m_u["first_name"][0][1] < 0.001  # random eight-letter names: strangers never share one
    n = len(records)
    assert estimated.weights.prior == pytest.approx(DUPLICATED / (n * (n - 1) / 2), rel=0.1)


def test_fields_without_data_keep_the_fallback(estimated) -> None:  # type: ignore[no-untyped-def]
    assert "phone" in estimated.kept and "address_line2" in estimated.kept
    assert estimated.weights.m_u["phone"] == DEFAULT_WEIGHTS.m_u["phone"]
    assert "first_name" not in estimated.kept
    assert estimated.warnings == ()


def test_levels_no_pair_landed_on_keep_the_fallback_weight(estimated) -> None:  # type: ignore[no-untyped-def]
    """Nobody's birth date is keyed day-for-month in these records, and no two strangers' are: add-one
    smoothing alone would make that level worth log2(random pairs / matches) bits."""
    assert "date_of_birth: day and month swapped" in estimated.unseen
    assert estimated.weights.bits["date_of_birth"][1] == pytest.approx(
        DEFAULT_WEIGHTS.bits["date_of_birth"][1], abs=1e-6
    )
    assert "first_name: exact" not in estimated.unseen and "city: exact" not in estimated.unseen


def test_every_probability_is_kept_away_from_zero_and_one(estimated) -> None:  # type: ignore[no-untyped-def]
    for levels in estimated.weights.m_u.values():
        for m, u in levels:
            assert EPSILON <= m <= 1 - EPSILON and EPSILON <= u <= 1 - EPSILON
    clamped = Weights({"state": ((1.0, 0.0), (0.0, 1.0))}, 0.0)
    assert clamped.m_u["state"] == ((1 - EPSILON, EPSILON), (EPSILON, 1 - EPSILON))
    assert clamped.prior == EPSILON


def test_deterministic_by_seed(records: list[MatchRecord], estimated) -> None:  # type: ignore[no-untyped-def]
    again = estimate(records, seed=1, random_pairs=30_000)
    assert again.weights == estimated.weights
    other = estimate(records, seed=2, random_pairs=30_000)
    assert other.weights != estimated.weights  # another sample of random pairs, another u


def test_refuses_too_few_records(records: list[MatchRecord]) -> None:
    with pytest.raises(EstimationError, match="too few match records"):
        estimate(records[: MIN_RECORDS - 1])


def test_refuses_records_that_share_no_blocking_key() -> None:
    rng = random.Random(3)
    strangers = [
        MatchRecord(first_name=word(rng), last_name=word(rng), date_of_birth=f"19{i + 10:02d}0101") for i in range(80)
    ]
    assert len(candidate_pairs(strangers)) < 20
    with pytest.raises(EstimationError, match="too few candidate pairs"):
        estimate(strangers)


def test_refuses_when_no_pair_looks_like_a_match() -> None:
    """Sixty people who share a birth date and initials (so they block together) and nothing else:
    there is nothing to learn m from."""
    rng = random.Random(4)
    crowd = [
        MatchRecord(first_name="a" + word(rng, 7), last_name="b" + word(rng, 7), date_of_birth="19800101")
        for _ in range(60)
    ]
    with pytest.raises(EstimationError, match="too few likely matches"):
        estimate(crowd, random_pairs=5_000)


def test_weights_round_trip_and_tolerate_a_changed_shape(estimated) -> None:  # type: ignore[no-untyped-def]
    w = estimated.weights
    assert Weights.from_json(w.to_json(), DEFAULT_WEIGHTS) == w
    stored = w.to_json()
    stored["m_u"]["state"] = [[0.5, 0.5]]  # a level fewer than the matcher compares now
    del stored["m_u"]["city"]
    back = Weights.from_json(stored, DEFAULT_WEIGHTS)
    assert back.m_u["state"] == DEFAULT_WEIGHTS.m_u["state"] and back.m_u["city"] == DEFAULT_WEIGHTS.m_u["city"]
    assert back.m_u["first_name"] == w.m_u["first_name"]


def test_default_weights_score_as_the_frozen_constants() -> None:
    a = MatchRecord(first_name="jane", last_name="doe", date_of_birth="19800101", postcode="2000", city="sydney")
    b = MatchRecord(first_name="jane", last_name="dow", date_of_birth="19800101", postcode="2000", city="sydney")
    assert compare(a, b, None, DEFAULT_WEIGHTS).bits == pytest.approx(compare(a, b).bits, abs=1e-4)
    assert set(M_U) == set(DEFAULT_WEIGHTS.m_u)


def _flip_pair() -> tuple[MatchRecord, MatchRecord, Weights]:
    """A pair that goes to review under the defaults (a typo'd given name, the family name, a
    birth date one digit apart: about 5.6 bits), and weights under which it auto-merges (a prior a
    hundred times higher: about 12 bits). The birth date is there because nothing personal agreeing
    never auto-merges, whatever the weights."""
    a = MatchRecord(first_name="jane", last_name="doe", date_of_birth="19800101")
    b = MatchRecord(first_name="jnae", last_name="doe", date_of_birth="19800107")
    return a, b, Weights(DEFAULT_WEIGHTS.m_u, 0.01)


def test_the_matcher_uses_weights_only_where_given() -> None:
    a, b, generous = _flip_pair()
    auto, review = Thresholds.of({}).auto_merge, Thresholds.of({}).review
    default = decide(a, (), {"p": [b]}, auto, review)
    assert default is not None and default.action != MERGE
    tuned = decide(a, (), {"p": [b]}, auto, review, None, generous)
    assert tuned is not None and tuned.action == MERGE
    assert tuned.match.to_json()["prior_bits"] == pytest.approx(generous.prior_bits, abs=1e-3)
    assert default.match.to_json()["prior_bits"] != tuned.match.to_json()["prior_bits"]


def test_batch_matcher_threads_the_weights() -> None:
    m = BatchMatcher.for_events(Thresholds.of({}), [], weights=DEFAULT_WEIGHTS)
    assert m.weights is DEFAULT_WEIGHTS
    assert BatchMatcher.for_events(Thresholds.of({}), []).weights is None


def test_effect_counts_flipped_decisions() -> None:
    a, b, generous = _flip_pair()
    records = [a, b]
    same = effect(records, DEFAULT_WEIGHTS, DEFAULT_WEIGHTS, 0.995, 0.6, [(0, 1)])
    assert same.pairs == 1 and same.old == same.new and same.lost_merges == same.new_merges == 0
    up = effect(records, DEFAULT_WEIGHTS, generous, 0.995, 0.6, [(0, 1)])
    assert (up.old.merge, up.new.merge, up.new_merges, up.lost_merges) == (0, 1, 1, 0)
    down = effect(records, generous, DEFAULT_WEIGHTS, 0.995, 0.6, [(0, 1)])
    assert (down.lost_merges, down.new_merges) == (1, 0)


def test_weight_changes_list_every_level() -> None:
    rows = weight_changes(DEFAULT_WEIGHTS, DEFAULT_WEIGHTS)
    assert rows[0].field == "prior"
    assert len(rows) == 1 + sum(len(levels) for levels in M_U.values())
    assert all(r.old_bits == r.new_bits for r in rows)


@pytest.mark.slow
def test_febrl4_estimate_reproduces_the_frozen_constants() -> None:
    """The one estimator, run by the benchmark on FEBRL4, gives the m/u and prior frozen in
    matching.py (to the four significant digits they were written down with)."""
    pytest.importorskip("recordlinkage")
    from bench.identity_accuracy_offline import estimate_parameters

    params, prior = estimate_parameters()
    assert prior == pytest.approx(PRIOR_MATCH, rel=1e-3)
    for name, levels in M_U.items():
        for (m, u), (m0, u0) in zip(params[name], levels, strict=True):
            assert m == pytest.approx(m0, rel=1e-3, abs=1e-6), name
            assert u == pytest.approx(u0, rel=1e-3, abs=1e-6), name
