"""Identifier rules, table-driven: each normalizer, blocked placeholders, unknown types and the exact
field a bad rule is reported on."""

from __future__ import annotations

import dataclasses

import pytest

from services.core.errors import InvalidArgument, Violation
from services.core.identity_rules import (
    DEFAULT_BLOCKED,
    DEFAULT_RULES,
    DropReason,
    IdentifierType,
    IdentityRules,
    NormalizedResult,
    normalize_identifier,
    validate_rules,
)
from services.core.normalize import (
    NORMALIZERS,
    normalize_digits,
    normalize_email,
    normalize_lower,
    normalize_phone,
    normalize_plain,
)

# --------------------------------------------------------------------------------------------------
# Email.

EMAILS: list[tuple[str, str]] = [
    ("ada@example.com", "ada@example.com"),
    ("  Ada.Lovelace@Example.COM \n", "ada.lovelace@example.com"),
    ("\u200bada@example.com\ufeff", "ada@example.com"),  # zero-width space and BOM from copy-paste
    ("Ada+Promo@Mail.Example.com", "ada+promo@mail.example.com"),  # +tags kept: not universal
    ("first.last@sub.example.co.uk", "first.last@sub.example.co.uk"),
    # Internationalised: Unicode kept, local lower-cased, domain case-folded, NFC composed.
    ("José@Exämple.COM", "josé@exämple.com"),
    ("Jose\u0301@Exa\u0308mple.com", "josé@exämple.com"),  # decomposed input, same canonical form
    ("jose@xn--exmple-cua.com", "jose@exämple.com"),  # punycode label decoded to the same Unicode
    ("JOSE@XN--EXMPLE-CUA.COM", "jose@exämple.com"),
    ("用户@例子.广告", "用户@例子.广告"),
    ("user@例子\u3002广告", "user@例子.广告"),  # ideographic full stop separates labels
    ("ÖMER@ÖRNEK.COM.TR", "ömer@örnek.com.tr"),
]

NOT_EMAILS: list[tuple[str, str]] = [
    ("empty", ""),
    ("blank", "   "),
    ("no at", "ada.example.com"),
    ("two ats", "ada@home@example.com"),
    ("empty local", "@example.com"),
    ("empty domain", "ada@"),
    ("single-label domain", "ada@localhost"),
    ("space inside", "ada lovelace@example.com"),
    ("space in domain", "ada@exa mple.com"),
    ("tab inside", "ada@\texample.com"),
    ("display name", "Ada <ada@example.com>"),
    ("address list", "ada@example.com,bob@example.com"),
    ("quoted local", '"ada"@example.com'),
    ("leading dot local", ".ada@example.com"),
    ("double dot local", "a..da@example.com"),
    ("empty label", "ada@example..com"),
    ("trailing dot domain", "ada@example.com."),
    ("hyphen edge label", "ada@-example.com"),
    ("underscore domain", "ada@ex_ample.com"),
    ("ip literal", "ada@[192.0.2.1]"),
    ("bare ip", "ada@192.0.2.1"),
    ("bad punycode", "ada@xn--a-.com"),
    ("control char", "ada\x00@example.com"),
    ("local over 64", "a" * 65 + "@example.com"),
    ("over 254", "a@" + "b" * 250 + ".com"),
    ("fullwidth at", "ada\uff20example.com"),
]


@pytest.mark.parametrize(("raw", "expected"), EMAILS)
def test_normalize_email(raw: str, expected: str) -> None:
    assert normalize_email(raw) == expected


@pytest.mark.parametrize("raw", [raw for _, raw in NOT_EMAILS], ids=[name for name, _ in NOT_EMAILS])
def test_normalize_email_rejects_non_emails(raw: str) -> None:
    assert normalize_email(raw) is None


# --------------------------------------------------------------------------------------------------
# Phone.

PHONES: list[tuple[str, str, str]] = [
    ("(415) 555-0142", "US", "+14155550142"),
    ("415.555.0142", "US", "+14155550142"),
    ("1-415-555-0142", "US", "+14155550142"),
    ("+1 (415) 555-0142", "GB", "+14155550142"),  # an explicit country code wins over the region
    ("tel:+1-415-555-0142", "US", "+14155550142"),
    ("+44 20 7946 0958", "US", "+442079460958"),
    ("+44 (0) 20 7946 0958", "US", "+442079460958"),
    ("020 7946 0958", "GB", "+442079460958"),
    ("00 44 20 7946 0958", "GB", "+442079460958"),
    ("00 44 20 7946 0958", "US", "+442079460958"),  # "00" read as international prefix from the US too
    ("011 44 20 7946 0958", "US", "+442079460958"),  # the US international prefix
    ("0011 44 20 7946 0958", "AU", "+442079460958"),  # the Australian one
    ("030 123456", "DE", "+4930123456"),
    ("06 12 34 56 78", "FR", "+33612345678"),
    ("090-1234-5678", "JP", "+819012345678"),
    ("+49 151 12345678", "US", "+4915112345678"),
    ("\u00a0415 555 0142\u00a0", "US", "+14155550142"),  # no-break spaces around
    ("\uff14\uff11\uff15 \uff15\uff15\uff15 \uff10\uff11\uff14\uff12", "US", "+14155550142"),  # fullwidth digits
]

NOT_PHONES: list[tuple[str, str, str]] = [
    ("empty", "", "US"),
    ("letters", "415-555-CALL", "US"),  # vanity spelling: refused, not translated
    ("extension", "415 555 0142 ext 12", "US"),
    ("extension hash", "415 555 0142 #12", "US"),
    ("word", "unknown", "US"),
    ("too short", "12", "US"),
    ("too short local", "555 0142", "US"),
    ("too long", "+1 415 555 0142 0142 0142", "US"),
    ("all zeros", "0000000000", "US"),
    ("all zeros plus", "+000 000 0000", "US"),
    ("country code and zeros", "+1 000 000 0000", "US"),
    ("invalid 555 area code", "+1 555 000 0000", "US"),
    ("invalid area code", "(123) 456-7890", "US"),
    ("national without region match", "020 7946 0958", "US"),
    ("punctuation only", "()-.", "US"),
    ("over input cap", "1" * 65, "US"),
]


@pytest.mark.parametrize(("raw", "region", "expected"), PHONES)
def test_normalize_phone(raw: str, region: str, expected: str) -> None:
    assert normalize_phone(raw, region) == expected


@pytest.mark.parametrize(
    ("raw", "region"), [(raw, region) for _, raw, region in NOT_PHONES], ids=[name for name, _, _ in NOT_PHONES]
)
def test_normalize_phone_rejects_bad_numbers(raw: str, region: str) -> None:
    assert normalize_phone(raw, region) is None


# --------------------------------------------------------------------------------------------------
# Plain, lower, digits and the registry.


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("usr_5c1d2e3f4a5b", "usr_5c1d2e3f4a5b"),
        ("  usr_ABC \t", "usr_ABC"),  # case kept: opaque ids are case-sensitive
        ("a  b", "a  b"),  # inside whitespace kept
        ("\u200busr\u200b", "usr"),
        ("", None),
        (" \n\t ", None),
    ],
)
def test_normalize_plain(raw: str, expected: str | None) -> None:
    assert normalize_plain(raw) == expected


@pytest.mark.parametrize(("raw", "expected"), [(" SAVE20 ", "save20"), ("MiXeD", "mixed"), ("  ", None)])
def test_normalize_lower(raw: str, expected: str | None) -> None:
    assert normalize_lower(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("LY4401287305", "4401287305"), ("4401-2873 05", "4401287305"), ("٤٤٠١", "4401"), ("no digits", None)],
)
def test_normalize_digits(raw: str, expected: str | None) -> None:
    assert normalize_digits(raw) == expected


def test_registry_names_and_uniform_signature() -> None:
    assert set(NORMALIZERS) == {"email", "phone", "trim", "lower", "digits"}
    assert NORMALIZERS["email"](" A@B.example ", "US") == "a@b.example"
    assert NORMALIZERS["phone"]("020 7946 0958", "GB") == "+442079460958"
    assert NORMALIZERS["trim"](" X ", "US") == "X"
    assert NORMALIZERS["lower"](" X ", "US") == "x"
    assert NORMALIZERS["digits"]("a1b2", "US") == "12"
    with pytest.raises(TypeError):
        NORMALIZERS["x"] = NORMALIZERS["trim"]  # type: ignore[index]


# --------------------------------------------------------------------------------------------------
# Default rules and normalize_identifier.


def test_default_types() -> None:
    got = {t.name: (t.normalizer, t.priority, t.max_per_profile) for t in DEFAULT_RULES.types.values()}
    assert got == {
        "user_id": ("trim", 100, 1),
        "email": ("email", 90, 5),
        "phone": ("phone", 80, 5),
        "device_id": ("trim", 60, 5),
        "anonymous_id": ("trim", 50, 5),
    }
    assert DEFAULT_RULES.default_region == "US"
    assert [t.name for t in DEFAULT_RULES.types_by_priority] == [
        "user_id",
        "email",
        "phone",
        "device_id",
        "anonymous_id",
    ]


@pytest.mark.parametrize(
    ("type_name", "raw", "expected"),
    [
        ("email", " Maya.Okafor@Example.COM ", "maya.okafor@example.com"),
        ("phone", "(415) 555-0142", "+14155550142"),
        ("user_id", " usr_5c1d2e3f4a5b ", "usr_5c1d2e3f4a5b"),
        ("anonymous_id", "0b6f4c1e-8a52-4d7e-9c3a-2f1e5d6a7b80", "0b6f4c1e-8a52-4d7e-9c3a-2f1e5d6a7b80"),
        ("device_id", "ABCD-1234", "ABCD-1234"),
    ],
)
def test_kept_identifiers(type_name: str, raw: str, expected: str) -> None:
    result = normalize_identifier(DEFAULT_RULES, type_name, raw)
    assert result == NormalizedResult(type_name, expected)
    assert result.ok


@pytest.mark.parametrize(
    ("type_name", "raw", "reason"),
    [
        ("crm_id", "0035g00000MayOkfQA", DropReason.UNKNOWN_TYPE),  # not configured: never linked
        ("emial", "ada@example.com", DropReason.UNKNOWN_TYPE),
        ("email", "not-an-email", DropReason.INVALID),
        ("email", "", DropReason.INVALID),
        ("phone", "415-555-CALL", DropReason.INVALID),
        ("phone", "+1 555 000 0000", DropReason.INVALID),
        ("user_id", "   ", DropReason.INVALID),
    ],
)
def test_dropped_identifiers(type_name: str, raw: str, reason: DropReason) -> None:
    result = normalize_identifier(DEFAULT_RULES, type_name, raw)
    assert result == NormalizedResult(type_name, None, reason)
    assert not result.ok


BLOCKED_DEFAULTS: list[tuple[str, str]] = [
    ("user_id", "null"),
    ("user_id", " NULL "),  # case-insensitive on the trimmed raw value
    ("user_id", "None"),
    ("user_id", "undefined"),
    ("user_id", "[object Object]"),
    ("user_id", "0"),
    ("anonymous_id", "unknown"),
    ("anonymous_id", "Anonymous"),
    ("device_id", "00000000-0000-0000-0000-000000000000"),  # nil UUID / zeroed advertising id
    ("device_id", "0000-0000"),  # zeros and separators only
    ("email", "unknown"),  # blocked, not merely invalid
    ("email", "N/A"),
    ("email", "test@test.com"),
    ("email", " TEST@Test.COM "),  # after normalization
    ("email", "test@example.com"),
    ("email", "noreply@shop.example"),  # automated senders, any domain
    ("email", "No-Reply+orders@shop.example"),
    ("email", "do-not-reply@mail.example.org"),
    ("phone", "0000000000"),
    ("phone", "000-000-0000"),
    ("phone", "(000) 000-0000"),
    ("phone", "+0 000 000"),
    ("phone", "+1 000 000 0000"),  # country code then zeros
    ("phone", "+10000000000"),
    ("phone", "0044 0000 000000"),
    ("phone", "+44 0000 000000"),
    ("phone", "1234567890"),
    ("phone", "n/a"),
]


@pytest.mark.parametrize(("type_name", "raw"), BLOCKED_DEFAULTS)
def test_default_blocked_values(type_name: str, raw: str) -> None:
    assert normalize_identifier(DEFAULT_RULES, type_name, raw) == NormalizedResult(type_name, None, DropReason.BLOCKED)


def test_default_blocked_list_has_the_issue_examples() -> None:
    assert {"unknown", "null", "none", "n/a", "test@test.com", "0000000000"} <= DEFAULT_BLOCKED


def test_real_values_that_look_close_to_placeholders_are_kept() -> None:
    for type_name, raw in [
        ("user_id", "nullable"),
        ("user_id", "10"),
        ("email", "test.user@shop.example"),
        ("email", "replies@shop.example"),
        ("phone", "+1 415 555 0100"),
        ("device_id", "00000000-0000-0000-0000-000000000001"),
    ]:
        assert normalize_identifier(DEFAULT_RULES, type_name, raw).ok, raw


TENANT = IdentityRules.of(
    IdentifierType("email", "email", 90, 5, blocked=frozenset({"Info@Harbor-Pine.example"})),
    IdentifierType("phone", "phone", 80, 5, blocked=frozenset({"+1 (800) 555-0100"})),
    IdentifierType("crm_id", "trim", 70, 1),
    IdentifierType("loyalty_id", "digits", 40, 3),
    default_region="GB",
    blocked=frozenset({"Walk-In", "CASH SALE"}),
)


@pytest.mark.parametrize(
    ("type_name", "raw"),
    [
        ("email", "info@harbor-pine.example"),  # type's own list, case-insensitive
        ("email", " INFO@HARBOR-PINE.EXAMPLE"),
        ("phone", "+18005550100"),  # type's own list, matched after normalization
        ("phone", "001 800 555 0100"),
        ("crm_id", "walk-in"),  # tenant-wide list, any type
        ("crm_id", "Cash Sale"),
        ("loyalty_id", "CASH SALE"),
        ("crm_id", "null"),  # defaults still apply to custom types
        ("loyalty_id", "0000"),
    ],
)
def test_tenant_blocked_values(type_name: str, raw: str) -> None:
    assert normalize_identifier(TENANT, type_name, raw).dropped is DropReason.BLOCKED


def test_tenant_rules_use_their_region_and_custom_types() -> None:
    assert normalize_identifier(TENANT, "phone", "020 7946 0958").value == "+442079460958"
    assert normalize_identifier(TENANT, "loyalty_id", "LY4401287305").value == "4401287305"
    assert normalize_identifier(TENANT, "crm_id", "0035g00000MayOkfQA").value == "0035g00000MayOkfQA"
    assert normalize_identifier(TENANT, "user_id", "usr_1").dropped is DropReason.UNKNOWN_TYPE  # removed
    assert [t.name for t in TENANT.types_by_priority] == ["email", "phone", "crm_id", "loyalty_id"]


def test_require_type() -> None:
    assert DEFAULT_RULES.require("email").name == "email"
    with pytest.raises(InvalidArgument) as err:
        DEFAULT_RULES.require("crm_id", "identifier.type")
    assert [(v.field, v.reason) for v in err.value.violations] == [("identifier.type", "UNKNOWN_TYPE")]


def test_rules_are_immutable() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_RULES.default_region = "GB"  # type: ignore[misc]
    with pytest.raises(TypeError):
        DEFAULT_RULES.types["x"] = IdentifierType("x")  # type: ignore[index]


# --------------------------------------------------------------------------------------------------
# Rule validation.


def _violations(spec: object) -> list[tuple[str, str]]:
    with pytest.raises(InvalidArgument) as err:
        validate_rules(spec)  # type: ignore[arg-type]
    assert err.value.code.name == "INVALID_ARGUMENT"
    return [(v.field, v.reason) for v in err.value.violations]


INVALID_SPECS: list[tuple[str, object, list[tuple[str, str]]]] = [
    (
        "unknown normalizer",
        {"types": {"email": {"normalizer": "emial"}}},
        [("types[email].normalizer", "UNKNOWN_VALUE")],
    ),
    (
        "negative limit",
        {"types": {"email": {"max_per_profile": -1}}},
        [("types[email].max_per_profile", "OUT_OF_RANGE")],
    ),
    ("zero limit", {"types": {"phone": {"max_per_profile": 0}}}, [("types[phone].max_per_profile", "OUT_OF_RANGE")]),
    (
        "limit over cap",
        {"types": {"phone": {"max_per_profile": 100_000}}},
        [("types[phone].max_per_profile", "OUT_OF_RANGE")],
    ),
    (
        "limit not int",
        {"types": {"phone": {"max_per_profile": "5"}}},
        [("types[phone].max_per_profile", "INVALID_TYPE")],
    ),
    ("limit bool", {"types": {"phone": {"max_per_profile": True}}}, [("types[phone].max_per_profile", "INVALID_TYPE")]),
    ("priority negative", {"types": {"crm_id": {"priority": -1}}}, [("types[crm_id].priority", "OUT_OF_RANGE")]),
    ("priority over 1000", {"types": {"crm_id": {"priority": 1001}}}, [("types[crm_id].priority", "OUT_OF_RANGE")]),
    ("priority float", {"types": {"crm_id": {"priority": 7.5}}}, [("types[crm_id].priority", "INVALID_TYPE")]),
    ("name not snake case", {"types": {"E-Mail": {}}}, [("types[E-Mail].name", "INVALID_FORMAT")]),
    ("name starts with digit", {"types": {"1id": {}}}, [("types[1id].name", "INVALID_FORMAT")]),
    ("name with newline", {"types": {"email\n": {}}}, [("types[email\n].name", "INVALID_FORMAT")]),
    ("name over 64", {"types": {"a" * 65: {}}}, [(f"types[{'a' * 65}].name", "INVALID_FORMAT")]),
    ("name differs from key", {"types": {"email": {"name": "mail"}}}, [("types[email].name", "MISMATCH")]),
    (
        "duplicate type in list",
        {"types": [{"name": "email"}, {"name": "crm_id"}, {"name": "email", "priority": 5}]},
        [("types[email]", "DUPLICATE")],
    ),
    ("list entry without name", {"types": [{"priority": 5}, {"name": "email"}]}, [("types[0].name", "REQUIRED")]),
    ("no types", {"types": {}}, [("types", "REQUIRED")]),
    ("no types list", {"types": []}, [("types", "REQUIRED")]),
    ("types wrong shape", {"types": "email"}, [("types", "INVALID_TYPE")]),
    ("type spec wrong shape", {"types": {"email": 5}}, [("types[email]", "INVALID_TYPE")]),
    ("unknown type field", {"types": {"email": {"limit": 3}}}, [("types[email].limit", "UNKNOWN_FIELD")]),
    ("unknown top field", {"probabilistic": True}, [("probabilistic", "UNKNOWN_FIELD")]),
    ("unknown region", {"default_region": "XX"}, [("default_region", "UNKNOWN_VALUE")]),
    ("lower-case region", {"default_region": "us"}, [("default_region", "UNKNOWN_VALUE")]),
    ("region not string", {"default_region": 1}, [("default_region", "INVALID_TYPE")]),
    ("blocked not list", {"blocked": "unknown"}, [("blocked", "INVALID_TYPE")]),
    ("blocked blank", {"blocked": ["ok", "  "]}, [("blocked[1]", "REQUIRED")]),
    ("blocked not string", {"blocked": [3]}, [("blocked[0]", "INVALID_TYPE")]),
    ("blocked too long", {"blocked": ["x" * 257]}, [("blocked[0]", "TOO_LONG")]),
    ("blocked too many", {"blocked": [f"v{i}" for i in range(1001)]}, [("blocked", "TOO_MANY")]),
    (
        "type blocked blank",
        {"types": {"email": {"blocked": ["a@b.example", ""]}}},
        [("types[email].blocked[1]", "REQUIRED")],
    ),
    ("spec not a mapping", ["email"], [("rules", "INVALID_TYPE")]),
]


@pytest.mark.parametrize(
    ("spec", "expected"), [(s, e) for _, s, e in INVALID_SPECS], ids=[name for name, _, _ in INVALID_SPECS]
)
def test_invalid_rules_name_the_field(spec: object, expected: list[tuple[str, str]]) -> None:
    assert _violations(spec) == expected


def test_every_problem_is_reported_at_once() -> None:
    spec = {
        "default_region": "XX",
        "types": {"email": {"normalizer": "soundex", "max_per_profile": -1}, "crm_id": {"priority": 5000}},
    }
    assert sorted(_violations(spec)) == [
        ("default_region", "UNKNOWN_VALUE"),
        ("types[crm_id].priority", "OUT_OF_RANGE"),
        ("types[email].max_per_profile", "OUT_OF_RANGE"),
        ("types[email].normalizer", "UNKNOWN_VALUE"),
    ]


def test_violations_carry_readable_descriptions() -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_rules({"types": {"email": {"normalizer": "soundex"}}})
    (violation,) = err.value.violations
    assert isinstance(violation, Violation)
    assert "email, phone, trim, lower, digits" in violation.description
    assert "types[email].normalizer" in err.value.message


def test_valid_spec_fills_defaults() -> None:
    rules = validate_rules(
        {
            "default_region": "GB",
            "blocked": ["walk-in"],
            "types": {
                "email": {"max_per_profile": 3},  # inherits normalizer and priority from the default email
                "crm_id": {"priority": 70, "blocked": ["TBD"]},  # custom: trim, limit 5
                "loyalty_id": {"normalizer": "digits", "max_per_profile": 1},
            },
        }
    )
    assert rules.default_region == "GB"
    assert rules.blocked == frozenset({"walk-in"})
    assert rules.types["email"] == IdentifierType("email", "email", 90, 3)
    assert rules.types["crm_id"] == IdentifierType("crm_id", "trim", 70, 5, frozenset({"TBD"}))
    assert rules.types["loyalty_id"] == IdentifierType("loyalty_id", "digits", 10, 1)
    assert set(rules.types) == {"email", "crm_id", "loyalty_id"}
    assert normalize_identifier(rules, "crm_id", "tbd").dropped is DropReason.BLOCKED


def test_valid_spec_list_form_and_empty_spec() -> None:
    rules = validate_rules({"types": [{"name": "user_id"}, {"name": "crm_id", "normalizer": "lower"}]})
    assert rules.types["user_id"] == DEFAULT_RULES.types["user_id"]
    assert rules.types["crm_id"].normalizer == "lower"
    assert validate_rules({}) == DEFAULT_RULES
    assert validate_rules(DEFAULT_RULES) is DEFAULT_RULES


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda: IdentityRules(types={}), [("types", "REQUIRED")]),
        (
            lambda: IdentityRules(types={"email": IdentifierType("mail", "email", 90, 5)}),
            [("types[email].name", "MISMATCH")],
        ),
        (
            lambda: IdentityRules.of(IdentifierType("email", "email", 90, 5), IdentifierType("email", "trim", 1, 1)),
            [("types[email]", "DUPLICATE")],
        ),
        (lambda: IdentityRules.of(IdentifierType("x", "nope")), [("types[x].normalizer", "UNKNOWN_VALUE")]),
        (
            lambda: IdentityRules.of(IdentifierType("x", max_per_profile=-3)),
            [("types[x].max_per_profile", "OUT_OF_RANGE")],
        ),
        (lambda: IdentityRules.of(IdentifierType("x"), default_region="ZZ"), [("default_region", "UNKNOWN_VALUE")]),
        (lambda: IdentityRules.of(IdentifierType("x", blocked=frozenset({" "}))), [("types[x].blocked", "REQUIRED")]),
    ],
)
def test_rules_objects_are_valid_by_construction(build: object, expected: list[tuple[str, str]]) -> None:
    with pytest.raises(InvalidArgument) as err:
        build()  # type: ignore[operator]
    assert [(v.field, v.reason) for v in err.value.violations] == expected
