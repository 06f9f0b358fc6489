"""The proto3 JSON mapping as the JSON API answers it, ``MessageToDict(message,
always_print_fields_with_no_presence=True)``, with every per-field decision (name, type, default)
taken once per message type instead of on every field of every response.

Why: json_format re-examines each field's descriptor for each value it prints; on the context
lookup (``GET /api/v1/context``) that was about a third of the gateway's CPU per request. The output
is the same dict, keys in the same order (``tests/unit/test_gateway_fastjson.py`` compares them on
randomly filled messages of every type the API returns); what this does not know (Any, extensions)
it leaves to json_format.
"""

from __future__ import annotations

import base64
import datetime as dt
import math
from collections.abc import Callable
from typing import Any, cast

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.internal import type_checkers
from google.protobuf.message import Message

Convert = Callable[[Any], Any]
_INT64 = frozenset({FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64})
_TIME_LIKE = frozenset({"google.protobuf.Timestamp", "google.protobuf.Duration", "google.protobuf.FieldMask"})


def _fallback(message: Message) -> dict[str, Any]:
    out: dict[str, Any] = json_format.MessageToDict(message, always_print_fields_with_no_presence=True)
    return out


def _float_special(value: float) -> str | None:
    if math.isinf(value):
        return "-Infinity" if value < 0.0 else "Infinity"
    if math.isnan(value):
        return "NaN"
    return None


def _double(value: float) -> Any:
    special = _float_special(value)
    return value if special is None else special


def _float(value: float) -> Any:
    special = _float_special(value)
    return type_checkers.ToShortestFloat(value) if special is None else special


def _bytes(value: bytes) -> str:
    return base64.b64encode(value).decode("utf-8")


def _same(value: Any) -> Any:
    return value


def _enum(field: FieldDescriptor) -> Convert:
    enum = field.enum_type
    assert enum is not None
    if enum.full_name == "google.protobuf.NullValue":
        return lambda _value: None
    names = {v.number: v.name for v in enum.values}
    closed = enum.is_closed

    def convert(value: int) -> Any:
        name = names.get(value)
        if name is not None:
            return name
        if closed:
            raise json_format.SerializeToJsonError(
                "Enum field contains an integer value which can not mapped to an enum value."
            )
        return value

    return convert


def _value(message: Any) -> Any:
    """google.protobuf.Value."""
    which = message.WhichOneof("kind")
    if which is None or which == "null_value":
        return None
    if which == "number_value":
        number = message.number_value
        if math.isinf(number) or math.isnan(number):
            raise ValueError(f"Fail to serialize {number} for Value.number_value, which would parse as string_value")
        return number
    if which == "string_value":
        return message.string_value
    if which == "bool_value":
        return message.bool_value
    if which == "struct_value":
        return _struct(message.struct_value)
    return [_value(v) for v in message.list_value.values]


def _struct(message: Any) -> dict[str, Any]:
    fields = message.fields
    return {key: _value(fields[key]) for key in fields}


class _Plan:
    """One message type's fields: by number, (JSON name, converter); and the fields without
    presence, each with a maker of its default, in declaration order."""

    __slots__ = ("by_field", "by_number", "defaults")

    def __init__(self) -> None:
        self.by_field: dict[FieldDescriptor, tuple[str, Convert]] = {}
        self.by_number: dict[int, tuple[str, Convert]] = {}
        # (name, the default, or a maker of a fresh empty list or dict)
        self.defaults: list[tuple[str, Any, Callable[[], Any] | None]] = []


_PLANS: dict[str, _Plan] = {}
_CONVERTERS: dict[str, Convert] = {}


def _message_converter(desc: Descriptor) -> Convert:
    found = _CONVERTERS.get(desc.full_name)
    if found is not None:
        return found
    convert: Convert
    if desc.file.name == "google/protobuf/wrappers.proto":
        inner = _scalar(desc.fields_by_name["value"])

        def convert(message: Any) -> Any:
            return inner(message.value)

    elif desc.full_name == "google.protobuf.Timestamp":
        convert = _timestamp
    elif desc.full_name in _TIME_LIKE:

        def convert(message: Any) -> Any:
            return message.ToJsonString()

    elif desc.full_name == "google.protobuf.Struct":
        convert = _struct
    elif desc.full_name == "google.protobuf.Value":
        convert = _value
    elif desc.full_name == "google.protobuf.ListValue":

        def convert(message: Any) -> Any:
            return [_value(v) for v in message.values]

    elif desc.full_name.startswith("google.protobuf."):  # Any and whatever else json_format knows better
        convert = _fallback
    else:
        planned: list[_Plan] = []  # planned on first use: building a plan never recurses

        def convert(message: Any) -> Any:
            if not planned:
                planned.append(_plan(desc))
            return _regular(message, planned[0])

    _CONVERTERS[desc.full_name] = convert
    return convert


def _scalar(field: FieldDescriptor) -> Convert:
    """One value of the field's type (for a repeated field: one element)."""
    cpp = field.cpp_type
    if cpp == FieldDescriptor.CPPTYPE_MESSAGE:
        assert field.message_type is not None
        return _message_converter(field.message_type)
    if cpp == FieldDescriptor.CPPTYPE_ENUM:
        return _enum(field)
    if cpp == FieldDescriptor.CPPTYPE_STRING:
        return _bytes if field.type == FieldDescriptor.TYPE_BYTES else _same
    if cpp in _INT64:
        return str
    if cpp == FieldDescriptor.CPPTYPE_DOUBLE:
        return _double
    if cpp == FieldDescriptor.CPPTYPE_FLOAT:
        return _float
    return _same  # int32, uint32, bool


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _field(field: FieldDescriptor) -> Convert:
    """The whole value of the field as ListFields gives it."""
    if field.message_type is not None and _is_map(field):
        value_of = _scalar(field.message_type.fields_by_name["value"])

        def convert_map(mapping: Any) -> dict[str, Any]:
            return {
                (("true" if key else "false") if isinstance(key, bool) else str(key)): value_of(mapping[key])
                for key in mapping
            }

        return convert_map
    one = _scalar(field)
    if field.is_repeated:
        return lambda values: [one(v) for v in values]
    return one


def _plan(desc: Descriptor) -> _Plan:
    plan = _PLANS.get(desc.full_name)
    if plan is not None:
        return plan
    plan = _Plan()
    _PLANS[desc.full_name] = plan  # before the fields: a type may contain itself
    for field in desc.fields:
        entry = (field.json_name, _field(field))
        plan.by_field[field] = entry
        plan.by_number[field.number] = entry
        if field.has_presence:
            continue
        if _is_map(field):
            plan.defaults.append((field.json_name, None, dict))
        elif field.is_repeated:
            plan.defaults.append((field.json_name, None, list))
        else:
            plan.defaults.append((field.json_name, _scalar(field)(field.default_value), None))
    return plan


def _regular(message: Any, plan: _Plan) -> dict[str, Any]:
    out: dict[str, Any] = {}
    by_field = plan.by_field
    for field, value in message.ListFields():
        entry = by_field.get(field)
        if entry is None:  # another copy of the descriptor, or an extension
            entry = plan.by_number.get(field.number)
            if entry is None or field.is_extension:
                return _fallback(message)
        out[entry[0]] = entry[1](value)
    for name, default, make in plan.defaults:
        if name not in out:
            out[name] = default if make is None else make()
    return out


_EPOCH = dt.datetime(1970, 1, 1)
_MIN_SECONDS, _MAX_SECONDS = -62135596800, 253402300799  # 0001-01-01 and 9999-12-31T23:59:59


def _timestamp(message: Any) -> str:
    """Timestamp.ToJsonString without its float arithmetic (same text)."""
    seconds, nanos = message.seconds, message.nanos
    if not (_MIN_SECONDS <= seconds <= _MAX_SECONDS and 0 <= nanos < 1_000_000_000):
        text: str = message.ToJsonString()  # raises what json_format raises
        return text
    text = (_EPOCH + dt.timedelta(seconds=seconds)).isoformat()
    if nanos == 0:
        return text + "Z"
    if nanos % 1_000_000 == 0:
        return f"{text}.{nanos // 1_000_000:03d}Z"
    if nanos % 1000 == 0:
        return f"{text}.{nanos // 1000:06d}Z"
    return f"{text}.{nanos:09d}Z"


def render(message: Message) -> dict[str, Any]:
    """``MessageToDict(message, always_print_fields_with_no_presence=True)``, faster."""
    out = _message_converter(cast(Descriptor, message.DESCRIPTOR))(message)
    if not isinstance(out, dict):  # a well-known type at the top (never a response of the API)
        return _fallback(message)
    return out
