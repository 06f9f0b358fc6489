"""How a customer's contribution to the rollups is kept (JSON text in ``metrics.contributions``).
Pure, no I/O."""

from __future__ import annotations

import datetime as dt
from typing import Any

from services.metrics.derive import Key
from services.metrics.stats import Stats


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
