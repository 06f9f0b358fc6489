"""A tenant's identity rules: cached per process, converted between their stored JSON form and
the ``tessera.v1.IdentityRules`` message, and updated with an AIP-134 ``update_mask``."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from services.core.errors import InvalidArgument, Violation
from services.core.identity_rules import DEFAULT_RULES, IdentityRules, validate_rules
from services.identity.storage import IdentityStore
from services.identity.weights import Weights
from services.identity.weights_store import WeightsStore
from tessera.v1 import identity_pb2

MASK_PATHS = (
    "types",
    "default_region",
    "blocked_values",
    "probabilistic",
    "probabilistic.enabled",
    "probabilistic.auto_merge_threshold",
    "probabilistic.review_threshold",
)


@dataclass(frozen=True)
class TenantRules:
    rules: IdentityRules
    probabilistic: dict[str, Any]
    updated_at: dt.datetime | None
    #: The tenant's active match weights (``tessera identity estimate --apply``); None: the defaults.
    weights: Weights | None = None


def rules_to_spec(rules: IdentityRules) -> dict[str, Any]:
    """The stored (and :func:`validate_rules`) form."""
    return {
        "default_region": rules.default_region,
        "blocked": sorted(rules.blocked),
        "types": [
            {
                "name": t.name,
                "normalizer": t.normalizer,
                "priority": t.priority,
                "max_per_profile": t.max_per_profile,
                "blocked": sorted(t.blocked),
            }
            for t in rules.types_by_priority
        ],
    }


def to_proto(tr: TenantRules) -> identity_pb2.IdentityRules:
    msg = identity_pb2.IdentityRules(
        name="identityRules",
        default_region=tr.rules.default_region,
        blocked_values=sorted(tr.rules.blocked),
        probabilistic=identity_pb2.ProbabilisticMatching(
            enabled=bool(tr.probabilistic.get("enabled", False)),
            auto_merge_threshold=float(tr.probabilistic.get("auto_merge_threshold", 0.0)),
            review_threshold=float(tr.probabilistic.get("review_threshold", 0.0)),
        ),
    )
    for t in tr.rules.types_by_priority:
        msg.types.add(
            type=t.name,
            normalizer=t.normalizer,
            priority=t.priority,
            max_per_profile=t.max_per_profile,
            blocked_values=sorted(t.blocked),
        )
    if tr.updated_at is not None:
        msg.update_time.FromDatetime(tr.updated_at)
    return msg


def apply_update(
    current: TenantRules, update: identity_pb2.IdentityRules, paths: Sequence[str]
) -> tuple[IdentityRules, dict[str, Any]]:
    """The rules after copying the masked fields of ``update`` over ``current``; every problem is
    reported as a field violation (``update_mask.paths[i]``, ``rules.types[email].priority``)."""
    bad = [
        Violation(f"update_mask.paths[{i}]", f"unknown field {p!r}; use one of: {', '.join(MASK_PATHS)}", "UNKNOWN")
        for i, p in enumerate(paths)
        if p not in MASK_PATHS
    ]
    if bad:
        raise InvalidArgument("invalid update_mask", bad)
    wanted = set(paths) or {"types", "default_region", "blocked_values", "probabilistic"}
    spec = rules_to_spec(current.rules)
    if "types" in wanted:
        spec["types"] = [
            {
                "name": t.type,
                "normalizer": t.normalizer,
                "priority": t.priority,
                "max_per_profile": t.max_per_profile,
                "blocked": list(t.blocked_values),
            }
            for t in update.types
        ]
        if not update.types:
            spec["types"] = []
    if "default_region" in wanted:
        spec["default_region"] = update.default_region
    if "blocked_values" in wanted:
        spec["blocked"] = list(update.blocked_values)
    try:
        rules = validate_rules(spec)
    except InvalidArgument as err:
        raise InvalidArgument(
            err.message.replace("invalid identity rules", "invalid rules"),
            [Violation(_proto_path(v.field), v.description, v.reason) for v in err.violations],
        ) from None
    prob = dict(current.probabilistic)
    source = update.probabilistic
    for name in ("enabled", "auto_merge_threshold", "review_threshold"):
        if "probabilistic" in wanted or f"probabilistic.{name}" in wanted:
            prob[name] = getattr(source, name)
    _check_probabilistic(prob)
    return rules, prob


def _proto_path(path: str) -> str:
    path = path.replace("blocked", "blocked_values") if path.rsplit(".", maxsplit=1)[-1].startswith("blocked") else path
    path = path.replace(".name", ".type")
    return f"rules.{path}"


def _check_probabilistic(prob: dict[str, Any]) -> None:
    violations = []
    auto = float(prob.get("auto_merge_threshold", 0.0))
    review = float(prob.get("review_threshold", 0.0))
    for name, value in (("auto_merge_threshold", auto), ("review_threshold", review)):
        if not 0.0 <= value <= 1.0:
            violations.append(Violation(f"rules.probabilistic.{name}", f"must be between 0 and 1, got {value}"))
    if review > auto > 0:
        violations.append(
            Violation("rules.probabilistic.review_threshold", "must not be above auto_merge_threshold", "ORDER")
        )
    if violations:
        raise InvalidArgument("invalid probabilistic matching settings", violations)


class RulesCache:
    """Rules per tenant, with its active match weights, re-read after ``ttl`` seconds so every
    replica follows an update."""

    def __init__(self, store: IdentityStore, ttl: float = 5.0) -> None:
        self.store = store
        self.weights = WeightsStore(store.engine)
        self.ttl = ttl
        self._cache: dict[str, tuple[float, TenantRules]] = {}
        self._lock = threading.Lock()

    def get(self, tenant_id: str) -> IdentityRules:
        return self.get_full(tenant_id).rules

    def get_full(self, tenant_id: str) -> TenantRules:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(tenant_id)
        if hit is not None and now - hit[0] < self.ttl:
            return hit[1]
        spec, prob, updated = self.store.load_rules(tenant_id)
        weights = self.weights.active(tenant_id)
        if hit is not None and (hit[1].updated_at, hit[1].probabilistic, hit[1].weights) == (updated, prob, weights):
            tr = hit[1]  # unchanged: keep the object, and with it the normalization memo
        else:
            tr = TenantRules(DEFAULT_RULES if spec is None else validate_rules(spec), prob, updated, weights)
        with self._lock:
            self._cache[tenant_id] = (now, tr)
        return tr

    def update(self, tenant_id: str, rules: IdentityRules, probabilistic: dict[str, Any]) -> TenantRules:
        updated = self.store.save_rules(tenant_id, rules_to_spec(rules), probabilistic)
        with self._lock:
            hit = self._cache.get(tenant_id)
        tr = TenantRules(
            rules, probabilistic, updated, hit[1].weights if hit is not None else self.weights.active(tenant_id)
        )
        with self._lock:
            self._cache[tenant_id] = (time.monotonic(), tr)
        return tr
