"""The one place where what ingest answers becomes an HTTP status a Segment SDK understands.

SDKs retry on 429 and 5xx and drop on other 4xx, so a status here decides whether a client
retries: a fault of the request is 4xx, a fault of ours (or of a service behind us) is 5xx."""

from __future__ import annotations

import math

import grpc
from google.rpc import error_details_pb2, status_pb2


class HttpError(Exception):
    """A request that ends with this status; raised anywhere, answered by the one middleware."""

    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


#: gRPC codes ingest answers with, as HTTP statuses.
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
#: What the client is told: ingest's own words for its 4xx, a generic sentence for faults of ours.
_GENERIC = {401: "missing or unknown write key", 503: "ingest is unavailable; retry later", 500: "internal error"}


def retry_after(trailing: grpc.aio.Metadata | None) -> int | None:
    """Whole seconds from the ``google.rpc.RetryInfo`` detail in a status's trailers."""
    for key, value in trailing or ():
        if key != "grpc-status-details-bin" or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            info = error_details_pb2.RetryInfo()
            if detail.Unpack(info):
                seconds: float = info.retry_delay.ToTimedelta().total_seconds()
                return max(1, math.ceil(seconds))
    return None


def from_rpc_error(err: grpc.aio.AioRpcError) -> HttpError:
    status = _STATUS.get(err.code(), 500)
    if status == 429:
        return HttpError(429, err.details() or "rate limit exceeded", retry_after(err.trailing_metadata()) or 1)
    if status >= 500 or status == 401:
        return HttpError(status, _GENERIC[status], 5 if status == 503 else None)
    return HttpError(status, err.details() or "refused")
