"""Domain errors: plain exceptions that any layer may raise and no layer needs a transport for.

Each names its outcome with a :class:`Code` (the ``google.rpc.Code`` numbers, so the mapping is
one-to-one) and carries its details as plain data: field violations, a retry delay, a failed
precondition. Only :mod:`services.core.status`, beside the interceptor, turns them into gRPC
statuses with ``google.rpc`` details; anything else a handler raises becomes INTERNAL with a
generic message, so internals never leak.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass


class Code(enum.IntEnum):
    """Canonical status codes, numbered as ``google.rpc.Code``."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


@dataclass(frozen=True)
class Violation:
    """One field-level problem: which field, and why, in words a caller can act on."""

    field: str
    description: str
    reason: str = ""


class TesseraError(Exception):
    """Base of the errors a caller may see; the subclass fixes the code."""

    code: Code = Code.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(TesseraError):
    code = Code.INVALID_ARGUMENT

    def __init__(self, message: str, violations: Iterable[Violation] = ()) -> None:
        super().__init__(message)
        self.violations = list(violations)


class Unauthenticated(TesseraError):
    code = Code.UNAUTHENTICATED


class PermissionDenied(TesseraError):
    code = Code.PERMISSION_DENIED


class NotFound(TesseraError):
    code = Code.NOT_FOUND


class AlreadyExists(TesseraError):
    code = Code.ALREADY_EXISTS


class FailedPrecondition(TesseraError):
    """A state that must change first; ``type_`` and ``subject`` name the precondition for callers."""

    code = Code.FAILED_PRECONDITION

    def __init__(self, message: str, *, type_: str = "", subject: str = "", description: str = "") -> None:
        super().__init__(message)
        self.type_ = type_
        self.subject = subject
        self.description = description or message


class ResourceExhausted(TesseraError):
    """Over a quota: the caller may retry after ``retry_after`` seconds."""

    code = Code.RESOURCE_EXHAUSTED

    def __init__(self, message: str, *, retry_after: float, subject: str = "") -> None:
        super().__init__(message)
        self.retry_after = max(retry_after, 0.001)
        self.subject = subject


class Unavailable(TesseraError):
    code = Code.UNAVAILABLE


class DeadlineExceeded(TesseraError):
    code = Code.DEADLINE_EXCEEDED
