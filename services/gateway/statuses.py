"""The one place where what a gRPC service answers becomes an HTTP status (and, for the JSON API,
the error body's status name and field violations).

SDKs retry on 429 and 5xx and drop on other 4xx, so a status here decides whether a client
retries: a fault of the request is 4xx, a fault of ours (or of a service behind us) is 5xx."""

from __future__ import annotations

import math
from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2, status_pb2


@dataclass(frozen=True)
class FieldViolation:
    """One entry of a ``google.rpc.BadRequest``: the service's words, or the gateway's for a parameter."""

    field: str
    description: str
    reason: str = ""


class HttpError(Exception):
    """A request that ends with this status; raised anywhere, answered by the one middleware."""

    def __init__(
        self,
        status: int,
        message: str,
        retry_after: int | None = None,
        *,
        grpc_status: str | None = None,
        violations: tuple[FieldViolation, ...] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after
        self.grpc_status = grpc_status or STATUS_NAMES.get(status, "UNKNOWN")
        self.violations = violations


def bad_parameter(name: str, description: str) -> HttpError:
    """A query or path parameter the gateway itself refuses, named as the field."""
    return HttpError(400, f"invalid parameter {name}", violations=(FieldViolation(name, description),))


#: gRPC codes the services answer with, as HTTP statuses.
_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 503,
    grpc.StatusCode.CANCELLED: 503,
}
#: The status name of an error the gateway itself answers (google.rpc's HTTP mapping).
STATUS_NAMES: dict[int, str] = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
    405: "UNIMPLEMENTED", 406: "INVALID_ARGUMENT", 413: "INVALID_ARGUMENT", 415: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE",
}  # fmt: skip


def _details(trailing: grpc.aio.Metadata | None) -> list[status_pb2.Status]:
    out: list[status_pb2.Status] = []
    for key, value in trailing or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            try:
                out.append(status_pb2.Status.FromString(value))
            except Exception:  # noqa: S112 - a malformed trailer is only a missing detail
                continue
    return out


def retry_after(trailing: grpc.aio.Metadata | None) -> int | None:
    """Whole seconds from the ``google.rpc.RetryInfo`` detail in a status's trailers."""
    for status in _details(trailing):
        for detail in status.details:
            info = error_details_pb2.RetryInfo()
            if detail.Unpack(info):
                seconds: float = info.retry_delay.ToTimedelta().total_seconds()
                return max(1, math.ceil(seconds))
    return None


def field_violations(trailing: grpc.aio.Metadata | None) -> tuple[FieldViolation, ...]:
    """The ``google.rpc.BadRequest`` field violations in a status's trailers, as the service wrote them."""
    out: list[FieldViolation] = []
    for status in _details(trailing):
        for detail in status.details:
            bad = error_details_pb2.BadRequest()
            if detail.Unpack(bad):
                out.extend(FieldViolation(v.field, v.description, v.reason) for v in bad.field_violations)
    return tuple(out)


def from_rpc_error(err: grpc.aio.AioRpcError, service: str = "ingest", key: str = "write key") -> HttpError:
    """``service`` and ``key`` only word the generic messages (the Segment API says "write key")."""
    status = _STATUS.get(err.code(), 500)
    name = err.code().name if status < 500 else STATUS_NAMES[503 if status == 503 else 500]
    if status == 429:
        return HttpError(
            429, err.details() or "rate limit exceeded", retry_after(err.trailing_metadata()) or 1, grpc_status=name
        )
    if status == 401:
        return HttpError(401, f"missing or unknown {key}", grpc_status=name)
    if status == 503:
        return HttpError(503, f"{service} is unavailable; retry later", 5, grpc_status=name)
    if status >= 500:
        return HttpError(status, "internal error", grpc_status=name)
    return HttpError(
        status, err.details() or "refused", grpc_status=name, violations=field_violations(err.trailing_metadata())
    )
