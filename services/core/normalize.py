"""Canonical forms of identifier values, so one person's identifiers compare equal byte for byte.

Pure functions, no I/O. A normalizer returns ``None`` for a value it does not accept; the caller then
drops the identifier rather than link anything with it, because a half-understood value is how two
strangers end up merged.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Final

import phonenumbers

#: ``(raw, default_region) -> canonical value or None``; every normalizer has this shape so the rules
#: can call any of them the same way. Only ``phone`` uses the region.
Normalizer = Callable[[str, str], str | None]

MAX_EMAIL_LENGTH: Final = 254  # RFC 5321 path limit, minus the angle brackets
MAX_EMAIL_LOCAL_LENGTH: Final = 64
MAX_DOMAIN_LABEL_LENGTH: Final = 63
MAX_PHONE_INPUT_LENGTH: Final = 64  # generous for formatting; keeps phonenumbers' work bounded

# Whitespace plus the zero-width characters and BOM that copy-paste and CSV exports leave behind.
_EDGES = re.compile(r"^[\s\u200b\u200c\u200d\u2060\ufeff]+|[\s\u200b\u200c\u200d\u2060\ufeff]+$")
# Characters that only appear in quoted local parts, display names or address lists, never in the
# plain addresses people type; seeing one means the value is not (just) an email address.
_EMAIL_FORBIDDEN: Final = frozenset('"(),:;<>[]\\')
# Full stops that IDNA treats as label separators (ideographic, fullwidth, halfwidth ideographic).
_DOTS = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})


def trim(raw: str) -> str:
    """Strip whitespace and invisible zero-width characters at both ends, never inside."""
    return _EDGES.sub("", raw)


def normalize_plain(raw: str) -> str | None:
    """Opaque ids (user_id, device_id…) are case- and space-sensitive inside; only the edges are noise."""
    value = trim(raw)
    return value or None


def normalize_lower(raw: str) -> str | None:
    """For custom ids a tenant knows to be case-insensitive (coupon codes, usernames)."""
    value = trim(raw).lower()
    return value or None


def normalize_digits(raw: str) -> str | None:
    """Keep ASCII digits only, for numeric ids that arrive formatted ("4401-2873 05", "LY4401287305")."""
    value = "".join(str(unicodedata.decimal(ch)) for ch in raw if ch.isdecimal())
    return value or None


def normalize_email(raw: str) -> str | None:
    """Trim, NFC, lower-case; ``None`` unless it is one plain ``local@domain`` address.

    Choice on internationalised domains: they stay Unicode (``josé@exämple.com``), because that is what
    people type and what shows in a profile. Punycode labels (``xn--exmple-cua``) are decoded to the
    same Unicode, so both spellings link. The domain is case-folded (DNS is case-insensitive; note
    folding maps ``ß`` to ``ss`` as IDNA2003 did), the local part is ``lower()``-ed: strictly it is
    case-sensitive, but no real mailbox provider treats it so and ``Ada@`` vs ``ada@`` is one person.
    Provider-specific rewrites (Gmail dots, ``+tags``) are not applied: they are not universal and
    would merge distinct mailboxes elsewhere.
    """
    value = unicodedata.normalize("NFC", trim(raw))
    if not value or len(value) > MAX_EMAIL_LENGTH or value.count("@") != 1:
        return None
    local, _, domain = value.partition("@")
    if not local or not domain or len(local) > MAX_EMAIL_LOCAL_LENGTH:
        return None
    if any(ch.isspace() or ch in _EMAIL_FORBIDDEN or unicodedata.category(ch)[0] == "C" for ch in value):
        return None
    if local.startswith(".") or local.endswith(".") or ".." in local:
        return None
    canonical_domain = _normalize_domain(domain)
    if canonical_domain is None:
        return None
    return f"{local.lower()}@{canonical_domain}"


def _normalize_domain(domain: str) -> str | None:
    """A dotted host name of letters, digits, marks and hyphens, in case-folded NFC Unicode."""
    labels = domain.translate(_DOTS).split(".")
    if len(labels) < 2:
        return None  # "a@localhost" reaches nobody outside one machine
    out = []
    for label in labels:
        if label[:4].lower() == "xn--":
            try:
                label = label.lower().encode("ascii").decode("idna")  # noqa: PLW2901
            except UnicodeError:
                return None
        folded = unicodedata.normalize("NFC", label.casefold())
        if not folded or len(folded) > MAX_DOMAIN_LABEL_LENGTH or folded[0] == "-" or folded[-1] == "-":
            return None
        if not all(ch.isalnum() or ch == "-" or unicodedata.category(ch)[0] == "M" for ch in folded):
            return None
        out.append(folded)
    if out[-1].isdecimal():
        return None  # "a@1.2.3.4": a bare IP, not a domain
    return ".".join(out)


def normalize_phone(raw: str, default_region: str) -> str | None:
    """E.164 (``+14155550123``) if ``phonenumbers`` finds a possible and valid number, else ``None``.

    National formats are read in the tenant's ``default_region``. Letters are refused outright:
    phonenumbers would read vanity spellings ("555-CALL") and extensions ("ext 12"), and an extension
    cannot be kept in E.164, so keeping the bare switchboard number would link everyone behind it.
    A ``tel:`` prefix is allowed. A leading ``00`` is read as the international prefix when the
    region's own reading is not a valid number ("00 44 20…" with region US).
    """
    value = trim(raw)
    if value[:4].lower() == "tel:":
        value = value[4:]
    if not value or len(value) > MAX_PHONE_INPUT_LENGTH or any(ch.isalpha() for ch in value):
        return None
    digits = "".join(str(unicodedata.decimal(ch)) for ch in value if ch.isdecimal())
    if not digits.strip("0"):
        return None  # no digits, or a zero placeholder
    number = _parse_valid(value, default_region)
    if number is None and digits.startswith("00") and not value.startswith("+"):
        number = _parse_valid("+" + digits[2:], default_region)
    if number is None or number.extension:
        return None
    return str(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))


def _parse_valid(value: str, region: str) -> phonenumbers.PhoneNumber | None:
    try:
        number = phonenumbers.parse(value, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_possible_number(number) or not phonenumbers.is_valid_number(number):
        return None
    return number


def _email(raw: str, _region: str) -> str | None:
    return normalize_email(raw)


def _trim(raw: str, _region: str) -> str | None:
    return normalize_plain(raw)


def _lower(raw: str, _region: str) -> str | None:
    return normalize_lower(raw)


def _digits(raw: str, _region: str) -> str | None:
    return normalize_digits(raw)


#: Normalizer names a tenant may configure, mapped to their functions. Read-only: a typo in a rule
#: must fail validation, not register a new normalizer.
NORMALIZERS: Final[Mapping[str, Normalizer]] = MappingProxyType(
    {"email": _email, "phone": normalize_phone, "trim": _trim, "lower": _lower, "digits": _digits}
)
