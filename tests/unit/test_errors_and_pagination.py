"""Domain errors to google.rpc statuses with rich details, and AIP-158 page sizes and tokens."""

from __future__ import annotations

import base64
import json
from typing import TypeVar

import grpc
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from services.core import pagination
from services.core.errors import (
    Code,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Violation,
)
from services.core.interceptors import grpc_code
from services.core.status import error_status, internal_status, status_proto

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


M = TypeVar("M", bound=Message)


def unpack(status: status_pb2.Status, kind: type[M]) -> list[M]:
    out: list[M] = []
    for detail in status.details:
        msg = kind()
        if detail.Unpack(msg):
            out.append(msg)
    return out


# --- errors -----------------------------------------------------------------------------------------


def test_invalid_argument_carries_bad_request_field_violations() -> None:
    err = InvalidArgument(
        "2 events are invalid",
        [
            Violation("events[0].channel", "required", "REQUIRED"),
            Violation("events[3].survey_response.score", "NPS score must be 0-10, got 11", "OUT_OF_RANGE"),
        ],
    )
    status = error_status(err)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] == 3
    assert status.message == "2 events are invalid"
    (br,) = unpack(status, error_details_pb2.BadRequest)
    assert [(v.field, v.description, v.reason) for v in br.field_violations] == [
        ("events[0].channel", "required", "REQUIRED"),
        ("events[3].survey_response.score", "NPS score must be 0-10, got 11", "OUT_OF_RANGE"),
    ]


def test_invalid_argument_without_violations_has_no_details() -> None:
    status = error_status(InvalidArgument("nope"))
    assert status.code == 3
    assert list(status.details) == []


def test_resource_exhausted_carries_retry_info_and_quota_failure() -> None:
    err = ResourceExhausted("over the ingest rate", retry_after=1.25, subject="tenant:acme")
    status = error_status(err)
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] == 8
    (info,) = unpack(status, error_details_pb2.RetryInfo)
    assert (info.retry_delay.seconds, info.retry_delay.nanos) == (1, 250_000_000)
    (quota,) = unpack(status, error_details_pb2.QuotaFailure)
    assert [(v.subject, v.description) for v in quota.violations] == [("tenant:acme", "over the ingest rate")]


def test_resource_exhausted_sub_millisecond_delay_is_never_zero() -> None:
    status = error_status(ResourceExhausted("slow down", retry_after=0.0))
    (info,) = unpack(status, error_details_pb2.RetryInfo)
    assert info.retry_delay.ToNanoseconds() > 0
    # Without a subject there is no QuotaFailure.
    assert unpack(status, error_details_pb2.QuotaFailure) == []


def test_failed_precondition_carries_precondition_failure() -> None:
    err = FailedPrecondition(
        "profile was merged", type_="MERGED", subject="profiles/p-1", description="merged into profiles/p-2"
    )
    status = error_status(err)
    assert status.code == grpc.StatusCode.FAILED_PRECONDITION.value[0] == 9
    assert status.message == "profile was merged"
    (pf,) = unpack(status, error_details_pb2.PreconditionFailure)
    assert [(v.type, v.subject, v.description) for v in pf.violations] == [
        ("MERGED", "profiles/p-1", "merged into profiles/p-2")
    ]


def test_failed_precondition_description_defaults_to_message() -> None:
    (pf,) = unpack(error_status(FailedPrecondition("stale etag", type_="ETAG")), error_details_pb2.PreconditionFailure)
    assert pf.violations[0].description == "stale etag"


def test_other_errors_map_to_their_code() -> None:
    status = error_status(NotFound("profile p-9 not found"))
    assert (status.code, status.message) == (5, "profile p-9 not found")


def test_internal_status_is_generic_with_the_trace_id_only() -> None:
    status = internal_status(TRACE_ID)
    assert status.code == grpc.StatusCode.INTERNAL.value[0] == 13
    assert status.message == f"internal error; the server logged it with trace id {TRACE_ID}"
    assert list(status.details) == []


def test_internal_status_without_trace() -> None:
    status = internal_status("")
    assert status.message == "internal error; the server logged it with trace id -"


def test_status_proto_packs_details_in_order() -> None:
    details = [error_details_pb2.RetryInfo(), error_details_pb2.BadRequest()]
    status = status_proto(Code.ABORTED, "x", details)
    assert [d.type_url.rsplit("/", 1)[-1] for d in status.details] == ["google.rpc.RetryInfo", "google.rpc.BadRequest"]


# --- pagination -------------------------------------------------------------------------------------


def test_page_size_default_and_cap() -> None:
    assert pagination.page_size(0) == pagination.DEFAULT_PAGE_SIZE == 50
    assert pagination.page_size(7) == 7
    assert pagination.page_size(1000) == 1000
    assert pagination.page_size(10_000) == pagination.MAX_PAGE_SIZE == 1000
    assert pagination.page_size(0, default=20, maximum=100) == 20
    assert pagination.page_size(500, default=20, maximum=100) == 100


def test_negative_page_size_is_invalid_argument_naming_page_size() -> None:
    with pytest.raises(InvalidArgument) as info:
        pagination.page_size(-1)
    assert [v.field for v in info.value.violations] == ["page_size"]


def test_token_round_trips() -> None:
    query = {"profile": "p-1", "kinds": ["track", "identify"]}
    position = {"ts": "2025-01-01T00:00:00Z", "seq": 42}
    token = pagination.encode_token(position, query)
    assert isinstance(token, str) and token
    assert "=" not in token  # URL-safe, unpadded
    assert pagination.decode_token(token, dict(reversed(query.items()))) == position


def test_empty_token_is_the_first_page() -> None:
    assert pagination.decode_token("", {"q": 1}) is None


def test_token_from_another_query_is_refused() -> None:
    token = pagination.encode_token(10, {"profile": "p-1"})
    with pytest.raises(InvalidArgument) as info:
        pagination.decode_token(token, {"profile": "p-2"})
    assert [v.field for v in info.value.violations] == ["page_token"]


def test_token_from_another_tenant_is_refused() -> None:
    from services.core.tenancy import Tenant, reset_current_tenant, set_current_tenant

    def as_tenant(tenant_id: str, fn):  # type: ignore[no-untyped-def]
        token = set_current_tenant(Tenant(tenant_id))
        try:
            return fn()
        finally:
            reset_current_tenant(token)

    issued = as_tenant("acme", lambda: pagination.encode_token(10, {"profile": ""}))
    assert as_tenant("acme", lambda: pagination.decode_token(issued, {"profile": ""})) == 10
    with pytest.raises(InvalidArgument):
        as_tenant("globex", lambda: pagination.decode_token(issued, {"profile": ""}))


def test_position_the_handler_rejects_is_an_invalid_token() -> None:
    token = pagination.encode_token("x", {"q": 1})
    assert pagination.decode_token(token, {"q": 1}) == "x"
    with pytest.raises(InvalidArgument) as info:
        pagination.decode_token(token, {"q": 1}, valid=lambda p: isinstance(p, int))
    assert [v.field for v in info.value.violations] == ["page_token"]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "token",
    [
        "garbage!!",
        "x",
        _b64(b"not json"),
        _b64(b"[1, 2]"),
        _b64(b'"p"'),
        _b64(b"null"),
        _b64(json.dumps({"p": 1}).encode()),
        _b64(b"\xff\xfe\x00"),
    ],
)
def test_garbage_token_is_refused_naming_page_token(token: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        pagination.decode_token(token, {"profile": "p-1"})
    assert [v.field for v in info.value.violations] == ["page_token"]


def test_every_domain_code_is_the_grpc_code_of_the_same_number() -> None:
    """The errors module has no gRPC import; its codes must still mean what gRPC means by them."""
    assert {c.name for c in Code} == {c.name for c in grpc.StatusCode}
    for code in Code:
        assert grpc_code(code).name == code.name
        assert grpc_code(code).value[0] == int(code)
