"""Raw request bytes against every RPC of every service: malformed protobuf (truncated, flipped,
invalid UTF-8, Structs nested past the parser's limit, random bytes) is INVALID_ARGUMENT, never
INTERNAL or UNKNOWN, nothing is logged at ERROR, and the process keeps serving.

The number of examples is bounded for ``make test``; ``make fuzz`` runs many more
(``TESSERA_FUZZ_EXAMPLES``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import MethodDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.core.harness import SERVING, health_status
from services.core.server import RunningServer
from services.core.streams import field_bytes, tag, varint
from tessera.v1 import event_pb2, identity_pb2, ingest_pb2
from tests.conftest import TenantKey
from tests.support.events import track

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("TESSERA_FUZZ_EXAMPLES", "60"))
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


def methods(*files: Any) -> list[MethodDescriptor]:
    return [m for f in files for s in f.DESCRIPTOR.services_by_name.values() for m in s.methods]


INGEST = methods(ingest_pb2)
IDENTITY = methods(identity_pb2)


def nested_struct(depth: int) -> bytes:
    """A Struct value nested ``depth`` levels, built on the wire (the parser stops at its limit)."""
    value_struct = tag(descriptor_pool.Default().FindMessageTypeByName("google.protobuf.Value"), "struct_value")
    struct_fields = tag(descriptor_pool.Default().FindMessageTypeByName("google.protobuf.Struct"), "fields")
    inner = b""
    for _ in range(depth):
        entry = field_bytes(b"\x0a", b"k") + field_bytes(b"\x12", field_bytes(value_struct, inner))
        inner = field_bytes(struct_fields, entry)
    return inner


def valid_request(method: MethodDescriptor) -> bytes:
    """A plausible request of the method's type (ingest batches get a real event)."""
    cls = descriptor_pool.Default().FindMessageTypeByName(method.input_type.full_name)
    from google.protobuf import message_factory

    msg = message_factory.GetMessageClass(cls)()
    if hasattr(msg, "events"):
        msg.events.append(track())
    return bytes(msg.SerializeToString())


def hostile(method: MethodDescriptor) -> st.SearchStrategy[bytes]:
    """Bytes a hostile or broken client might send for this method."""
    base = valid_request(method)
    event_props = tag(event_pb2.Event.DESCRIPTOR, "properties")
    events_tag = tag(ingest_pb2.IngestEventsRequest.DESCRIPTOR, "events")
    message_id = tag(event_pb2.Event.DESCRIPTOR, "message_id")
    specials = [
        # Struct nesting past the parser's recursion limit.
        field_bytes(events_tag, field_bytes(message_id, b"deep") + field_bytes(event_props, nested_struct(120))),
        # Invalid UTF-8 in a string field of the first message.
        field_bytes(b"\x0a", b"\xff\xfe\xfd"),
        field_bytes(events_tag, field_bytes(message_id, b"\xc3\x28")),
        # A length that runs past the end; a truncated varint; a wrong wire type.
        b"\x0a\xff\xff\x7f",
        b"\x08\xff\xff\xff",
        b"\x0b",
        base[: max(1, len(base) // 2)],
    ]
    flipped = st.builds(
        lambda i, b: base[: i % max(1, len(base))] + bytes([b]) + base[i % max(1, len(base)) + 1 :],
        st.integers(0, 10_000),
        st.integers(0, 255),
    )
    return st.one_of(st.sampled_from(specials), flipped, st.binary(max_size=512))


def call(channel: grpc.Channel, method: MethodDescriptor, raw: bytes, metadata: Any) -> grpc.StatusCode:
    path = f"/{method.containing_service.full_name}/{method.name}"
    try:
        if method.client_streaming and method.server_streaming:
            for _ in channel.stream_stream(path)(iter([raw]), metadata=metadata, timeout=10):
                pass
        elif method.client_streaming:
            channel.stream_unary(path)(iter([raw]), metadata=metadata, timeout=10)
        elif method.server_streaming:
            for _ in channel.unary_stream(path)(raw, metadata=metadata, timeout=10):
                pass
        else:
            channel.unary_unary(path)(raw, metadata=metadata, timeout=10)
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


@pytest.fixture
def quiet_errors(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.WARNING)
    yield caplog


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("server_name", ["ingest", "identity"])
def test_raw_bytes_never_become_internal(
    server_name: str, request: pytest.FixtureRequest, tenant: TenantKey, quiet_errors: pytest.LogCaptureFixture
) -> None:
    server: RunningServer = request.getfixturevalue(f"{server_name}_server")
    rpcs = INGEST if server_name == "ingest" else IDENTITY
    target = f"127.0.0.1:{server.port}"
    with grpc.insecure_channel(target) as channel:

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
            derandomize=True,
        )
        @given(data=st.data())
        def check(data: st.DataObject) -> None:
            method = data.draw(st.sampled_from(rpcs), label="method")
            raw = data.draw(hostile(method), label="bytes")
            code = call(channel, method, raw, tenant.metadata)
            assert code not in FORBIDDEN, f"{method.full_name} answered {code} to {raw[:60]!r}"

        check()
    assert health_status(target) == SERVING, "the server must keep serving"
    assert _errors(quiet_errors) == []


def test_a_struct_nested_past_the_parser_limit_is_invalid_argument(
    ingest_server: RunningServer, tenant: TenantKey
) -> None:
    events_tag = tag(ingest_pb2.IngestEventsRequest.DESCRIPTOR, "events")
    props = tag(event_pb2.Event.DESCRIPTOR, "properties")
    raw = field_bytes(events_tag, field_bytes(props, nested_struct(120)))
    with grpc.insecure_channel(f"127.0.0.1:{ingest_server.port}") as channel, pytest.raises(grpc.RpcError) as err:
        channel.unary_unary("/tessera.v1.IngestService/IngestEvents")(raw, metadata=tenant.metadata, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid IngestEvents request" in (err.value.details() or "")


def test_invalid_utf8_on_a_stream_is_invalid_argument(ingest_server: RunningServer, tenant: TenantKey) -> None:
    events_tag = tag(ingest_pb2.StreamEventsRequest.DESCRIPTOR, "events")
    message_id = tag(event_pb2.Event.DESCRIPTOR, "message_id")
    bad = field_bytes(events_tag, field_bytes(message_id, b"\xff\xfe"))
    good = ingest_pb2.StreamEventsRequest(batch_id="b-1", events=[track()]).SerializeToString()
    with grpc.insecure_channel(f"127.0.0.1:{ingest_server.port}") as channel:
        stream = channel.stream_stream("/tessera.v1.IngestService/StreamEvents")
        answers = []
        with pytest.raises(grpc.RpcError) as err:
            for raw in stream(iter([good, bad]), metadata=tenant.metadata, timeout=10):
                answers.append(ingest_pb2.StreamEventsResponse.FromString(raw))
    assert [a.accepted_count for a in answers] == [1], "the good batch before it was answered"
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


__all__ = ["varint"]
