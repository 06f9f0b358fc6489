"""The quality facade the servicer talks to: categories and forms (validated, versioned),
evaluations, people's answers and how often they agree with the automatic ones. SQL stays in
:mod:`services.metrics.quality_storage`; the rules are in :mod:`categories`, :mod:`forms` and
:mod:`evaluate`."""

from __future__ import annotations

from collections.abc import Callable

from services.core import pagination
from services.core.errors import InvalidArgument, Violation
from services.metrics import alerts as al
from services.metrics import categories as cat
from services.metrics import evaluate as ev
from services.metrics import forms
from services.metrics.quality_storage import QualityStore
from services.metrics.stats import wilson
from services.metrics.tenant_settings import MetricsConfig
from tessera.v1 import quality_pb2

CATEGORY_PREFIX = "categories/"
RULE_PREFIX = "alertRules/"
ALERT_PREFIX = "alerts/"
FORM_PREFIX = "evaluationForms/"
MAX_PAGE = 100
_POSITION = {"start", "interaction", "form"}


def _id(name: str, prefix: str, field: str) -> str:
    value = name.removeprefix(prefix)
    if not name.startswith(prefix) or not forms.is_id(value):
        raise InvalidArgument(
            f"invalid {field}", [Violation(field, f'"{prefix}{{id}}", the id lowercase letters, digits and dashes')]
        )
    return value


def evaluation_name(name: str, field: str = "name") -> tuple[str, str]:
    """(interaction id, form id) of "evaluations/{interaction_id}/forms/{form_id}"."""
    parts = name.split("/")
    if len(parts) != 4 or parts[0] != "evaluations" or parts[2] != "forms" or not parts[1] or not forms.is_id(parts[3]):
        raise InvalidArgument(
            "invalid evaluation name", [Violation(field, '"evaluations/{interaction_id}/forms/{form_id}"')]
        )
    return parts[1], parts[3]


class Quality:
    def __init__(self, store: QualityStore, configs: Callable[[str], MetricsConfig]) -> None:
        self.store = store
        self.configs = configs

    # -- categories ------------------------------------------------------------------------------

    def create_category(self, tenant_id: str, category_id: str, category: quality_pb2.Category) -> quality_pb2.Category:
        cat.validate(category_id, category)
        self.store.create_category(tenant_id, category_id, _category_spec(category))
        return self.store.categories(tenant_id)[CATEGORY_PREFIX + category_id]

    def update_category(self, tenant_id: str, category: quality_pb2.Category) -> quality_pb2.Category:
        category_id = _id(category.name, CATEGORY_PREFIX, "category.name")
        cat.validate(None, category)
        self.store.update_category(tenant_id, category_id, _category_spec(category))
        using = [
            form.name.removeprefix(FORM_PREFIX)
            for form in self.store.latest_forms(tenant_id)
            if any(q.automatic.category == category.name for s in form.sections for q in s.questions)
        ]
        self.store.request_reevaluation(tenant_id, using)
        return self.store.categories(tenant_id)[category.name]

    def categories(self, tenant_id: str) -> list[quality_pb2.Category]:
        return list(self.store.categories(tenant_id).values())

    # -- forms -----------------------------------------------------------------------------------

    def save_form(
        self, tenant_id: str, form_id: str | None, form: quality_pb2.EvaluationForm
    ) -> quality_pb2.EvaluationForm:
        """Create (``form_id`` given) or make a new version of a form; the ended interactions it
        applies to are evaluated with it in the background (``reevaluation_step``)."""
        create = form_id is not None
        fid = form_id if form_id is not None else _id(form.name, FORM_PREFIX, "form.name")
        forms.validate(form_id, form, set(self.store.categories(tenant_id)))
        version = self.store.save_form(tenant_id, fid, form, create)
        self.store.request_reevaluation(tenant_id, [fid])
        return self.store.form(tenant_id, fid, version)

    def form(self, tenant_id: str, name: str, version: int) -> quality_pb2.EvaluationForm:
        if version < 0:
            raise InvalidArgument("invalid version", [Violation("version", "0 (the latest) or a version number")])
        return self.store.form(tenant_id, _id(name, FORM_PREFIX, "name"), version)

    def forms(self, tenant_id: str) -> list[quality_pb2.EvaluationForm]:
        return self.store.latest_forms(tenant_id)

    # -- evaluations -----------------------------------------------------------------------------

    def evaluation(self, tenant_id: str, name: str) -> quality_pb2.Evaluation:
        iid, form_id = evaluation_name(name)
        return self.store.evaluation(tenant_id, iid, form_id)

    def evaluations(
        self, tenant_id: str, interaction_id: str, profile: str, page_size: int, page_token: str
    ) -> tuple[list[quality_pb2.Evaluation], str]:
        violations = []
        profile_id = profile.removeprefix("profiles/")
        if bool(interaction_id) == bool(profile):
            violations.append(Violation("interaction_id", "name an interaction or a profile, not both"))
        if profile and (not profile.startswith("profiles/") or not profile_id or "/" in profile_id):
            violations.append(Violation("profile", '"profiles/{profile_id}"'))
        if violations:
            raise InvalidArgument("invalid evaluations request", violations)
        query = {"interaction_id": interaction_id, "profile": profile}
        limit = pagination.page_size(page_size, default=20, maximum=MAX_PAGE)
        after = (
            pagination.decode_token(page_token, query, lambda p: isinstance(p, dict) and set(p) == _POSITION)
            if page_token
            else None
        )
        rows = self.store.evaluations(
            tenant_id,
            interaction_id=interaction_id,
            profile_id=profile_id,
            after=(after["start"], after["interaction"], after["form"]) if after else None,
            limit=limit + 1,
        )
        token = ""
        if len(rows) > limit:
            rows = rows[:limit]
            last = rows[-1]
            token = pagination.encode_token(
                {
                    "start": last.interaction_start_time.ToDatetime().isoformat() + "+00:00",
                    "interaction": last.interaction_id,
                    "form": last.form.removeprefix(FORM_PREFIX),
                },
                query,
            )
        return rows, token

    def override(self, tenant_id: str, request: quality_pb2.OverrideAnswerRequest) -> quality_pb2.Evaluation:
        iid, form_id = evaluation_name(request.name)
        violations = []
        if not request.reviewer.strip() or len(request.reviewer) > 200:
            violations.append(Violation("reviewer", "required: who answered, at most 200 characters"))
        if not request.reason.strip() or len(request.reason) > 2000:
            violations.append(Violation("reason", "required: why, at most 2,000 characters"))
        current = self.store.evaluation(tenant_id, iid, form_id)
        form = self.store.form(tenant_id, form_id, current.form_version)
        question = next((q for s in form.sections for q in s.questions if q.question_id == request.question_id), None)
        answer = next((a for a in current.answers if a.question_id == request.question_id), None)
        if question is None or answer is None:
            violations.append(Violation("question_id", f"no question {request.question_id!r} in the form"))
        elif request.not_applicable:
            if request.value:
                violations.append(Violation("value", "empty when not_applicable"))
            if not question.allow_not_applicable:
                violations.append(Violation("not_applicable", "this question does not allow N/A"))
        elif ev.parse_answer(question, request.value) is None:
            allowed = (
                "a number"
                if question.type == quality_pb2.QUESTION_TYPE_NUMERIC
                else [o.value for o in forms.options(question)]
            )
            violations.append(Violation("value", f"one of the question's answers: {allowed}"))
        if violations:
            raise InvalidArgument("invalid override", violations)
        assert question is not None and answer is not None
        parsed = None if request.not_applicable else ev.parse_answer(question, request.value)
        value = parsed[0] if parsed else ""
        was_automatic = bool(answer.automatic_value) or _automatic_na(answer)
        self.store.override(
            tenant_id,
            iid,
            form_id,
            request.question_id,
            (value, request.not_applicable),
            (answer.automatic_value, was_automatic),
            request.reviewer,
            request.reason,
            self.configs(tenant_id),
        )
        return self.store.evaluation(tenant_id, iid, form_id)

    def agreement(self, tenant_id: str, form_name: str) -> list[quality_pb2.QuestionAgreement]:
        form = self.store.form(tenant_id, _id(form_name, FORM_PREFIX, "form"))
        counts = self.store.agreement(tenant_id, form.name.removeprefix(FORM_PREFIX))
        out = []
        for s in form.sections:
            for q in s.questions:
                reviewed, agreed = counts.get(q.question_id, (0, 0))
                row = quality_pb2.QuestionAgreement(question_id=q.question_id, reviewed=reviewed, agreed=agreed)
                if reviewed:
                    row.agreement = 100 * agreed / reviewed
                    row.ci_low, row.ci_high = wilson(agreed, reviewed)
                out.append(row)
        return out

    # -- alerts ----------------------------------------------------------------------------------

    def create_alert_rule(self, tenant_id: str, rule_id: str, rule: quality_pb2.AlertRule) -> quality_pb2.AlertRule:
        al.validate(rule_id, rule, list(self.store.categories(tenant_id)))
        return self.store.create_alert_rule(tenant_id, rule_id, rule)

    def alert_rules(self, tenant_id: str) -> list[quality_pb2.AlertRule]:
        return self.store.alert_rules(tenant_id)

    def delete_alert_rule(self, tenant_id: str, name: str) -> None:
        self.store.delete_alert_rule(tenant_id, _id(name, RULE_PREFIX, "name"))

    def alert_feed(
        self, tenant_id: str, after: int, limit: int, queues: list[str], agents: list[str]
    ) -> list[tuple[int, quality_pb2.Alert]]:
        return self.store.alert_feed(tenant_id, after, limit, queues, agents)

    def alert_head(self, tenant_id: str) -> int:
        return self.store.alert_head(tenant_id)

    def alerts(
        self, tenant_id: str, profile: str, interaction_id: str, acknowledged: bool, page_size: int
    ) -> list[quality_pb2.Alert]:
        profile_id = profile.removeprefix("profiles/")
        violations = []
        if profile and interaction_id:
            violations.append(Violation("profile", "name a profile or an interaction (or neither: all), not both"))
        elif profile and (not profile.startswith("profiles/") or not profile_id or "/" in profile_id):
            violations.append(Violation("profile", '"profiles/{profile_id}"'))
        if violations:
            raise InvalidArgument("invalid alerts request", violations)
        limit = pagination.page_size(page_size, default=20, maximum=MAX_PAGE)
        return self.store.alerts(
            tenant_id, profile_id=profile_id, interaction_id=interaction_id, acknowledged=acknowledged, limit=limit
        )

    def acknowledge(self, tenant_id: str, name: str, who: str) -> quality_pb2.Alert:
        alert_id = name.removeprefix(ALERT_PREFIX)
        violations = []
        if not name.startswith(ALERT_PREFIX) or not alert_id or "/" in alert_id or len(alert_id) > 64:
            violations.append(Violation("name", '"alerts/{alert_id}"'))
        if not who.strip() or len(who) > 200:
            violations.append(Violation("acknowledged_by", "required: who handled it, at most 200 characters"))
        if violations:
            raise InvalidArgument("invalid acknowledgement", violations)
        return self.store.acknowledge(tenant_id, alert_id, who)


def _automatic_na(answer: quality_pb2.Answer) -> bool:
    """An automatic N/A (no data, N/A allowed) is an automatic answer a person can agree with."""
    return answer.not_applicable and answer.source == quality_pb2.ANSWER_SOURCE_AUTOMATIC


def _category_spec(category: quality_pb2.Category) -> quality_pb2.Category:
    spec = quality_pb2.Category()
    spec.CopyFrom(category)
    spec.ClearField("name")
    spec.ClearField("update_time")
    return spec
