"""The read and admin facade the servicer talks to: customer scores, series from the rollups,
definitions and settings. SQL stays in storage; this module builds the rollup query of a
:class:`~services.metrics.query.Plan` and turns sufficient statistics into scores."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from google.protobuf import timestamp_pb2

from services.core.errors import InvalidArgument, NotFound, Violation
from services.metrics import derive as dv
from services.metrics import quality_rollup as qr
from services.metrics import query as q
from services.metrics.definitions import BY_NAME, DIMENSIONS, METRICS
from services.metrics.quality_storage import QualityStore
from services.metrics.stats import COUNTERS, SQUARES, Score, Stats, total
from services.metrics.storage import MetricsStore
from services.metrics.tenant_settings import MetricsConfig, updated
from tessera.v1 import metrics_pb2

PROFILE_PREFIX = "profiles/"
CONTEXT_EVALUATIONS = 5
CONTEXT_ALERTS = 10
WINDOWS: tuple[tuple[str, int | None], ...] = (("lifetime", None), ("30d", 30), ("90d", 90))
_HIST_METRICS = {"aht_p50_seconds", "aht_p90_seconds"}


def _ts(t: dt.datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(t)
    return out


def score_proto(s: Score) -> metrics_pb2.Score:
    out = metrics_pb2.Score(sample_size=s.sample_size)
    if s.value is not None:
        out.value = s.value
    if s.ci_low is not None and s.ci_high is not None:
        out.ci_low, out.ci_high = s.ci_low, s.ci_high
    return out


def profile_id_of(name: str, field: str = "profile") -> str:
    pid = name.removeprefix(PROFILE_PREFIX)
    if not name.startswith(PROFILE_PREFIX) or not pid or len(pid) > 64 or "/" in pid:
        raise InvalidArgument("invalid profile name", [Violation(field, "must be profiles/{profile_id}")])
    return pid


class MetricsReads:
    def __init__(
        self, store: MetricsStore, configs: Callable[[str], MetricsConfig], quality: QualityStore | None = None
    ) -> None:
        self.quality = quality
        self.store = store
        self.configs = configs

    # -- one customer ----------------------------------------------------------------------------

    def customer(self, tenant_id: str, name: str, now: dt.datetime | None = None) -> metrics_pb2.CustomerMetrics:
        pid = profile_id_of(name)
        survivor = self.store.survivor(tenant_id, pid)
        if survivor is None:
            raise NotFound(f"profile {name} was erased")
        config = self.configs(tenant_id)
        facts, others = self.store.customer(tenant_id, survivor)
        now = now or dt.datetime.now(dt.UTC)
        window = dt.timedelta(days=config.fcr_window_days)
        out = metrics_pb2.CustomerMetrics(profile=f"{PROFILE_PREFIX}{survivor}")
        out.compute_time.FromDatetime(now)
        for label, days in WINDOWS:
            chosen = facts if days is None else dv.since(facts, now - dt.timedelta(days=days))
            derived = dv.derive(chosen, others, config)
            stats = total(derived.contrib.values())
            pending = derived.pending(now, window)
            w = out.windows.add(window=label, fcr_pending=pending)
            for m in METRICS:
                w.scores[m.name].CopyFrom(score_proto(m.compute(stats, pending)))
            if days is None:
                for proto_field, metric in (
                    ("nps", "nps"),
                    ("csat", "csat"),
                    ("ces_mean", "ces_mean"),
                    ("ces_agree", "ces_agree"),
                    ("fcr", "fcr"),
                    ("aht_seconds", "aht_seconds"),
                    ("sentiment", "sentiment"),
                ):
                    getattr(out, proto_field).CopyFrom(w.scores[metric])
                out.fcr_pending = pending
        for p in dv.sentiment_trend(facts):
            out.sentiment_trend.add(
                interaction_id=p.interaction_id, time=_ts(p.first_at), score=p.mean, trend=p.trend, messages=p.messages
            )
        if self.quality is not None:
            for e in self.quality.evaluations(tenant_id, profile_id=survivor, limit=CONTEXT_EVALUATIONS):
                e.ClearField("answers")
                out.latest_evaluations.append(e)
            out.open_alerts.extend(
                self.quality.alerts(tenant_id, profile_id=survivor, acknowledged=False, limit=CONTEXT_ALERTS)
            )
        return out

    def erase(self, tenant_id: str, profile_names: list[str]) -> int:
        ids = []
        violations = []
        for i, raw in enumerate(profile_names):
            pid = raw.removeprefix(PROFILE_PREFIX)
            if not pid or len(pid) > 64 or "/" in pid:
                violations.append(Violation(f"profile_ids[{i}]", "a profile id"))
            ids.append(pid)
        if not ids:
            violations.append(Violation("profile_ids", "at least one"))
        if violations:
            raise InvalidArgument("invalid erasure", violations)
        erased = self.store.erase(tenant_id, ids)
        if self.quality is not None:  # transcripts and evaluations go with the facts
            self.quality.erase(tenant_id, ids)
        return erased

    # -- series ------------------------------------------------------------------------------------

    def query(
        self,
        tenant_id: str,
        metrics: list[str],
        start: dt.datetime | None,
        end: dt.datetime | None,
        granularity: int,
        group_by: list[str],
        filters: list[tuple[str, list[str]]],
        now: dt.datetime | None = None,
    ) -> metrics_pb2.QueryMetricsResponse:
        config = self.configs(tenant_id)
        quality = [m for m in metrics if m in qr.QUALITY_BY_NAME]
        if quality:
            if len(quality) != len(metrics):
                raise InvalidArgument(
                    "invalid metrics query",
                    [Violation("metrics", "quality metrics are queried on their own, not beside CX metrics")],
                )
            return self._quality_query(tenant_id, config, metrics, start, end, granularity, group_by, filters)
        plan = q.plan(config, metrics, start, end, granularity, group_by, filters)
        now = now or dt.datetime.now(dt.UTC)
        groups = self._sums(tenant_id, plan)
        pending = (
            self._pending(tenant_id, plan, now, config.fcr_window_days)
            if any(BY_NAME[m].uses_pending for m in plan.metrics)
            else {}
        )
        out = metrics_pb2.QueryMetricsResponse(
            start_time=_ts(plan.start), end_time=_ts(plan.end), time_zone=config.time_zone
        )
        by_dims: dict[tuple[Any, ...], set[Any]] = {}
        for k in (*groups, *pending):
            by_dims.setdefault(k[1:], set()).add(k[0])
        starts: dict[Any, timestamp_pb2.Timestamp] = {}  # bucket -> its start (the same in every series)
        zero = Stats.zero()
        for metric in plan.metrics:
            m = BY_NAME[metric]
            for dims in sorted(by_dims, key=repr):
                series = out.series.add(metric=metric)
                for d, v in zip(plan.group_by, dims, strict=True):
                    series.group[d] = q.CHANNEL_NAMES.get(v, "") if isinstance(v, int) else str(v)
                for b in sorted(by_dims[dims]):
                    key = (b, *dims)
                    found = m.compute(groups.get(key, zero), pending.get(key, 0) if m.uses_pending else 0)
                    if found.sample_size == 0 and not found.pending:
                        continue
                    point = series.points.add(score=score_proto(found), pending=found.pending)
                    at = starts.get(b)
                    if at is None:
                        at = starts[b] = _ts(self._instant(b, plan))
                    point.start_time.CopyFrom(at)
                    point.relative_error = found.relative_error
                if not series.points:
                    del out.series[-1]
        return out

    def _quality_query(
        self,
        tenant_id: str,
        config: MetricsConfig,
        metrics: list[str],
        start: dt.datetime | None,
        end: dt.datetime | None,
        granularity: int,
        group_by: list[str],
        filters: list[tuple[str, list[str]]],
    ) -> metrics_pb2.QueryMetricsResponse:
        """Quality metrics from the quality rollups: evaluation scores and auto-fail rates from the
        evaluation rows, pass and points rates from the answer rows (by question when asked)."""
        plan = q.plan(
            config,
            metrics,
            start,
            end,
            granularity,
            group_by,
            filters,
            catalogue=qr.QUALITY_BY_NAME,
            dimensions=qr.QUALITY_DIMENSIONS,
            hourly=False,
        )
        by_question = "question" in plan.group_by or any(d == "question" for d, _ in plan.filters)
        whole = [m for m in plan.metrics if not qr.QUALITY_BY_NAME[m].per_question]
        if by_question and whole:
            raise InvalidArgument(
                "invalid metrics query",
                [Violation("group_by", f"{whole[0]} is per evaluation; by question, ask for quality_pass_rate")],
            )
        lo, hi = self._range(plan)
        params: dict[str, Any] = {"t": tenant_id, "lo": lo, "hi": hi}
        columns = {"form": "form_id", "question": "question_id", "agent": "agent", "queue": "queue"}
        dims = "".join(f", {columns.get(d, d)}" for d in plan.group_by)
        where = "tenant_id = %(t)s AND day >= %(lo)s AND day < %(hi)s"
        for i, (dim, values) in enumerate(plan.filters):
            params[f"f{i}"] = list(values)
            where += f" AND {columns.get(dim, dim)} = ANY(%(f{i})s)"
        bucket = self._bucket_sql(plan, "day")
        sums: dict[bool, dict[tuple[Any, ...], tuple[Any, ...]]] = {}
        for per_question in sorted({qr.QUALITY_BY_NAME[m].per_question for m in plan.metrics}):
            rows = self.store.rollups(
                f"SELECT {bucket} AS b{dims}, sum(n), sum(auto_failed), sum(passed), sum(score_sum), sum(score_sq) "  # noqa: S608
                f"FROM metrics.quality_rollup_day WHERE {where} AND question_id {'<>' if per_question else '='} '' "
                f"GROUP BY 1{dims}",
                params,
            )
            sums[per_question] = {tuple(r[:-5]): tuple(float(x) for x in r[-5:]) for r in rows}
        out = metrics_pb2.QueryMetricsResponse(
            start_time=_ts(plan.start), end_time=_ts(plan.end), time_zone=config.time_zone
        )
        for metric in plan.metrics:
            found = sums[qr.QUALITY_BY_NAME[metric].per_question]
            for key_dims in sorted({k[1:] for k in found}, key=repr):
                series = out.series.add(metric=metric)
                for d, v in zip(plan.group_by, key_dims, strict=True):
                    series.group[d] = q.CHANNEL_NAMES.get(v, "") if isinstance(v, int) else str(v)
                for b in sorted(k[0] for k in found if k[1:] == key_dims):
                    value = qr.score(metric, *found[(b, *key_dims)])
                    if value.sample_size == 0:
                        continue
                    point = series.points.add(score=score_proto(value))
                    point.start_time.FromDatetime(self._instant(b, plan))
                if not series.points:
                    del out.series[-1]
        return out

    @staticmethod
    def _instant(bucket: Any, plan: q.Plan) -> dt.datetime:
        if plan.granularity == q.ALL:
            return plan.start
        if isinstance(bucket, dt.datetime):
            return bucket.astimezone(dt.UTC)
        return dt.datetime(bucket.year, bucket.month, bucket.day, tzinfo=plan.tz).astimezone(dt.UTC)

    @staticmethod
    def _bucket_sql(plan: q.Plan, column: str = "bucket") -> str:
        if plan.granularity in (q.HOUR, q.DAY):
            return column
        if plan.granularity == q.WEEK:
            return f"date_trunc('week', {column})::date"
        if plan.granularity == q.MONTH:
            return f"date_trunc('month', {column})::date"
        return "0"

    @staticmethod
    def _range(plan: q.Plan) -> tuple[Any, Any]:
        if plan.granularity == q.HOUR:
            return plan.start, plan.end
        return plan.start.astimezone(plan.tz).date(), plan.end.astimezone(plan.tz).date()

    def _where(self, plan: q.Plan, params: dict[str, Any]) -> str:
        clauses = []
        for i, (dim, values) in enumerate(plan.filters):
            params[f"f{i}"] = list(values)
            clauses.append(f" AND {dim} = ANY(%(f{i})s)")
        return "".join(clauses)

    def _sums(self, tenant_id: str, plan: q.Plan) -> dict[tuple[Any, ...], Stats]:
        lo, hi = self._range(plan)
        params: dict[str, Any] = {"t": tenant_id, "g": plan.grouping, "lo": lo, "hi": hi}
        dims = "".join(f", {d}" for d in plan.group_by)
        where = "tenant_id = %(t)s AND grouping = %(g)s AND bucket >= %(lo)s AND bucket < %(hi)s" + self._where(
            plan, params
        )
        # Counters summed as int8 (a bigint sum is numeric, and a Decimal per value was a sixth of
        # the query); the squares stay numeric, their sums can pass int8.
        sums = ", ".join([*(f"sum({c})::int8" for c in COUNTERS), *(f"sum({c})" for c in SQUARES)])
        b = self._bucket_sql(plan)
        rows = self.store.rollups(
            f"SELECT {b} AS b{dims}, {sums} FROM metrics.{plan.table} WHERE {where} GROUP BY 1{dims}",  # noqa: S608
            params,
        )
        n = 1 + len(plan.group_by)
        out: dict[tuple[Any, ...], Stats] = {}
        for row in rows:
            out[tuple(row[:n])] = Stats.from_list(row[n:])
        if _HIST_METRICS & set(plan.metrics):
            hist_rows = self.store.rollups(
                f"SELECT {b} AS b{dims}, u.i, sum(u.h) FROM metrics.{plan.table}, "  # noqa: S608
                f"unnest(hist) WITH ORDINALITY AS u(h, i) WHERE {where} GROUP BY 1{dims}, u.i",
                params,
            )
            for row in hist_rows:
                key = tuple(row[:n])
                stats = out.setdefault(key, Stats.zero())
                stats.add_hist(int(row[n]) - 1, int(row[n + 1]))
        return out

    def _pending(self, tenant_id: str, plan: q.Plan, now: dt.datetime, days: int) -> dict[tuple[Any, ...], int]:
        lo, hi = self._range(plan)
        column = "hour" if plan.granularity == q.HOUR else "day"
        params: dict[str, Any] = {"t": tenant_id, "lo": lo, "hi": hi, "since": now - dt.timedelta(days=days)}
        dims = "".join(f", {d}" for d in plan.group_by)
        if "source" in plan.group_by:  # contacts have no survey source
            dims = dims.replace(", source", ", ''::text")
        where = (
            f"tenant_id = %(t)s AND started_at > %(since)s AND {column} >= %(lo)s AND {column} < %(hi)s"
            + self._where(plan, params)
        )
        if any(d == "source" for d, _ in plan.filters):
            return {}
        rows = self.store.rollups(
            f"SELECT {self._bucket_sql(plan, column)} AS b{dims}, count(*) FROM metrics.open_contacts "  # noqa: S608
            f"WHERE {where} GROUP BY 1{dims}",
            params,
        )
        return {tuple(r[:-1]): int(r[-1]) for r in rows}

    # -- definitions and settings -------------------------------------------------------------------

    @staticmethod
    def definitions() -> metrics_pb2.ListMetricDefinitionsResponse:
        return metrics_pb2.ListMetricDefinitionsResponse(
            definitions=[
                metrics_pb2.MetricDefinition(
                    name=m.name,
                    display_name=m.display_name,
                    definition=m.definition,
                    formula=m.formula,
                    unit=m.unit,
                    interval=m.interval,
                )
                for m in METRICS
            ]
            + [
                metrics_pb2.MetricDefinition(
                    name=m.name,
                    display_name=m.name.replace("_", " "),
                    definition=m.text + " Dimensions: " + ", ".join(qr.QUALITY_DIMENSIONS) + "; per day at the finest.",
                    formula=m.formula,
                    unit=m.unit,
                    interval="normal 95%" if m.name == "quality_score" else "Wilson score interval, 95%",
                )
                for m in qr.QUALITY_METRICS
            ],
            dimensions=list(DIMENSIONS),
        )

    def settings(self, tenant_id: str) -> MetricsConfig:
        return self.store.config(tenant_id)

    def update_settings(self, tenant_id: str, values: dict[str, Any], paths: list[str]) -> MetricsConfig:
        config = updated(self.store.config(tenant_id), values, paths)
        self.store.save_config(tenant_id, config)
        return config
