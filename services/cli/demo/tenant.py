"""The demo tenant's configuration, applied through the public APIs as a tenant's admin would."""

from __future__ import annotations

import grpc
from google.protobuf import field_mask_pb2

from tessera.v1 import event_pb2, identity_pb2, identity_pb2_grpc, quality_pb2, quality_pb2_grpc

#: The identifier types the demo systems send beyond the defaults (CRM, loyalty program, chat
#: platform). Unconfigured types never link anything, so without these the demo would not stitch.
CUSTOM_IDENTIFIER_TYPES: tuple[identity_pb2.IdentifierTypeRule, ...] = (
    identity_pb2.IdentifierTypeRule(type="crm_id", normalizer="trim", priority=95, max_per_profile=1),
    identity_pb2.IdentifierTypeRule(type="loyalty_id", normalizer="trim", priority=85, max_per_profile=1),
    identity_pb2.IdentifierTypeRule(type="chat_id", normalizer="trim", priority=40, max_per_profile=5),
)


def configure_tenant(identity: grpc.Channel, api_key: str, timeout: float = 10.0) -> identity_pb2.IdentityRules:
    """Add the demo's identifier types to the tenant's rules (``UpdateIdentityRules``, mask ``types``)."""
    stub = identity_pb2_grpc.IdentityServiceStub(identity)
    metadata = (("authorization", f"Bearer {api_key}"),)
    current = stub.GetIdentityRules(identity_pb2.GetIdentityRulesRequest(), metadata=metadata, timeout=timeout).rules
    custom = {t.type for t in CUSTOM_IDENTIFIER_TYPES}
    types = [t for t in current.types if t.type not in custom] + list(CUSTOM_IDENTIFIER_TYPES)
    request = identity_pb2.UpdateIdentityRulesRequest(
        rules=identity_pb2.IdentityRules(types=types), update_mask=field_mask_pb2.FieldMask(paths=["types"])
    )
    updated: identity_pb2.IdentityRules = stub.UpdateIdentityRules(request, metadata=metadata, timeout=timeout).rules
    return updated


def _category(*rules: tuple[list[str], int, int, int, bool]) -> quality_pb2.Category:
    return quality_pb2.Category(
        rules=[
            quality_pb2.CategoryRule(
                phrases=phrases,
                participant=participant,  # type: ignore[arg-type]
                window=window,  # type: ignore[arg-type]
                window_size=size,
                negate=negate,
            )
            for phrases, participant, window, size, negate in rules
        ]
    )


_AGENT, _CUSTOMER = quality_pb2.PARTICIPANT_AGENT, quality_pb2.PARTICIPANT_CUSTOMER
_FIRST, _LAST = quality_pb2.TRANSCRIPT_WINDOW_FIRST_MESSAGES, quality_pb2.TRANSCRIPT_WINDOW_LAST_MESSAGES
#: Categories over the demo's conversations (services/cli/demo/conversations.py says what agents
#: and customers write).
DEMO_CATEGORIES: dict[str, quality_pb2.Category] = {
    "greeting": _category((["{hi|hello} *", "thanks for reaching out"], _AGENT, _FIRST, 3, False)),
    "introduction": _category((["my name is *", "i m *", "* here"], _AGENT, _FIRST, 3, False)),
    "verification": _category((["order number"], _AGENT, 0, 0, False)),
    "offered-more-help": _category((["anything else"], _AGENT, _LAST, 4, False)),
    "thanked": _category((["thanks for contacting *", "have a great day"], _AGENT, _LAST, 3, False)),
    "abusive-language": _category((["{stupid|idiot|shut up|not my problem}"], _AGENT, 0, 0, False)),
    "customer-frustration": _category(
        (
            ["{second|third} time", "nobody got back", "really frustrating", "{terrible|ridiculous}"],
            _CUSTOMER,
            0,
            0,
            False,
        )
    ),
}


def _yes_no(qid: str, text: str, weight: float, category: str, **kw: object) -> quality_pb2.FormQuestion:
    return quality_pb2.FormQuestion(
        question_id=qid,
        text=text,
        weight=weight,
        type=quality_pb2.QUESTION_TYPE_YES_NO,
        automatic=quality_pb2.AutomaticAnswer(category=f"categories/{category}"),
        **kw,  # type: ignore[arg-type]
    )


DEMO_FORM = quality_pb2.EvaluationForm(
    display_name="Chat and messaging quality",
    scope=quality_pb2.FormScope(channels=[event_pb2.CHANNEL_CHAT, event_pb2.CHANNEL_SMS]),
    sections=[
        quality_pb2.FormSection(
            section_id="opening",
            title="Opening",
            weight=30,
            questions=[
                _yes_no("greeted", "Did the agent greet the customer?", 50, "greeting"),
                _yes_no("introduced", "Did the agent give their name?", 50, "introduction"),
            ],
        ),
        quality_pb2.FormSection(
            section_id="handling",
            title="Handling",
            weight=40,
            questions=[
                _yes_no("verified", "Did the agent ask for the order number?", 25, "verification"),
                _yes_no(
                    "respectful",
                    "Was the agent's language respectful?",
                    25,
                    "abusive-language",
                    options=[
                        quality_pb2.AnswerOption(value="yes", points=0, auto_fail=True),
                        quality_pb2.AnswerOption(value="no", points=100),
                    ],
                ),
                quality_pb2.FormQuestion(
                    question_id="sentiment",
                    text="Did the customer end the conversation neutral or positive?",
                    weight=25,
                    type=quality_pb2.QUESTION_TYPE_NUMERIC,
                    ranges=[
                        quality_pb2.NumericRange(max=-0.05, points=0),
                        quality_pb2.NumericRange(min=-0.05, max=0.3, points=60),
                        quality_pb2.NumericRange(min=0.3, points=100),
                    ],
                    automatic=quality_pb2.AutomaticAnswer(sentiment=quality_pb2.SENTIMENT_MEASURE_OVERALL),
                    allow_not_applicable=True,
                ),
                quality_pb2.FormQuestion(
                    question_id="no-repeat",
                    text="Was the issue resolved without a repeat contact?",
                    weight=25,
                    type=quality_pb2.QUESTION_TYPE_YES_NO,
                    options=[
                        quality_pb2.AnswerOption(value="yes", points=0),
                        quality_pb2.AnswerOption(value="no", points=100),
                    ],
                    automatic=quality_pb2.AutomaticAnswer(outcome=quality_pb2.OUTCOME_REPEAT_CONTACT),
                ),
            ],
        ),
        quality_pb2.FormSection(
            section_id="closing",
            title="Closing",
            weight=30,
            questions=[
                _yes_no("offered-help", "Did the agent offer more help?", 50, "offered-more-help"),
                _yes_no("thanked", "Did the agent thank the customer?", 50, "thanked"),
            ],
        ),
    ],
)
DEMO_ALERT_RULES: dict[str, quality_pb2.AlertRule] = {
    "frustrated-customer": quality_pb2.AlertRule(
        display_name="Customer frustration detected",
        category_detected=quality_pb2.CategoryDetected(category="categories/customer-frustration"),
    ),
    "third-contact": quality_pb2.AlertRule(
        display_name="Third contact on the same reason in a week",
        repeated_reason=quality_pb2.RepeatedReason(contacts=3, days=7),
    ),
    "back-after-low-nps": quality_pb2.AlertRule(
        display_name="Back within a week of a low NPS",
        contact_after_low_nps=quality_pb2.ContactAfterLowNps(days=7, max_score=6),
    ),
    "sentiment-falling": quality_pb2.AlertRule(
        display_name="Customer sentiment falling in an open conversation",
        sentiment_below=quality_pb2.SentimentBelow(threshold=-0.4, min_messages=2),
    ),
}


def configure_quality(metrics: grpc.Channel, api_key: str, timeout: float = 30.0) -> None:
    """The demo's categories, its evaluation form and its alert rules (left as they are when the
    tenant already has them)."""
    stub = quality_pb2_grpc.QualityServiceStub(metrics)
    metadata = (("authorization", f"Bearer {api_key}"),)

    def create(method: str, request: object) -> None:
        try:
            getattr(stub, method)(request, metadata=metadata, timeout=timeout)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise

    for category_id, category in DEMO_CATEGORIES.items():
        create("CreateCategory", quality_pb2.CreateCategoryRequest(category_id=category_id, category=category))
    create("CreateEvaluationForm", quality_pb2.CreateEvaluationFormRequest(form_id="chat-quality", form=DEMO_FORM))
    for rule_id, rule in DEMO_ALERT_RULES.items():
        create("CreateAlertRule", quality_pb2.CreateAlertRuleRequest(rule_id=rule_id, rule=rule))
