"""``tessera identity estimate TENANT [--apply]``: re-estimate a tenant's probabilistic-matching
weights from its own records (no labels), store them as proposed, and show old against new and
what the change would do; ``--apply`` (or ``tessera identity apply TENANT``) makes the proposal
the tenant's active weights. Reads and writes the identity database (``TESSERA_DATABASE_URL``)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # kept off `tessera --help`'s import path
    from services.identity.reestimate import Diff

EPILOG = (
    "The estimate is only proposed: matching keeps the tenant's active weights (or the built-in "
    "defaults) until the proposal is applied with --apply, and every identity replica picks the "
    "applied weights up within TESSERA_IDENTITY_RULES_CACHE_SECONDS. With "
    "TESSERA_IDENTITY_ESTIMATE_INTERVAL set (seconds; off by default) the identity service's leader "
    "re-estimates every tenant with probabilistic matching on at that interval; it too only "
    "proposes, never applies."
)


def format_diff(d: Diff, *, applied: bool) -> str:
    """The weight table and the effect, as ``tessera identity estimate`` prints them."""
    lines = []
    if d.estimate is not None:
        e = d.estimate
        lines.append(
            f"tenant {d.tenant_id}: {e.records} match records, {e.candidate_pairs} candidate pairs, "
            f"{e.random_pairs} random pairs; about {e.matches:.0f} matches among the candidates"
        )
        if e.kept:
            lines.append(f"too little data, these fields keep the {d.old_source} weights: {', '.join(e.kept)}")
        if e.unseen:
            lines.append(f"no pair landed on these levels, they keep the {d.old_source} weight: {', '.join(e.unseen)}")
        lines.extend(f"warning: {w}" for w in e.warnings)
    else:
        lines.append(f"tenant {d.tenant_id}: {d.records} match records")
    new_name = "applied (now active)" if applied else "proposed (stored, not in use)"
    lines.append(f"old: {d.old_source}   new: {new_name}   weight = log2(m/u) in bits")
    lines.append("")
    lines.append(f"{'field':<15} {'level':<22} {'old':>8} {'new':>8} {'change':>8}")
    for c in d.changes:
        lines.append(
            f"{c.field:<15} {c.level:<22} {c.old_bits:>+8.2f} {c.new_bits:>+8.2f} {c.new_bits - c.old_bits:>+8.2f}"
        )
    eff, t = d.effect, d.thresholds
    lines.append("")
    lines.append(
        f"effect over the tenant's {eff.pairs} candidate pairs (auto-merge >= {t.auto_merge}, "
        f"review >= {t.review}; pair by pair, without term-frequency adjustment):"
    )
    lines.append(f"{'':<12} {'old':>8} {'new':>8}")
    for label, attr in (("auto-merge", "merge"), ("review", "review"), ("no match", "no_match")):
        lines.append(f"{label:<12} {getattr(eff.old, attr):>8} {getattr(eff.new, attr):>8}")
    lines.append(f"auto-merges under the old weights that would no longer reach the threshold: {eff.lost_merges}")
    lines.append(f"pairs that would newly auto-merge: {eff.new_merges}")
    if not applied:
        lines.append("")
        lines.append(f"apply with: tessera identity estimate {d.tenant_id} --apply")
    return "\n".join(lines)


def diff_json(d: Diff, *, applied: bool) -> dict[str, Any]:
    return {
        "tenant": d.tenant_id,
        "state": "active" if applied else "proposed",
        "old_source": d.old_source,
        "old": d.old.to_json(),
        "new": d.new.to_json(),
        "changes": [asdict(c) for c in d.changes],
        **d.summary(),
    }


def cmd_identity(args: argparse.Namespace) -> int:
    from services.cli.main import _engine, _settings
    from services.core import tenancy
    from services.identity import reestimate
    from services.identity.estimate import EstimationError
    from services.identity.storage import IdentityStore
    from services.identity.weights_store import WeightsStore

    engine = _engine(_settings())
    try:
        if args.tenant not in tenancy.tenant_ids(engine):
            print(f"tessera: no enabled tenant {args.tenant!r}", file=sys.stderr)
            return 1
        store, weights = IdentityStore(engine), WeightsStore(engine)
        applied = args.action == "apply" or args.apply
        if args.action == "show":
            shown = reestimate.show(store, weights, args.tenant)
            if shown is None:
                print(f"tessera: tenant {args.tenant!r} has no proposed weights", file=sys.stderr)
                return 1
            d = shown
        elif applied:
            d = reestimate.apply(store, weights, args.tenant)
        else:
            try:
                d = reestimate.propose(store, weights, args.tenant, seed=args.seed, random_pairs=args.random_pairs)
            except EstimationError as exc:
                print(f"tessera: not estimated, the active weights are unchanged: {exc}", file=sys.stderr)
                return 1
        print(json.dumps(diff_json(d, applied=applied)) if args.json else format_diff(d, applied=applied))
        return 0
    finally:
        engine.dispose()


def add_parser(sub: Any) -> None:
    from services.identity.estimate import DEFAULT_RANDOM_PAIRS, DEFAULT_SEED

    p = sub.add_parser("identity", help="identity resolution upkeep: re-estimate a tenant's matching weights")
    actions = p.add_subparsers(dest="action", required=True)
    est = actions.add_parser(
        "estimate",
        help="estimate a tenant's match weights from its own records and store them as proposed",
        description=(
            "Estimate the tenant's Fellegi-Sunter weights (m/u per field and level, and the prior) from "
            "its stored match records, without labels, store them as proposed, and show the old and new "
            "weights and their effect on the tenant's candidate pairs."
        ),
        epilog=EPILOG,
    )
    est.add_argument("tenant")
    est.add_argument("--apply", action="store_true", help="make the stored proposal active (no new estimate)")
    est.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random pair sampling seed")
    est.add_argument("--random-pairs", type=int, default=DEFAULT_RANDOM_PAIRS, help="random pairs for u")
    est.add_argument("--json", action="store_true")
    est.set_defaults(func=cmd_identity)
    app = actions.add_parser("apply", help="make a tenant's proposed match weights active", epilog=EPILOG)
    app.add_argument("tenant")
    app.add_argument("--json", action="store_true")
    app.set_defaults(func=cmd_identity, apply=True)
    show = actions.add_parser(
        "show", help="show a tenant's stored proposal against its active weights, without estimating", epilog=EPILOG
    )
    show.add_argument("tenant")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_identity, apply=False)
