"""Sufficient statistics and the scores computed from them. Pure, no I/O.

A rollup bucket holds a :class:`Stats`: counts and exact integer sums (durations in
milliseconds, sentiment in 1/10,000), so adding buckets in any order gives the same totals and
every mean and rate over any range of buckets is exact. Sums of squares (for the intervals of
means) are exact integers too, the squares of the same units (see :data:`SQUARE_UNITS`), so an
interval is the same to the last bit whatever order replicas, redeliveries and merges added the
events in, and a retraction cancels exactly. Durations also go into a fixed
log-bucket histogram, so handle-time percentiles come with a stated error bound.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

#: The additive counters, in the order of the rollup tables' columns (a test checks the tables).
COUNTERS: tuple[str, ...] = (
    # contacts (one per interaction with at least one Interaction leg)
    "offered",
    "handled",
    "abandoned",
    "transferred",
    "answered_sl",
    "wait_ms",
    "repeats",
    # contact-based FCR: handled contacts, and those followed by a repeat within the window
    "fcr_handled",
    "fcr_repeated",
    # legs an agent handled, and their handle time
    "legs_handled",
    "handle_ms",
    # cases (at their first contact): resolved ones, and those resolved with a single contact
    "cases_resolved",
    "cases_single",
    # self-service: conversations a bot took part in, contained or handed to an agent
    "bot_contacts",
    "contained",
    "handoffs",
    # surveys
    "nps_n",
    "nps_promoters",
    "nps_detractors",
    "csat_n",
    "csat_top2",
    "csat_sum",
    "ces_n",
    "ces_agree",
    "ces_sum",
    # customer messages' VADER compound scores, x 10,000
    "sentiment_n",
    "sentiment_sum",
    "sentiment_positive",
    "sentiment_negative",
)
#: Sums of squares, for the intervals of means (numeric columns: an hour-long leg adds 1.3e13).
SQUARES: tuple[str, ...] = ("handle_sq", "csat_sq", "ces_sq", "sentiment_sq")
#: The unit each square's values are counted in, per its quantity's own unit: handle time in
#: milliseconds and sentiment in 1/10,000 as their sums are, scores as they are.
SQUARE_UNITS: dict[str, int] = {"handle_sq": 1000, "csat_sq": 1, "ces_sq": 1, "sentiment_sq": 10_000}
INDEX = {name: i for i, name in enumerate(COUNTERS)}
SQUARE_INDEX = {name: i for i, name in enumerate(SQUARES)}

#: Handle-time histogram: bucket 0 is under 1 s, bucket i (1..64) is [2^((i-1)/4), 2^(i/4)) s,
#: the last one open-ended. A percentile is reported as its bucket's geometric midpoint, at most
#: 2^(1/8) - 1 (9.05%) from any value in the bucket.
HIST_BUCKETS = 65
HIST_STEP = 2**0.25
PERCENTILE_ERROR = 2**0.125 - 1
Z95 = 1.959963984540054


def hist_index(seconds: float) -> int:
    if seconds < 1.0:
        return 0
    return min(HIST_BUCKETS - 1, 1 + math.floor(math.log2(seconds) * 4 + 1e-9))


def hist_value(index: int) -> float:
    """The reported value of a bucket: its geometric midpoint (0.5 s for the first)."""
    if index == 0:
        return 0.5
    return float(2 ** ((index - 1 + 0.5) / 4))


#: Slots of a :class:`Stats`: the counters, then the squares, then the histogram's buckets.
SQUARE_SLOT = len(COUNTERS)
HIST_SLOT = SQUARE_SLOT + len(SQUARES)
WIDTH = HIST_SLOT + HIST_BUCKETS


class Stats:
    """One bucket's sufficient statistics; ``merge`` combines them (rollup deltas).

    Kept sparse, slot -> value with zeros left out: a customer's bucket or a batch's delta
    touches a handful of the 98 slots, and the consumer merges hundreds of thousands of them."""

    __slots__ = ("values",)

    def __init__(self, values: dict[int, int] | None = None) -> None:
        self.values: dict[int, int] = {} if values is None else values

    @classmethod
    def zero(cls) -> Stats:
        return cls()

    def _bump(self, slot: int, value: int) -> None:
        v = self.values
        total_ = v.get(slot, 0) + value
        if total_:
            v[slot] = total_
        else:
            v.pop(slot, None)

    def add(self, name: str, value: int = 1) -> None:
        self._bump(INDEX[name], value)

    def add_square(self, name: str, units: int) -> None:
        """Add the square of ``units``, a value counted in the square's :data:`SQUARE_UNITS`."""
        self._bump(SQUARE_SLOT + SQUARE_INDEX[name], units * units)

    def add_hist(self, index: int, value: int = 1) -> None:
        self._bump(HIST_SLOT + index, value)

    def __getitem__(self, name: str) -> int:
        return int(self.values.get(INDEX[name], 0))

    def square(self, name: str) -> float:
        """The sum of squares in the quantity's own unit (seconds², score², compound²)."""
        return self.values.get(SQUARE_SLOT + SQUARE_INDEX[name], 0) / SQUARE_UNITS[name] ** 2

    @property
    def counts(self) -> list[int]:
        get = self.values.get
        return [int(get(i, 0)) for i in range(SQUARE_SLOT)]

    @property
    def squares(self) -> list[int]:
        get = self.values.get
        return [int(get(i, 0)) for i in range(SQUARE_SLOT, HIST_SLOT)]

    @property
    def hist(self) -> list[int]:
        get = self.values.get
        return [int(get(i, 0)) for i in range(HIST_SLOT, WIDTH)]

    def merge(self, other: Stats, sign: int = 1) -> None:
        v = self.values
        get = v.get
        for slot, x in other.values.items():
            total_ = get(slot, 0) + (x if sign == 1 else -x)
            if total_:
                v[slot] = total_
            else:
                del v[slot]

    def copy(self) -> Stats:
        return Stats(dict(self.values))

    def is_zero(self) -> bool:
        return not self.values  # exact integers: zeros are dropped as they arise

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Stats) and self.values == other.values

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Stats({self.values!r})"

    def to_list(self) -> list[int]:
        return [*self.counts, *self.squares, *self.hist]

    @classmethod
    def from_list(cls, values: Sequence[float]) -> Stats:
        return cls(
            {
                i: int(x)
                for i, x in enumerate(values)
                if x  # None (a SQL sum over no rows) and 0 both mean nothing there
            }
        )


def total(stats: Iterable[Stats]) -> Stats:
    out = Stats.zero()
    for s in stats:
        out.merge(s)
    return out


@dataclass(frozen=True)
class Score:
    """A value with its evidence: sample size and, where defined, a 95% interval."""

    value: float | None
    sample_size: int
    ci_low: float | None = None
    ci_high: float | None = None
    pending: int = 0
    relative_error: float = 0.0


def wilson(successes: int, n: int) -> tuple[float, float]:
    """Wilson score interval for a proportion, in percent."""
    p = successes / n
    denom = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denom
    return max(0.0, centre - half) * 100, min(1.0, centre + half) * 100


def rate(successes: int, n: int) -> Score:
    if n <= 0:
        return Score(None, 0)
    low, high = wilson(successes, n)
    return Score(successes / n * 100, n, low, high)


def nps(promoters: int, detractors: int, n: int) -> Score:
    """NPS with the adjusted-Wald interval: add 3 to n and 3/4 to promoters and detractors."""
    if n <= 0:
        return Score(None, 0)
    value = (promoters - detractors) / n * 100
    na = n + 3
    p, d = (promoters + 0.75) / na, (detractors + 0.75) / na
    centre = p - d
    half = Z95 * math.sqrt(max(p + d - centre * centre, 0.0) / na)
    return Score(value, n, max(-100.0, (centre - half) * 100), min(100.0, (centre + half) * 100))


def mean(total_: float, squares: float, n: int, scale: float = 1.0) -> Score:
    """A mean of ``n`` values summing to ``total_`` (in units of 1/``scale``), with a normal 95%
    interval from the sample variance when there are at least two values."""
    if n <= 0:
        return Score(None, 0)
    m = total_ / scale / n
    if n < 2:
        return Score(m, n)
    var = max((squares - n * m * m) / (n - 1), 0.0)
    half = Z95 * math.sqrt(var / n)
    return Score(m, n, m - half, m + half)


def percentile(hist: Sequence[int], q: float) -> Score:
    """Nearest-rank percentile from the histogram, within :data:`PERCENTILE_ERROR`."""
    n = sum(hist)
    if n <= 0:
        return Score(None, 0)
    rank = max(1, math.ceil(q * n))
    seen = 0
    for i, c in enumerate(hist):
        seen += c
        if seen >= rank:
            return Score(hist_value(i), n, relative_error=PERCENTILE_ERROR)
    raise AssertionError("unreachable")
