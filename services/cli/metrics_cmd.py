"""``tessera metrics query|definitions``: CX series as a table, for people who would rather look
than write grpcurl JSON."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # kept off `tessera --help`'s import path
    from google.protobuf import timestamp_pb2

    from tessera.v1 import metrics_pb2

_RELATIVE = re.compile(r"^(\d+)([hdw])$")
_UNITS = {"h": dt.timedelta(hours=1), "d": dt.timedelta(days=1), "w": dt.timedelta(weeks=1)}


def when(raw: str, now: dt.datetime) -> dt.datetime:
    """``now``, ``30d`` / ``12h`` / ``2w`` ago, or an ISO date or time (UTC unless it says)."""
    if raw == "now":
        return now
    m = _RELATIVE.match(raw)
    if m:
        return now - int(m.group(1)) * _UNITS[m.group(2)]
    try:
        parsed = dt.datetime.fromisoformat(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r}: use now, 30d, 12h, 2w or an ISO date such as 2026-11-01") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def _ts(t: dt.datetime) -> timestamp_pb2.Timestamp:
    from google.protobuf import timestamp_pb2

    out = timestamp_pb2.Timestamp()
    out.FromDatetime(t)
    return out


def _fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    return f"{v:,.1f}" if abs(v) >= 10 or unit == "count" else f"{v:.3f}"


def rows(resp: metrics_pb2.QueryMetricsResponse, tz: str) -> list[list[str]]:
    import zoneinfo

    zone = zoneinfo.ZoneInfo(tz or "UTC")
    out = []
    for s in resp.series:
        group = " ".join(f"{k}={v or '-'}" for k, v in sorted(s.group.items()))
        for p in s.points:
            start = p.start_time.ToDatetime(tzinfo=dt.UTC).astimezone(zone)
            score = p.score
            value = score.value if score.HasField("value") else None
            ci = (
                f"[{_fmt(score.ci_low)}, {_fmt(score.ci_high)}]"
                if score.HasField("ci_low") and score.HasField("ci_high")
                else ""
            )
            extra = f"±{p.relative_error * 100:.1f}%" if p.relative_error else ""
            out.append(
                [
                    s.metric,
                    group,
                    start.strftime("%Y-%m-%d %H:%M"),
                    _fmt(value),
                    str(score.sample_size),
                    ci or extra,
                    str(p.pending) if p.pending else "",
                ]
            )
    return out


def table(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_metrics(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf import json_format

    from services.cli.client import auth_metadata, open_channel
    from tessera.v1 import metrics_pb2, metrics_pb2_grpc

    target = args.target or f"localhost:{os.environ.get('TESSERA_METRICS_PORT', '50054')}"
    key = args.api_key or os.environ.get("TESSERA_API_KEY", "")
    if not key:
        print("an API key is needed: --api-key or TESSERA_API_KEY", file=sys.stderr)
        return 2
    stub = metrics_pb2_grpc.MetricsServiceStub(open_channel(target, tls=args.tls))
    try:
        if args.action == "definitions":
            defs = stub.ListMetricDefinitions(
                metrics_pb2.ListMetricDefinitionsRequest(), metadata=auth_metadata(key), timeout=10
            )
            if args.json:
                print(json_format.MessageToJson(defs, preserving_proto_field_name=True))
            else:
                for d in defs.definitions:
                    print(f"{d.name} ({d.unit}): {d.definition}\n    = {d.formula}")
            return 0
        now = dt.datetime.now(dt.UTC)
        filters: list[metrics_pb2.MetricFilter] = []
        for raw in args.filter or []:
            dim, _, values = raw.partition("=")
            filters.append(metrics_pb2.MetricFilter(dimension=dim, values=[v for v in values.split(",") if v]))
        req = metrics_pb2.QueryMetricsRequest(
            metrics=[m for spec in args.metric for m in spec.split(",") if m],
            start_time=_ts(when(args.start, now)),
            end_time=_ts(when(args.end, now)),
            granularity=metrics_pb2.Granularity.Value(f"GRANULARITY_{args.granularity.upper()}"),
            group_by=[g for spec in args.group_by or [] for g in spec.split(",") if g],
            filters=filters,
        )
        resp = stub.QueryMetrics(req, metadata=auth_metadata(key), timeout=30)
    except grpc.RpcError as err:
        print(f"{err.code().name}: {err.details()}", file=sys.stderr)
        _violations(err)
        return 1
    if args.json:
        print(json_format.MessageToJson(resp, preserving_proto_field_name=True))
        return 0
    body = rows(resp, resp.time_zone)
    print(table(["metric", "group", f"bucket ({resp.time_zone})", "value", "n", "95% CI", "pending"], body))
    if not body:
        print("(no observations in this range)")
    return 0


def _violations(err: Any) -> None:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    for detail in status.details if status else []:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            for v in bad.field_violations:
                print(f"  {v.field}: {v.description}", file=sys.stderr)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("metrics", help="query CX metrics (NPS, CSAT, CES, FCR, AHT, sentiment...) as a table")
    p.add_argument("action", choices=["query", "definitions"])
    p.add_argument("--metric", action="append", default=[], help="metric name(s), comma-separated or repeated")
    p.add_argument("--from", dest="start", default="30d", help="now, 30d, 12h, 2w or an ISO date (default 30d)")
    p.add_argument("--to", dest="end", default="now", help="as --from (default now)")
    p.add_argument("--granularity", default="day", choices=["hour", "day", "week", "month", "all"])
    p.add_argument("--group-by", action="append", help="channel, queue, agent, reason, source (comma-separated)")
    p.add_argument("--filter", action="append", help="DIMENSION=VALUE[,VALUE...], repeatable")
    p.add_argument("--target", help="metrics address (default localhost:$TESSERA_METRICS_PORT)")
    p.add_argument("--api-key", help="default: $TESSERA_API_KEY")
    p.add_argument("--tls", action="store_true")
    p.add_argument("--json", action="store_true", help="the response as JSON")
    p.set_defaults(func=cmd_metrics)


__all__ = ["add_parser", "cmd_metrics", "rows", "table", "when"]
