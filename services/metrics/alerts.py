"""Real-time alert rules: what a valid rule is, and whether one fires for an interaction. Pure,
no I/O. A rule fires at most once per interaction (the store keeps that unique), with a
description and the evidence that made it fire.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from services.core.errors import InvalidArgument, Violation
from services.metrics import categories as cat
from services.metrics import forms
from services.metrics.facts import Fact
from tessera.v1 import quality_pb2

MAX_QUEUES = 50


@dataclass
class Watched:
    """An interaction as the rules see it: its legs so far (maybe none yet: a chat's legs often
    arrive when it ends), its transcript with the customer's scores, and the customer's contacts
    (start, interaction, reason) and NPS answers (time, score, event id)."""

    interaction_id: str
    profile_id: str
    legs: Sequence[Fact] = ()
    transcript: Sequence[cat.Line] = ()
    customer_scores: Sequence[float] = ()
    contacts: Sequence[tuple[dt.datetime, str, str]] = ()
    nps: Sequence[tuple[dt.datetime, int, str]] = ()

    @property
    def ended(self) -> bool:
        return any(f.ended_at is not None for f in self.legs)

    @property
    def first(self) -> Fact | None:
        return min(self.legs, key=lambda f: (f.start, f.leg_id)) if self.legs else None

    @property
    def queue(self) -> str:
        first = self.first
        return first.queue if first else ""

    @property
    def agent(self) -> str:
        handled = sorted((f for f in self.legs if f.agent), key=lambda f: (f.start, f.leg_id))
        return handled[-1].agent if handled else ""

    @property
    def reason(self) -> str:
        for f in sorted(self.legs, key=lambda f: (f.start, f.leg_id)):
            if f.reason:
                return f.reason
        return ""


@dataclass(frozen=True)
class Fired:
    description: str
    evidence: tuple[quality_pb2.Evidence, ...] = field(default_factory=tuple)


def fire(rule: quality_pb2.AlertRule, w: Watched, known: Mapping[str, quality_pb2.Category]) -> Fired | None:
    """Whether ``rule`` fires for the interaction now."""
    if rule.queues and w.queue not in rule.queues:
        return None
    which = rule.WhichOneof("condition")
    if which == "sentiment_below":
        c = rule.sentiment_below
        scores = list(w.customer_scores)
        if w.ended or len(scores) < (c.min_messages or 2):
            return None
        mean = sum(scores) / len(scores)
        if mean >= c.threshold:
            return None
        return Fired(
            f"customer sentiment {mean:+.3f} over {len(scores)} messages, below {c.threshold:+.3f}, "
            "while the interaction is open",
            (quality_pb2.Evidence(description=f"last customer message scored {scores[-1]:+.3f}", value=mean),),
        )
    if which == "category_detected":
        category = known.get(rule.category_detected.category)
        if category is None:
            return None
        found = cat.detect(category, w.transcript)
        if not found.detected:
            return None
        return Fired(
            f"{rule.category_detected.category} detected: " + "; ".join(found.reasons),
            tuple(h.evidence() for h in found.hits),
        )
    first = w.first
    if first is None:
        return None
    start = first.start
    if which == "contact_after_low_nps":
        c2 = rule.contact_after_low_nps
        days, max_score = c2.days or 7, c2.max_score if c2.HasField("max_score") else 6
        low = [(at, s, e) for at, s, e in w.nps if s <= max_score and start - dt.timedelta(days=days) <= at < start]
        if not low:
            return None
        at, score, event_id = max(low)
        return Fired(
            f"the customer answered NPS {score} on {at:%Y-%m-%d} and got in touch again within {days} days",
            (quality_pb2.Evidence(description=f"NPS {score}", event_id=event_id, value=float(score)),),
        )
    if which == "repeated_reason":
        c3 = rule.repeated_reason
        days, wanted = c3.days or 7, c3.contacts or 3
        reason = w.reason
        if not reason:
            return None
        window = [(s, iid) for s, iid, r in w.contacts if r == reason and start - dt.timedelta(days=days) <= s <= start]
        earlier = sorted({iid for _s, iid in window} - {w.interaction_id})
        if len(earlier) + 1 < wanted:
            return None
        return Fired(
            f"contact {len(earlier) + 1} on {reason!r} within {days} days",
            tuple(quality_pb2.Evidence(description=f"earlier contact {iid}") for iid in earlier),
        )
    return None


def validate(rule_id: str, rule: quality_pb2.AlertRule, categories: Sequence[str]) -> None:
    out: list[Violation] = []
    if not forms.is_id(rule_id):
        out.append(Violation("rule_id", "lowercase letters, digits and dashes, 1 to 63, not starting with a dash"))
    if len(rule.display_name) > 200:
        out.append(Violation("rule.display_name", "at most 200 characters"))
    if len(rule.queues) > MAX_QUEUES:
        out.append(Violation("rule.queues", f"at most {MAX_QUEUES}"))
    which = rule.WhichOneof("condition")
    if which is None:
        out.append(
            Violation(
                "rule.condition", "one of sentiment_below, category_detected, contact_after_low_nps, repeated_reason"
            )
        )
    elif which == "sentiment_below":
        c = rule.sentiment_below
        if not -1 < c.threshold <= 1:
            out.append(Violation("rule.sentiment_below.threshold", "above -1, at most 1"))
        if not 0 <= c.min_messages <= 1000:
            out.append(Violation("rule.sentiment_below.min_messages", "from 1 to 1,000 (0: the default, 2)"))
    elif which == "category_detected":
        if rule.category_detected.category not in categories:
            out.append(Violation("rule.category_detected.category", "a category of this tenant"))
    elif which == "contact_after_low_nps":
        c2 = rule.contact_after_low_nps
        if not 0 <= c2.days <= 365:
            out.append(Violation("rule.contact_after_low_nps.days", "from 1 to 365 (0: the default, 7)"))
        if not 0 <= c2.max_score <= 10:
            out.append(Violation("rule.contact_after_low_nps.max_score", "from 0 to 10"))
    else:
        c3 = rule.repeated_reason
        if not 0 <= c3.days <= 365:
            out.append(Violation("rule.repeated_reason.days", "from 1 to 365 (0: the default, 7)"))
        if not (c3.contacts == 0 or 2 <= c3.contacts <= 100):
            out.append(Violation("rule.repeated_reason.contacts", "from 2 to 100 (0: the default, 3)"))
    if out:
        raise InvalidArgument("invalid alert rule", out)
