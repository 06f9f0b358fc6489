"""The JSON API's parameters, declared once: the same :class:`Param` parses a request (400 naming
the parameter) and describes itself in /openapi.json, so the document cannot drift from the code.
Pure: no I/O."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from services.gateway.statuses import HttpError, bad_parameter

Kind = Literal["string", "integer", "boolean", "enum", "date-time", "uuid"]
#: What an identifier type looks like (identity's configured types: user_id, email, phone...).
_TYPE = re.compile(r"[a-z][a-z0-9_]{0,63}")
_PHONE = re.compile(r"[0-9 ()\-]+")
MAX_VALUE = 1024
#: Values of one repeated parameter: the request line must stay under the HTTP parser's 8190 bytes.
MAX_ITEMS = 20


@dataclass(frozen=True)
class Param:
    """One query or path parameter of a route."""

    name: str
    kind: Kind = "string"
    description: str = ""
    location: Literal["query", "path", "header"] = "query"
    required: bool = False
    repeated: bool = False
    minimum: int | None = None
    maximum: int | None = None
    enum: tuple[str, ...] = ()
    max_length: int = MAX_VALUE

    def schema(self) -> dict[str, Any]:
        """The parameter's JSON Schema (OpenAPI 3.1)."""
        one: dict[str, Any]
        if self.kind == "integer":
            one = {"type": "integer"}
            if self.minimum is not None:
                one["minimum"] = self.minimum
            if self.maximum is not None:
                one["maximum"] = self.maximum
        elif self.kind == "boolean":
            one = {"type": "boolean"}
        elif self.kind == "enum":
            one = {"type": "string", "enum": list(self.enum)}
        elif self.kind == "date-time":
            one = {"type": "string", "format": "date-time"}
        elif self.kind == "uuid":
            one = {"type": "string", "format": "uuid"}
        else:  # an empty optional value is the same as none ("pageToken=" is the first page)
            one = {
                "type": "string",
                "minLength": 1 if self.required or self.repeated else 0,
                "maxLength": self.max_length,
            }
        return {"type": "array", "items": one, "maxItems": MAX_ITEMS} if self.repeated else one

    def parse_one(self, raw: str) -> Any:
        """One value, or the 400 that names this parameter."""
        if self.kind == "integer":
            if not re.fullmatch(r"-?[0-9]{1,12}", raw.strip()):
                raise bad_parameter(self.name, "must be an integer")
            value = int(raw)
            if (self.minimum is not None and value < self.minimum) or (
                self.maximum is not None and value > self.maximum
            ):
                raise bad_parameter(self.name, f"must be between {self.minimum} and {self.maximum}")
            return value
        if self.kind == "boolean":
            if raw not in ("true", "false"):
                raise bad_parameter(self.name, "must be true or false")
            return raw == "true"
        if self.kind == "enum":
            if raw not in self.enum:
                raise bad_parameter(self.name, "must be one of " + ", ".join(self.enum))
            return raw
        if self.kind == "date-time":
            return parse_time(raw, self.name)
        if self.kind == "uuid":
            try:
                return str(uuid.UUID(raw))
            except ValueError:
                raise bad_parameter(self.name, "must be a UUID") from None
        if not raw or len(raw) > self.max_length:
            raise bad_parameter(self.name, f"must be 1 to {self.max_length} characters")
        if "\x00" in raw:
            raise bad_parameter(self.name, "must not contain NUL characters")
        return raw


def parse_time(raw: str, name: str) -> dt.datetime:
    """An RFC 3339 date-time with its offset ("2026-05-01T00:00:00Z")."""
    text = raw.strip().upper()
    if len(text) > 64 or not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]+(Z|[+-][0-9]{2}:[0-9]{2})", text):
        raise bad_parameter(name, "must be an RFC 3339 date-time with an offset, such as 2026-05-01T00:00:00Z")
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise bad_parameter(name, "must be a valid RFC 3339 date-time") from None
    if value.utcoffset() is None:
        raise bad_parameter(name, "must have an offset (Z or +hh:mm)")
    try:
        return value.astimezone(dt.UTC)
    except OverflowError:
        raise bad_parameter(name, "is out of range") from None


def parse(
    params: Sequence[Param],
    query: Iterable[tuple[str, str]],
    path: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Each declared parameter's value (a list for a repeated one), None when absent. Parameters
    that are not declared are ignored (a cache-buster must not break a request)."""
    given: dict[str, list[str]] = {}
    for key, value in query:
        given.setdefault(key, []).append(value)
    out: dict[str, Any] = {}
    for param in params:
        if param.location == "query":
            values = given.get(param.name, [])
        else:
            found = (path if param.location == "path" else headers) or {}
            values = [found.get(param.name, "").strip()]
        if not values or (not param.repeated and values == [""]):
            if param.required:
                raise bad_parameter(param.name, "required")
            out[param.name] = [] if param.repeated else None
            continue
        if param.repeated:
            if len(values) > MAX_ITEMS:
                raise bad_parameter(param.name, f"given more than {MAX_ITEMS} times")
            out[param.name] = [param.parse_one(v) for v in values]
        elif len(values) > 1:
            raise bad_parameter(param.name, "given more than once")
        else:
            out[param.name] = param.parse_one(values[0])
    return out


def guess_identifier(q: str) -> tuple[str, str]:
    """What a person typed into a lookup box, as (type, value): an email when it has an "@", a phone
    when it starts with "+" or is digits, spaces, dashes and parentheses, else a user id."""
    text = q.strip()
    if not text:
        raise bad_parameter("q", "required: an email, a phone number or a user id")
    if "@" in text:
        return "email", text
    if text.startswith("+") or (_PHONE.fullmatch(text) and any(c.isdigit() for c in text)):
        return "phone", text
    return "user_id", text


def split_identifier(raw: str) -> tuple[str, str]:
    """``<type>:<value>`` ("phone:+14155550100"); the value may itself contain colons."""
    kind, sep, value = raw.partition(":")
    if not sep or not _TYPE.fullmatch(kind) or not value.strip():
        raise bad_parameter("identifier", "must be <type>:<value>, such as email:ada@example.com")
    return kind, value


def lookup(identifier: str | None, q: str | None) -> tuple[str, str]:
    """Exactly one of ``identifier`` and ``q``."""
    if identifier is not None and q is not None:
        raise bad_parameter("identifier", "give identifier or q, not both")
    if identifier is not None:
        return split_identifier(identifier)
    if q is not None:
        return guess_identifier(q)
    raise bad_parameter("identifier", "required (or q)")


def metric_filters(raw: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``dimension:value`` filters, values of one dimension together, in first-seen order."""
    grouped: dict[str, list[str]] = {}
    for item in raw:
        dim, sep, value = item.partition(":")
        if not sep or not dim or not value:
            raise bad_parameter("filter", "must be <dimension>:<value>, such as channel:voice")
        grouped.setdefault(dim, []).append(value)
    return list(grouped.items())


__all__ = ["HttpError", "Param", "guess_identifier", "lookup", "metric_filters", "parse", "parse_time"]
