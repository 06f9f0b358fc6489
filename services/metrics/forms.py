"""Evaluation forms: what a valid form is, and which interactions it applies to. Pure, no I/O.

Weights are percentages: a form's section weights total 100, and each section's question
weights total 100 (of the section). A question is worth ``section.weight * question.weight /
100`` points of the form's 100.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Collection, Sequence

from services.core.errors import InvalidArgument, Violation
from tessera.v1 import event_pb2, quality_pb2

_ID = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
MAX_SECTIONS = 50
MAX_QUESTIONS = 200
YES, NO = "yes", "no"
DEFAULT_YES_NO = (quality_pb2.AnswerOption(value=YES, points=100), quality_pb2.AnswerOption(value=NO, points=0))
_BOOLEAN_FACTS = (quality_pb2.CONTACT_FACT_TRANSFERRED, quality_pb2.CONTACT_FACT_ABANDONED)


def is_id(value: str) -> bool:
    return bool(_ID.match(value))


def options(q: quality_pb2.FormQuestion) -> Sequence[quality_pb2.AnswerOption]:
    """The question's answers with their points (yes/no questions default to yes 100, no 0)."""
    if q.type == quality_pb2.QUESTION_TYPE_YES_NO and not q.options:
        return DEFAULT_YES_NO
    return list(q.options)


def applies(form: quality_pb2.EvaluationForm, channel: int, queue: str, reason: str) -> bool:
    s = form.scope
    return (
        (not s.channels or channel in s.channels)
        and (not s.queues or queue in s.queues)
        and (not s.reasons or reason in s.reasons)
    )


def _near(value: float, target: float) -> bool:
    return abs(value - target) < 1e-6


def answer_kind(a: quality_pb2.AutomaticAnswer) -> int | None:
    """The question type an automatic source can answer."""
    which = a.WhichOneof("source")
    if which in ("category", "outcome") or (which == "fact" and a.fact in _BOOLEAN_FACTS):
        return quality_pb2.QUESTION_TYPE_YES_NO
    if which in ("fact", "sentiment"):
        return quality_pb2.QUESTION_TYPE_NUMERIC
    return None


def validate(
    form_id: str | None, form: quality_pb2.EvaluationForm, categories: Collection[str], field: str = "form"
) -> None:
    """Field violations for a form (its id only when creating); ``categories`` are the tenant's
    category names, which automatic answers may name."""
    out: list[Violation] = []
    if form_id is not None and not is_id(form_id):
        out.append(Violation("form_id", "lowercase letters, digits and dashes, 1 to 63, not starting with a dash"))
    if not form.display_name.strip() or len(form.display_name) > 200:
        out.append(Violation(f"{field}.display_name", "required, at most 200 characters"))
    for i, ch in enumerate(form.scope.channels):
        if ch not in event_pb2.Channel.values() or ch == event_pb2.CHANNEL_UNSPECIFIED:
            out.append(Violation(f"{field}.scope.channels[{i}]", f"unknown channel {ch}"))
    if not form.sections:
        out.append(Violation(f"{field}.sections", "at least one section"))
    if len(form.sections) > MAX_SECTIONS:
        out.append(Violation(f"{field}.sections", f"at most {MAX_SECTIONS} sections"))
    total = sum(s.weight for s in form.sections)
    if form.sections and not _near(total, 100):
        out.append(Violation(f"{field}.sections", f"section weights must total 100, not {total:g}"))
    section_ids: set[str] = set()
    question_ids: set[str] = set()
    count = 0
    for i, section in enumerate(form.sections):
        p = f"{field}.sections[{i}]"
        if not is_id(section.section_id):
            out.append(Violation(f"{p}.section_id", "lowercase letters, digits and dashes, 1 to 63"))
        elif section.section_id in section_ids:
            out.append(Violation(f"{p}.section_id", f"{section.section_id!r} is used twice"))
        section_ids.add(section.section_id)
        if not (0 < section.weight <= 100) or not math.isfinite(section.weight):
            out.append(Violation(f"{p}.weight", "more than 0, at most 100"))
        if not section.questions:
            out.append(Violation(f"{p}.questions", "at least one question"))
        q_total = sum(q.weight for q in section.questions)
        if section.questions and not _near(q_total, 100):
            out.append(Violation(f"{p}.questions", f"question weights must total 100, not {q_total:g}"))
        for j, q in enumerate(section.questions):
            count += 1
            qp = f"{p}.questions[{j}]"
            if not is_id(q.question_id):
                out.append(Violation(f"{qp}.question_id", "lowercase letters, digits and dashes, 1 to 63"))
            elif q.question_id in question_ids:
                out.append(Violation(f"{qp}.question_id", f"{q.question_id!r} is used twice in the form"))
            question_ids.add(q.question_id)
            if not q.text.strip() or len(q.text) > 500:
                out.append(Violation(f"{qp}.text", "required, at most 500 characters"))
            if not (0 < q.weight <= 100) or not math.isfinite(q.weight):
                out.append(Violation(f"{qp}.weight", "more than 0, at most 100"))
            out.extend(_question(q, qp, categories))
    if count > MAX_QUESTIONS:
        out.append(Violation(f"{field}.sections", f"at most {MAX_QUESTIONS} questions in a form"))
    if out:
        raise InvalidArgument("invalid evaluation form", out)


def _points(value: float) -> bool:
    return math.isfinite(value) and 0 <= value <= 100


def _question(q: quality_pb2.FormQuestion, p: str, categories: Collection[str]) -> list[Violation]:
    out: list[Violation] = []
    if q.type == quality_pb2.QUESTION_TYPE_YES_NO:
        if q.options and sorted(o.value for o in q.options) != [NO, YES]:
            out.append(Violation(f"{p}.options", 'a yes/no question has exactly the options "yes" and "no" (or none)'))
        if q.ranges:
            out.append(Violation(f"{p}.ranges", "only numeric questions have ranges"))
    elif q.type == quality_pb2.QUESTION_TYPE_SINGLE_CHOICE:
        values = [o.value for o in q.options]
        if len(values) < 2:
            out.append(Violation(f"{p}.options", "at least two options"))
        if any(not v.strip() or len(v) > 100 for v in values) or len(set(values)) != len(values):
            out.append(Violation(f"{p}.options", "option values are required, distinct, at most 100 characters"))
        if q.ranges:
            out.append(Violation(f"{p}.ranges", "only numeric questions have ranges"))
    elif q.type == quality_pb2.QUESTION_TYPE_NUMERIC:
        if not q.ranges:
            out.append(Violation(f"{p}.ranges", "at least one range"))
        if q.options:
            out.append(Violation(f"{p}.options", "numeric questions score by ranges, not options"))
        spans = []
        for k, r in enumerate(q.ranges):
            lo = r.min if r.HasField("min") else -math.inf
            hi = r.max if r.HasField("max") else math.inf
            if math.isnan(lo) or math.isnan(hi) or lo >= hi:
                out.append(Violation(f"{p}.ranges[{k}]", "min must be below max"))
            if not _points(r.points):
                out.append(Violation(f"{p}.ranges[{k}].points", "from 0 to 100"))
            spans.append((lo, hi, k))
        spans.sort()
        for (_, hi, _k), (lo, _, k) in itertools.pairwise(spans):
            if lo < hi:
                out.append(Violation(f"{p}.ranges[{k}]", "ranges must not overlap"))
    else:
        out.append(Violation(f"{p}.type", "yes/no, single choice or numeric"))
    for k, o in enumerate(q.options):
        if not _points(o.points):
            out.append(Violation(f"{p}.options[{k}].points", "from 0 to 100"))
    if q.HasField("automatic"):
        a = q.automatic
        which = a.WhichOneof("source")
        kind = answer_kind(a)
        if which is None:
            out.append(Violation(f"{p}.automatic", "name a category, fact, sentiment measure or outcome"))
        elif which == "category" and a.category not in categories:
            out.append(Violation(f"{p}.automatic.category", f"no category {a.category!r} in this tenant"))
        elif which == "fact" and (a.fact == 0 or a.fact not in quality_pb2.ContactFact.values()):
            out.append(Violation(f"{p}.automatic.fact", "a known contact fact"))
        elif which == "sentiment" and a.sentiment not in (1, 2):
            out.append(Violation(f"{p}.automatic.sentiment", "overall or trend"))
        elif which == "outcome" and a.outcome not in (1, 2):
            out.append(Violation(f"{p}.automatic.outcome", "repeat contact or low survey"))
        elif kind is not None and kind != q.type:
            wanted = "yes/no" if kind == quality_pb2.QUESTION_TYPE_YES_NO else "numeric"
            out.append(Violation(f"{p}.automatic", f"this source answers {wanted} questions"))
    return out
