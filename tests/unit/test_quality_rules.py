"""Quality's rules on hand-made cases (pure: no database): phrase matching, category windows and
negation, form validation, and scoring with N/A, auto-fail, people's answers and evidence."""

from __future__ import annotations

import ast
import datetime as dt
from typing import Any

import pytest

from services.core.errors import InvalidArgument
from services.metrics import categories as cat
from services.metrics import evaluate as ev
from services.metrics import forms
from services.metrics.facts import LEG, Fact
from tessera.v1 import event_pb2, quality_pb2

T0 = dt.datetime(2026, 11, 2, 9, tzinfo=dt.UTC)
CUSTOMER, AGENT, BOT = event_pb2.AUTHOR_CUSTOMER, event_pb2.AUTHOR_AGENT, event_pb2.AUTHOR_BOT


def line(n: int, author: int, text: str, offset: float | None = None) -> cat.Line:
    return cat.Line(f"m{n}", author, text, float(n * 10 if offset is None else offset))


def rule(*phrases: str, **kw: object) -> quality_pb2.CategoryRule:
    return quality_pb2.CategoryRule(phrases=list(phrases), **kw)  # type: ignore[arg-type]


def category(*rules: quality_pb2.CategoryRule, name: str = "categories/c") -> quality_pb2.Category:
    return quality_pb2.Category(name=name, rules=list(rules))


TRANSCRIPT = [
    line(0, BOT, "Hi! How can I help?"),
    line(1, CUSTOMER, "Je suis très déçu, I want to CANCEL my account."),
    line(2, AGENT, "I'm sorry to hear that. Let me check your refunds."),
    line(3, CUSTOMER, "ok thanks"),
    line(4, AGENT, "Thank you for calling Acme, goodbye!"),
]


# ---- phrases -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("phrase", "text", "matches"),
    [
        ("thank you for calling", "THANK YOU, for calling!", True),
        ("decu", "très déçu", True),
        ("déçu", "tres decu", True),
        ("refund*", "your refunds", True),
        ("refund*", "a prerefund", False),
        ("*fund", "a refund", True),
        ("{cancel|close} my account", "please close my account", True),
        ("{cancel|close} my account", "please open my account", False),
        ("{speak to a manager|supervisor}", "get me a supervisor", True),
        ("thank * much", "thank you much", True),
        ("thank * much", "thank you very much", False),
        ("call", "recall", False),
        ("can't", "I can t", True),
    ],
)
def test_phrases_match_whole_words_ignoring_case_accents_and_punctuation(phrase: str, text: str, matches: bool) -> None:
    assert bool(cat.compile_phrase(phrase).search(cat.normalize(text))) is matches


def test_a_rule_is_limited_to_its_participant() -> None:
    c = category(rule("cancel"))
    assert cat.detect(c, TRANSCRIPT).detected
    assert cat.detect(category(rule("cancel", participant=quality_pb2.PARTICIPANT_CUSTOMER)), TRANSCRIPT).detected
    assert not cat.detect(category(rule("cancel", participant=quality_pb2.PARTICIPANT_AGENT)), TRANSCRIPT).detected


@pytest.mark.parametrize(
    ("window", "size", "detected"),
    [
        (quality_pb2.TRANSCRIPT_WINDOW_LAST_MESSAGES, 1, True),
        (quality_pb2.TRANSCRIPT_WINDOW_FIRST_MESSAGES, 1, False),
        (quality_pb2.TRANSCRIPT_WINDOW_LAST_SECONDS, 5, True),
        (quality_pb2.TRANSCRIPT_WINDOW_FIRST_SECONDS, 30, False),
        (quality_pb2.TRANSCRIPT_WINDOW_FIRST_SECONDS, 40, True),
    ],
)
def test_first_and_last_windows_count_the_participants_messages_or_seconds(
    window: int, size: float, detected: bool
) -> None:
    """The closing phrase is the agent's second message, 40 s in and last of the transcript."""
    r = rule("thank you for calling", participant=quality_pb2.PARTICIPANT_AGENT, window=window, window_size=size)
    assert cat.detect(category(r), TRANSCRIPT).detected is detected


def test_negation_holds_when_no_message_matches_and_says_which_did() -> None:
    never_closed = category(rule("have a nice day", participant=quality_pb2.PARTICIPANT_AGENT, negate=True))
    found = cat.detect(never_closed, TRANSCRIPT)
    assert found.detected and not found.hits
    assert "never said" in found.reasons[0]
    closed = cat.detect(category(rule("goodbye", participant=quality_pb2.PARTICIPANT_AGENT, negate=True)), TRANSCRIPT)
    assert not closed.detected
    assert closed.hits[0].event_id == "m4"


def test_all_rules_of_a_category_must_hold_and_each_hit_names_its_message() -> None:
    both = category(rule("cancel*", participant=quality_pb2.PARTICIPANT_CUSTOMER), rule("sorry"))
    found = cat.detect(both, TRANSCRIPT)
    assert found.detected
    assert [(h.event_id, h.phrase) for h in found.hits] == [("m1", "cancel*"), ("m2", "sorry")]
    assert "[cancel]" in found.hits[0].excerpt
    assert not cat.detect(category(rule("cancel"), rule("escalate")), TRANSCRIPT).detected


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        (category(), "category.rules"),
        (category(rule()), "category.rules[0].phrases"),
        (category(rule("{a|b")), "category.rules[0].phrases[0]"),
        (category(rule("{a|{b}}")), "category.rules[0].phrases[0]"),
        (category(rule("!!!")), "category.rules[0].phrases[0]"),
        (category(rule("x", window=quality_pb2.TRANSCRIPT_WINDOW_LAST_MESSAGES)), "category.rules[0].window_size"),
        (category(rule("x", window_size=3)), "category.rules[0].window_size"),
        (category(rule("x", participant=9)), "category.rules[0].participant"),  # type: ignore[arg-type]
    ],
)
def test_bad_categories_name_the_field(bad: quality_pb2.Category, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        cat.validate("ok-id", bad)
    assert field in {v.field for v in err.value.violations}


def test_category_ids_are_checked_when_creating() -> None:
    with pytest.raises(InvalidArgument) as err:
        cat.validate("Bad Id", category(rule("x")))
    assert {v.field for v in err.value.violations} == {"category_id"}


# ---- forms -------------------------------------------------------------------------------------


def yes_no(qid: str, weight: float, **kw: object) -> quality_pb2.FormQuestion:
    return quality_pb2.FormQuestion(
        question_id=qid,
        text=qid,
        weight=weight,
        type=quality_pb2.QUESTION_TYPE_YES_NO,
        **kw,  # type: ignore[arg-type]
    )


def numeric(qid: str, weight: float, ranges: list[quality_pb2.NumericRange], **kw: object) -> quality_pb2.FormQuestion:
    return quality_pb2.FormQuestion(
        question_id=qid,
        text=qid,
        weight=weight,
        type=quality_pb2.QUESTION_TYPE_NUMERIC,
        ranges=ranges,
        **kw,  # type: ignore[arg-type]
    )


def auto(**kw: object) -> quality_pb2.AutomaticAnswer:
    return quality_pb2.AutomaticAnswer(**kw)  # type: ignore[arg-type]


def rng(lo: float | None, hi: float | None, points: float, fail: bool = False) -> quality_pb2.NumericRange:
    r = quality_pb2.NumericRange(points=points, auto_fail=fail)
    if lo is not None:
        r.min = lo
    if hi is not None:
        r.max = hi
    return r


def form(*sections: quality_pb2.FormSection) -> quality_pb2.EvaluationForm:
    return quality_pb2.EvaluationForm(name="evaluationForms/f", display_name="Calls", version=3, sections=sections)


def section(sid: str, weight: float, *questions: quality_pb2.FormQuestion) -> quality_pb2.FormSection:
    return quality_pb2.FormSection(section_id=sid, title=sid, weight=weight, questions=questions)


GREETED = category(rule("{hello|hi|good morning}", participant=quality_pb2.PARTICIPANT_AGENT), name="categories/greet")
CLOSED = category(rule("thank you for calling", participant=quality_pb2.PARTICIPANT_AGENT), name="categories/close")
RUDE = category(rule("shut up", "{idiot|stupid}", participant=quality_pb2.PARTICIPANT_AGENT), name="categories/rude")
KNOWN = {c.name: c for c in (GREETED, CLOSED, RUDE)}

FORM = form(
    section(
        "opening",
        40,
        yes_no("greeted", 50, automatic=auto(category="categories/greet")),
        yes_no("closed", 50, automatic=auto(category="categories/close")),
    ),
    section(
        "handling",
        60,
        numeric(
            "hold",
            50,
            [rng(None, 60, 100), rng(60, 300, 50), rng(300, None, 0)],
            automatic=auto(fact=quality_pb2.CONTACT_FACT_HOLD_SECONDS),
        ),
        yes_no(
            "rude",
            25,
            options=[
                quality_pb2.AnswerOption(value="yes", points=0, auto_fail=True),
                quality_pb2.AnswerOption(value="no", points=100),
            ],
            automatic=auto(category="categories/rude"),
        ),
        numeric(
            "sentiment",
            25,
            [rng(None, -0.05, 0), rng(-0.05, None, 100)],
            automatic=auto(sentiment=quality_pb2.SENTIMENT_MEASURE_OVERALL),
            allow_not_applicable=True,
        ),
    ),
)


def test_the_example_form_is_valid() -> None:
    forms.validate("f", FORM, KNOWN)


def _mutated(change: str) -> quality_pb2.EvaluationForm:
    """A copy of FORM with one change: ``path = value`` (a literal), ``del path`` or ``path.append(n)``."""
    f = quality_pb2.EvaluationForm()
    f.CopyFrom(FORM)
    if change.startswith("del "):
        _resolve(f, change[4:].removesuffix("[:]")).__delitem__(slice(None))
    elif change.endswith(")"):
        path, arg = change.removesuffix(")").split(".append(")
        _resolve(f, path).append(int(arg))
    else:
        path, value = (x.strip() for x in change.split(" = "))
        owner, _, attr = path.rpartition(".")
        setattr(_resolve(f, owner), attr, _literal(value))
    return f


def _resolve(root: object, path: str) -> Any:
    out: Any = root
    for part in path.split(".")[1:]:
        name, *index = part.replace("]", "").split("[")
        out = getattr(out, name)
        for i in index:
            out = out[int(i)]
    return out


def _literal(value: str) -> object:
    if value.startswith("quality_pb2."):
        return getattr(quality_pb2, value.removeprefix("quality_pb2."))
    return ast.literal_eval(value)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ("f.sections[0].weight = 30", "form.sections"),
        ("f.sections[1].questions[0].weight = 10", "form.sections[1].questions"),
        ("f.sections[1].questions[0].question_id = 'greeted'", "form.sections[1].questions[0].question_id"),
        (
            "f.sections[0].questions[0].automatic.category = 'categories/nope'",
            "form.sections[0].questions[0].automatic.category",
        ),
        (
            "f.sections[0].questions[0].automatic.fact = quality_pb2.CONTACT_FACT_HOLD_SECONDS",
            "form.sections[0].questions[0].automatic",
        ),
        ("f.sections[1].questions[0].ranges[1].min = 30", "form.sections[1].questions[0].ranges[1]"),
        ("f.sections[1].questions[0].ranges[0].points = 120", "form.sections[1].questions[0].ranges[0].points"),
        ("f.sections[1].questions[1].options[0].value = 'maybe'", "form.sections[1].questions[1].options"),
        ("f.display_name = ''", "form.display_name"),
        ("del f.sections[:]", "form.sections"),
        ("f.scope.channels.append(99)", "form.scope.channels[0]"),
        (
            "f.sections[0].questions[0].type = quality_pb2.QUESTION_TYPE_SINGLE_CHOICE",
            "form.sections[0].questions[0].options",
        ),
    ],
)
def test_bad_forms_name_the_field(change: str, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        forms.validate("f", _mutated(change), KNOWN)
    assert field in {v.field for v in err.value.violations}, err.value.violations


def test_a_form_applies_by_channel_queue_and_reason() -> None:
    f = form()
    f.scope.channels.append(event_pb2.CHANNEL_VOICE)
    f.scope.queues.append("billing")
    assert forms.applies(f, event_pb2.CHANNEL_VOICE, "billing", "anything")
    assert not forms.applies(f, event_pb2.CHANNEL_CHAT, "billing", "anything")
    assert not forms.applies(f, event_pb2.CHANNEL_VOICE, "sales", "anything")


# ---- evaluations -------------------------------------------------------------------------------


def leg(hold: float = 30.0, **kw: object) -> Fact:
    values: dict[str, object] = {"channel": event_pb2.CHANNEL_CHAT, "queue": "q1", "agent": "a1", "reason": "billing"}
    values.update(kw)
    return Fact(
        key="leg:i1:i1",
        kind=LEG,
        event_id="e-leg",
        profile_id="p1",
        at=T0,
        source="cc",
        interaction_id="i1",
        started_at=T0,
        talk=200.0,
        hold=hold,
        acw=20.0,
        leg_id="i1",
        ended_at=T0 + dt.timedelta(minutes=5),
        **values,  # type: ignore[arg-type]
    )


GOOD = [
    line(0, AGENT, "Hello, this is Sam."),
    line(1, CUSTOMER, "thanks, great help"),
    line(2, AGENT, "Thank you for calling!"),
]


def interaction(
    transcript: list[cat.Line] = GOOD, scores: tuple[float, ...] = (0.8,), hold: float = 30.0
) -> ev.Interaction:
    return ev.Interaction("i1", "p1", [leg(hold)], transcript=transcript, customer_scores=scores)


def answer(e: quality_pb2.Evaluation, qid: str) -> quality_pb2.Answer:
    return next(a for a in e.answers if a.question_id == qid)


def test_a_perfect_interaction_scores_100_with_evidence_for_every_answer() -> None:
    e = ev.evaluate(FORM, interaction(), KNOWN)
    assert e.score == pytest.approx(100)
    assert [s.score for s in e.sections] == [pytest.approx(100), pytest.approx(100)]
    assert e.name == "evaluations/i1/forms/f" and e.form_version == 3 and e.agent_id == "a1"
    greeted = answer(e, "greeted")
    assert greeted.value == "yes" and greeted.source == quality_pb2.ANSWER_SOURCE_AUTOMATIC
    assert any(x.event_id == "m0" and x.phrase == "{hello|hi|good morning}" for x in greeted.evidence)
    hold = answer(e, "hold")
    assert hold.number == 30 and hold.evidence[0].value == 30
    assert hold.max_points == pytest.approx(30)  # 60% section x 50%


def test_points_follow_weights_and_ranges() -> None:
    """Not closed (40% x 50% = 20 points lost) and a 2-minute hold (half of 30 points): 65."""
    e = ev.evaluate(FORM, interaction(transcript=GOOD[:2], hold=120.0), KNOWN)
    assert answer(e, "closed").value == "no"
    assert answer(e, "hold").points == pytest.approx(15)
    assert e.score == pytest.approx(65)
    assert [s.score for s in e.sections] == [pytest.approx(50), pytest.approx(75)]


def test_an_auto_fail_answer_sets_the_score_to_zero_and_names_the_question() -> None:
    rude = [*GOOD, line(3, AGENT, "oh shut up")]
    e = ev.evaluate(FORM, interaction(transcript=rude), KNOWN)
    assert e.auto_failed and e.auto_fail_question == "rude" and e.score == 0
    assert answer(e, "rude").auto_fail
    assert any(x.event_id == "m3" for x in answer(e, "rude").evidence)


def test_not_applicable_counts_zero_of_zero() -> None:
    """No customer messages: sentiment is N/A and the rest is scored out of 75 points."""
    e = ev.evaluate(FORM, interaction(transcript=[GOOD[0], GOOD[2]], scores=()), KNOWN)
    s = answer(e, "sentiment")
    assert s.not_applicable and s.max_points == 0
    assert e.score == pytest.approx(100)


def test_no_data_without_n_a_waits_for_a_person() -> None:
    f = _mutated("f.sections[1].questions[2].allow_not_applicable = False")
    e = ev.evaluate(f, interaction(scores=()), KNOWN)
    assert answer(e, "sentiment").source == quality_pb2.ANSWER_SOURCE_AWAITING_REVIEW
    assert e.awaiting_review == 1 and e.score == pytest.approx(100)


def test_a_manual_choice_question_awaits_review_until_a_person_answers() -> None:
    tone = quality_pb2.FormQuestion(
        question_id="tone",
        text="Tone",
        weight=100,
        type=quality_pb2.QUESTION_TYPE_SINGLE_CHOICE,
        options=[
            quality_pb2.AnswerOption(value="warm", points=100),
            quality_pb2.AnswerOption(value="neutral", points=60),
            quality_pb2.AnswerOption(value="cold", points=0),
        ],
    )
    f = form(
        section("opening", 50, yes_no("greeted", 100, automatic=auto(category="categories/greet"))),
        section("manual", 50, tone),
    )
    forms.validate("f", f, KNOWN)
    pending = ev.evaluate(f, interaction(), KNOWN)
    assert pending.awaiting_review == 1 and pending.score == pytest.approx(100)
    human = {"tone": ev.HumanAnswer("neutral", False, "sup@acme", "sounded flat", T0)}
    reviewed = ev.evaluate(f, interaction(), KNOWN, human)
    t = answer(reviewed, "tone")
    assert t.source == quality_pb2.ANSWER_SOURCE_HUMAN and t.override.reviewer == "sup@acme"
    assert reviewed.awaiting_review == 0 and reviewed.score == pytest.approx(80)


def test_a_persons_answer_replaces_the_automatic_one_and_keeps_it() -> None:
    human = {"closed": ev.HumanAnswer("no", False, "sup", "closing was mumbled", T0)}
    e = ev.evaluate(FORM, interaction(), KNOWN, human)
    closed = answer(e, "closed")
    assert closed.value == "no" and closed.automatic_value == "yes"
    assert closed.source == quality_pb2.ANSWER_SOURCE_HUMAN and closed.override.reason == "closing was mumbled"
    assert e.score == pytest.approx(80)


def test_outcomes_answer_repeat_contact_and_low_survey() -> None:
    f = form(
        section(
            "outcome",
            100,
            yes_no(
                "repeat",
                50,
                options=[
                    quality_pb2.AnswerOption(value="yes", points=0),
                    quality_pb2.AnswerOption(value="no", points=100),
                ],
                automatic=auto(outcome=quality_pb2.OUTCOME_REPEAT_CONTACT),
            ),
            yes_no(
                "low",
                50,
                options=[
                    quality_pb2.AnswerOption(value="yes", points=0),
                    quality_pb2.AnswerOption(value="no", points=100),
                ],
                automatic=auto(outcome=quality_pb2.OUTCOME_LOW_SURVEY),
                allow_not_applicable=True,
            ),
        )
    )
    forms.validate("f", f, KNOWN)
    ix = interaction()
    ix.repeat, ix.repeat_evidence = True, "contact i2 on 'billing' followed"
    ix.surveys = [ev.Survey("s1", event_pb2.SURVEY_TYPE_CSAT, 2)]
    e = ev.evaluate(f, ix, KNOWN)
    assert answer(e, "repeat").value == "yes" and "i2" in answer(e, "repeat").evidence[0].description
    assert answer(e, "low").value == "yes" and answer(e, "low").evidence[0].event_id == "s1"
    assert e.score == 0
    ix.repeat, ix.surveys = False, [ev.Survey("s1", event_pb2.SURVEY_TYPE_NPS, 9)]
    assert ev.evaluate(f, ix, KNOWN).score == pytest.approx(100)


def test_the_same_inputs_give_byte_identical_evaluations() -> None:
    a = ev.evaluate(FORM, interaction(), KNOWN).SerializeToString(deterministic=True)
    b = ev.evaluate(FORM, interaction(), KNOWN).SerializeToString(deterministic=True)
    assert a == b


def test_a_pattern_hit_says_the_words_that_matched_as_well_as_the_pattern() -> None:
    """An alert that reads "customer said '{terrible|ridiculous}'" tells a supervisor nothing; it
    says which of the words the customer used."""
    transcript = [line(0, event_pb2.AUTHOR_CUSTOMER, "This is Ridiculous, honestly")]
    found = cat.detect(
        category(rule("{terrible|ridiculous}", participant=quality_pb2.PARTICIPANT_CUSTOMER)), transcript
    )
    assert found.detected
    assert found.reasons == ("customer said 'ridiculous' (as '{terrible|ridiculous}')",)
    assert found.hits[0].evidence().description.startswith("customer said 'ridiculous' (as '{terrible|ridiculous}'):")
    plain = cat.detect(category(rule("ridiculous", participant=quality_pb2.PARTICIPANT_CUSTOMER)), transcript)
    assert plain.reasons == ("customer said 'ridiculous'",)
