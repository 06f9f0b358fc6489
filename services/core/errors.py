"""Domain errors and their one mapping to gRPC status codes with ``google.rpc`` details.

Servicers raise these; :mod:`services.core.interceptors` turns them into a status.
Anything else becomes INTERNAL with a generic message, so internals never leak.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2

GENERIC_INTERNAL_MESSAGE = "internal error; the server logged it with trace id {trace_id}"


@dataclass(frozen=True)
class Violation:
    """One field-level problem: which field, and why, in words a caller can act on."""

    field: str
    description: str
    reason: str = ""

    def to_proto(self) -> error_details_pb2.BadRequest.FieldViolation:
        return error_details_pb2.BadRequest.FieldViolation(
            field=self.field, description=self.description, reason=self.reason
        )


class TesseraError(Exception):
    """Base of the errors a caller may see; the subclass fixes the status code."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def details(self) -> Sequence[Message]:
        return ()


class InvalidArgument(TesseraError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, message: str, violations: Iterable[Violation] = ()) -> None:
        super().__init__(message)
        self.violations = list(violations)

    def details(self) -> Sequence[Message]:
        if not self.violations:
            return ()
        return (error_details_pb2.BadRequest(field_violations=[v.to_proto() for v in self.violations]),)


class Unauthenticated(TesseraError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(TesseraError):
    code = grpc.StatusCode.PERMISSION_DENIED


class NotFound(TesseraError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(TesseraError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(TesseraError):
    code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, message: str, *, type_: str = "", subject: str = "", description: str = "") -> None:
        super().__init__(message)
        self.violation = (type_, subject, description or message)

    def details(self) -> Sequence[Message]:
        type_, subject, description = self.violation
        if not type_:
            return ()
        return (
            error_details_pb2.PreconditionFailure(
                violations=[
                    error_details_pb2.PreconditionFailure.Violation(
                        type=type_, subject=subject, description=description
                    )
                ]
            ),
        )


class ResourceExhausted(TesseraError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, *, retry_after: float, subject: str = "") -> None:
        super().__init__(message)
        self.retry_after = max(retry_after, 0.001)
        self.subject = subject

    def details(self) -> Sequence[Message]:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(self.retry_after * 1e9))
        out: list[Message] = [error_details_pb2.RetryInfo(retry_delay=delay)]
        if self.subject:
            out.append(
                error_details_pb2.QuotaFailure(
                    violations=[
                        error_details_pb2.QuotaFailure.Violation(subject=self.subject, description=self.message)
                    ]
                )
            )
        return out


class Unavailable(TesseraError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(TesseraError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


def status_proto(code: grpc.StatusCode, message: str, details: Sequence[Message] = ()) -> status_pb2.Status:
    """A ``google.rpc.Status`` with packed details, for trailers or for an in-band batch error."""
    packed = []
    for detail in details:
        any_msg = any_pb2.Any()
        any_msg.Pack(detail)
        packed.append(any_msg)
    return status_pb2.Status(code=code.value[0], message=message, details=packed)


def error_status(err: TesseraError) -> status_pb2.Status:
    return status_proto(err.code, err.message, err.details())


def internal_status(trace_id: str) -> status_pb2.Status:
    return status_proto(grpc.StatusCode.INTERNAL, GENERIC_INTERNAL_MESSAGE.format(trace_id=trace_id or "-"))


OK_CODE = code_pb2.OK
