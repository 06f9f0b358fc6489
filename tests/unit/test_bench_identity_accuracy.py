"""``tessera bench identity-accuracy``'s choices and its anchor's wiring (the services run is the
benchmark itself, not a test)."""

from __future__ import annotations

import pytest

from bench.identity_accuracy import DEFAULT_DATASET, datasets_of, identify_event, stream_order
from bench.identity_anchor import clean
from bench.identity_datasets import DATASETS, Dataset, LabelledRecord, generate_households


def test_dataset_choices() -> None:
    assert datasets_of(None) == [DEFAULT_DATASET]
    assert datasets_of("households") == ["households"]
    assert datasets_of("febrl1, febrl3") == ["febrl1", "febrl3"]
    assert datasets_of("all") == list(DATASETS)
    assert {"febrl1", "febrl2", "febrl3", "febrl4", "households"} <= set(DATASETS)
    with pytest.raises(ValueError, match="febrl9"):
        datasets_of("febrl1,febrl9")


def test_the_stream_is_a_seeded_shuffle_and_the_limit_a_prefix() -> None:
    records = generate_households(seed=3, households=30).records
    once, twice = stream_order(records, None), stream_order(records, None)
    assert once == twice and once != records and sorted(once, key=records.index) == records
    assert stream_order(records, 10) == once[:10]


def test_an_event_carries_only_the_opaque_anonymous_id() -> None:
    ev = identify_event("m-1", "a1b2-000001", "bench", {"first_name": "Ada", "postcode": "2615"})
    assert [(i.type, i.value) for i in ev.identifiers] == [("anonymous_id", "a1b2-000001")]
    assert ev.HasField("identify")
    assert dict(ev.identify.traits) == {"first_name": "Ada", "postcode": "2615"}


def test_the_anchor_cleans_values_and_keeps_missing_ones_missing() -> None:
    row = clean(
        {
            "first_name": " O'Brien-Smith ",
            "date_of_birth": "1984-03-07",
            "phone": "+1 (415) 555-0142",
            "postcode": "94110-1234",
            "email": " Ada@Example.COM ",
        }
    )
    assert row["first_name"] == "o brien smith"
    assert row["date_of_birth"] == "19840307"
    assert row["phone"] == "4155550142"
    assert row["postcode"] == "94110"
    assert row["email"] == "ada@example.com"
    assert row["last_name"] is None and row["national_id"] is None  # absent, not ""
    assert clean({"date_of_birth": "03/07/1984"})["date_of_birth"] is None


def test_the_anchor_links_clear_duplicates_and_not_strangers() -> None:
    pytest.importorskip("recordlinkage")
    from bench.identity_anchor import link

    base = {"last_name": "Okafor", "date_of_birth": "19840307", "postcode": "2615", "city": "Kaleen"}
    records = [
        LabelledRecord("r1", "A", {**base, "first_name": "Maya", "address_line1": "Wattle Street"}),
        LabelledRecord("r2", "A", {**base, "first_name": "Maya", "address_line1": "Wattle Street"}),
    ]
    for n in range(40):  # strangers, so the classifier has two classes to tell apart
        records.append(
            LabelledRecord(
                f"s{n}",
                f"S{n}",
                {
                    "first_name": f"Zed{chr(97 + n % 26)}{n}",
                    "last_name": "Okafor" if n % 2 else f"Quux{n}",
                    "date_of_birth": f"19{50 + n}0{1 + n % 9}1{n % 9}",
                    "postcode": "2615" if n % 3 else f"3{n:03d}",
                    "city": "Kaleen" if n % 4 else "Belconnen",
                    "address_line1": f"Street {n}",
                },
            )
        )
    out = link(Dataset("tiny", "", records))
    assert out["clusters"]["r1"] == out["clusters"]["r2"]
    assert out["closure"]["true_positive_pairs"] == 1


def test_a_data_set_is_scored_for_both_linkers_and_tabled() -> None:
    pytest.importorskip("recordlinkage")
    from bench.identity_accuracy import _scored, table

    ds = generate_households(seed=5, households=80)
    stream = stream_order(ds.records, None)
    # "Ours" as if every record had stayed on its own profile except one true pair joined.
    clusters = {r.rec_id: r.rec_id for r in stream}
    by_person: dict[str, list[str]] = {}
    for r in stream:
        by_person.setdefault(r.entity, []).append(r.rec_id)
    a, b = next(recs for recs in by_person.values() if len(recs) > 1)[:2]
    clusters[b] = clusters[a]
    ours = {"clusters": clusters, "profiles": len(set(clusters.values())), "merges": 1, "suggestions": 0}
    ours |= {"ingest_seconds": 1.0, "end_to_end_seconds": 1.5, "records_per_s_end_to_end": 100.0}
    result = _scored(ds, stream, ours, None)
    assert result["ours"]["precision"] == 1.0 and result["ours"]["true_positive_pairs"] == 1
    assert result["targets"] == {"precision": 0.999}  # F1 is a target on FEBRL only
    assert result["meets_targets"] is True
    assert set(result["ours"]["hard_negatives_merged"].values()) == {0}
    assert result["anchor"]["closure"]["true_pairs"] == result["ours"]["true_pairs"]
    report = {
        "date": "2026-12-03T15:40:00Z",
        "backends": "external",
        "settings": "defaults",
        "code": {"commit": "abc123", "services_dirty": False},
        "metric": "pairwise",
        "datasets": {"households": result},
    }
    text = table(report)
    assert "households" in text and "commit abc123" in text and "hard-negative person pairs merged" in text


def test_an_unknown_data_set_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from bench.identity_accuracy import run
    from services.cli.main import build_parser

    args = build_parser().parse_args(["bench", "identity-accuracy", "--dataset", "febrl9"])
    assert args.dataset == "febrl9" and args.matching == "off"
    assert run(seconds=10.0, as_json=True, extra=args) == 2
    assert "unknown data set" in capsys.readouterr().err
    assert run(seconds=10.0, as_json=True, extra=argparse.Namespace(dataset="nope")) == 2
