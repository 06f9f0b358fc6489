"""The Grafana dashboard names only metrics the code exports, as Prometheus names them.

The exported names are derived from the code, not kept by hand: every instrument created under
``services/`` (read from the source), renamed by the SDK's own Prometheus exporter. A renamed or
removed instrument, or a typo in a panel, fails here instead of showing "No data".
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.metric_names import ROOT, declared_instruments, prometheus_names

DASHBOARD = ROOT / "helm" / "tessera" / "dashboards" / "tessera.json"
#: What the issue asks the dashboard to show, by the instrument (OTel name) behind it.
REQUIRED = (
    "tessera.rpc.duration",
    "tessera.ingest.events",
    "tessera.bus.consumer_lag",
    "tessera.bus.consumer_pending",
    "tessera.identity.merges",
    "tessera.identity.unmerges",
    "tessera.profile.context.cache",
    "tessera.quality.evaluations",
    "tessera.quality.alerts",
    "tessera.leader.status",
    "tessera.gateway.requests",
    "tessera.gateway.events",
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
_NUMBER = re.compile(r"(?<![\w:])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless"})
_KEYWORDS |= {"offset", "inf", "nan", "Inf", "NaN"}
_LABEL_VALUES = re.compile(r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,")
_LABEL_VALUES_LABEL = re.compile(r"label_values\(\s*[a-zA-Z_:][a-zA-Z0-9_:]*\s*,\s*([a-zA-Z_][a-zA-Z0-9_]*)")


def metric_names_in(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (function names, labels, keywords aside)."""
    names = set(_LABEL_VALUES.findall(expr))
    if names:
        return names
    text = _VARIABLE.sub(" ", expr)
    text = _STRING.sub(" ", text)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    out = set()
    for m in _NAME.finditer(text):
        rest = text[m.end() :].lstrip()
        if rest.startswith("(") or m.group() in _KEYWORDS:
            continue  # a function or an aggregation
        out.add(m.group())
    return out


_MATCHER_LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUP_LABELS = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
#: Labels Prometheus adds itself: the scrape's, and the buckets' bound.
SCRAPE_LABELS = frozenset({"instance", "job", "le"})


def labels_in(expr: str) -> set[str]:
    """The label names an expression filters or groups by (the scrape's own aside)."""
    text = _STRING.sub('""', _VARIABLE.sub(" ", expr))
    found = {m.group(1) for block in _MATCHERS.findall(text) for m in _MATCHER_LABEL.finditer(block)}
    found |= {label.strip() for group in _GROUP_LABELS.findall(text) for label in group.split(",") if label.strip()}
    found |= set(_LABEL_VALUES_LABEL.findall(text))
    return found - SCRAPE_LABELS


def expressions(node: Any) -> Iterator[str]:
    """Every PromQL expression in the dashboard: panel targets (rows included) and variables."""
    if isinstance(node, dict):
        for key, value in node.items():
            promql = key in ("expr", "definition") or (key == "query" and "(" in str(value))
            if promql and isinstance(value, str):
                yield value
            else:
                yield from expressions(value)
    elif isinstance(node, list):
        for item in node:
            yield from expressions(item)


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return dict(json.loads(Path(DASHBOARD).read_text(encoding="utf-8")))


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    return prometheus_names(declared_instruments())


def test_every_metric_the_dashboard_reads_is_one_the_code_exports(
    dashboard: dict[str, Any], exported: dict[str, set[str]]
) -> None:
    known = set().union(*exported.values())
    used = {name: expr for expr in expressions(dashboard) for name in metric_names_in(expr)}
    assert used, "no PromQL found in the dashboard"
    unknown = {name: expr for name, expr in used.items() if name not in known}
    assert not unknown, f"the dashboard reads metrics no code exports: {unknown}"


def test_the_dashboard_shows_what_operators_were_promised(
    dashboard: dict[str, Any], exported: dict[str, set[str]]
) -> None:
    used = {name for expr in expressions(dashboard) for name in metric_names_in(expr)}
    missing = [name for name in REQUIRED if name not in exported or not exported[name] & used]
    assert not missing, f"no panel reads {missing}"


def test_every_panel_uses_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    assert {"datasource", "service"} <= {v["name"] for v in dashboard["templating"]["list"]}
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]


def test_the_parser_finds_names_and_skips_functions_labels_and_variables() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, service_name) (rate(tessera_rpc_duration_seconds_bucket"
        '{rpc_method=~"a|b", service_name=~"$service"}[$__rate_interval]))) / on (x) group_left up'
    )
    assert metric_names_in(expr) == {"tessera_rpc_duration_seconds_bucket", "up"}
    assert metric_names_in("label_values(tessera_rpc_duration_seconds_count, service_name)") == {
        "tessera_rpc_duration_seconds_count"
    }
    assert metric_names_in("sum(rate(a_total[5m])) / clamp_min(sum(rate(b_total[5m])), 1e-9)") == {"a_total", "b_total"}


def test_the_label_parser_finds_matchers_and_groupings() -> None:
    expr = (
        'sum by (service_name, rpc_method) (rate(x_count{service_name=~"$service", code!="OK"}[5m]))'
        " / on (instance) group_left sum without (le) (y)"
    )
    assert labels_in(expr) == {"service_name", "rpc_method", "code"}
    assert labels_in("label_values(tessera_rpc_duration_seconds_count, service_name)") == {"service_name"}


def test_instruments_have_unique_names() -> None:
    seen: dict[str, str] = {}
    for inst in declared_instruments():
        assert inst.name not in seen, f"{inst.name} is created at {seen.get(inst.name)} and {inst.where}"
        seen[inst.name] = inst.where
