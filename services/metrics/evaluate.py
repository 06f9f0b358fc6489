"""One interaction evaluated under one form: every answer with its evidence, the section scores
and the total. Pure, no I/O: the same inputs give the same evaluation, so re-evaluating on a
redelivered event changes nothing and a late message changes exactly what it should.

Scoring: an answered question earns ``points/100`` of its share of the form; the total is the
points earned over the points of the answered questions (N/A and awaiting-review questions
count 0 of 0), 0 when an auto-fail answer was given.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from google.protobuf import timestamp_pb2

from services.metrics import categories as cat
from services.metrics import forms
from services.metrics.facts import Fact
from tessera.v1 import event_pb2, quality_pb2

_FACT_NAMES = {
    quality_pb2.CONTACT_FACT_HOLD_SECONDS: "hold",
    quality_pb2.CONTACT_FACT_TALK_SECONDS: "talk",
    quality_pb2.CONTACT_FACT_AFTER_CONTACT_WORK_SECONDS: "after-contact work",
    quality_pb2.CONTACT_FACT_HANDLE_SECONDS: "handle time",
    quality_pb2.CONTACT_FACT_WAIT_SECONDS: "wait",
    quality_pb2.CONTACT_FACT_TRANSFERRED: "transferred",
    quality_pb2.CONTACT_FACT_ABANDONED: "abandoned",
}
#: A survey answer this low on its scale is a low score.
LOW_SURVEY: dict[int, int] = {event_pb2.SURVEY_TYPE_NPS: 6, event_pb2.SURVEY_TYPE_CSAT: 2, event_pb2.SURVEY_TYPE_CES: 3}
_SURVEY_NAMES: dict[int, str] = {
    event_pb2.SURVEY_TYPE_NPS: "NPS",
    event_pb2.SURVEY_TYPE_CSAT: "CSAT",
    event_pb2.SURVEY_TYPE_CES: "CES",
}


@dataclass(frozen=True)
class Survey:
    event_id: str
    survey_type: int
    score: int


@dataclass(frozen=True)
class HumanAnswer:
    value: str
    not_applicable: bool
    reviewer: str
    reason: str
    at: dt.datetime


@dataclass
class Interaction:
    """What the evaluation reads: the interaction's legs, its transcript (with each customer
    message's VADER score), its surveys, and whether the customer came back on the same reason
    within the FCR window (None while the window is open and nobody has)."""

    interaction_id: str
    profile_id: str
    legs: Sequence[Fact]
    transcript: Sequence[cat.Line] = ()
    customer_scores: Sequence[float] = ()
    surveys: Sequence[Survey] = ()
    repeat: bool | None = None
    repeat_evidence: str = ""

    @property
    def first(self) -> Fact:
        return min(self.legs, key=lambda f: (f.start, f.leg_id))

    @property
    def reason(self) -> str:
        for f in sorted(self.legs, key=lambda f: (f.start, f.leg_id)):
            if f.reason:
                return f.reason
        return ""

    @property
    def agent(self) -> str:
        """The agent of the last handled leg (who closed the contact)."""
        handled = sorted((f for f in self.legs if f.handled), key=lambda f: (f.start, f.leg_id))
        return handled[-1].agent if handled else ""

    @property
    def team(self) -> str:
        """That agent's team, as its leg says."""
        handled = sorted((f for f in self.legs if f.handled), key=lambda f: (f.start, f.leg_id))
        return handled[-1].team if handled else ""


@dataclass
class _Auto:
    value: str = ""
    number: float | None = None
    not_applicable: bool = False
    awaiting: bool = False
    evidence: list[quality_pb2.Evidence] = field(default_factory=list)


def _fact_value(ix: Interaction, fact: int) -> float:
    legs = ix.legs
    if fact == quality_pb2.CONTACT_FACT_HOLD_SECONDS:
        return sum(f.hold for f in legs)
    if fact == quality_pb2.CONTACT_FACT_TALK_SECONDS:
        return sum(f.talk for f in legs)
    if fact == quality_pb2.CONTACT_FACT_AFTER_CONTACT_WORK_SECONDS:
        return sum(f.acw for f in legs)
    if fact == quality_pb2.CONTACT_FACT_HANDLE_SECONDS:
        return sum(f.handle_seconds for f in legs if f.handled)
    if fact == quality_pb2.CONTACT_FACT_WAIT_SECONDS:
        return ix.first.wait
    if fact == quality_pb2.CONTACT_FACT_TRANSFERRED:
        return float(any(f.transferred for f in legs))
    return float(not any(f.handled for f in legs) and any(f.abandoned for f in legs))


def _automatic(q: quality_pb2.FormQuestion, ix: Interaction, known: Mapping[str, quality_pb2.Category]) -> _Auto:
    a = q.automatic
    which = a.WhichOneof("source")
    if which == "category":
        category = known.get(a.category)
        if category is None:  # deleted since the form was saved: a person decides
            return _Auto(awaiting=True)
        found = cat.detect(category, ix.transcript)
        evidence = [h.evidence() for h in found.hits]
        summary = f"{a.category} {'detected' if found.detected else 'not detected'}: " + "; ".join(found.reasons)
        return _Auto(
            forms.YES if found.detected else forms.NO, evidence=[quality_pb2.Evidence(description=summary), *evidence]
        )
    if which == "fact":
        value = _fact_value(ix, a.fact)
        name = _FACT_NAMES[a.fact]
        if a.fact in (quality_pb2.CONTACT_FACT_TRANSFERRED, quality_pb2.CONTACT_FACT_ABANDONED):
            yes = value > 0
            return _Auto(
                forms.YES if yes else forms.NO,
                evidence=[quality_pb2.Evidence(description=f"{name}: {'yes' if yes else 'no'}", value=value)],
            )
        return _Auto(number=value, evidence=[quality_pb2.Evidence(description=f"{name} {value:.0f} s", value=value)])
    if which == "sentiment":
        scores = list(ix.customer_scores)
        if not scores:
            return _Auto(
                not_applicable=True, evidence=[quality_pb2.Evidence(description="no customer messages to score")]
            )
        if a.sentiment == quality_pb2.SENTIMENT_MEASURE_TREND:
            value = scores[-1] - scores[0]
            text = (
                f"customer sentiment moved {value:+.3f} from the first message ({scores[0]:+.3f}) "
                f"to the last ({scores[-1]:+.3f})"
            )
        else:
            value = sum(scores) / len(scores)
            text = f"customer sentiment {value:+.3f}, the mean of {len(scores)} messages"
        return _Auto(number=value, evidence=[quality_pb2.Evidence(description=text, value=value)])
    if which == "outcome":
        if a.outcome == quality_pb2.OUTCOME_REPEAT_CONTACT:
            if ix.repeat is None:
                return _Auto(
                    forms.NO,
                    evidence=[quality_pb2.Evidence(description=ix.repeat_evidence or "no repeat contact so far")],
                )
            return _Auto(
                forms.YES if ix.repeat else forms.NO, evidence=[quality_pb2.Evidence(description=ix.repeat_evidence)]
            )
        if not ix.surveys:
            return _Auto(
                not_applicable=True, evidence=[quality_pb2.Evidence(description="no survey on this interaction")]
            )
        low = [s for s in ix.surveys if s.score <= LOW_SURVEY.get(s.survey_type, -1)]
        shown = low or list(ix.surveys)
        evidence = [
            quality_pb2.Evidence(
                description=f"{_SURVEY_NAMES.get(s.survey_type, 'survey')} {s.score}" + (" (low)" if s in low else ""),
                event_id=s.event_id,
                value=float(s.score),
            )
            for s in shown
        ]
        return _Auto(forms.YES if low else forms.NO, evidence=evidence)
    return _Auto(awaiting=True)


def _range(q: quality_pb2.FormQuestion, value: float) -> quality_pb2.NumericRange | None:
    for r in q.ranges:
        lo = r.min if r.HasField("min") else -math.inf
        hi = r.max if r.HasField("max") else math.inf
        if lo <= value < hi:
            return r
    return None


def _score(q: quality_pb2.FormQuestion, value: str, number: float | None) -> tuple[float, bool, str]:
    """(points 0-100, auto-fail, a note when the answer earns nothing by default)."""
    if q.type == quality_pb2.QUESTION_TYPE_NUMERIC:
        r = _range(q, number if number is not None else math.nan)
        if r is None:
            return 0.0, False, "in no range of the question: 0 points"
        return r.points, r.auto_fail, ""
    for o in forms.options(q):
        if o.value == value:
            return o.points, o.auto_fail, ""
    return 0.0, False, f"{value!r} is not an answer of the question: 0 points"


def parse_answer(q: quality_pb2.FormQuestion, value: str) -> tuple[str, float | None] | None:
    """A person's answer as the question takes it, or None when it is not one of its answers."""
    if q.type == quality_pb2.QUESTION_TYPE_NUMERIC:
        try:
            number = float(value)
        except ValueError:
            return None
        return (f"{number:g}", number) if math.isfinite(number) else None
    if value in {o.value for o in forms.options(q)}:
        return value, None
    return None


def _ts(t: dt.datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(t)
    return out


def evaluate(
    form: quality_pb2.EvaluationForm,
    ix: Interaction,
    known: Mapping[str, quality_pb2.Category],
    human: Mapping[str, HumanAnswer] | None = None,
) -> quality_pb2.Evaluation:
    """The evaluation of ``ix`` under ``form`` (``known``: the tenant's categories by name;
    ``human``: people's answers by question id, which replace the automatic ones)."""
    human = human or {}
    first = ix.first
    form_id = form.name.removeprefix("evaluationForms/")
    out = quality_pb2.Evaluation(
        name=f"evaluations/{ix.interaction_id}/forms/{form_id}",
        interaction_id=ix.interaction_id,
        profile=f"profiles/{ix.profile_id}",
        form=form.name,
        form_version=form.version,
        channel=first.channel,  # type: ignore[arg-type]
        queue=first.queue,
        agent_id=ix.agent,
        team=ix.team,
        reason=ix.reason,
        interaction_start_time=_ts(first.start),
    )
    earned_total = possible_total = 0.0
    failed_by = ""
    for section in form.sections:
        earned = possible = 0.0
        for q in section.questions:
            share = section.weight * q.weight / 100
            auto = _automatic(q, ix, known) if q.HasField("automatic") else _Auto(awaiting=True)
            answer = quality_pb2.Answer(question_id=q.question_id, section_id=section.section_id)
            answer.evidence.extend(auto.evidence)
            answer.automatic_value = "" if auto.awaiting or auto.not_applicable else _text(auto)
            value, number, na = _text(auto), auto.number, auto.not_applicable
            answer.source = quality_pb2.ANSWER_SOURCE_AUTOMATIC
            if auto.awaiting:
                answer.source = quality_pb2.ANSWER_SOURCE_AWAITING_REVIEW
            if auto.not_applicable and not q.allow_not_applicable:
                answer.source = quality_pb2.ANSWER_SOURCE_AWAITING_REVIEW
                answer.evidence.add(description="no data, and the question does not allow N/A: a person must answer")
            h = human.get(q.question_id)
            if h is not None:
                parsed = None if h.not_applicable else parse_answer(q, h.value)
                na = h.not_applicable
                value, number = parsed if parsed else ("", None)
                answer.source = quality_pb2.ANSWER_SOURCE_HUMAN
                answer.override.reviewer, answer.override.reason = h.reviewer, h.reason
                answer.override.override_time.FromDatetime(h.at)
            if answer.source == quality_pb2.ANSWER_SOURCE_AWAITING_REVIEW:
                out.awaiting_review += 1
                out.answers.append(answer)
                continue
            if na:
                answer.not_applicable = True
                out.answers.append(answer)
                continue
            points, fails, note = _score(q, value, number)
            if note:
                answer.evidence.add(description=note)
            answer.value = value
            if number is not None:
                answer.number = number
            answer.max_points = share
            answer.points = share * points / 100
            answer.auto_fail = fails
            if fails and not failed_by:
                failed_by = q.question_id
            earned += answer.points
            possible += share
            out.answers.append(answer)
        score = out.sections.add(section_id=section.section_id)
        if possible > 0:
            score.score = round(100 * earned / possible, 4)
        earned_total += earned
        possible_total += possible
    if failed_by:
        out.auto_failed = True
        out.auto_fail_question = failed_by
        out.score = 0.0
    elif possible_total > 0:
        out.score = round(100 * earned_total / possible_total, 4)
    return out


def _text(auto: _Auto) -> str:
    if auto.number is not None:
        return f"{auto.number:g}"
    return auto.value
