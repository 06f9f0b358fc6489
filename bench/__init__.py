"""Benchmarks behind ``tessera bench <scenario>``.

Each scenario is a module with ``run(seconds=..., as_json=..., extra=...) -> int``. Figures go to
stdout (a table, or exactly one JSON object with ``--json``); every log line goes to stderr.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

SCENARIOS: dict[str, str] = {
    "ingest": "bench.ingest",
    "identity": "bench.identity",
    "identity-accuracy": "bench.identity_accuracy",
    "context": "bench.context",
    "freshness": "bench.freshness",
    "metrics": "bench.metrics",
    "quality": "bench.quality",
    "gateway": "bench.gateway",
}


def run_scenario(name: str, *, seconds: float = 10.0, as_json: bool = False, extra: Any = None) -> int:
    """Run one scenario and return the process exit code (0 ok, 1 failed check, 2 usage)."""
    module_name = SCENARIOS.get(name)
    if module_name is None:
        known = ", ".join(sorted(SCENARIOS))
        print(f"tessera bench: unknown scenario {name!r}; known: {known}", file=sys.stderr)
        return 2
    if seconds <= 0:
        print("tessera bench: --seconds must be > 0", file=sys.stderr)
        return 2
    module = importlib.import_module(module_name)
    result: int = module.run(seconds=seconds, as_json=as_json, extra=extra or argparse.Namespace())
    return result
