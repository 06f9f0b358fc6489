"""Re-estimating a tenant's match weights from its stored records: the facade the CLI
(``tessera identity estimate TENANT [--apply]``) and the optional schedule
(``TESSERA_IDENTITY_ESTIMATE_INTERVAL``) call.

An estimate is only ever *proposed*: it is stored beside the active weights with its effect, and
the matcher keeps using the active weights (or the frozen defaults) until someone applies the
proposal. The schedule proposes and never applies.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from services.identity.estimate import (
    DEFAULT_RANDOM_PAIRS,
    DEFAULT_SEED,
    DEFAULT_WEIGHTS,
    Effect,
    Estimate,
    EstimationError,
    WeightChange,
    candidate_pairs,
    effect,
    estimate,
    weight_changes,
)
from services.identity.matching import MatchRecord
from services.identity.probabilistic import Thresholds
from services.identity.storage import IdentityStore
from services.identity.weights import ACTIVE, PROPOSED, Weights
from services.identity.weights_store import WeightsStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Diff:
    """Old weights against new, and what the change does over the tenant's candidate pairs.
    ``old_source`` says whether the old weights are the tenant's ``active`` ones or the ``defaults``."""

    tenant_id: str
    old: Weights
    new: Weights
    old_source: str
    thresholds: Thresholds
    effect: Effect
    changes: list[WeightChange]
    records: int
    estimate: Estimate | None = None

    def summary(self) -> dict[str, Any]:
        """What is stored with a proposal, so it can be shown again before it is applied."""
        out: dict[str, Any] = {
            "records": self.records,
            "old_source": self.old_source,
            "auto_merge_threshold": self.thresholds.auto_merge,
            "review_threshold": self.thresholds.review,
            "effect": asdict(self.effect),
        }
        if self.estimate is not None:
            out |= {
                "candidate_pairs": self.estimate.candidate_pairs,
                "random_pairs": self.estimate.random_pairs,
                "matches": round(self.estimate.matches, 2),
                "kept": list(self.estimate.kept),
                "unseen": list(self.estimate.unseen),
                "warnings": list(self.estimate.warnings),
            }
        return out


def _thresholds(store: IdentityStore, tenant_id: str) -> Thresholds:
    _spec, probabilistic, _updated = store.load_rules(tenant_id)
    return Thresholds.of(probabilistic)


def diff(
    tenant_id: str,
    records: Sequence[MatchRecord],
    old: Weights | None,
    new: Weights,
    thresholds: Thresholds,
    pairs: Sequence[tuple[int, int]] | None = None,
    est: Estimate | None = None,
) -> Diff:
    """``new`` against ``old`` (the defaults when the tenant has no active weights)."""
    before = DEFAULT_WEIGHTS if old is None else old
    eff = effect(records, before, new, thresholds.auto_merge, thresholds.review, pairs)
    source = "defaults" if old is None else "active"
    return Diff(tenant_id, before, new, source, thresholds, eff, weight_changes(before, new), len(records), est)


def propose(
    store: IdentityStore,
    weights: WeightsStore,
    tenant_id: str,
    *,
    seed: int = DEFAULT_SEED,
    random_pairs: int = DEFAULT_RANDOM_PAIRS,
    source: str = "cli",
) -> Diff:
    """Estimate the tenant's weights from its records and store them as proposed (the active
    weights do not change). Fields with too little data keep the active weights' values. Raises
    :class:`EstimationError` when the records cannot support an estimate."""
    records = weights.records(tenant_id)
    old = weights.active(tenant_id)
    pairs = candidate_pairs(records)
    fallback = DEFAULT_WEIGHTS if old is None else old
    est = estimate(records, seed=seed, random_pairs=random_pairs, fallback=fallback, pairs=pairs)
    out = diff(tenant_id, records, old, est.weights, _thresholds(store, tenant_id), pairs, est)
    weights.propose(tenant_id, est.weights, {**out.summary(), "seed": seed, "source": source})
    return out


def apply(store: IdentityStore, weights: WeightsStore, tenant_id: str) -> Diff:
    """Make the tenant's proposed weights active (every replica's matcher uses them once its rules
    cache refreshes, ``TESSERA_IDENTITY_RULES_CACHE_SECONDS``); the diff is against the weights
    active until now. Raises :class:`~services.identity.weights_store.NothingProposed`."""
    old = weights.active(tenant_id)
    applied = weights.apply(tenant_id)
    return diff(tenant_id, weights.records(tenant_id), old, applied.weights, _thresholds(store, tenant_id))


def show(store: IdentityStore, weights: WeightsStore, tenant_id: str) -> Diff | None:
    """The stored proposal against the active weights (or the defaults), without estimating again;
    ``None`` when nothing is proposed. This is how a scheduled proposal is looked at."""
    stored = weights.load(tenant_id)
    if PROPOSED not in stored:
        return None
    old = stored[ACTIVE].weights if ACTIVE in stored else None
    return diff(tenant_id, weights.records(tenant_id), old, stored[PROPOSED].weights, _thresholds(store, tenant_id))


def propose_all(store: IdentityStore, weights: WeightsStore, tenant_ids: Iterable[str]) -> dict[str, str]:
    """The schedule's job: propose new weights for every tenant with probabilistic matching on;
    a tenant whose records cannot support an estimate is skipped (and says why). Never applies."""
    outcome: dict[str, str] = {}
    for tenant_id in tenant_ids:
        _spec, probabilistic, _updated = store.load_rules(tenant_id)
        if not probabilistic.get("enabled"):
            continue
        try:
            d = propose(store, weights, tenant_id, source="schedule")
        except EstimationError as exc:
            outcome[tenant_id] = f"skipped: {exc}"
            log.info("identity weights not re-estimated", extra={"tenant": tenant_id, "reason": str(exc)})
            continue
        outcome[tenant_id] = "proposed"
        log.info(
            "identity weights proposed",
            extra={
                "tenant": tenant_id,
                "records": d.records,
                "lost_merges": d.effect.lost_merges,
                "new_merges": d.effect.new_merges,
            },
        )
    return outcome
