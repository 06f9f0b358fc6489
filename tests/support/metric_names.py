"""The metrics the code exports, derived from the code itself: every ``create_<instrument>("name",
unit=...)`` call under ``services/``, and the names Prometheus shows for them, produced by the
SDK's own Prometheus exporter (so its renaming rules, unit suffixes and ``_total`` are never
restated here)."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry, generate_latest

ROOT = Path(__file__).resolve().parents[2]
KINDS = (
    "counter",
    "up_down_counter",
    "histogram",
    "gauge",
    "observable_counter",
    "observable_up_down_counter",
    "observable_gauge",
)
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{|\s)")


@dataclass(frozen=True)
class Instrument:
    name: str
    kind: str
    unit: str
    where: str


def declared_instruments(root: Path = ROOT / "services") -> list[Instrument]:
    """Every instrument the services create, found by reading their source."""
    found: list[Instrument] = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            kind = node.func.attr.removeprefix("create_")
            if not node.func.attr.startswith("create_") or kind not in KINDS:
                continue
            args = {kw.arg: kw.value for kw in node.keywords}
            # create_counter(name, unit, description); create_observable_gauge(name, callbacks, unit, ...)
            unit_at = 2 if kind.startswith("observable") else 1
            name = node.args[0] if node.args else args.get("name")
            unit = node.args[unit_at] if len(node.args) > unit_at else args.get("unit")
            if not (isinstance(name, ast.Constant) and isinstance(name.value, str)):
                raise AssertionError(f"{path}:{node.lineno}: instrument names must be literal strings")
            unit_text = unit.value if isinstance(unit, ast.Constant) and isinstance(unit.value, str) else ""
            found.append(Instrument(name.value, kind, unit_text, f"{path.relative_to(ROOT)}:{node.lineno}"))
    return found


def prometheus_names(instruments: Iterable[Instrument]) -> dict[str, set[str]]:
    """For each instrument, the sample names ``/metrics`` shows once it has recorded (for a
    histogram ``_bucket``, ``_sum`` and ``_count``), from the SDK's exporter itself."""
    out: dict[str, set[str]] = {}
    for inst in instruments:
        # A provider of its own per instrument: what each one adds to a scrape is all there is.
        registry = CollectorRegistry()
        provider = MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry)])
        try:
            _record(provider.get_meter("names"), inst)
            out.setdefault(inst.name, set()).update(_samples(registry))
        finally:
            provider.shutdown()
    return out


def _record(meter: object, inst: Instrument) -> None:
    def one(_options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(1)]

    create = getattr(meter, f"create_{inst.kind}")
    if inst.kind.startswith("observable"):
        create(inst.name, [one], unit=inst.unit)
        return
    instrument = create(inst.name, unit=inst.unit)
    if inst.kind == "histogram":
        instrument.record(1)
    elif inst.kind == "gauge":
        instrument.set(1)
    else:
        instrument.add(1)


def _samples(registry: CollectorRegistry) -> set[str]:
    """The sample names a scrape of ``registry`` shows (target_info aside)."""
    return sample_names(generate_latest(registry).decode()) - {"target_info"}


def sample_names(metrics_text: str) -> set[str]:
    """The sample names in a ``/metrics`` response."""
    return {m.group(1) for line in metrics_text.splitlines() if not line.startswith("#") and (m := _SAMPLE.match(line))}
