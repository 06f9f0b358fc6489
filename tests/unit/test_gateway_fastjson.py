"""fastjson.render is MessageToDict(always_print_fields_with_no_presence=True), key order included,
on randomly filled messages of every type in the tessera.v1 protos (and so every API response)."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from google.protobuf import json_format, timestamp_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from services.gateway.fastjson import render
from tessera.v1 import event_pb2, ingest_pb2, metrics_pb2, profile_pb2, quality_pb2

MODULES = (event_pb2, ingest_pb2, metrics_pb2, profile_pb2, quality_pb2)
F = FieldDescriptor


def _messages() -> list[Descriptor]:
    out: list[Descriptor] = []

    def walk(desc: Descriptor) -> None:
        if desc.GetOptions().map_entry:
            return
        out.append(desc)
        for nested in desc.nested_types:
            walk(nested)

    for module in MODULES:
        for desc in module.DESCRIPTOR.message_types_by_name.values():
            walk(desc)
    return out


def _scalar(field: FieldDescriptor, rng: random.Random) -> Any:
    t = field.type
    if t == F.TYPE_ENUM:
        assert field.enum_type is not None
        values = [v.number for v in field.enum_type.values]
        return rng.choice(values)
    if t in (F.TYPE_STRING,):
        return rng.choice(["", "a", "ünï", "x" * 5, "2026-01-01"])
    if t == F.TYPE_BYTES:
        return rng.choice([b"", b"\x00\xff", b"abc"])
    if t == F.TYPE_BOOL:
        return rng.random() < 0.5
    if t in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        return rng.choice([0.0, 1.5, -2.25, 0.1, 1e300 if t == F.TYPE_DOUBLE else 3.4e38, float("nan"), float("inf")])
    if t in (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64):
        return rng.choice([0, -1, 2**62, 12345])
    if t in (F.TYPE_UINT64, F.TYPE_FIXED64):
        return rng.choice([0, 2**63, 7])
    if t in (F.TYPE_UINT32, F.TYPE_FIXED32):
        return rng.choice([0, 2**31, 7])
    return rng.choice([0, -5, 2**30])


def _fill(msg: Any, rng: random.Random, depth: int) -> None:
    name = msg.DESCRIPTOR.full_name
    if name == "google.protobuf.Timestamp":
        msg.seconds = rng.choice([0, -1, 1_790_000_000, -62135596800, 253402300799, rng.randint(0, 2_000_000_000)])
        msg.nanos = rng.choice([0, 1, 5000, 123_000_000, 999_999_999, -1])
        return
    if name == "google.protobuf.Duration":
        msg.FromMilliseconds(rng.randint(0, 10**7))
        return
    if name == "google.protobuf.Struct":
        msg.update({"a": 1.0, "b": [True, "x", None, {"c": 2.5}], "d": {"e": "f"}} if rng.random() < 0.7 else {})
        return
    if name == "google.protobuf.Value":
        choice = rng.randrange(4)
        if choice == 0:
            msg.string_value = "s"
        elif choice == 1:
            msg.number_value = 3.0
        elif choice == 2:
            msg.struct_value.update({"k": "v"})
        return
    if name == "google.protobuf.ListValue":
        msg.extend([1.0, "two", None])
        return
    if name == "google.protobuf.Any":
        stamp = timestamp_pb2.Timestamp(seconds=rng.randint(0, 10**9))
        msg.Pack(stamp if rng.random() < 0.5 else event_pb2.Identifier(type="email", value="a@example.com"))
        return
    if name == "google.protobuf.FieldMask":
        msg.paths.append("a.b")
        return
    if msg.DESCRIPTOR.file.name == "google/protobuf/wrappers.proto":
        msg.value = _scalar(msg.DESCRIPTOR.fields_by_name["value"], rng)
        return
    for field in msg.DESCRIPTOR.fields:
        if rng.random() < 0.3 or (field.containing_oneof is not None and rng.random() < 0.5):
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_f, val_f = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            for _ in range(rng.randint(0, 2)):
                key = _scalar(key_f, rng) if key_f.type != F.TYPE_STRING else rng.choice(["k1", "k2"])
                if val_f.message_type is not None:
                    if depth < 3:
                        _fill(getattr(msg, field.name)[key], rng, depth + 1)
                else:
                    getattr(msg, field.name)[key] = _scalar(val_f, rng)
        elif field.is_repeated:
            for _ in range(rng.randint(0, 2)):
                if field.message_type is not None:
                    if depth < 3:
                        _fill(getattr(msg, field.name).add(), rng, depth + 1)
                else:
                    getattr(msg, field.name).append(_scalar(field, rng))
        elif field.message_type is not None:
            if depth < 3:
                sub = getattr(msg, field.name)
                sub.SetInParent()
                _fill(sub, rng, depth + 1)
        else:
            setattr(msg, field.name, _scalar(field, rng))


def _expected(message: Message) -> Any:
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)


@pytest.mark.parametrize("desc", _messages(), ids=lambda d: d.full_name)
def test_render_is_message_to_dict(desc: Descriptor) -> None:
    cls = GetMessageClass(desc)
    assert render(cls()) == _expected(cls())
    rng = random.Random(desc.full_name)
    for _ in range(25):
        msg = cls()
        _fill(msg, rng, 0)
        try:
            want = _expected(msg)
        except (json_format.SerializeToJsonError, ValueError):
            with pytest.raises((json_format.SerializeToJsonError, ValueError)):
                render(msg)
            continue
        got = render(msg)
        assert json.dumps(got) == json.dumps(want)  # the same values, keys in the same order
