"""Seeded hard negatives for probabilistic matching: different people of one household who agree
on nearly everything (a parent and a child of the same name, 25 to 30 years apart; twins with
different given names), as real customer data holds them and FEBRL does not."""

from __future__ import annotations

import dataclasses
import datetime as dt
import random

from services.identity.matching import MatchRecord

FIRST = ["james", "olivia", "william", "charlotte", "jack", "amelia", "noah", "isla", "thomas", "mia"]
LAST = ["smith", "nguyen", "okafor", "rossi", "kowalski", "murphy", "singh", "papadopoulos", "tanaka", "brown"]
STREETS = ["wattle street", "banksia road", "collins street", "myrtle avenue", "ocean parade"]


def _date(rng: random.Random, start: dt.date, span_days: int) -> dt.date:
    return start + dt.timedelta(days=rng.randrange(span_days))


def households(seed: int, n: int) -> list[tuple[MatchRecord, MatchRecord, str]]:
    """Seeded pairs of different people at one address: (a, b, "parent-child" or "twins")."""
    rng = random.Random(seed)
    out: list[tuple[MatchRecord, MatchRecord, str]] = []
    for i in range(n):
        last, street = rng.choice(LAST), rng.choice(STREETS)
        home = MatchRecord(
            last_name=last,
            street_number=str(rng.randint(1, 200)),
            address_line1=street,
            city="ringwood",
            postcode=str(3000 + i % 200),
            state="vic",
            phone=f"03{rng.randrange(10**8):08d}",
        )
        born = _date(rng, dt.date(1940, 1, 1), 365 * 30)
        if i % 2 == 0:
            first = rng.choice(FIRST)
            child = born + dt.timedelta(days=rng.randint(25 * 365, 30 * 365))
            a = dataclasses.replace(home, first_name=first, date_of_birth=born.strftime("%Y%m%d"))
            b = dataclasses.replace(home, first_name=first, date_of_birth=child.strftime("%Y%m%d"))
            out.append((a, b, "parent-child"))
        else:
            f1, f2 = rng.sample(FIRST, 2)
            a = dataclasses.replace(home, first_name=f1, date_of_birth=born.strftime("%Y%m%d"))
            b = dataclasses.replace(a, first_name=f2)
            out.append((a, b, "twins"))
    return out


def traits(rec: MatchRecord) -> dict[str, str]:
    """Identify traits that normalise back to ``rec`` (the birth date as an ISO date)."""
    out = rec.to_json()
    if rec.date_of_birth:
        d = rec.date_of_birth
        out["date_of_birth"] = f"{d[:4]}-{d[4:6]}-{d[6:]}"
    return out
