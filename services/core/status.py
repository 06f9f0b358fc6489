"""The one mapping from domain errors (:mod:`services.core.errors`) to ``google.rpc.Status``.

Protobuf only, no gRPC: pure code (ingest's per-event results) may build field violations with it.

The interceptor sends it as the call's status (with the details in ``grpc-status-details-bin``);
a streaming servicer sends it in-band for one batch. Details: ``BadRequest`` for field
violations, ``RetryInfo`` (and ``QuotaFailure``) for quotas, ``PreconditionFailure`` for state.
"""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from services.core.errors import (
    Code,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    TesseraError,
    Violation,
)

GENERIC_INTERNAL_MESSAGE = "internal error; the server logged it with trace id {trace_id}"
# Details travel in a trailer, and gRPC refuses trailers past 16 KiB (the caller then sees
# RESOURCE_EXHAUSTED instead of the real error): at most this many violations are sent, the last
# saying how many more there were.
MAX_VIOLATIONS = 50
MAX_DESCRIPTION = 300


def field_violation(v: Violation) -> error_details_pb2.BadRequest.FieldViolation:
    return error_details_pb2.BadRequest.FieldViolation(
        field=v.field[:MAX_DESCRIPTION], description=v.description[:MAX_DESCRIPTION], reason=v.reason
    )


def capped(violations: list[Violation]) -> list[Violation]:
    """The first :data:`MAX_VIOLATIONS`, then one that counts the rest."""
    if len(violations) <= MAX_VIOLATIONS:
        return violations
    more = len(violations) - MAX_VIOLATIONS + 1
    kept = violations[: MAX_VIOLATIONS - 1]
    return [*kept, Violation("", f"and {more} more violations not listed", "TRUNCATED")]


def details(err: TesseraError) -> list[Message]:
    """The ``google.rpc`` detail messages an error carries."""
    if isinstance(err, InvalidArgument):
        if not err.violations:
            return []
        return [error_details_pb2.BadRequest(field_violations=[field_violation(v) for v in capped(err.violations)])]
    if isinstance(err, FailedPrecondition):
        if not err.type_:
            return []
        violation = error_details_pb2.PreconditionFailure.Violation(
            type=err.type_, subject=err.subject, description=err.description
        )
        return [error_details_pb2.PreconditionFailure(violations=[violation])]
    if isinstance(err, ResourceExhausted):
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(err.retry_after * 1e9))
        out: list[Message] = [error_details_pb2.RetryInfo(retry_delay=delay)]
        if err.subject:
            quota = error_details_pb2.QuotaFailure.Violation(subject=err.subject, description=err.message)
            out.append(error_details_pb2.QuotaFailure(violations=[quota]))
        return out
    return []


def status_proto(code: Code, message: str, detail_messages: Sequence[Message] = ()) -> status_pb2.Status:
    """A ``google.rpc.Status`` with packed details, for trailers or for an in-band batch error."""
    packed = []
    for detail in detail_messages:
        any_msg = any_pb2.Any()
        any_msg.Pack(detail)
        packed.append(any_msg)
    return status_pb2.Status(code=int(code), message=message, details=packed)


def error_status(err: TesseraError) -> status_pb2.Status:
    return status_proto(err.code, err.message[:1000], details(err))


def internal_status(trace_id: str) -> status_pb2.Status:
    return status_proto(Code.INTERNAL, GENERIC_INTERNAL_MESSAGE.format(trace_id=trace_id or "-"))
