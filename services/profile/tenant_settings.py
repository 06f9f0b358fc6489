"""A tenant's profile settings: trait merge policies, source priorities, computed-trait
definitions. Validated as a whole (every problem reported at once, by field path); pure, no I/O."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from services.core.errors import InvalidArgument, Violation
from services.profile import computed
from services.profile.traits import LATEST, POLICIES, policy_of
from tessera.v1 import profile_pb2

MASK_PATHS: Final = ("trait_policies", "default_policy", "source_priority", "computed_traits")
TRAIT_KEY_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,127}")
MAX_POLICIES: Final = 500
MAX_SOURCES: Final = 100
MAX_SOURCE_LENGTH: Final = 128


@dataclass(frozen=True)
class ProfileConfig:
    """What the consumer and the API need of a tenant's settings."""

    trait_policies: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    default_policy: int = LATEST
    source_priority: tuple[str, ...] = ()
    computed_traits: tuple[computed.Definition, ...] = ()
    updated_at: dt.datetime | None = None

    def policy(self, key: str) -> int:
        return policy_of(key, self.trait_policies, self.default_policy)

    @property
    def source_rank(self) -> Mapping[str, int]:
        return {s: i for i, s in enumerate(self.source_priority)}

    @property
    def windowed(self) -> tuple[computed.Definition, ...]:
        return tuple(d for d in self.computed_traits if d.windowed)

    def definition(self, key: str) -> computed.Definition | None:
        return next((d for d in self.computed_traits if d.key == key), None)


DEFAULT: Final = ProfileConfig()


def to_json(c: ProfileConfig) -> dict[str, Any]:
    return {
        "trait_policies": dict(c.trait_policies),
        "default_policy": c.default_policy,
        "source_priority": list(c.source_priority),
        "computed": [computed.to_json(d) for d in c.computed_traits],
    }


def from_json(raw: Mapping[str, Any], updated_at: dt.datetime | None = None) -> ProfileConfig:
    return ProfileConfig(
        trait_policies=MappingProxyType({str(k): int(v) for k, v in raw.get("trait_policies", {}).items()}),
        default_policy=int(raw.get("default_policy", LATEST)) or LATEST,
        source_priority=tuple(raw.get("source_priority", ())),
        computed_traits=tuple(computed.from_json(d) for d in raw.get("computed", ())),
        updated_at=updated_at,
    )


def to_proto(c: ProfileConfig) -> profile_pb2.ProfileSettings:
    msg = profile_pb2.ProfileSettings(
        name="profileSettings",
        default_policy=c.default_policy,  # type: ignore[arg-type]
        source_priority=list(c.source_priority),
        computed_traits=[computed.to_proto(d) for d in c.computed_traits],
    )
    for k, v in c.trait_policies.items():
        msg.trait_policies[k] = v  # type: ignore[assignment]
    if c.updated_at is not None:
        msg.update_time.FromDatetime(c.updated_at)
    return msg


def apply_update(current: ProfileConfig, new: profile_pb2.ProfileSettings, mask: list[str]) -> ProfileConfig:
    """``current`` with the fields named in ``mask`` (all when empty) taken from ``new``, validated;
    :class:`InvalidArgument` lists every problem by field path."""
    violations: list[Violation] = []
    paths = list(mask) or list(MASK_PATHS)
    for i, p in enumerate(mask):
        if p not in MASK_PATHS:
            violations.append(
                Violation(f"update_mask.paths[{i}]", f"unknown field {p!r}; one of {', '.join(MASK_PATHS)}")
            )
    if "trait_policies" in paths:
        if len(new.trait_policies) > MAX_POLICIES:
            violations.append(Violation("settings.trait_policies", f"at most {MAX_POLICIES} entries"))
        for k, v in sorted(new.trait_policies.items()):
            if not TRAIT_KEY_RE.fullmatch(k):
                violations.append(
                    Violation(f"settings.trait_policies[{k!r}]", "a trait key of 1-128 letters, digits, '_', '.', '-'")
                )
            if v not in POLICIES:
                violations.append(
                    Violation(f"settings.trait_policies[{k!r}]", "LATEST, FIRST, MOST_FREQUENT or SOURCE_PRIORITY")
                )
    if "default_policy" in paths and new.default_policy not in (0, *POLICIES):
        violations.append(Violation("settings.default_policy", "LATEST, FIRST, MOST_FREQUENT or SOURCE_PRIORITY"))
    if "source_priority" in paths:
        if len(new.source_priority) > MAX_SOURCES:
            violations.append(Violation("settings.source_priority", f"at most {MAX_SOURCES} sources"))
        seen: set[str] = set()
        for i, s in enumerate(new.source_priority):
            if not s or len(s) > MAX_SOURCE_LENGTH:
                violations.append(Violation(f"settings.source_priority[{i}]", "1-128 characters"))
            elif s in seen:
                violations.append(Violation(f"settings.source_priority[{i}]", f"{s!r} is listed twice"))
            seen.add(s)
    if "computed_traits" in paths:
        violations += [
            Violation(p, why) for p, why in computed.problems(new.computed_traits, "settings.computed_traits")
        ]
    if violations:
        raise InvalidArgument("invalid profile settings", violations)
    return ProfileConfig(
        trait_policies=(
            MappingProxyType({k: int(v) for k, v in new.trait_policies.items()})
            if "trait_policies" in paths
            else current.trait_policies
        ),
        default_policy=(int(new.default_policy) or LATEST) if "default_policy" in paths else current.default_policy,
        source_priority=tuple(new.source_priority) if "source_priority" in paths else current.source_priority,
        computed_traits=(
            tuple(computed.from_proto(d) for d in new.computed_traits)
            if "computed_traits" in paths
            else current.computed_traits
        ),
    )
