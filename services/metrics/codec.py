"""How facts and contributions are kept in PostgreSQL's ``jsonb`` columns. Pure, no I/O."""

from __future__ import annotations

import datetime as dt
from dataclasses import fields
from typing import Any

from services.metrics.derive import Key
from services.metrics.facts import Fact
from services.metrics.stats import Stats

_FIELDS = [f.name for f in fields(Fact) if f.name not in ("key", "kind", "event_id", "profile_id", "interaction_id")]
_TIMES = ("at", "started_at")
_DEFAULTS = {f.name: f.default for f in fields(Fact)}


def _micros(t: dt.datetime) -> int:
    return round(t.timestamp() * 1_000_000)


def _time(us: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(us / 1_000_000, dt.UTC)


def fact_body(f: Fact) -> dict[str, Any]:
    """The fact's fields that differ from their defaults (times as epoch microseconds)."""
    out: dict[str, Any] = {}
    for name in _FIELDS:
        value = getattr(f, name)
        if name in _TIMES:
            if value is not None:
                out[name] = _micros(value)
        elif value != _DEFAULTS[name]:
            out[name] = value
    return out


def fact(key: str, kind: int, event_id: str, profile_id: str, interaction_id: str, body: dict[str, Any]) -> Fact:
    values = dict(body)
    for name in _TIMES:
        if name in values:
            values[name] = _time(values[name])
    return Fact(key=key, kind=kind, event_id=event_id, profile_id=profile_id, interaction_id=interaction_id, **values)


def _sparse(values: list[int] | list[float]) -> list[list[float]]:
    return [[i, v] for i, v in enumerate(values) if v]


def contribution_body(contrib: dict[Key, Stats]) -> list[list[Any]]:
    rows = []
    for key, s in sorted(contrib.items()):
        hour, *dims = key
        rows.append([int(hour.timestamp()), *dims, _sparse(s.counts), _sparse(s.squares), _sparse(s.hist)])
    return rows


def contribution(body: list[list[Any]]) -> dict[Key, Stats]:
    out: dict[Key, Stats] = {}
    for hour, channel, queue, agent, reason, source, counts, squares, hist in body:
        s = Stats.zero()
        for i, v in counts:
            s.counts[i] = int(v)
        for i, v in squares:
            s.squares[i] = float(v)
        for i, v in hist:
            s.hist[i] = int(v)
        out[(dt.datetime.fromtimestamp(hour, dt.UTC), channel, queue, agent, reason, source)] = s
    return out
