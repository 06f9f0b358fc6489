"""How a customer's contribution to the rollups is kept (JSON text in ``metrics.contributions``).
Pure, no I/O."""

from __future__ import annotations

import datetime as dt
from typing import Any

from services.metrics.derive import Key
from services.metrics.stats import HIST_SLOT, SQUARE_SLOT, Stats


def contribution_body(contrib: dict[Key, Stats]) -> list[list[Any]]:
    """Per key: the hour (epoch seconds), the dimensions, and the nonzero counters, squares and
    histogram buckets as [index, value] pairs."""
    rows = []
    for key, s in sorted(contrib.items()):
        hour, *dims = key
        counts, squares, hist = [], [], []
        for slot, v in sorted(s.values.items()):
            if slot < SQUARE_SLOT:
                counts.append([slot, v])
            elif slot < HIST_SLOT:
                squares.append([slot - SQUARE_SLOT, v])
            else:
                hist.append([slot - HIST_SLOT, v])
        rows.append([int(hour.timestamp()), *dims, counts, squares, hist])
    return rows


def contribution(body: list[list[Any]]) -> dict[Key, Stats]:
    out: dict[Key, Stats] = {}
    for hour, channel, queue, agent, reason, source, counts, squares, hist in body:
        values: dict[int, int] = {i: int(v) for i, v in counts}
        values.update((SQUARE_SLOT + i, int(v)) for i, v in squares)
        values.update((HIST_SLOT + i, int(v)) for i, v in hist)
        out[(dt.datetime.fromtimestamp(hour, dt.UTC), channel, queue, agent, reason, source)] = Stats(values)
    return out
