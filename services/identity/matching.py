"""Probabilistic record matching for identity resolution: normalise, block, score, pick the best profile.

Deterministic stitching links only identical identifiers; people also arrive with a typo'd surname, a
swapped day and month or a new address. This module scores how likely two person records describe the
same person with a Fellegi-Sunter model: every field is compared into a few similarity levels, each
level carries a log-likelihood weight ``log2(m / u)`` (``m``: how often true matches land on it, ``u``:
how often unrelated people do), the weights are summed with the prior log-odds and mapped through a
logistic into a probability. A missing field adds nothing, so absence is never evidence.

Pure functions, no I/O: the caller owns storage and the block index. Blocking keys decide which stored
profiles are worth scoring at all; several keys per record mean one typo cannot hide a true match.

The m/u probabilities were estimated without labels on the FEBRL4 benchmark and frozen here; the
procedure is ``bench.identity_accuracy_offline.estimate_parameters`` (u from random pairs, m by
expectation-maximisation over blocked pairs, the prior as the match rate among random pairs). Phone
has no data there, so its values are an assumption, documented below. Fields are treated as
independent except the parts of an address, which count once (see ``match_weight``): FEBRL draws them
independently, real people share them by household.

Three guards FEBRL does not need and real data does:
- **Strong conflicts** (``person_conflicts``): birth dates years apart beyond a keying slip or national
  ids more than one edit apart, with no strong field agreeing (the other one agreeing vouches for a
  mis-keyed or replaced value: a parent and a child never share a national id), different given
  names in one family (twins, siblings, a couple) with no agreeing national id, or nothing personal
  agreeing at all (no birth date or national id: a parent and a child of one name share name,
  address and phone) are never auto-merged, however well the names and places agree; they may go
  to review.
- **Profiles as a whole** (``compare_profile``, ``decide``): a record is compared with every record a
  profile holds, and a merge must not join records that strongly conflict; after a merge the joined
  profile is matched again (``BatchMatcher.match``), so a record that ties two fragments of a person
  together reunites them.
- **Term frequencies** (``ValueCounts``, ``tf_adjustment``): exact agreement on a name or place
  weighs ``log2(m / tf)``, tf being the value's share of the tenant's own records, so a shared
  "smith" says less than a shared "okafor".
"""

from __future__ import annotations

import datetime as dt
import math
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Final

from rapidfuzz.distance import OSA, JaroWinkler

if TYPE_CHECKING:
    from services.identity.weights import Weights

# On FEBRL4 every true pair scores above 0.99999 and every other candidate pair below 0.001, so any
# threshold in between gives the same result there (on FEBRL3 a few true pairs fall in the review band).
# Auto-merge sits high because a wrong merge is costly to undo and real data breaks the independence
# the model assumes (a household shares its address fields); the band between the two thresholds is
# for a person to review.
# Conservative: two people who share a full name and birth date but nothing else score about
# 0.99, so they go to review rather than merge. FEBRL4 streams at F1 0.997 with it (0.998 at 0.95).
DEFAULT_AUTO_MERGE_THRESHOLD: Final[float] = 0.995
DEFAULT_REVIEW_THRESHOLD: Final[float] = 0.6

MIN_FIELDS: Final = 3  # below this a record is too thin to tell people apart
PHONE_TAIL: Final = 9  # phone digits compared: "+61 2 9999 0000" and "(02) 9999 0000" end the same


@dataclass(frozen=True, slots=True)
class MatchRecord:
    """The normalised person attributes one profile record contributes to matching ("" = unknown)."""

    first_name: str = ""
    last_name: str = ""
    date_of_birth: str = ""  # YYYYMMDD or ""
    street_number: str = ""
    address_line1: str = ""
    address_line2: str = ""
    city: str = ""
    postcode: str = ""
    state: str = ""
    phone: str = ""
    national_id: str = ""

    def to_json(self) -> dict[str, str]:
        """Non-empty fields only, so stored records stay small and read like the traits they came from."""
        return {name: value for name in _FIELD_NAMES if (value := getattr(self, name))}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MatchRecord:
        """Inverse of ``to_json``; unknown keys are ignored so older or newer stored forms still load."""
        return cls(**{name: str(data[name]) for name in _FIELD_NAMES if data.get(name) is not None})


_FIELD_NAMES: Final[tuple[str, ...]] = tuple(f.name for f in fields(MatchRecord))

# --------------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------------

# Trait names people actually send, mapped to our fields; the canonical name wins over an alias.
_ALIASES: Final[Mapping[str, tuple[str, ...]]] = {
    "first_name": ("first_name", "given_name", "firstname", "firstName"),
    "last_name": ("last_name", "surname", "lastname", "lastName", "family_name"),
    "date_of_birth": ("date_of_birth", "dob", "birthday", "birth_date"),
    "street_number": ("street_number",),
    "address_line1": ("address_line1", "address", "street"),
    "address_line2": ("address_line2",),
    "city": ("city", "suburb", "town"),
    "postcode": ("postcode", "zip", "postal_code", "zipcode"),
    "state": ("state", "region"),
    "phone": ("phone", "phone_number"),
    "national_id": ("national_id",),
}
# Sub-keys of a structured ``address`` trait (Segment-style) and the field each fills.
_ADDRESS_PARTS: Final[Mapping[str, str]] = {
    "street": "address_line1",
    "line1": "address_line1",
    "line2": "address_line2",
    "city": "city",
    "postal_code": "postcode",
    "postcode": "postcode",
    "zip": "postcode",
    "state": "state",
}
_DIGIT_FIELDS: Final = frozenset({"street_number", "postcode", "phone", "national_id"})
_APOSTROPHES = re.compile(r"['\u2019`]")
_NON_WORD = re.compile(r"[\W_]+")
_SPACES = re.compile(r"\s+")
_YEAR_LAST_DATE = re.compile(r"^\s*(\d{1,2})[/.](\d{1,2})[/.](\d{4})\s*$")
_ISO_DATE = re.compile(r"^\s*(\d{4})[-/.](\d{1,2})[-/.](\d{1,2})(?:$|[T ])")


def _as_text(value: Any) -> str:
    """Traits are JSON-ish: numbers and NaN (from data frames) turn up where strings are expected."""
    if value is None or isinstance(value, bool):
        return ""
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return ""
        if value.is_integer():
            return str(int(value))
    return str(value)


def normalize_text(raw: Any) -> str:
    """Lower-case words: accents folded, apostrophes dropped (o'brien = obrien), other punctuation
    turned into spaces and whitespace collapsed, so formatting never reads as disagreement."""
    text = unicodedata.normalize("NFKD", _as_text(raw))
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).casefold()
    text = _NON_WORD.sub(" ", _APOSTROPHES.sub("", text))
    return _SPACES.sub(" ", text).strip()


def normalize_digits(raw: Any) -> str:
    """Digits only, for numbers that arrive formatted ("2615 ", "+61 2 9999-0000", 4223.0)."""
    return "".join(str(unicodedata.decimal(ch)) for ch in _as_text(raw) if ch.isdecimal())


def normalize_dob(raw: Any) -> str:
    """YYYYMMDD from YYYYMMDD, YYYY-MM-DD (ISO timestamps too), DD/MM/YYYY or MM/DD/YYYY when the
    day is above 12 (so the order is certain), a number or a date; "" otherwise.

    Only the shape is checked, not the calendar: a typo'd month is still evidence for the other digits.
    """
    if isinstance(raw, dt.date):
        return raw.strftime("%Y%m%d")
    text = _as_text(raw)
    if m := _ISO_DATE.match(text):
        year, month, day = m.groups()
        return f"{year}{int(month):02d}{int(day):02d}"
    if m := _YEAR_LAST_DATE.match(text):
        # Day and month order differ by country: only a date that says which is which is read
        # (a number above 12 is the day); "02/03/1984" stays unknown.
        a, b, year = int(m.group(1)), int(m.group(2)), m.group(3)
        if a > 12 >= b >= 1:
            return f"{year}{b:02d}{a:02d}"
        if b > 12 >= a >= 1:
            return f"{year}{a:02d}{b:02d}"
        return ""
    digits = text.strip()
    return digits if len(digits) == 8 and digits.isascii() and digits.isdigit() else ""


def record_from_traits(traits: Mapping[str, Any]) -> MatchRecord | None:
    """A normalised record from Identify traits, or ``None`` when there is too little to match on:
    no name at all, or fewer than ``MIN_FIELDS`` fields (a lone name plus city fits thousands)."""
    values: dict[str, str] = {}
    address = traits.get("address")
    if isinstance(address, Mapping):
        for key, name in _ADDRESS_PARTS.items():
            if address.get(key) is not None and name not in values:
                values[name] = _normalize_field(name, address[key])
    for name, keys in _ALIASES.items():
        for key in keys:
            value = traits.get(key)
            if value is None or isinstance(value, Mapping):
                continue
            normalized = _normalize_field(name, value)
            if normalized:
                values[name] = normalized
                break
    values = {k: v for k, v in values.items() if v}
    if len(values) < MIN_FIELDS or not (values.get("first_name") or values.get("last_name")):
        return None
    return MatchRecord(**values)


# Street-type abbreviations, spelled out so "wattle st" and "wattle street" agree exactly.
_STREET_TYPES: Final[Mapping[str, str]] = {
    "st": "street",
    "rd": "road",
    "ave": "avenue",
    "av": "avenue",
    "dr": "drive",
    "ln": "lane",
    "pl": "place",
    "ct": "court",
    "cr": "crescent",
    "cres": "crescent",
    "cct": "circuit",
    "cl": "close",
    "tce": "terrace",
    "pde": "parade",
    "hwy": "highway",
    "blvd": "boulevard",
    "sq": "square",
}


def normalize_address_line(raw: Any) -> str:
    """``normalize_text`` plus street types spelled out; a leading word is left alone ("st johns road")."""
    words = normalize_text(raw).split(" ")
    return " ".join([words[0], *(_STREET_TYPES.get(word, word) for word in words[1:])])


def _normalize_field(name: str, value: Any) -> str:
    if name == "date_of_birth":
        return normalize_dob(value)
    if name in _DIGIT_FIELDS:
        return normalize_digits(value)
    if name in {"address_line1", "address_line2"}:
        return normalize_address_line(value)
    return normalize_text(value)


# --------------------------------------------------------------------------------------------------
# Blocking
# --------------------------------------------------------------------------------------------------

_SOUNDEX_CODES: Final[Mapping[str, str]] = {
    **dict.fromkeys("bfpv", "1"),
    **dict.fromkeys("cgjkqsxz", "2"),
    **dict.fromkeys("dt", "3"),
    "l": "4",
    **dict.fromkeys("mn", "5"),
    "r": "6",
}


def soundex(text: str) -> str:
    """American Soundex of the letters in ``text`` ("" if none): spelling variants share a code, so a
    blocking key built on it survives most single-letter typos after the first letter."""
    letters = [ch for ch in text if "a" <= ch <= "z"]
    if not letters:
        return ""
    code = letters[0]
    last = _SOUNDEX_CODES.get(letters[0], "")
    for ch in letters[1:]:
        digit = _SOUNDEX_CODES.get(ch, "")
        if digit and digit != last:
            code += digit
            if len(code) == 4:
                break
        if ch not in "hw":  # h and w do not separate equal codes; vowels do
            last = digit
    return code.ljust(4, "0")


def blocking_keys(rec: MatchRecord) -> list[str]:
    """Selective keys under which a record is indexed and its candidates looked up.

    Each key pairs two independent attributes, so a typo in any one field still leaves most keys intact,
    and none is so broad (a surname alone, a postcode alone) that it returns a crowd. Name keys do not
    say which name they came from, so first and last names entered the wrong way round still meet.
    National id and phone are keys on their own: one value rarely covers more than a household.
    """
    first, last, dob, postcode = rec.first_name, rec.last_name, rec.date_of_birth, rec.postcode
    names = [name for name in (first, last) if name]
    sounds = sorted({code for name in names if (code := soundex(name))})
    # Sound of one name with the other's initial, both ways round: the same set for a swapped record.
    pairs = sorted({f"{soundex(x)}|{y[0]}" for x, y in ((last, first), (first, last)) if x and y and soundex(x)})
    keys: list[str] = []
    if dob:
        keys.extend(f"dob_ini:{dob}|{initial}" for initial in sorted({name[0] for name in names}))
        keys.extend(f"name_ym:{code}|{dob[:6]}" for code in sounds)
    if postcode:
        keys.extend(f"names_pc:{pair}|{postcode}" for pair in pairs)
    if rec.city:
        keys.extend(f"names_city:{pair}|{rec.city}" for pair in pairs)
    # Each address line on its own, so lines entered the wrong way round still meet.
    for line in sorted({line[:4] for line in (rec.address_line1, rec.address_line2) if line}):
        street = f"{rec.street_number}|{line}"
        if postcode:
            keys.append(f"addr_pc:{street}|{postcode}")
        if rec.city:
            keys.append(f"addr_city:{street}|{rec.city[:4]}")
    if len(rec.national_id) >= 4:
        keys.append(f"nid:{rec.national_id}")
    if len(rec.phone) >= 6:
        keys.append(f"phone:{rec.phone[-PHONE_TAIL:]}")
    return keys


# --------------------------------------------------------------------------------------------------
# Comparison levels
# --------------------------------------------------------------------------------------------------

MISSING: Final = -1  # a comparison level meaning "one side unknown": weight 0


def _string_level(x: str, y: str) -> int:
    """0 exact, 1 one typo (one edit, spaces ignored, or Jaro-Winkler >= 0.95), 2 similar (two edits
    or JW >= 0.88), 3 different. Spaces are ignored for edits because split or fused words
    ("myles close" / "myleshclose") are keying slips, not different values."""
    if x == y:
        return 0
    edits = OSA.distance(x.replace(" ", ""), y.replace(" ", ""), score_cutoff=2)
    if edits <= 1:
        return 1
    jw = JaroWinkler.similarity(x, y)
    if jw >= 0.95:
        return 1
    if edits <= 2 or jw >= 0.88:
        return 2
    return 3


# Given names and the short forms people also go by (common English usage). Two names are variants
# when one is a formal name and the other one of its short forms, or both are short forms of one
# formal name (bob, rob); two formal names never are (christine, christopher both give "chris").
_NAME_VARIANTS: Final[Mapping[str, tuple[str, ...]]] = {
    "robert": ("rob", "bob", "bobby", "robbie", "bert"),
    "william": ("will", "bill", "billy", "willie", "liam"),
    "elizabeth": ("liz", "beth", "betty", "lizzie", "eliza", "betsy", "libby"),
    "margaret": ("maggie", "meg", "peggy", "marge", "margie"),
    "richard": ("rick", "dick", "rich", "ricky", "richie"),
    "james": ("jim", "jimmy", "jamie"),
    "john": ("johnny", "jack", "jon"),
    "joseph": ("joe", "joey"),
    "thomas": ("tom", "tommy"),
    "michael": ("mike", "mikey", "mick"),
    "christopher": ("chris", "kit"),
    "christine": ("chris", "christy", "chrissy"),
    "katherine": ("kate", "katie", "kathy", "kat"),
    "catherine": ("cathy", "cate", "kate", "katie"),
    "jennifer": ("jen", "jenny"),
    "patricia": ("pat", "patty", "trish", "tricia"),
    "daniel": ("dan", "danny"),
    "david": ("dave", "davey"),
    "anthony": ("tony",),
    "edward": ("ed", "eddie", "ted", "ned"),
    "charles": ("charlie", "chuck", "chas"),
    "alexander": ("alex", "xander"),
    "alexandra": ("alex", "lexi", "sandra"),
    "nicholas": ("nick", "nicky"),
    "matthew": ("matt",),
    "andrew": ("andy", "drew"),
    "benjamin": ("ben", "benny"),
    "samuel": ("sam", "sammy"),
    "samantha": ("sam", "sammy"),
    "steven": ("steve",),
    "stephen": ("steve",),
    "jonathan": ("jon", "jonny"),
    "joshua": ("josh",),
    "timothy": ("tim", "timmy"),
    "kenneth": ("ken", "kenny"),
    "ronald": ("ron", "ronnie"),
    "donald": ("don", "donnie"),
    "gregory": ("greg",),
    "jeffrey": ("jeff",),
    "lawrence": ("larry",),
    "peter": ("pete",),
    "philip": ("phil",),
    "susan": ("sue", "susie"),
    "deborah": ("deb", "debbie"),
    "barbara": ("barb",),
    "dorothy": ("dot", "dottie"),
    "rebecca": ("becky", "becca"),
    "victoria": ("vicky", "tori"),
    "jessica": ("jess", "jessie"),
    "abigail": ("abby",),
    "amanda": ("mandy",),
    "kimberly": ("kim",),
    "pamela": ("pam",),
    "cynthia": ("cindy",),
    "theodore": ("ted", "teddy", "theo"),
    "frederick": ("fred", "freddie"),
    "harold": ("harry", "hal"),
    "henry": ("harry", "hank"),
    "francis": ("frank",),
    "gerald": ("gerry", "jerry"),
    "leonard": ("len", "lenny"),
    "raymond": ("ray",),
    "walter": ("walt",),
    "albert": ("al", "bert"),
    "eleanor": ("ellie", "nell"),
    "natalie": ("nat",),
    "zachary": ("zach",),
    "nathaniel": ("nate", "nat"),
}
_FORMAL_OF: Final[Mapping[str, frozenset[str]]] = {
    short: frozenset(f for f, shorts in _NAME_VARIANTS.items() if short in shorts)
    for short in {s for shorts in _NAME_VARIANTS.values() for s in shorts}
}


def name_variants(x: str, y: str) -> bool:
    """Whether two given names are one name and its short form (robert, bob) or two short forms of
    one name (bob, rob)."""
    fx, fy = _FORMAL_OF.get(x, frozenset()), _FORMAL_OF.get(y, frozenset())
    return x in fy or y in fx or bool(fx & fy)


def _given_name_level(x: str, y: str) -> int:
    """``_string_level``, with a known short form counted as one typo (a nickname is a spelling of
    the name, not another name)."""
    level = _string_level(x, y)
    return 1 if level >= 2 and name_variants(x, y) else level


def _number_level(x: str, y: str) -> int:
    """0 exact, 1 one edit (a wrong or transposed digit, one digit dropped), 2 different."""
    if x == y:
        return 0
    return 1 if OSA.distance(x, y, score_cutoff=1) <= 1 else 2


def _dob_level(x: str, y: str) -> int:
    """0 exact, 1 day and month swapped (US/EU order), 2 one digit wrong or transposed, 3 same year and
    month, 4 different."""
    if x == y:
        return 0
    if x[:4] == y[:4] and x[4:6] == y[6:8] and x[6:8] == y[4:6]:
        return 1
    if OSA.distance(x, y, score_cutoff=1) <= 1:
        return 2
    if x[:6] == y[:6]:
        return 3
    return 4


def _phone_level(x: str, y: str) -> int:
    """Like a number, on the last ``PHONE_TAIL`` digits only, so a country or trunk prefix written one
    way and not the other does not hide agreement."""
    return _number_level(x[-PHONE_TAIL:], y[-PHONE_TAIL:])


def _exact_level(x: str, y: str) -> int:
    return 0 if x == y else 1


_COMPARATORS: Final[Mapping[str, Callable[[str, str], int]]] = {
    "first_name": _given_name_level,
    "last_name": _string_level,
    "date_of_birth": _dob_level,
    "street_number": _number_level,
    "address_line1": _string_level,
    "address_line2": _string_level,
    "city": _string_level,
    "postcode": _number_level,
    "state": _exact_level,
    "phone": _phone_level,
    "national_id": _number_level,
}
# Pairs of fields people fill the wrong way round (first/last name, the two address lines): compared
# crossed as well, and the better-aligned reading is used.
_SWAPPABLE: Final[tuple[tuple[str, str], ...]] = (
    ("first_name", "last_name"),
    ("address_line1", "address_line2"),
)
_SIMPLE_FIELDS: Final[tuple[str, ...]] = tuple(
    name for name in _FIELD_NAMES if all(name not in pair for pair in _SWAPPABLE)
)


def _level(field: str, x: str, y: str) -> int:
    return _COMPARATORS[field](x, y) if x and y else MISSING


def comparison_levels(a: MatchRecord, b: MatchRecord) -> dict[str, int]:
    """Per-field similarity level (``MISSING`` where either side is empty); the Fellegi-Sunter
    comparison vector that ``score`` weighs and that the parameter estimation counts."""
    levels: dict[str, int] = {}
    for f1, f2 in _SWAPPABLE:
        a1, a2, b1, b2 = getattr(a, f1), getattr(a, f2), getattr(b, f1), getattr(b, f2)
        straight = (_level(f1, a1, b1), _level(f2, a2, b2))
        if straight != (0, 0) and a1 and a2 and b1 and b2:
            crossed = (_level(f1, a1, b2), _level(f2, a2, b1))
            # Only a clean swap counts: both crossed comparisons close, and better than straight.
            if max(crossed) <= 1 and sum(crossed) < sum(straight):
                straight = crossed
        levels[f1], levels[f2] = straight
    for name in _SIMPLE_FIELDS:
        levels[name] = _level(name, getattr(a, name), getattr(b, name))
    return levels


# --------------------------------------------------------------------------------------------------
# Fellegi-Sunter parameters
# --------------------------------------------------------------------------------------------------

#: field -> (m, u) per comparison level, best level first. Estimated on FEBRL4 by
#: ``bench.identity_accuracy_offline.estimate_parameters`` (no labels used) and frozen here.
M_U: Final[Mapping[str, tuple[tuple[float, float], ...]]] = {
    # Re-estimated when short forms of given names (bob, robert) became "one typo": FEBRL4 has a few.
    "first_name": ((0.7432, 0.003323), (0.1526, 0.00195), (0.008685, 0.005757), (0.09553, 0.989)),
    "last_name": ((0.7299, 0.003298), (0.1918, 0.0009027), (0.01163, 0.002201), (0.06671, 0.9936)),
    # FEBRL never swaps day and month nor keeps only year and month, so those two m are smoothing
    # only: weak evidence either way, as it should be without data.
    "date_of_birth": (
        (0.9308, 2.358e-05),
        (0.0002083, 1.856e-05),
        (0.02298, 0.000993),
        (0.0002089, 0.000568),
        (0.04581, 0.9984),
    ),
    "street_number": ((0.8722, 0.01383), (0.04584, 0.2208), (0.08194, 0.7653)),
    "address_line1": ((0.6591, 0.0003263), (0.3048, 0.0001883), (0.0069, 0.0008319), (0.02928, 0.9987)),
    "address_line2": ((0.6342, 0.0004917), (0.3446, 0.0002842), (0.008268, 0.0003671), (0.01297, 0.9989)),
    "city": ((0.7628, 0.0008016), (0.1787, 0.0001835), (0.005725, 0.0006295), (0.05281, 0.9984)),
    "postcode": ((0.8431, 0.0009207), (0.1428, 0.01244), (0.01402, 0.9866)),
    "state": ((0.9623, 0.2244), (0.03771, 0.7756)),
    # Not in FEBRL4, so assumed: agreement rates like a national id's, but u well above one because a
    # phone is often shared by a household.
    "phone": ((0.9, 0.001), (0.05, 0.005), (0.05, 0.994)),
    "national_id": ((0.911, 2.5e-06), (0.04874, 7.62e-06), (0.04029, 1.0)),
}
#: Prior probability that two records drawn at random are the same person (EM's match count over all
#: FEBRL4 pairs). Deliberately not the share among blocked candidates, so a score does not depend on
#: the blocking keys; it is conservative, as every pair must overcome about 13 bits of doubt.
PRIOR_MATCH: Final[float] = 0.0001001

#: Where and how a household is reached: its address parts and its phone (a landline is shared by
#: everyone at the address), one piece of evidence together (see ``match_weight``).
_ADDRESS_FIELDS: Final = frozenset(
    {"street_number", "address_line1", "address_line2", "city", "postcode", "state", "phone"}
)
_WEIGHTS: Final[Mapping[str, tuple[float, ...]]] = {
    name: tuple(math.log2(m / u) for m, u in levels) for name, levels in M_U.items()
}
_PRIOR_BITS: Final[float] = math.log2(PRIOR_MATCH / (1 - PRIOR_MATCH))


#: Names of each comparison level, best first, as ``ExplainLink`` shows them.
LEVEL_NAMES: Final[Mapping[str, tuple[str, ...]]] = {
    **dict.fromkeys(
        ("first_name", "last_name", "address_line1", "address_line2", "city"),
        ("exact", "one typo", "similar", "different"),
    ),
    **dict.fromkeys(("street_number", "postcode", "national_id", "phone"), ("exact", "one edit", "different")),
    "date_of_birth": ("exact", "day and month swapped", "one digit", "same year and month", "different"),
    "state": ("exact", "different"),
}


def level_name(field: str, level: int) -> str:
    return "missing" if level == MISSING else LEVEL_NAMES[field][level]


# --------------------------------------------------------------------------------------------------
# Term frequencies: a shared common value says less than a shared rare one
# --------------------------------------------------------------------------------------------------

#: Fields whose exact agreement is weighed by how common the shared value is (as Splink does). Dates
#: and numbers are spread evenly enough that their average weight fits; names and places are not.
TF_FIELDS: Final[tuple[str, ...]] = ("first_name", "last_name", "address_line1", "city", "postcode")
#: Pseudo-records of prior belief: until a tenant has a few hundred records, a value's frequency is
#: mostly the field's average (``u`` of the exact level), so a young tenant's first records are not
#: judged by a frequency table of ten (two records, both "smith": well under a bit).
TF_PRIOR_RECORDS: Final = 1000.0
#: The most a rare value may add over the field's average exact weight (bits). A value seen once
#: among millions is not proof; the cap keeps rare-value agreement from outvoting a disagreement.
TF_MAX_GAIN_BITS: Final = 3.0


class ValueCounts:
    """How many of a tenant's trait records carry each value of each ``TF_FIELDS`` field, and how
    many carry the field at all: the term-frequency table, kept incrementally as records arrive."""

    __slots__ = ("counts", "totals")

    def __init__(
        self, counts: Mapping[tuple[str, str], int] | None = None, totals: Mapping[str, int] | None = None
    ) -> None:
        self.counts: dict[tuple[str, str], int] = dict(counts or {})
        self.totals: dict[str, int] = dict(totals or {})

    def add(self, rec: MatchRecord) -> list[tuple[str, str]]:
        """Count a record's values; returns the (field, value) pairs it counted."""
        added = [(name, value) for name in TF_FIELDS if (value := getattr(rec, name))]
        for key in added:
            self.counts[key] = self.counts.get(key, 0) + 1
            self.totals[key[0]] = self.totals.get(key[0], 0) + 1
        return added

    def frequency(self, field: str, value: str, u0: float | None = None) -> float:
        """The share of records with ``field`` that hold ``value``, shrunk towards the field's
        average (the ``u`` of exact agreement) by ``TF_PRIOR_RECORDS`` pseudo-records."""
        u0 = M_U[field][0][1] if u0 is None else u0
        return (self.counts.get((field, value), 0) + TF_PRIOR_RECORDS * u0) / (
            self.totals.get(field, 0) + TF_PRIOR_RECORDS
        )


def tf_adjustment(field: str, value: str, counts: ValueCounts | None, weights: Weights | None = None) -> float:
    """Bits added to ``field``'s exact-agreement weight for sharing ``value``: log2(u / tf), where u
    is the field's average chance agreement and tf the value's frequency; negative for common
    values, positive (at most ``TF_MAX_GAIN_BITS``) for rare ones, 0 without a table."""
    if counts is None or field not in TF_FIELDS:
        return 0.0
    u0 = M_U[field][0][1] if weights is None else weights.u_exact(field)
    return min(math.log2(u0 / counts.frequency(field, value, u0)), TF_MAX_GAIN_BITS)


# --------------------------------------------------------------------------------------------------
# Strong conflicts: evidence that no amount of agreement elsewhere overturns
# --------------------------------------------------------------------------------------------------


def _dob_typo(x: str, y: str) -> bool:
    """A birth-date difference a keying slip explains: equal, day and month swapped, one digit
    transposed, or one digit wrong, except a wrong decade or century digit (years ten or more apart
    are a different person far more often than a slip: a parent, a child)."""
    if x == y or _dob_level(x, y) == 1:
        return True
    if OSA.distance(x, y, score_cutoff=1) > 1:
        return False
    diff = [i for i in range(min(len(x), len(y))) if x[i] != y[i]]
    if len(diff) == 2:  # a transposition of adjacent digits
        return True
    return not (diff and diff[0] < 3 and x[:4].isdigit() and y[:4].isdigit() and abs(int(x[:4]) - int(y[:4])) >= 10)


def _dob_conflict(x: str, y: str) -> bool:
    return bool(x and y) and not _dob_typo(x, y) and abs(int(x[:4]) - int(y[:4])) >= 2


def _id_conflict(x: str, y: str) -> bool:
    return bool(x and y) and _number_level(x, y) == 2


def strong_conflicts(a: MatchRecord, b: MatchRecord) -> list[str]:
    """Why ``a`` and ``b`` cannot be one person, however well the names and places agree: birth
    dates years apart beyond a keying slip, or national ids more than one edit or transposition
    apart, with neither agreeing (up to a slip or one edit). Such a pair is never auto-merged (a
    person may still review it). See ``person_conflicts``: the other strong field agreeing is the
    one thing that outweighs a clash."""
    return person_conflicts((a,), (b,))


def person_conflicts(xs: Sequence[MatchRecord], ys: Sequence[MatchRecord], *, both_ways: bool = True) -> list[str]:
    """The strong conflicts that forbid making ``xs`` and ``ys`` (a record and a profile, or two
    profiles) one person.

    The strong fields are the birth date and the national id. A record clashes with another when
    either field is far apart in the two (dates years apart beyond a keying slip, ids more than one
    edit apart). A clash is a conflict unless the record is corroborated by the other side: one of
    the other side's records agrees with it on a strong field, up to a slip or one edit. So the
    other strong field agreeing overrules a clash (the same national id with a birth date years
    off is the same person with a mis-keyed date: a parent and a child never share a national id;
    a replaced national id beside the same birth date is a replaced number: twins share a birth
    date, and the given-name rule keeps them apart), and a profile that already holds a wrong value
    beside the right one does not block a record that agrees with the right one. A record that
    agrees on neither strong field with anything on the other side, and clashes, is always a
    conflict, however well the names and places agree.

    ``both_ways``: check the records of ``ys`` against ``xs`` too (two profiles joining); a
    profile's own records were weighed against each other when they joined it, so a new record
    (``xs``) against a profile needs only its own side checked."""
    return _strong_fields(xs, ys, both_ways=both_ways)[0]


def _strong_fields(
    xs: Sequence[MatchRecord], ys: Sequence[MatchRecord], *, both_ways: bool
) -> tuple[list[str], list[str]]:
    """One pass for ``person_conflicts``: (the conflicts, the clashes a strong field overruled,
    each saying which; the latter for ``xs`` against ``ys`` only, for a merge's evidence)."""
    conflicts: list[str] = []
    overruled: list[str] = []
    for side, other in ((xs, ys), (ys, xs)) if both_ways else ((xs, ys),):
        for x in side:
            vouch = next((v for y in other if (v := _vouch(x, y))), "")
            if vouch and side is not xs:
                continue
            for y in other:
                for reason in _clashes(x, y) if side is xs else _clashes(y, x):
                    text = f"{reason}, overruled: {vouch}" if vouch else reason
                    found = overruled if vouch else conflicts
                    if text not in found:
                        found.append(text)
    return conflicts, overruled


def _vouch(x: MatchRecord, y: MatchRecord) -> str:
    """Which strong field agrees in ``x`` and ``y`` ("" if none): the birth date up to a slip, or
    the national id up to one edit."""
    if x.date_of_birth and y.date_of_birth and _dob_typo(x.date_of_birth, y.date_of_birth):
        return "date_of_birth agrees"
    if x.national_id and y.national_id and _number_level(x.national_id, y.national_id) < 2:
        return "national_id agrees"
    return ""


def _clashes(x: MatchRecord, y: MatchRecord) -> list[str]:
    out = []
    if _dob_conflict(x.date_of_birth, y.date_of_birth):
        out.append(f"date_of_birth: years {x.date_of_birth[:4]} and {y.date_of_birth[:4]}")
    if _id_conflict(x.national_id, y.national_id):
        out.append("national_id: different beyond one edit")
    return out


def _first_name_conflict(a: MatchRecord, b: MatchRecord, levels: Mapping[str, int]) -> bool:
    """One family, different given names: twins (the same birth date too), siblings, a couple. Only
    an identifier that agrees (national id) tells a retyped given name from a relative; an initial
    is not a different name."""
    return (
        levels.get("first_name", MISSING) >= 2
        and levels.get("last_name") in (0, 1)
        and levels.get("national_id", MISSING) not in (0, 1)
        and not (a.first_name[:1] == b.first_name[:1] and min(len(a.first_name), len(b.first_name)) == 1)
    )


NO_PERSON_EVIDENCE: Final = "no birth date or national id agrees (name and address do not tell relatives apart)"


def _person_evidence(levels: Mapping[str, int]) -> bool:
    """Whether something personal agrees: the birth date (up to a slip) or the national id (up to
    one edit). A parent and a child of one name share everything else, so without one of these an
    auto-merge could join them."""
    return levels.get("date_of_birth", MISSING) in (0, 1, 2) or levels.get("national_id", MISSING) in (0, 1)


# --------------------------------------------------------------------------------------------------
# Weighing
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FieldEvidence:
    """One field's part in a score: its agreement level, the term-frequency adjustment in it, and
    the bits it contributes (0 for an address part another one stands for)."""

    level: int
    bits: float
    tf_bits: float = 0.0
    counted: bool = True


@dataclass(frozen=True, slots=True)
class Match:
    """A scored comparison: total log2 Bayes factor with the prior (``bits``), its probability, each
    compared field's evidence, and the strong conflicts that forbid an auto-merge."""

    bits: float
    fields: Mapping[str, FieldEvidence]
    conflicts: tuple[str, ...] = ()
    prior_bits: float = _PRIOR_BITS  # the prior of the weights it was scored with
    #: Strong-field clashes the other strong field overruled (see ``person_conflicts``), so the
    #: evidence of a merge says why a birth date years off did not stop it.
    overruled: tuple[str, ...] = ()

    @property
    def probability(self) -> float:
        return probability(self.bits)

    def contributions(self) -> dict[str, float]:
        """field -> bits, the form ``score`` returns and older merge facts stored."""
        return {name: ev.bits for name, ev in self.fields.items()}

    def to_json(self) -> dict[str, Any]:
        """The evidence stored with a merge or suggestion (see ``evidence_from_json``)."""
        return {
            "fields": {
                name: {
                    "level": level_name(name, ev.level),
                    "bits": round(ev.bits, 4),
                    "tf_bits": round(ev.tf_bits, 4),
                    "counted": ev.counted,
                }
                for name, ev in self.fields.items()
            },
            "prior_bits": round(self.prior_bits, 4),
            "total_bits": round(self.bits, 4),
            "conflicts": list(self.conflicts),
            "overruled": list(self.overruled),
        }


def _weigh(
    levels: Mapping[str, int], rec: MatchRecord, counts: ValueCounts | None, weights: Weights | None = None
) -> tuple[float, dict[str, FieldEvidence]]:
    """Sum the weights of a comparison vector (the address parts counted once, see ``match_weight``);
    exact agreement on a ``TF_FIELDS`` field is adjusted for how common ``rec``'s value is."""
    table = _WEIGHTS if weights is None else weights.bits  # a tenant's own weights, else the frozen ones
    bits = _PRIOR_BITS if weights is None else weights.prior_bits
    evidence: dict[str, FieldEvidence] = {}
    best: tuple[str, float] | None = None
    worst: tuple[str, float] | None = None
    for name, level in levels.items():
        if level == MISSING:
            continue
        tf = tf_adjustment(name, getattr(rec, name), counts, weights) if level == 0 else 0.0
        weight = table[name][level] + tf
        if name not in _ADDRESS_FIELDS:
            evidence[name] = FieldEvidence(level, weight, tf)
            bits += weight
            continue
        evidence[name] = FieldEvidence(level, 0.0, tf, counted=False)
        if weight > 0 and (best is None or weight > best[1]):
            best = (name, weight)
        elif weight < 0 and (worst is None or weight < worst[1]):
            worst = (name, weight)
    for strongest in (best, worst):
        if strongest is not None:
            name, weight = strongest
            evidence[name] = FieldEvidence(levels[name], weight, evidence[name].tf_bits)
            bits += weight
    return bits, evidence


def compare(a: MatchRecord, b: MatchRecord, counts: ValueCounts | None = None, weights: Weights | None = None) -> Match:
    """``a`` against one record ``b``: weighed levels, term-frequency adjusted when ``counts`` is
    given, with the strong conflicts between them."""
    levels = comparison_levels(a, b)
    bits, evidence = _weigh(levels, a, counts, weights)
    conflicts = strong_conflicts(a, b)
    if _first_name_conflict(a, b, levels):
        conflicts.append("first_name: different given names in one family")
    if not _person_evidence(levels):
        conflicts.append(NO_PERSON_EVIDENCE)
    return Match(bits, evidence, tuple(conflicts), _PRIOR_BITS if weights is None else weights.prior_bits)


def compare_profile(
    rec: MatchRecord,
    records: Sequence[MatchRecord],
    counts: ValueCounts | None = None,
    weights: Weights | None = None,
) -> Match:
    """``rec`` against everything a profile knows: each field at the best agreement any of the
    profile's records has (a person's records hold old addresses, a maiden name, a typo'd birth
    date beside the right one), and the strong conflicts with any of them. ``records`` is not empty."""
    best_levels: dict[str, int] = {}
    conflicts: list[str] = []
    first_name_conflicts = 0
    for other in records:
        levels = comparison_levels(rec, other)
        for name, level in levels.items():
            if level != MISSING and (name not in best_levels or level < best_levels[name]):
                best_levels[name] = level
        first_name_conflicts += _first_name_conflict(rec, other, levels)
    strong, overruled = _strong_fields((rec,), records, both_ways=False)
    conflicts.extend(strong)
    levels = {name: best_levels.get(name, MISSING) for name in _FIELD_NAMES}
    if first_name_conflicts and levels["first_name"] >= 2:
        conflicts.append("first_name: different given names in one family")
    if not _person_evidence(levels):
        conflicts.append(NO_PERSON_EVIDENCE)
    bits, evidence = _weigh(levels, rec, counts, weights)
    return Match(
        bits,
        evidence,
        tuple(conflicts),
        _PRIOR_BITS if weights is None else weights.prior_bits,
        tuple(overruled),
    )


def profiles_conflict(a: Sequence[MatchRecord], b: Sequence[MatchRecord]) -> list[str]:
    """Strong conflicts between two profiles (``person_conflicts`` both ways): a merge must be
    consistent with everything both already hold, not only with the record that triggered it."""
    return person_conflicts(a, b)


def match_weight(a: MatchRecord, b: MatchRecord) -> tuple[float, dict[str, float]]:
    """Total log2 likelihood ratio (prior included) and each compared field's contribution in bits;
    the contributions plus the prior add up to the total.

    The address fields are one fact, where the person lives: in real data they agree together
    (a household, a neighbour in the same street) and change together (a move), so adding them up as
    independent would count one address up to six times. They count as one piece of evidence instead:
    the strongest agreement among them plus the strongest disagreement; the others contribute 0.
    """
    bits, evidence = _weigh(comparison_levels(a, b), a, None)
    return bits, {name: ev.bits for name, ev in evidence.items()}


def probability(bits: float) -> float:
    """Logistic in base 2: log-odds in bits to a probability, safe for any magnitude."""
    if bits >= 0:
        return 1.0 / (1.0 + math.exp2(-min(bits, 1000.0)))
    odds = math.exp2(max(bits, -1000.0))
    return odds / (1.0 + odds)


def score(a: MatchRecord, b: MatchRecord) -> tuple[float, dict[str, float]]:
    """Match probability in [0, 1] and the per-field evidence (contribution in bits, see
    ``match_weight``; fields missing on either side are absent, as they add nothing). The national id
    is weighed like any other field, so neither a typo in it nor a stranger's shared number decides on
    its own."""
    bits, evidence = match_weight(a, b)
    return probability(bits), evidence


MERGE: Final = "merge"
REVIEW: Final = "review"


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with a record and its best candidate profile: ``MERGE``, ``REVIEW`` or ``None``
    (below the review threshold), the match, and the strong conflicts that held a merge back."""

    profile_id: str
    match: Match
    action: str | None

    @property
    def conflicts(self) -> tuple[str, ...]:
        return self.match.conflicts


def decide(
    rec: MatchRecord,
    own: Sequence[MatchRecord],
    candidates: Mapping[str, Sequence[MatchRecord]],
    auto_merge: float,
    review: float,
    counts: ValueCounts | None = None,
    weights: Weights | None = None,
) -> Decision | None:
    """Where ``rec`` (now on a profile holding ``own`` besides it) belongs among ``candidates``
    (profile id -> every record the profile holds).

    Each candidate is scored as a whole (``compare_profile``). A merge needs the auto-merge
    threshold and no strong conflict between any record of the one profile and any of the other;
    the best such candidate merges. Otherwise the best-scoring candidate is suggested for review
    when it reaches the review threshold (a conflict never merges, but a person may know better)."""
    scored: list[tuple[float, str, Match]] = []
    for pid, records in candidates.items():
        if not records:
            continue
        m = compare_profile(rec, records, counts, weights)
        if m.probability >= review:
            extra = [c for c in profiles_conflict(own, records) if c not in m.conflicts]
            if extra:
                m = Match(m.bits, m.fields, (*m.conflicts, *extra), m.prior_bits, m.overruled)
        scored.append((m.bits, pid, m))
    if not scored:
        return None
    scored.sort(key=lambda t: (-t[0], t[1]))
    for _bits, pid, m in scored:
        if m.probability < auto_merge:
            break
        if not m.conflicts:
            return Decision(pid, m, MERGE)
    _bits, pid, m = scored[0]
    return Decision(pid, m, REVIEW if m.probability >= review else None)


def best_match(
    rec: MatchRecord, candidates: Mapping[str, Sequence[MatchRecord]]
) -> tuple[str, float, dict[str, float]] | None:
    """The candidate profile most likely to be ``rec``'s person: (profile id, probability, evidence),
    scoring a profile by its best-matching record, since a person's older records may hold old
    addresses. ``None`` when there is nothing to compare with."""
    best: tuple[str, float, dict[str, float]] | None = None
    best_bits = -math.inf
    for profile_id, records in candidates.items():
        for other in records:
            bits, evidence = match_weight(rec, other)
            if bits > best_bits:
                best_bits, best = bits, (profile_id, probability(bits), evidence)
    return best
