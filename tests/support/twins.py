"""Building blocks of the twin-request isolation oracles (identity's and profile's): a request is
built twice, once with tenant A's secrets and once with look-alikes that exist nowhere, and tenant
B must get the same answer to both."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass(frozen=True)
class Tok:
    """A string in a request. ``twin`` is the same string with A's secret swapped for a look-alike
    that exists in no tenant; for anything that is not A's secret, twin == real."""

    real: str
    twin: str = ""

    def __post_init__(self) -> None:
        if not self.twin:
            object.__setattr__(self, "twin", self.real)

    @property
    def secret(self) -> bool:
        return self.real != self.twin


Pick = Callable[[Tok], str]
IdentArg = tuple[str, Tok]
Side = IdentArg | Tok | None  # a request's profile: an identifier, a profile name, or unset


def real(t: Tok) -> str:
    return t.real


def twin(t: Tok) -> str:
    return t.twin


# How a profile id is spelled: all of these name the same profile.
PROFILE_FORMS: dict[str, Callable[[str], str]] = {
    "name": lambda u: f"profiles/{u}",
    "bare": lambda u: u,
    "upper": lambda u: f"profiles/{u.upper()}",
    "hex": lambda u: f"profiles/{u.replace('-', '')}",
    "braces": lambda u: f"profiles/{{{u}}}",
}


def garbled_forms(sub_collection: str, other: tuple[str, str]) -> dict[str, Callable[[str], str]]:
    """Malformed names that still carry the id: a sub-resource, the singular, ``other`` (a label
    and another collection of the API), one character short, a space, a NUL."""
    label, collection = other
    return {
        "suffix": lambda u: f"profiles/{u}/{sub_collection}",
        "singular": lambda u: f"profile/{u}",
        label: lambda u: f"{collection}/{u}",
        "short": lambda u: f"profiles/{u[:-1]}",
        "space": lambda u: f"profiles/ {u}",
        "nul": lambda u: f"profiles/{u}\x00",  # refused by the guard, A's id or not
    }


# How an identifier value is spelled (applied to A's value and its twin alike).
VALUE_FORMS: dict[str, Callable[[str], str]] = {
    "exact": lambda v: v,
    "upper": lambda v: v.upper(),
    "padded": lambda v: f"  {v} ",
    # A's national spelling of a British number: A (region GB) reads it, B (region US) does not.
    "gb_national": lambda v: f"0{v[3:5]} {v[5:9]} {v[9:]}" if v.startswith("+44") else v,
    "spaced": lambda v: f"{v[:3]} {v[3:5]} {v[5:9]} {v[9:]}" if v.startswith("+44") else v,
    # PostgreSQL text cannot hold NUL: the server guard refuses it as INVALID_ARGUMENT naming the field.
    "nul": lambda v: f"{v}\x00",
}


def names_field(path: str, fields: frozenset[str]) -> bool:
    """Whether a field violation's path is one of ``fields`` or inside one ("identifiers[1].value"
    is inside "identifiers[1]", "rules.types[crm_id].normalizer" inside "rules.types")."""
    return any(path == f or path.startswith((f"{f}.", f"{f}[")) for f in fields)


def side_toks(side: Side) -> list[Tok]:
    if side is None:
        return []
    return [side[1]] if isinstance(side, tuple) else [side]
