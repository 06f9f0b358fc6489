"""QualityService through the real pipeline: categories and forms over gRPC, events in at ingest,
identity resolves them, the metrics consumer keeps the transcript and evaluates each ended
interaction; evidence, late messages, versions, people's answers, agreement, erasure,
validation and tenant isolation are read back over gRPC."""

from __future__ import annotations

import datetime as dt
from typing import Any

import grpc
import pytest
from sqlalchemy.engine import Engine

from services.core.server import RunningServer
from services.metrics.facts import LEG, Fact
from services.metrics.quality_storage import MessageRow, QualityStore
from tessera.v1 import event_pb2, metrics_pb2, metrics_pb2_grpc, quality_pb2, quality_pb2_grpc
from tests.conftest import TenantKey, make_tenant
from tests.support.events import uid
from tests.support.grpc_errors import bad_request
from tests.support.profile import Apis, base, interaction, wait_until

pytestmark = pytest.mark.integration

AGENT = quality_pb2.PARTICIPANT_AGENT


def chat(phone: str, iid: str, author: int, text: str, at: dt.datetime, offset: float | None = None) -> event_pb2.Event:
    ev = base(("phone", phone), channel=event_pb2.CHANNEL_CHAT, at=at)
    ev.message.interaction_id = iid
    ev.message.author = author  # type: ignore[assignment]
    ev.message.text = text
    if offset is not None:
        ev.message.offset_seconds = offset
    return ev


def ended_chat(phone: str, iid: str, at: dt.datetime, hold: float = 10.0, team: str = "", **kw: Any) -> event_pb2.Event:
    ev = interaction(("phone", phone), interaction_id=iid, at=at, channel=event_pb2.CHANNEL_CHAT, **kw)
    ev.interaction.hold_seconds = hold
    ev.interaction.team = team
    ev.interaction.ended_at.FromDatetime(at + dt.timedelta(minutes=6))
    return ev


class Quality:
    def __init__(self, channel: grpc.Channel, metadata: tuple[tuple[str, str], ...]) -> None:
        self.stub = quality_pb2_grpc.QualityServiceStub(channel)
        self.metrics = metrics_pb2_grpc.MetricsServiceStub(channel)
        self.md = metadata

    def call(self, method: str, request: Any) -> Any:
        return getattr(self.stub, method)(request, metadata=self.md, timeout=20)

    def setup(self) -> quality_pb2.EvaluationForm:
        for cid, phrase in (("greeting", "{hello|hi|good morning}"), ("closing", "thank you for {calling|contacting}")):
            self.call(
                "CreateCategory",
                quality_pb2.CreateCategoryRequest(
                    category_id=cid,
                    category=quality_pb2.Category(
                        display_name=cid, rules=[quality_pb2.CategoryRule(phrases=[phrase], participant=AGENT)]
                    ),
                ),
            )
        resp = self.call("CreateEvaluationForm", quality_pb2.CreateEvaluationFormRequest(form_id="chat", form=FORM))
        return resp.form  # type: ignore[no-any-return]

    def evaluation(self, iid: str, form: str = "chat") -> quality_pb2.Evaluation | None:
        try:
            resp = self.call("GetEvaluation", quality_pb2.GetEvaluationRequest(name=f"evaluations/{iid}/forms/{form}"))
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return resp.evaluation  # type: ignore[no-any-return]

    def wait(self, iid: str, check: Any = lambda e: True, what: str = "an evaluation") -> quality_pb2.Evaluation:
        def ready() -> quality_pb2.Evaluation | None:
            e = self.evaluation(iid)
            return e if e is not None and check(e) else None

        return wait_until(ready, 30, what)


def _yes_no(qid: str, weight: float, **kw: Any) -> quality_pb2.FormQuestion:
    return quality_pb2.FormQuestion(
        question_id=qid, text=qid, weight=weight, type=quality_pb2.QUESTION_TYPE_YES_NO, **kw
    )


FORM = quality_pb2.EvaluationForm(
    display_name="Chat quality",
    scope=quality_pb2.FormScope(channels=[event_pb2.CHANNEL_CHAT]),
    sections=[
        quality_pb2.FormSection(
            section_id="etiquette",
            title="Etiquette",
            weight=60,
            questions=[
                _yes_no("greeted", 50, automatic=quality_pb2.AutomaticAnswer(category="categories/greeting")),
                _yes_no("closed", 50, automatic=quality_pb2.AutomaticAnswer(category="categories/closing")),
            ],
        ),
        quality_pb2.FormSection(
            section_id="handling",
            title="Handling",
            weight=40,
            questions=[
                quality_pb2.FormQuestion(
                    question_id="hold",
                    text="Hold under a minute",
                    weight=100,
                    type=quality_pb2.QUESTION_TYPE_NUMERIC,
                    ranges=[quality_pb2.NumericRange(max=60, points=100), quality_pb2.NumericRange(min=60, points=0)],
                    automatic=quality_pb2.AutomaticAnswer(fact=quality_pb2.CONTACT_FACT_HOLD_SECONDS),
                )
            ],
        ),
    ],
)


@pytest.fixture
def qa(metrics_channel: grpc.Channel, tenant: TenantKey, metrics_server: RunningServer) -> Quality:
    return Quality(metrics_channel, tenant.metadata)


def answer(e: quality_pb2.Evaluation, qid: str) -> quality_pb2.Answer:
    return next(a for a in e.answers if a.question_id == qid)


def test_an_ended_chat_is_evaluated_with_evidence_and_a_late_message_re_evaluates_it(api: Apis, qa: Quality) -> None:
    qa.setup()
    phone, iid = "+14155550111", uid("chat")
    t0 = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(hours=1)
    # A message before its interaction, the interaction (ended), then the closing line late.
    api.send(chat(phone, iid, event_pb2.AUTHOR_AGENT, "Hello, this is Sam. How can I help?", t0))
    api.send(ended_chat(phone, iid, t0, hold=90.0))
    first = qa.wait(iid, what="the first evaluation")
    assert answer(first, "greeted").value == "yes"
    greeting_hit = [x for x in answer(first, "greeted").evidence if x.phrase]
    assert greeting_hit and "[hello]" in greeting_hit[0].excerpt
    assert answer(first, "closed").value == "no"
    assert answer(first, "hold").number == 90 and answer(first, "hold").points == 0
    assert first.score == pytest.approx(30)  # greeted: 30 of 100; closed and hold: 0
    assert first.form_version == 1 and first.profile.startswith("profiles/")

    api.send(chat(phone, iid, event_pb2.AUTHOR_AGENT, "Thank you for contacting Acme!", t0 + dt.timedelta(minutes=5)))
    later = qa.wait(iid, lambda e: answer(e, "closed").value == "yes", "the late closing line to count")
    assert later.score == pytest.approx(60)
    listed = qa.call("ListEvaluations", quality_pb2.ListEvaluationsRequest(profile=later.profile)).evaluations
    assert [e.name for e in listed] == [f"evaluations/{iid}/forms/chat"]


def test_a_new_form_version_re_evaluates_and_each_evaluation_records_its_version(api: Apis, qa: Quality) -> None:
    created = qa.setup()
    phone, iid = "+14155550112", uid("chat")
    t0 = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(hours=2)
    api.send(ended_chat(phone, iid, t0, hold=90.0))
    assert qa.wait(iid).score == 0
    lenient = quality_pb2.EvaluationForm()
    lenient.CopyFrom(created)
    del lenient.sections[1].questions[0].ranges[:]
    lenient.sections[1].questions[0].ranges.add(max=120, points=100)
    lenient.sections[1].questions[0].ranges.add(min=120, points=0)
    updated = qa.call("UpdateEvaluationForm", quality_pb2.UpdateEvaluationFormRequest(form=lenient)).form
    assert updated.version == 2
    again = qa.wait(iid, lambda e: e.form_version == 2, "the evaluation under version 2")
    assert again.score == pytest.approx(40)
    old = qa.call("GetEvaluationForm", quality_pb2.GetEvaluationFormRequest(name="evaluationForms/chat", version=1))
    assert old.form.sections[1].questions[0].ranges[0].max == 60


def test_a_persons_answer_replaces_the_automatic_one_and_agreement_is_reported(api: Apis, qa: Quality) -> None:
    qa.setup()
    phone = "+14155550113"
    t0 = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(hours=3)
    iids = [uid("chat") for _ in range(3)]
    for iid in iids:
        api.send(chat(phone, iid, event_pb2.AUTHOR_AGENT, "hi there", t0), ended_chat(phone, iid, t0))
    for iid in iids:
        qa.wait(iid)
    name = f"evaluations/{iids[0]}/forms/chat"
    with pytest.raises(grpc.RpcError) as err:
        qa.call("OverrideAnswer", quality_pb2.OverrideAnswerRequest(name=name, question_id="greeted", value="maybe"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert {f for f, _ in bad_request(err.value)} == {"value", "reviewer", "reason"}
    overridden = qa.call(
        "OverrideAnswer",
        quality_pb2.OverrideAnswerRequest(
            name=name, question_id="greeted", value="no", reviewer="sup@acme", reason="'hi there' was to a colleague"
        ),
    ).evaluation
    greeted = answer(overridden, "greeted")
    assert greeted.source == quality_pb2.ANSWER_SOURCE_HUMAN and greeted.automatic_value == "yes"
    assert greeted.value == "no" and greeted.override.reviewer == "sup@acme"
    assert overridden.score == pytest.approx(40)  # only the hold now earns points
    for iid in iids[1:]:
        qa.call(
            "OverrideAnswer",
            quality_pb2.OverrideAnswerRequest(
                name=f"evaluations/{iid}/forms/chat", question_id="greeted", value="yes", reviewer="sup", reason="ok"
            ),
        )
    rows = {
        r.question_id: r
        for r in qa.call(
            "GetAnswerAgreement", quality_pb2.GetAnswerAgreementRequest(form="evaluationForms/chat")
        ).questions
    }
    assert (rows["greeted"].reviewed, rows["greeted"].agreed) == (3, 2)
    assert rows["greeted"].agreement == pytest.approx(200 / 3)
    assert rows["greeted"].ci_low < rows["greeted"].agreement < rows["greeted"].ci_high
    assert rows["closed"].reviewed == 0 and not rows["closed"].HasField("agreement")


def test_redelivered_inputs_change_no_evaluation(engine: Engine, tenant: TenantKey, qa: Quality) -> None:
    """The consumer's quality step applied twice to the same batch writes nothing the second time."""
    qa.setup()
    store = QualityStore(engine)
    t0 = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(days=30)
    leg = Fact(
        key="leg:i-r:i-r",
        kind=LEG,
        event_id="e1",
        profile_id="p-r",
        at=t0,
        channel=event_pb2.CHANNEL_CHAT,
        source="t",
        interaction_id="i-r",
        agent="a",
        reason="billing",
        started_at=t0,
        leg_id="i-r",
        ended_at=t0 + dt.timedelta(minutes=3),
    )
    from services.metrics.storage import MetricsStore
    from services.metrics.tenant_settings import MetricsConfig

    MetricsStore(engine).apply_facts(tenant.tenant_id, [leg], MetricsConfig())
    msgs = [MessageRow("m1", "i-r", "p-r", t0, 2.0, event_pb2.AUTHOR_AGENT, 0.0, "good morning")]
    assert store.apply(tenant.tenant_id, msgs, [leg], MetricsConfig()) == 1
    assert store.apply(tenant.tenant_id, msgs, [leg], MetricsConfig()) == 0
    assert answer(store.evaluation(tenant.tenant_id, "i-r", "chat"), "greeted").value == "yes"


def test_bad_categories_and_forms_get_field_violations(qa: Quality) -> None:
    cases = [
        (
            "CreateCategory",
            quality_pb2.CreateCategoryRequest(
                category_id="Bad!", category=quality_pb2.Category(rules=[quality_pb2.CategoryRule(phrases=["{x"])])
            ),
            {"category_id", "category.rules[0].phrases[0]"},
        ),
        (
            "CreateEvaluationForm",
            quality_pb2.CreateEvaluationFormRequest(form_id="f", form=_broken_form()),
            # No categories exist yet in this tenant: both automatic answers name unknown ones.
            {
                "form.sections",
                "form.sections[0].questions[0].automatic.category",
                "form.sections[0].questions[1].automatic.category",
            },
        ),
        ("GetEvaluation", quality_pb2.GetEvaluationRequest(name="evaluations/x"), {"name"}),
        ("GetEvaluationForm", quality_pb2.GetEvaluationFormRequest(name="forms/x"), {"name"}),
        ("ListEvaluations", quality_pb2.ListEvaluationsRequest(), {"interaction_id"}),
    ]
    for method, request, fields in cases:
        with pytest.raises(grpc.RpcError) as err:
            qa.call(method, request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
        assert {f for f, _ in bad_request(err.value)} == fields, method


def _broken_form() -> quality_pb2.EvaluationForm:
    f = quality_pb2.EvaluationForm()
    f.CopyFrom(FORM)
    f.sections[0].weight = 50
    f.sections[0].questions[0].automatic.category = "categories/missing"
    return f


def test_another_tenant_sees_none_of_it(api: Apis, qa: Quality, engine: Engine, metrics_channel: grpc.Channel) -> None:
    qa.setup()
    phone, iid = "+14155550114", uid("chat")
    t0 = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(hours=1)
    api.send(chat(phone, iid, event_pb2.AUTHOR_AGENT, "hello", t0), ended_chat(phone, iid, t0))
    qa.wait(iid)
    other = Quality(metrics_channel, make_tenant(engine).metadata)
    assert other.evaluation(iid) is None
    assert list(other.call("ListEvaluationForms", quality_pb2.ListEvaluationFormsRequest()).forms) == []
    assert list(other.call("ListCategories", quality_pb2.ListCategoriesRequest()).categories) == []
    with pytest.raises(grpc.RpcError) as err:
        other.call("GetEvaluationForm", quality_pb2.GetEvaluationFormRequest(name="evaluationForms/chat"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # The other tenant's own category of the same id is its own.
    other.call(
        "CreateCategory",
        quality_pb2.CreateCategoryRequest(
            category_id="greeting", category=quality_pb2.Category(rules=[quality_pb2.CategoryRule(phrases=["yo"])])
        ),
    )
    assert {c.name for c in qa.call("ListCategories", quality_pb2.ListCategoriesRequest()).categories} == {
        "categories/greeting",
        "categories/closing",
    }
    mine = qa.call("ListCategories", quality_pb2.ListCategoriesRequest()).categories
    assert [r.phrases[0] for c in mine if c.name == "categories/greeting" for r in c.rules] == [
        "{hello|hi|good morning}"
    ]


def test_erasure_forgets_transcripts_and_evaluations(api: Apis, qa: Quality) -> None:
    qa.setup()
    phone, iid = "+14155550115", uid("chat")
    t0 = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(hours=1)
    api.send(chat(phone, iid, event_pb2.AUTHOR_AGENT, "hello", t0), ended_chat(phone, iid, t0))
    e = qa.wait(iid)
    qa.metrics.EraseCustomerMetrics(
        metrics_pb2.EraseCustomerMetricsRequest(profile_ids=[e.profile]), metadata=qa.md, timeout=20
    )
    assert qa.evaluation(iid) is None
    with api.engine.connect() as conn:
        left = conn.exec_driver_sql(
            "SELECT count(*) FROM metrics.messages WHERE tenant_id = %(t)s AND interaction_id = %(i)s",
            {"t": api.tenant_id, "i": iid},
        ).scalar_one()
    assert left == 0


def _query(qa: Quality, metrics: list[str], **kw: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], Any]:
    from google.protobuf import timestamp_pb2

    from tessera.v1 import metrics_pb2

    lo, hi = timestamp_pb2.Timestamp(), timestamp_pb2.Timestamp()
    lo.FromDatetime(dt.datetime.now(dt.UTC) - dt.timedelta(days=10))
    hi.FromDatetime(dt.datetime.now(dt.UTC) + dt.timedelta(days=1))
    resp = qa.metrics.QueryMetrics(
        metrics_pb2.QueryMetricsRequest(
            metrics=metrics, start_time=lo, end_time=hi, granularity=metrics_pb2.GRANULARITY_ALL, **kw
        ),
        metadata=qa.md,
        timeout=20,
    )
    return {(s.metric, tuple(sorted(s.group.items()))): s.points[0].score for s in resp.series}


def test_quality_rollups_equal_the_current_evaluations_through_late_messages_overrides_and_versions(
    api: Apis, qa: Quality
) -> None:
    created = qa.setup()
    t0 = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(days=2)
    iids = []
    for n in range(6):
        phone, iid = f"+1415555013{n}", uid("chat")
        iids.append(iid)
        events = [
            ended_chat(
                phone,
                iid,
                t0 + dt.timedelta(hours=n),
                hold=30.0 if n % 2 else 90.0,
                agent=f"a{n % 2}",
                team="north" if n < 4 else "south",
            )
        ]
        if n % 3:
            events.append(chat(phone, iid, event_pb2.AUTHOR_AGENT, "hello there", t0 + dt.timedelta(hours=n)))
        api.send(*events)
    for iid in iids:
        qa.wait(iid)
    # Change things after the first evaluations: a late closing line, a person's answer, a new version.
    api.send(chat("+14155550131", iids[1], event_pb2.AUTHOR_AGENT, "thank you for calling", t0))
    qa.wait(iids[1], lambda e: answer(e, "closed").value == "yes")
    qa.call(
        "OverrideAnswer",
        quality_pb2.OverrideAnswerRequest(
            name=f"evaluations/{iids[0]}/forms/chat", question_id="greeted", value="yes", reviewer="r", reason="said hi"
        ),
    )
    newer = quality_pb2.EvaluationForm()
    newer.CopyFrom(created)
    newer.sections[0].weight, newer.sections[1].weight = 50, 50
    qa.call("UpdateEvaluationForm", quality_pb2.UpdateEvaluationFormRequest(form=newer))
    current = [qa.wait(i, lambda e: e.form_version == 2, "version 2") for i in iids]

    by_agent = _query(qa, ["quality_score", "quality_auto_fail_rate"], group_by=["agent"])
    for agent in ("a0", "a1"):
        mine = [e.score for e in current if e.agent_id == agent]
        score = by_agent[("quality_score", (("agent", agent),))]
        assert score.sample_size == len(mine)
        assert score.value == pytest.approx(sum(mine) / len(mine), abs=1e-6)
        assert by_agent[("quality_auto_fail_rate", (("agent", agent),))].value == 0
    by_team = _query(qa, ["quality_score"], group_by=["team"])
    for team in ("north", "south"):
        mine = [e.score for e in current if e.team == team]
        assert len(mine) == (4 if team == "north" else 2)
        got = by_team[("quality_score", (("team", team),))]
        assert (got.sample_size, got.value) == (len(mine), pytest.approx(sum(mine) / len(mine), abs=1e-6))
    by_question = _query(qa, ["quality_pass_rate"], group_by=["question"])
    for qid in ("greeted", "closed", "hold"):
        answers = [answer(e, qid) for e in current]
        passed = sum(1 for a in answers if a.points >= a.max_points)
        got = by_question[("quality_pass_rate", (("question", qid),))]
        assert (got.sample_size, got.value) == (len(answers), pytest.approx(100 * passed / len(answers)))
    with pytest.raises(grpc.RpcError) as err:
        _query(qa, ["quality_score"], group_by=["question"])
    assert {f for f, _ in bad_request(err.value)} == {"group_by"}
    with pytest.raises(grpc.RpcError) as err:
        _query(qa, ["quality_score", "nps"])
    assert {f for f, _ in bad_request(err.value)} == {"metrics"}


def test_a_queued_re_evaluation_resumes_batch_by_batch_and_leaves_the_queue(
    engine: Engine, tenant: TenantKey, qa: Quality
) -> None:
    """What a new form version queues is done a batch at a time, its progress committed with each
    batch, so a replica that dies mid-way leaves the rest to the next."""
    from services.metrics.storage import MetricsStore
    from services.metrics.tenant_settings import MetricsConfig

    created = qa.setup()
    t0 = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(days=3)
    legs = [
        Fact(
            key=f"leg:q{n}:q{n}",
            kind=LEG,
            event_id=f"eq{n}",
            profile_id=f"pq{n}",
            at=t0,
            channel=event_pb2.CHANNEL_CHAT,
            source="t",
            interaction_id=f"q{n}",
            agent="a",
            reason="r",
            started_at=t0,
            leg_id=f"q{n}",
            ended_at=t0 + dt.timedelta(minutes=2),
            hold=90.0,
        )
        for n in range(5)
    ]
    MetricsStore(engine).apply_facts(tenant.tenant_id, legs, MetricsConfig())
    store = QualityStore(engine)
    store.apply(tenant.tenant_id, [], legs, MetricsConfig())
    assert {store.evaluation(tenant.tenant_id, f"q{n}", "chat").form_version for n in range(5)} == {1}
    # A batch at a time, resuming where the last one stopped (the service's own job may take part).
    store.save_form(tenant.tenant_id, "chat", created, create=False)
    store.request_reevaluation(tenant.tenant_id, ["chat"])
    while store.reevaluation_step(lambda _t: MetricsConfig(), batch=2):
        pass

    def settled() -> bool:
        with engine.connect() as conn:
            left = conn.exec_driver_sql(
                "SELECT count(*) FROM metrics.reevaluations WHERE tenant_id = %(t)s", {"t": tenant.tenant_id}
            ).scalar_one()
        versions = {store.evaluation(tenant.tenant_id, f"q{n}", "chat").form_version for n in range(5)}
        return left == 0 and versions == {2}

    wait_until(settled, 20, "every interaction under version 2 and the queue empty")


REPEAT = quality_pb2.OUTCOME_REPEAT_CONTACT
REPEAT_FORM = quality_pb2.EvaluationForm(
    display_name="Repeat",
    scope=quality_pb2.FormScope(channels=[event_pb2.CHANNEL_CHAT]),
    sections=[
        quality_pb2.FormSection(
            section_id="outcome",
            title="Outcome",
            weight=100,
            questions=[
                _yes_no(
                    "repeat", 100, automatic=quality_pb2.AutomaticAnswer(outcome=quality_pb2.OUTCOME_REPEAT_CONTACT)
                )
            ],
        )
    ],
)


def test_a_merge_that_reveals_a_repeat_contact_changes_the_earlier_evaluation(api: Apis, qa: Quality) -> None:
    """Two chats on the same reason two days apart, from a phone and an email not yet known to be one
    person: the first is no repeat. The event that ties them together makes it one, though neither
    chat's events arrive again."""
    qa.call("CreateEvaluationForm", quality_pb2.CreateEvaluationFormRequest(form_id="repeat", form=REPEAT_FORM))
    phone, email = "+14155550177", f"{uid('m')}@example.com"
    first, second = uid("c"), uid("c")
    at = dt.datetime(2026, 3, 2, 10, 0, tzinfo=dt.UTC)  # long closed windows: each answer is final
    later = ended_chat(phone, second, at + dt.timedelta(days=2))
    later.ClearField("identifiers")
    later.identifiers.add(type="email", value=email)
    api.send(ended_chat(phone, first, at), later)
    before = wait_until(lambda: qa.evaluation(first, "repeat"), 30, "the first chat's evaluation")
    assert answer(before, "repeat").value == "no"
    assert qa.evaluation(second, "repeat") is not None

    tie = base(("phone", phone), ("email", email), at=at + dt.timedelta(days=3))
    tie.identify.SetInParent()
    api.send(tie)

    def repeated() -> quality_pb2.Evaluation | None:
        e = qa.evaluation(first, "repeat")
        return e if e is not None and answer(e, "repeat").value == "yes" else None

    after = wait_until(repeated, 30, "the merge to reveal the repeat")
    assert second in after.answers[0].evidence[0].description
    other = qa.evaluation(second, "repeat")
    assert other is not None and after.profile == other.profile  # both under the survivor


def test_a_repeat_contact_resolved_before_a_merge_and_applied_after_it_still_counts(
    engine: Engine, tenant: TenantKey, qa: Quality
) -> None:
    """The order replicas can take: the merge is applied (and re-evaluates the survivor) before
    the second contact, which was resolved under the merged-away customer, is stored. The first
    contact's answer still becomes a repeat (the system test caught it missing)."""
    from services.metrics.storage import MetricsStore
    from services.metrics.tenant_settings import MetricsConfig

    qa.call("CreateEvaluationForm", quality_pb2.CreateEvaluationFormRequest(form_id="repeat", form=REPEAT_FORM))
    t0 = dt.datetime(2026, 3, 2, 10, 0, tzinfo=dt.UTC)
    config, metrics, store = MetricsConfig(), MetricsStore(engine), QualityStore(engine)

    def contact(iid: str, profile_id: str, at: dt.datetime) -> Fact:
        return Fact(
            key=f"leg:{iid}:{iid}",
            kind=LEG,
            event_id=f"e-{iid}",
            profile_id=profile_id,
            at=at,
            channel=event_pb2.CHANNEL_CHAT,
            source="t",
            interaction_id=iid,
            agent="a",
            reason="billing",
            started_at=at,
            leg_id=iid,
            ended_at=at + dt.timedelta(minutes=3),
        )

    first = contact("rm-1", "p-survivor", t0)
    metrics.apply_facts(tenant.tenant_id, [first], config)
    store.apply(tenant.tenant_id, [], [first], config)
    assert answer(store.evaluation(tenant.tenant_id, "rm-1", "repeat"), "repeat").value == "no"

    metrics.apply_merge(tenant.tenant_id, "p-survivor", "p-absorbed", config)
    store.apply_merge(tenant.tenant_id, "p-survivor", "p-absorbed", config)
    second = contact("rm-2", "p-absorbed", t0 + dt.timedelta(days=2))  # resolved before the merge
    metrics.apply_facts(tenant.tenant_id, [second], config)
    store.apply(tenant.tenant_id, [], [second], config)

    after = store.evaluation(tenant.tenant_id, "rm-1", "repeat")
    assert answer(after, "repeat").value == "yes"
    assert "rm-2" in after.answers[0].evidence[0].description


@pytest.mark.parametrize("order", ["as identity made them", "later one first"])
def test_a_chain_of_merges_applied_in_any_order_leaves_everything_with_the_last_survivor(
    engine: Engine, tenant: TenantKey, qa: Quality, order: str
) -> None:
    """Identity merges a chat-only customer into an email one, then that into a phone one. Two
    metrics replicas may apply the two changes in either order; either way the chat's facts,
    transcript and evaluation all end with the phone customer (the system test caught them left
    under the chat customer when the later merge was applied first)."""
    from services.core import streams
    from services.core.bus import Delivery
    from services.metrics.consumer import ChangesHandler
    from services.metrics.storage import MetricsStore
    from services.metrics.tenant_settings import MetricsConfig
    from tessera.v1 import stream_pb2

    qa.setup()
    t, config = tenant.tenant_id, MetricsConfig()
    metrics, store = MetricsStore(engine), QualityStore(engine)
    at = dt.datetime(2026, 3, 2, 10, 0, tzinfo=dt.UTC)
    leg = Fact(
        key="leg:ch-1:ch-1", kind=LEG, event_id="e-ch-1", profile_id="p-chat", at=at, channel=event_pb2.CHANNEL_CHAT,
        source="t", interaction_id="ch-1", agent="a", reason="billing", started_at=at, leg_id="ch-1",
        ended_at=at + dt.timedelta(minutes=3),
    )  # fmt: skip
    said = MessageRow("e-msg-1", "ch-1", "p-chat", at, 5.0, int(AGENT), 0.4, "hello, thank you for contacting us")
    metrics.apply_facts(t, [leg], config)
    store.apply(t, [said], [leg], config)
    assert store.evaluation(t, "ch-1", "chat").profile == "profiles/p-chat"

    first = stream_pb2.ProfileChange(
        kind=streams.MERGED, profile_id="p-email", absorbed_profile_id="p-chat", merge_id=1
    )
    second = stream_pb2.ProfileChange(
        kind=streams.MERGED, profile_id="p-phone", absorbed_profile_id="p-email", merge_id=2
    )
    handler = ChangesHandler(metrics, lambda _t: config, store)
    for n, change in enumerate([first, second] if order == "as identity made them" else [second, first]):
        envelope = stream_pb2.ProfileChangeEnvelope(tenant_id=t, change=change)
        handler([Delivery(t, "changes", f"{n}-0", b"", envelope)])

    assert {f.event_id: p for p, fs in metrics.all_facts(t).items() for f in fs} == {"e-ch-1": "p-phone"}
    assert store.evaluation(t, "ch-1", "chat").profile == "profiles/p-phone"
    with engine.connect() as conn:
        owners = (
            conn.exec_driver_sql("SELECT profile_id FROM metrics.messages WHERE tenant_id = %s", (t,)).scalars().all()
        )
        rows = conn.exec_driver_sql("SELECT profile_id, survivor FROM metrics.aliases WHERE tenant_id = %s", (t,))
        aliases = {a: s for a, s in rows}
    assert owners == ["p-phone"]
    assert aliases == {"p-chat": "p-phone", "p-email": "p-phone"}
