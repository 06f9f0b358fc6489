"""Person records generated with known error rates, for the weight estimator's tests: the m and u
an estimate should recover are known by construction."""

from __future__ import annotations

import random
import string

from services.identity.matching import MatchRecord

#: Chance that a duplicate's field carries one keyed typo (a substituted character).
ERROR_RATES = {"first_name": 0.10, "last_name": 0.20, "address_line1": 0.30}
CITIES = 20
PEOPLE, DUPLICATED = 260, 160


def word(rng: random.Random, n: int = 8) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(n))


def _typo(rng: random.Random, text: str) -> str:
    i = rng.randrange(1, len(text) - 1)  # never the first letter, so blocking keys mostly survive
    return text[:i] + rng.choice([c for c in string.ascii_lowercase if c != text[i]]) + text[i + 1 :]


def synthetic(seed: int = 7) -> list[MatchRecord]:
    """PEOPLE people with random names and streets (so strangers almost never look alike), one of
    CITIES cities, and DUPLICATED of them entered twice, the second time with a typo in each
    ``ERROR_RATES`` field at that rate and every other field copied exactly."""
    rng = random.Random(seed)
    cities = [word(rng, 6) for _ in range(CITIES)]
    people = []
    for _ in range(PEOPLE):
        people.append(
            MatchRecord(
                first_name=word(rng),
                last_name=word(rng),
                date_of_birth=f"{rng.randint(1940, 2000)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}",
                street_number=str(rng.randint(1, 300)),
                address_line1=f"{word(rng)} street",
                city=rng.choice(cities),
                postcode=str(rng.randint(2000, 2999)),
                state=rng.choice(["nsw", "vic", "qld", "wa"]),
                national_id=str(rng.randint(10**8, 10**9 - 1)),
            )
        )
    records = list(people)
    for person in people[:DUPLICATED]:
        values = {name: getattr(person, name) for name in ("date_of_birth", "street_number", "city", "postcode")}
        values |= {"state": person.state, "national_id": person.national_id}
        for name, rate in ERROR_RATES.items():
            value = getattr(person, name)
            values[name] = _typo(rng, value) if rng.random() < rate else value
        records.append(MatchRecord(**values))
    rng.shuffle(records)
    return records
