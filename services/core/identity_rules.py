"""Per-tenant identifier rules: which identifier types link profiles, how their values are made canonical,
how far each is trusted, and which placeholder values must never link anyone.

Pure domain code. The identity service builds a tenant's :class:`IdentityRules` once (validated and
compiled then) and calls :func:`normalize_identifier` for every identifier of every event, so that path
is only a dict look-up, set look-ups and the type's normalizer.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Final

import phonenumbers

from services.core.errors import InvalidArgument, Violation
from services.core.normalize import NORMALIZERS, Normalizer, trim

TYPE_NAME_RE: Final = re.compile(r"[a-z][a-z0-9_]{0,63}")  # used with fullmatch: "email\n" is not a name
TYPE_NAME_RULE: Final = "lower snake case, 1-64 characters, such as 'email'"
MIN_PRIORITY: Final = 0
MAX_PRIORITY: Final = 1000
MIN_PER_PROFILE: Final = 1
# A cap, so a typo (50000) cannot silently switch merge protection off for a type.
MAX_PER_PROFILE: Final = 1000
MAX_BLOCKED_VALUES: Final = 1000
MAX_TYPES: Final = 64
MAX_BLOCKED_VALUE_LENGTH: Final = 256  # ingest's cap on an identifier value; longer can never match
MEMO_SIZE: Final = 200_000  # normalized identifiers remembered per tenant's rules

# Custom types a tenant adds without saying more: opaque, trimmed, trusted below every default type.
CUSTOM_NORMALIZER: Final = "trim"
CUSTOM_PRIORITY: Final = 10
CUSTOM_MAX_PER_PROFILE: Final = 5

#: Placeholders real systems emit for "no value". They apply to every type and are compared
#: case-insensitively on the trimmed raw value and on the normalized value.
DEFAULT_BLOCKED: Final[frozenset[str]] = frozenset(
    {
        # words for "nothing"
        "unknown", "null", "(null)", "<null>", "nil", "none", "n/a", "na", "n.a.", "undefined", "nan",
        "void", "empty", "blank", "default", "not available", "not provided", "not set", "notset",
        "true", "false", "[object object]", "anonymous", "anon", "guest", "user", "customer",
        "test", "testing", "-", "--", ".", "?", "x", "xx", "xxx",
        # placeholder emails
        "test@test.com", "test@example.com", "user@example.com", "email@example.com", "example@example.com",
        "email@email.com", "no@email.com", "noemail@noemail.com", "none@none.com", "unknown@unknown.com",
        "null@null.com", "a@a.com", "abc@abc.com", "asdf@asdf.com",
        # placeholder numbers and ids
        "0", "00", "000", "0000000000", "1111111111", "5555555555", "9999999999", "123", "1234", "12345",
        "123456", "123456789", "1234567890", "00000000-0000-0000-0000-000000000000",
    }
)  # fmt: skip
#: Local parts of automated senders: whatever the domain, such an address is nobody's.
BLOCKED_EMAIL_LOCAL_PARTS: Final[frozenset[str]] = frozenset(
    {"noreply", "no-reply", "no_reply", "donotreply", "do-not-reply", "do_not_reply", "mailer-daemon"}
)
# A value made only of zeros and separators ("000-000", "0.0", the nil UUID) carries no identity.
_ZERO_NOISE: Final = "0 -+()./:_"


class DropReason(StrEnum):
    """Why an identifier was not used for linking; counted and shown, never silently lost."""

    UNKNOWN_TYPE = "UNKNOWN_TYPE"  # the tenant has not configured this type
    INVALID = "INVALID"  # the type's normalizer rejected the value
    BLOCKED = "BLOCKED"  # a placeholder that would link strangers


@dataclass(frozen=True, slots=True)
class NormalizedResult:
    """The canonical value to link with, or the reason the identifier was dropped (``value`` is None)."""

    type: str
    value: str | None
    dropped: DropReason | None = None

    @property
    def ok(self) -> bool:
        return self.dropped is None


@dataclass(frozen=True, slots=True)
class IdentifierType:
    """One identifier type of a tenant. Higher ``priority`` = more trusted: merge protection drops the
    lowest-priority identifiers first. ``blocked`` adds to :data:`DEFAULT_BLOCKED` and the tenant's list.
    """

    name: str
    normalizer: str = CUSTOM_NORMALIZER
    priority: int = CUSTOM_PRIORITY
    max_per_profile: int = CUSTOM_MAX_PER_PROFILE
    blocked: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        # Accept any collection of values, but never a bare string (it would become its characters).
        if not isinstance(self.blocked, frozenset | str) and isinstance(self.blocked, Iterable):
            object.__setattr__(self, "blocked", frozenset(self.blocked))


@dataclass(frozen=True, slots=True)
class _Compiled:
    normalize: Normalizer
    blocked: frozenset[str]  # case-folded raw and normalized forms of every blocked value
    is_phone: bool
    is_email: bool


@dataclass(frozen=True, slots=True)
class IdentityRules:
    """A tenant's identifier types, the default region for national phone numbers and its own blocked
    values. Valid by construction: building one with bad rules raises :class:`InvalidArgument`.
    """

    types: Mapping[str, IdentifierType]
    default_region: str = "US"
    blocked: frozenset[str] = frozenset()
    #: Highest priority first, ties by name, so merge protection's drop order is deterministic.
    types_by_priority: tuple[IdentifierType, ...] = field(init=False, repr=False, compare=False)
    _compiled: Mapping[str, _Compiled] = field(init=False, repr=False, compare=False)
    # Known customers repeat their identifiers, and a phone costs ~30 µs to parse: remember results.
    _memo: dict[tuple[str, str], NormalizedResult] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.blocked, frozenset | str) and isinstance(self.blocked, Iterable):
            object.__setattr__(self, "blocked", frozenset(self.blocked))
        violations = _check(self.types, self.default_region, self.blocked)
        if violations:
            raise _invalid(violations)
        object.__setattr__(self, "types", MappingProxyType(dict(self.types)))
        ordered = tuple(sorted(self.types.values(), key=lambda t: (-t.priority, t.name)))
        object.__setattr__(self, "types_by_priority", ordered)
        compiled = {name: _compile(t, self.blocked, self.default_region) for name, t in self.types.items()}
        object.__setattr__(self, "_compiled", MappingProxyType(compiled))
        object.__setattr__(self, "_memo", {})

    @classmethod
    def of(cls, *types: IdentifierType, default_region: str = "US", blocked: Iterable[str] = ()) -> IdentityRules:
        """Rules from a list of types; a name given twice is INVALID_ARGUMENT, not last-one-wins."""
        seen: dict[str, IdentifierType] = {}
        duplicates = []
        for t in types:
            if t.name in seen:
                duplicates.append(Violation(f"types[{t.name}]", "identifier type defined more than once", "DUPLICATE"))
            seen[t.name] = t
        if duplicates:
            raise _invalid(duplicates)
        return cls(types=seen, default_region=default_region, blocked=frozenset(blocked))

    def normalize(self, type_name: str, raw: str) -> NormalizedResult:
        """See :func:`normalize_identifier`. Results are remembered (at most :data:`MEMO_SIZE`)."""
        hit = self._memo.get((type_name, raw))
        if hit is None:
            hit = self._normalize(type_name, raw)
            if len(self._memo) >= MEMO_SIZE:
                self._memo.clear()
            self._memo[(type_name, raw)] = hit
        return hit

    def _normalize(self, type_name: str, raw: str) -> NormalizedResult:
        compiled = self._compiled.get(type_name)
        if compiled is None:
            return NormalizedResult(type_name, None, DropReason.UNKNOWN_TYPE)
        trimmed = trim(raw)
        if (
            trimmed.casefold() in compiled.blocked
            or _is_zero_placeholder(trimmed)
            or (compiled.is_phone and _is_zero_phone(trimmed))
        ):
            return NormalizedResult(type_name, None, DropReason.BLOCKED)
        # Control characters (NUL above all, which PostgreSQL text cannot hold) mean a broken value.
        value = None if any(ord(ch) < 32 for ch in trimmed) else compiled.normalize(trimmed, self.default_region)
        if value is None:
            return NormalizedResult(type_name, None, DropReason.INVALID)
        if value.casefold() in compiled.blocked or (compiled.is_email and _is_automated_sender(value)):
            return NormalizedResult(type_name, None, DropReason.BLOCKED)
        return NormalizedResult(type_name, value)

    def require(self, type_name: str, field: str = "type") -> IdentifierType:
        """The configured type, or INVALID_ARGUMENT: an API call naming a type (lookup, unmerge) must
        not guess, unlike an event, whose unknown identifiers are dropped so the rest still links.
        """
        found = self.types.get(type_name)
        if found is None:
            known = ", ".join(sorted(self.types))
            raise _invalid([Violation(field, f"unknown identifier type; configured: {known}", "UNKNOWN_TYPE")])
        return found


def normalize_identifier(rules: IdentityRules, type_name: str, raw: str) -> NormalizedResult:
    """The canonical value of one identifier, or why it must not link anything.

    An unconfigured type is dropped (UNKNOWN_TYPE) rather than treated as a custom type: a typo in a
    producer ("emial") would otherwise start linking profiles on values nobody vetted. Blocked values
    are checked on the raw trimmed value (case-insensitively) and again after normalization, so
    ``" NULL "`` and ``"(000) 000-0000"`` are caught as well as their canonical forms.
    """
    return rules.normalize(type_name, raw)


def validate_rules(spec: IdentityRules | Mapping[str, object]) -> IdentityRules:
    """Rules from their stored/API form (a JSON-like mapping), or INVALID_ARGUMENT naming every bad field.

    Shape::

        {"default_region": "US", "blocked": ["n/a"],
         "types": {"email": {"max_per_profile": 3}, "crm_id": {"normalizer": "trim", "priority": 70}}}

    ``types`` may also be a list of objects with a ``name``. When given, ``types`` is the whole set (a
    default type may be removed, but one type at least is required); a type named like a default one
    inherits the default's fields it does not set, a custom type gets trim / priority 10 / limit 5.
    Field paths name the type: ``types[email].max_per_profile``.
    """
    if isinstance(spec, IdentityRules):
        return spec  # validated when it was built
    if not isinstance(spec, Mapping):
        raise _invalid([Violation("rules", "identity rules must be an object", "INVALID_TYPE")])
    violations: list[Violation] = []
    for key in spec:
        if key not in _TOP_FIELDS:
            violations.append(_unknown_field(str(key), _TOP_FIELDS))

    region = spec.get("default_region", DEFAULT_RULES.default_region)
    if not isinstance(region, str):
        violations.append(Violation("default_region", "must be a string such as 'US'", "INVALID_TYPE"))
        region = DEFAULT_RULES.default_region
    blocked = _parse_values("blocked", spec.get("blocked", ()), violations)

    raw_types = spec.get("types")
    allow_empty = False
    types: dict[str, IdentifierType] = {}
    if raw_types is None:
        types = dict(DEFAULT_RULES.types)
    elif isinstance(raw_types, Mapping):
        for key, type_spec in raw_types.items():
            name = str(key)
            parsed = _parse_type(f"types[{name}]", name, type_spec, violations, name_from_key=True)
            if parsed is not None:
                types[name] = parsed
        allow_empty = bool(raw_types) and not types
    elif isinstance(raw_types, list | tuple):
        for i, type_spec in enumerate(raw_types):
            name_obj = type_spec.get("name") if isinstance(type_spec, Mapping) else None
            if not isinstance(name_obj, str):
                violations.append(Violation(f"types[{i}].name", "each type needs a name", "REQUIRED"))
                continue
            path = f"types[{name_obj}]"
            if name_obj in types:
                violations.append(Violation(path, "identifier type defined more than once", "DUPLICATE"))
                continue
            parsed = _parse_type(path, name_obj, type_spec, violations, name_from_key=False)
            if parsed is not None:
                types[name_obj] = parsed
        allow_empty = bool(raw_types) and not types
    else:
        violations.append(Violation("types", "must be an object keyed by type name, or a list", "INVALID_TYPE"))
        allow_empty = True

    violations.extend(_check(types, region, blocked, allow_empty=allow_empty))
    if violations:
        raise _invalid(violations)
    return IdentityRules(types=types, default_region=region, blocked=blocked)


# --------------------------------------------------------------------------------------------------
# Internals.

_TOP_FIELDS: Final = ("types", "default_region", "blocked")
_TYPE_FIELDS: Final = ("name", "normalizer", "priority", "max_per_profile", "blocked")


def _invalid(violations: list[Violation]) -> InvalidArgument:
    fields = ", ".join(dict.fromkeys(v.field for v in violations))
    return InvalidArgument(f"invalid identity rules: {fields}", violations)


def _unknown_field(path: str, known: Iterable[str]) -> Violation:
    return Violation(path, f"unknown field; expected one of: {', '.join(known)}", "UNKNOWN_FIELD")


def _check(types: object, region: object, blocked: object, *, allow_empty: bool = False) -> list[Violation]:
    """Every rule a built :class:`IdentityRules` must satisfy, as field violations (none = valid)."""
    out: list[Violation] = []
    if not isinstance(types, Mapping):
        out.append(Violation("types", "must map type names to IdentifierType", "INVALID_TYPE"))
        types = {}
    elif not types and not allow_empty:
        out.append(Violation("types", "at least one identifier type is required", "REQUIRED"))
    elif len(types) > MAX_TYPES:
        out.append(Violation("types", f"at most {MAX_TYPES} identifier types, got {len(types)}", "TOO_MANY"))
        return out
    for key, t in types.items():
        path = f"types[{key}]"
        if not isinstance(t, IdentifierType):
            out.append(Violation(path, "must be an IdentifierType", "INVALID_TYPE"))
            continue
        if not isinstance(key, str) or not TYPE_NAME_RE.fullmatch(key):
            out.append(Violation(f"{path}.name", TYPE_NAME_RULE, "INVALID_FORMAT"))
        elif t.name != key:
            out.append(Violation(f"{path}.name", f"name {t.name!r} differs from its key {key!r}", "MISMATCH"))
        if t.normalizer not in NORMALIZERS:
            known = ", ".join(NORMALIZERS)
            out.append(Violation(f"{path}.normalizer", f"unknown normalizer; use one of: {known}", "UNKNOWN_VALUE"))
        out.extend(_check_int(f"{path}.priority", t.priority, MIN_PRIORITY, MAX_PRIORITY))
        out.extend(_check_int(f"{path}.max_per_profile", t.max_per_profile, MIN_PER_PROFILE, MAX_PER_PROFILE))
        out.extend(_check_values(f"{path}.blocked", t.blocked))
    if not isinstance(region, str) or region not in phonenumbers.SUPPORTED_REGIONS:
        out.append(
            Violation(
                "default_region", "an upper-case ISO 3166 region phonenumbers supports, such as 'US'", "UNKNOWN_VALUE"
            )
        )
    out.extend(_check_values("blocked", blocked))
    return out


def _check_int(path: str, value: object, low: int, high: int) -> list[Violation]:
    if not isinstance(value, int) or isinstance(value, bool):
        return [Violation(path, "must be an integer", "INVALID_TYPE")]
    if not low <= value <= high:
        return [Violation(path, f"must be between {low} and {high}, got {value}", "OUT_OF_RANGE")]
    return []


def _check_values(path: str, values: object) -> list[Violation]:
    """Blocked-value sets on built rules (already frozensets); the list form is checked with indexes."""
    if not isinstance(values, frozenset):
        return [Violation(path, "must be a set of strings", "INVALID_TYPE")]
    out = []
    if len(values) > MAX_BLOCKED_VALUES:
        out.append(Violation(path, f"at most {MAX_BLOCKED_VALUES} values, got {len(values)}", "TOO_MANY"))
    for value in sorted(values, key=repr):
        if not isinstance(value, str):
            out.append(Violation(path, f"{value!r} is not a string", "INVALID_TYPE"))
        elif not trim(value):
            out.append(Violation(path, "a blocked value must not be blank", "REQUIRED"))
        elif len(value) > MAX_BLOCKED_VALUE_LENGTH:
            out.append(Violation(path, f"values are at most {MAX_BLOCKED_VALUE_LENGTH} characters", "TOO_LONG"))
    return out


def _parse_values(path: str, raw: object, violations: list[Violation]) -> frozenset[str]:
    """A JSON list of blocked values, reporting bad entries by index and keeping only the good ones."""
    if not isinstance(raw, list | tuple | set | frozenset):
        violations.append(Violation(path, "must be a list of strings", "INVALID_TYPE"))
        return frozenset()
    if len(raw) > MAX_BLOCKED_VALUES:
        violations.append(Violation(path, f"at most {MAX_BLOCKED_VALUES} values, got {len(raw)}", "TOO_MANY"))
        return frozenset()
    good = []
    for i, value in enumerate(raw):
        if not isinstance(value, str):
            violations.append(Violation(f"{path}[{i}]", "must be a string", "INVALID_TYPE"))
        elif not trim(value):
            violations.append(Violation(f"{path}[{i}]", "a blocked value must not be blank", "REQUIRED"))
        elif len(value) > MAX_BLOCKED_VALUE_LENGTH:
            violations.append(Violation(f"{path}[{i}]", f"at most {MAX_BLOCKED_VALUE_LENGTH} characters", "TOO_LONG"))
        else:
            good.append(value)
    return frozenset(good)


def _parse_type(
    path: str, name: str, spec: object, violations: list[Violation], *, name_from_key: bool
) -> IdentifierType | None:
    if not isinstance(spec, Mapping):
        violations.append(Violation(path, "must be an object", "INVALID_TYPE"))
        return None
    for key in spec:
        if key not in _TYPE_FIELDS:
            violations.append(_unknown_field(f"{path}.{key}", _TYPE_FIELDS))
    if name_from_key and "name" in spec and spec["name"] != name:
        violations.append(Violation(f"{path}.name", f"name {spec['name']!r} differs from its key", "MISMATCH"))
    base = _DEFAULT_TYPES.get(name) or IdentifierType(name)
    normalizer = spec.get("normalizer", base.normalizer)
    if not isinstance(normalizer, str):
        violations.append(Violation(f"{path}.normalizer", "must be a string", "INVALID_TYPE"))
        normalizer = base.normalizer
    priority = _parse_int(f"{path}.priority", spec.get("priority", base.priority), base.priority, violations)
    limit = _parse_int(
        f"{path}.max_per_profile", spec.get("max_per_profile", base.max_per_profile), base.max_per_profile, violations
    )
    blocked = _parse_values(f"{path}.blocked", spec.get("blocked", ()), violations)
    return IdentifierType(name, normalizer, priority, limit, blocked)


def _parse_int(path: str, value: object, fallback: int, violations: list[Violation]) -> int:
    """An integer field; a wrong JSON type is reported here and replaced, so range checks stay quiet."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    violations.append(Violation(path, "must be an integer", "INVALID_TYPE"))
    return fallback


def _compile(t: IdentifierType, tenant_blocked: frozenset[str], region: str) -> _Compiled:
    """Pre-compute the blocked forms once per rules object, so the per-event check is a set look-up."""
    normalize = NORMALIZERS[t.normalizer]
    forms: set[str] = set()
    for value in DEFAULT_BLOCKED | tenant_blocked | t.blocked:
        trimmed = trim(value)
        forms.add(trimmed.casefold())
        normalized = normalize(trimmed, region)
        if normalized is not None:
            forms.add(normalized.casefold())
    return _Compiled(normalize, frozenset(forms), t.normalizer == "phone", t.normalizer == "email")


def _is_zero_placeholder(value: str) -> bool:
    return "0" in value and not value.strip(_ZERO_NOISE)


def _is_zero_phone(value: str) -> bool:
    """A country code followed only by zeros ("+1 000 000 0000", "0044 0000 000000"): a placeholder.

    Checked before normalization because phonenumbers rejects these as invalid, and a blocked
    placeholder is worth counting apart from a typo.
    """
    digits = "".join(str(unicodedata.decimal(ch)) for ch in value if ch.isdecimal())
    digits = digits.removeprefix("00")
    for size in (1, 2, 3):
        code, rest = digits[:size], digits[size:]
        if len(rest) >= 4 and not rest.strip("0") and int(code) in phonenumbers.COUNTRY_CODE_TO_REGION_CODE:
            return True
    return False


def _is_automated_sender(email: str) -> bool:
    local = email.partition("@")[0]
    return local.partition("+")[0] in BLOCKED_EMAIL_LOCAL_PARTS


DEFAULT_RULES: Final = IdentityRules.of(
    IdentifierType("user_id", "trim", priority=100, max_per_profile=1),
    IdentifierType("email", "email", priority=90, max_per_profile=5),
    IdentifierType("phone", "phone", priority=80, max_per_profile=5),
    IdentifierType("device_id", "trim", priority=60, max_per_profile=5),
    IdentifierType("anonymous_id", "trim", priority=50, max_per_profile=5),
)
_DEFAULT_TYPES: Final = DEFAULT_RULES.types
