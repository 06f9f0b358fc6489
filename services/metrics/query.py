"""A ``QueryMetrics`` request as a plan: validated, its range widened to whole buckets of the
tenant's time zone, the rollup table and dimension subset it reads. Pure, no I/O."""

from __future__ import annotations

import datetime as dt
import zoneinfo
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from services.core.errors import InvalidArgument, Violation
from services.metrics.definitions import BY_NAME, DIMENSIONS
from services.metrics.tenant_settings import MetricsConfig
from tessera.v1 import event_pb2

HOUR, DAY, WEEK, MONTH, ALL = "hour", "day", "week", "month", "all"
GRANULARITIES = {1: HOUR, 2: DAY, 3: WEEK, 4: MONTH, 5: ALL}
#: Dimension subsets kept in the rollups (bit i: DIMENSIONS[i]): per day none, each dimension alone
#: and all five; per hour none and all five (hourly queries span days, not months). Any other
#: subset is read from all five.
DAY_GROUPINGS: tuple[int, ...] = (0, 1, 2, 4, 8, 16, 31)
HOUR_GROUPINGS: tuple[int, ...] = (0, 31)
MAX_FILTER_VALUES = 100
CHANNELS = {
    name.removeprefix("CHANNEL_").lower(): number
    for name, number in event_pb2.Channel.items()
    if number != event_pb2.CHANNEL_UNSPECIFIED
}
CHANNEL_NAMES: dict[int, str] = {int(v): k for k, v in CHANNELS.items()}


@dataclass(frozen=True)
class Plan:
    metrics: tuple[str, ...]
    granularity: str
    group_by: tuple[str, ...]
    filters: tuple[tuple[str, tuple[object, ...]], ...]
    #: [start, end): UTC instants of local bucket edges.
    start: dt.datetime
    end: dt.datetime
    grouping: int
    tz: zoneinfo.ZoneInfo

    @property
    def table(self) -> str:
        return "rollup_hour" if self.granularity == HOUR else "rollup_day"

    def buckets(self) -> int:
        return len(bucket_starts(self))


def _local_midnight(d: dt.date, tz: zoneinfo.ZoneInfo) -> dt.datetime:
    return dt.datetime(d.year, d.month, d.day, tzinfo=tz).astimezone(dt.UTC)


def _floor(t: dt.datetime, granularity: str, tz: zoneinfo.ZoneInfo) -> dt.datetime:
    local = t.astimezone(tz)
    if granularity == HOUR:
        return local.replace(minute=0, second=0, microsecond=0).astimezone(dt.UTC)
    d = local.date()
    if granularity == WEEK:
        d -= dt.timedelta(days=d.weekday())
    elif granularity == MONTH:
        d = d.replace(day=1)
    return _local_midnight(d, tz)


def _next(t: dt.datetime, granularity: str, tz: zoneinfo.ZoneInfo) -> dt.datetime:
    """The start of the bucket after the one starting at ``t``."""
    if granularity == HOUR:
        return _next_hour(t, tz)
    d = t.astimezone(tz).date()
    if granularity == DAY:
        d += dt.timedelta(days=1)
    elif granularity == WEEK:
        d += dt.timedelta(days=7)
    else:
        d = (d.replace(day=28) + dt.timedelta(days=4)).replace(day=1)
    return _local_midnight(d, tz)


def _next_hour(t: dt.datetime, tz: zoneinfo.ZoneInfo) -> dt.datetime:
    # Local hours are whole UTC hours apart except in zones with sub-hour DST shifts; step in UTC
    # and floor again, so every local hour start is visited once.
    step = t + dt.timedelta(hours=1)
    floored = _floor(step, HOUR, tz)
    return floored if floored > t else _floor(step + dt.timedelta(minutes=30), HOUR, tz)


def _ceil(t: dt.datetime, granularity: str, tz: zoneinfo.ZoneInfo) -> dt.datetime:
    f = _floor(t, granularity, tz)
    return f if f == t else _next(f, granularity, tz)


def bucket_starts(plan: Plan) -> list[dt.datetime]:
    if plan.granularity == ALL:
        return [plan.start]
    out = []
    t = plan.start
    while t < plan.end:
        out.append(t)
        t = _next(t, plan.granularity, plan.tz)
    return out


def plan(
    config: MetricsConfig,
    metrics: list[str],
    start: dt.datetime | None,
    end: dt.datetime | None,
    granularity: int,
    group_by: list[str],
    filters: list[tuple[str, list[str]]],
    *,
    catalogue: Collection[str] = BY_NAME,
    dimensions: Sequence[str] = DIMENSIONS,
    hourly: bool = True,
) -> Plan:
    """The plan of a query over the CX rollups (the defaults) or another family of rollups: its
    metric names, dimensions, and whether it has hourly buckets."""
    violations: list[Violation] = []
    if not metrics:
        violations.append(Violation("metrics", "name at least one metric (ListMetricDefinitions lists them)"))
    for i, m in enumerate(metrics):
        if m not in catalogue:
            violations.append(
                Violation(f"metrics[{i}]", f"unknown metric {m[:100]!r}; ListMetricDefinitions lists them")
            )
    if len(set(metrics)) != len(metrics):
        violations.append(Violation("metrics", "each metric at most once"))
    gran = GRANULARITIES.get(granularity)
    if gran is None:
        violations.append(Violation("granularity", "one of HOUR, DAY, WEEK, MONTH, ALL"))
    elif gran == HOUR and not hourly:
        violations.append(Violation("granularity", "these metrics are kept per day: DAY, WEEK, MONTH or ALL"))
    for i, d in enumerate(group_by):
        if d not in dimensions:
            violations.append(Violation(f"group_by[{i}]", f"unknown dimension {d[:100]!r}; one of {list(dimensions)}"))
    if len(set(group_by)) != len(group_by):
        violations.append(Violation("group_by", "each dimension at most once"))
    parsed: list[tuple[str, tuple[object, ...]]] = []
    for i, (dim, values) in enumerate(filters):
        if dim not in dimensions:
            violations.append(
                Violation(f"filters[{i}].dimension", f"unknown dimension {dim[:100]!r}; one of {list(dimensions)}")
            )
            continue
        if not values or len(values) > MAX_FILTER_VALUES:
            violations.append(Violation(f"filters[{i}].values", f"1 to {MAX_FILTER_VALUES} values"))
            continue
        if dim == "channel":
            bad = [j for j, v in enumerate(values) if v not in CHANNELS]
            for j in bad:
                violations.append(Violation(f"filters[{i}].values[{j}]", f"a channel: one of {sorted(CHANNELS)}"))
            parsed.append((dim, tuple(CHANNELS.get(v, 0) for v in values)))
        else:
            parsed.append((dim, tuple(values)))
    if start is None:
        violations.append(Violation("start_time", "required"))
    if end is None:
        violations.append(Violation("end_time", "required"))
    if start is not None and end is not None:
        if end <= start:
            violations.append(Violation("end_time", "must be after start_time"))
        elif end - start > dt.timedelta(days=config.max_range_days):
            violations.append(
                Violation("end_time", f"the range is over this tenant's maximum of {config.max_range_days} days")
            )
    if violations:
        raise InvalidArgument("invalid metrics query", violations)
    assert start is not None and end is not None and gran is not None
    tz = config.tz
    floor_gran = DAY if gran == ALL else gran
    lo, hi = _floor(start, floor_gran, tz), _ceil(end, floor_gran, tz)
    needed = 0
    for d in {*group_by, *(f[0] for f in parsed)}:
        needed |= 1 << DIMENSIONS.index(d) if d in DIMENSIONS else 0
    kept = HOUR_GROUPINGS if gran == HOUR else DAY_GROUPINGS
    built = Plan(tuple(metrics), gran, tuple(group_by), tuple(parsed), lo, hi, needed if needed in kept else 31, tz)
    points = built.buckets() * len(metrics)
    if points > config.max_points:
        raise InvalidArgument(
            "the query would return too many points",
            [
                Violation(
                    "granularity",
                    f"{points} points ({built.buckets()} buckets x {len(metrics)} metrics) per series is over this "
                    f"tenant's maximum of {config.max_points}; choose a coarser granularity or a shorter range",
                )
            ],
        )
    return built
