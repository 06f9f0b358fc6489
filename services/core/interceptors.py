"""The one server interceptor: credentials to tenant, domain errors to status codes.

Like kserve's exception interceptor, but every status also carries ``google.rpc`` details
(BadRequest, RetryInfo, PreconditionFailure) through ``grpc-status-details-bin``, and
unknown errors become INTERNAL with a generic message and a trace id in the log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
from grpc_status import rpc_status

from services.core.errors import Code, DeadlineExceeded, TesseraError
from services.core.status import error_status, internal_status
from services.core.telemetry import current_trace_id
from services.core.tenancy import Authenticator, reset_current_tenant, set_current_tenant

log = logging.getLogger(__name__)

PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

Behavior = Callable[..., Any]
_GRPC_CODES = {c.value[0]: c for c in grpc.StatusCode}


def grpc_code(code: Code) -> grpc.StatusCode:
    """The gRPC status code of a domain code (they share their numbers)."""
    return _GRPC_CODES[int(code)]


NO_DEADLINE_SECONDS = 86_400.0


def time_remaining(context: grpc.ServicerContext) -> float | None:
    """Seconds left before the caller's deadline, or None when it set none (grpc reports ~forever)."""
    remaining = context.time_remaining()
    if remaining is None or remaining > NO_DEADLINE_SECONDS:
        return None
    return float(remaining)


def _abort(context: grpc.ServicerContext, exc: BaseException, method: str) -> None:
    if not context.is_active():
        # The client cancelled or went away (grpcurl cancels every reflection stream it is done
        # with): reading its requests fails, and there is nobody to answer. Not a server error.
        log.debug("call ended by the client", extra={"method": method})
        return
    code = context.code() if hasattr(context, "code") else None
    if not isinstance(exc, TesseraError) and code not in (None, grpc.StatusCode.OK):
        # The handler called context.abort() itself: its status stands.
        raise exc
    if isinstance(exc, TesseraError):
        status = error_status(exc)
    else:
        trace_id = current_trace_id()
        log.error("unhandled error in %s", method, exc_info=exc, extra={"method": method})
        status = internal_status(trace_id)
    context.abort_with_status(rpc_status.to_status(status))


class GuardInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Authenticates every non-public RPC and maps every exception it raises."""

    def __init__(self, authenticator: Authenticator | None) -> None:
        self.authenticator = authenticator

    def intercept_service(self, continuation: Callable[[Any], Any], handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        public = self.authenticator is None or method.startswith(PUBLIC_PREFIXES)

        @contextmanager
        def guarded(context: grpc.ServicerContext) -> Iterator[None]:
            """Tenant from credentials and a live deadline in; any exception out as a status."""
            token = None
            try:
                if not public:
                    assert self.authenticator is not None
                    metadata = dict(context.invocation_metadata())
                    token = set_current_tenant(self.authenticator.authenticate(metadata.get("authorization")))
                remaining = time_remaining(context)
                if remaining is not None and remaining <= 0:
                    raise DeadlineExceeded("deadline expired before the request was served")
                yield
            except Exception as exc:
                _abort(context, exc, method)
            finally:
                if token is not None:
                    reset_current_tenant(token)

        def wrap_unary(behavior: Behavior) -> Behavior:
            def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
                with guarded(context):
                    return behavior(request, context)

            return wrapped

        def wrap_stream(behavior: Behavior) -> Behavior:
            def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                with guarded(context):
                    yield from behavior(request, context)

            return wrapped

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                wrap_unary(handler.unary_unary), handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                wrap_unary(handler.stream_unary), handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                wrap_stream(handler.unary_stream), handler.request_deserializer, handler.response_serializer
            )
        return grpc.stream_stream_rpc_method_handler(
            wrap_stream(handler.stream_stream), handler.request_deserializer, handler.response_serializer
        )
