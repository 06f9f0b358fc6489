"""A tenant's Fellegi-Sunter parameters as one value: per field, per comparison level (best
first), ``m`` (how often true matches land on the level) and ``u`` (how often unrelated people do),
and the prior probability that two random records are one person.

The matcher (:mod:`services.identity.matching`) weighs a level ``log2(m / u)`` and starts from the
prior's log-odds; it uses the frozen constants there unless it is given a :class:`Weights`. A
tenant's own weights come from :mod:`services.identity.estimate` (label-free, on its own records)
and are stored as *proposed* until someone applies them (``tessera identity estimate TENANT
--apply``), then *active*. Pure: no I/O, no imports from the rest of the service.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

#: The stored states of a tenant's weights.
PROPOSED: Final = "proposed"
ACTIVE: Final = "active"

#: No probability is ever 0 or 1: a level must never be an absolute veto or proof.
EPSILON: Final = 1e-6


def clamp(p: float) -> float:
    """``p`` kept within [EPSILON, 1 - EPSILON]."""
    return min(max(p, EPSILON), 1.0 - EPSILON)


@dataclass(frozen=True)
class Weights:
    """m/u per field and level, and the prior. ``bits`` and ``prior_bits`` are derived once."""

    m_u: Mapping[str, tuple[tuple[float, float], ...]]
    prior: float
    bits: Mapping[str, tuple[float, ...]] = field(init=False, compare=False, repr=False)
    prior_bits: float = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        m_u = {name: tuple((clamp(m), clamp(u)) for m, u in levels) for name, levels in self.m_u.items()}
        prior = clamp(self.prior)
        object.__setattr__(self, "m_u", m_u)
        object.__setattr__(self, "prior", prior)
        object.__setattr__(
            self, "bits", {name: tuple(math.log2(m / u) for m, u in levels) for name, levels in m_u.items()}
        )
        object.__setattr__(self, "prior_bits", math.log2(prior / (1.0 - prior)))

    def u_exact(self, name: str) -> float:
        """``u`` of exact agreement: the field's average chance agreement (term frequencies use it)."""
        return self.m_u[name][0][1]

    def to_json(self) -> dict[str, Any]:
        return {"prior": self.prior, "m_u": {name: [[m, u] for m, u in levels] for name, levels in self.m_u.items()}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], defaults: Weights) -> Weights:
        """Inverse of ``to_json``. A field that is absent, or stored with another number of levels
        than ``defaults`` has (a comparison changed since), takes the defaults' values, so a stored
        estimate never breaks the matcher; fields ``defaults`` does not know are dropped."""
        stored = data.get("m_u") or {}
        m_u: dict[str, tuple[tuple[float, float], ...]] = {}
        for name, levels in defaults.m_u.items():
            raw = stored.get(name)
            if isinstance(raw, list) and len(raw) == len(levels):
                try:
                    m_u[name] = tuple((float(m), float(u)) for m, u in raw)
                    continue
                except (TypeError, ValueError):
                    pass
            m_u[name] = levels
        prior = data.get("prior")
        return cls(m_u, float(prior) if isinstance(prior, int | float) else defaults.prior)
