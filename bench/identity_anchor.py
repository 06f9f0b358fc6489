"""The anchor for ``tessera bench identity-accuracy``: the same records linked in one batch by
``recordlinkage`` (PyPI), unsupervised, so our streaming matcher's figures sit beside a
well-known batch linker's on the same data and the same metric.

The recipe is the textbook one from the recordlinkage documentation, applied to the same Identify
traits the services receive: plain cleaning (lower case, punctuation removed, digits only for
numbers, the birth date read from the two formats FEBRL and our data use), candidate pairs from the
union of a few blocking passes, binary field agreement (Jaro-Winkler >= 0.85 for names and address
text, exact for the rest, a missing value counted as disagreement as recordlinkage does), and the
ECM classifier (expectation-conditional maximisation, no labels). Its predicted links are turned into
clusters by transitive closure, as our profiles are clusters, and scored pairwise over those
clusters; the raw links are scored too (``links``), so the closure's effect is visible.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any, Final

from bench.identity_datasets import Dataset, closure, score_clusters, score_links

_NON_ALNUM: Final = re.compile(r"[^0-9a-z ]+")
_SPACES: Final = re.compile(r"\s+")
_ISO: Final = re.compile(r"^(\d{4})-?(\d{2})-?(\d{2})$")
_STRING_FIELDS: Final = ("first_name", "last_name", "address_line1", "address_line2", "city")
_EXACT_FIELDS: Final = ("date_of_birth", "street_number", "postcode", "state", "phone", "national_id", "email")
JARO_WINKLER_THRESHOLD: Final = 0.85


def _text(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    out = _SPACES.sub(" ", _NON_ALNUM.sub(" ", value.lower())).strip()
    return out or None


def _digits(value: Any, keep_last: int | None = None, keep_first: int | None = None) -> str | None:
    if not isinstance(value, str):
        return None
    d = "".join(ch for ch in value if ch.isdigit())
    if keep_last:
        d = d[-keep_last:]
    if keep_first:
        d = d[:keep_first]
    return d or None


def _dob(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    m = _ISO.match(value.strip())
    return "".join(m.groups()) if m else None


def clean(traits: Mapping[str, Any]) -> dict[str, str | None]:
    """The anchor's view of one record: its comparison columns, ``None`` where a value is missing."""
    email = traits.get("email")
    return {
        **{name: _text(traits.get(name)) for name in _STRING_FIELDS},
        "date_of_birth": _dob(traits.get("date_of_birth")),
        "street_number": _digits(traits.get("street_number")),
        "postcode": _digits(traits.get("postcode"), keep_first=5),
        "state": _text(traits.get("state")),
        "phone": _digits(traits.get("phone"), keep_last=10),
        "national_id": _digits(traits.get("national_id")),
        "email": email.strip().lower() or None if isinstance(email, str) else None,
    }


def link(dataset: Dataset) -> dict[str, Any]:
    """Link ``dataset`` with recordlinkage + ECM; figures for the clusters and the raw links."""
    import pandas as pd  # type: ignore[import-untyped]
    import recordlinkage  # type: ignore[import-untyped]
    from recordlinkage.preprocessing import phonetic  # type: ignore[import-untyped]

    started = time.monotonic()
    ids = [r.rec_id for r in dataset.records]
    frame = pd.DataFrame([clean(r.traits) for r in dataset.records], index=pd.Index(ids, name="rec_id"))
    frame = frame.astype(object).where(frame.notna(), None)
    first_sx = phonetic(frame["first_name"].fillna(""), "soundex")
    last_sx = phonetic(frame["last_name"].fillna(""), "soundex")
    initial = frame["first_name"].fillna("").str[:1]
    blocks = pd.DataFrame(index=frame.index)
    blocks["last_init"] = (last_sx + "|" + initial).where(last_sx.ne("") & initial.ne(""))
    blocks["dob"] = frame["date_of_birth"]
    blocks["first_pc"] = (first_sx + "|" + frame["postcode"].fillna("")).where(
        first_sx.ne("") & frame["postcode"].notna()
    )
    blocks["last_pc"] = (last_sx + "|" + frame["postcode"].fillna("")).where(last_sx.ne("") & frame["postcode"].notna())
    blocks["phone"] = frame["phone"]
    blocks["national_id"] = frame["national_id"]
    indexer = recordlinkage.Index()
    used_blocks = [col for col in blocks.columns if blocks[col].notna().any()]
    for col in used_blocks:
        indexer.block(col)
    candidates = indexer.index(blocks)

    compare = recordlinkage.Compare()
    present = [col for col in (*_STRING_FIELDS, *_EXACT_FIELDS) if frame[col].notna().any()]
    for col in present:
        if col in _STRING_FIELDS:
            compare.string(col, col, method="jarowinkler", threshold=JARO_WINKLER_THRESHOLD, label=col)
        else:
            compare.exact(col, col, label=col)
    features = compare.compute(candidates, frame)
    classifier = recordlinkage.ECMClassifier(binarize=None)
    matches = classifier.fit_predict(features)
    links = [(str(a), str(b)) for a, b in matches]
    seconds = time.monotonic() - started

    truth = {r.rec_id: r.entity for r in dataset.records}
    clusters = closure(ids, links)
    return {
        "linker": f"recordlinkage {recordlinkage.__version__}: blocking + Compare + ECMClassifier (unsupervised)",
        "blocking_passes": used_blocks,
        "fields_compared": present,
        "candidate_pairs": len(candidates),
        "predicted_links": len(links),
        "clusters": clusters,
        "closure": score_clusters(clusters, truth).as_dict(),
        "links": score_links(links, truth).as_dict(),
        "seconds": round(seconds, 2),
    }
