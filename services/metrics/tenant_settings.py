"""A tenant's metric settings and their validation. Pure, no I/O."""

from __future__ import annotations

import zoneinfo
from dataclasses import dataclass, fields, replace
from functools import cache
from typing import Any

from services.core.errors import InvalidArgument, Violation

LIMITS: dict[str, tuple[int, int]] = {
    "fcr_window_days": (1, 90),
    "service_level_seconds": (1, 3600),
    "max_range_days": (1, 3660),
    "max_points": (1, 100_000),
}


@cache
def zone(name: str) -> zoneinfo.ZoneInfo:
    return zoneinfo.ZoneInfo(name)


@dataclass(frozen=True)
class MetricsConfig:
    time_zone: str = "UTC"
    fcr_window_days: int = 7
    service_level_seconds: int = 20
    max_range_days: int = 400
    max_points: int = 5_000

    @property
    def tz(self) -> zoneinfo.ZoneInfo:
        return zone(self.time_zone)

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> MetricsConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def derivation_changed(self, other: MetricsConfig) -> bool:
        """Whether the facts' contributions differ between the two (the rollups need a rebuild)."""
        return (self.time_zone, self.fcr_window_days, self.service_level_seconds) != (
            other.time_zone,
            other.fcr_window_days,
            other.service_level_seconds,
        )


def _valid_zone(name: str) -> bool:
    if not name or len(name) > 64 or name.startswith("/") or ".." in name:
        return False
    try:
        zone(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return False
    return True


def updated(current: MetricsConfig, values: dict[str, Any], paths: list[str]) -> MetricsConfig:
    """``current`` with the masked fields of ``values``; every bad path or value is one violation."""
    violations: list[Violation] = []
    if not paths:
        violations.append(Violation("update_mask", "name at least one field to change"))
    known = {f.name for f in fields(MetricsConfig)}
    changes: dict[str, Any] = {}
    for i, path in enumerate(paths):
        name = path.removeprefix("settings.")
        if name not in known:
            violations.append(Violation(f"update_mask.paths[{i}]", f"unknown field {path!r}; one of {sorted(known)}"))
            continue
        value = values.get(name)
        if name == "time_zone":
            if not isinstance(value, str) or not _valid_zone(value):
                violations.append(Violation("settings.time_zone", "an IANA time zone such as 'Europe/Berlin'"))
                continue
        else:
            low, high = LIMITS[name]
            if not isinstance(value, int) or not low <= value <= high:
                violations.append(Violation(f"settings.{name}", f"a whole number from {low} to {high}"))
                continue
        changes[name] = value
    if violations:
        raise InvalidArgument("invalid metrics settings", violations)
    return replace(current, **changes)
