"""The one server interceptor: credentials to tenant, a span per RPC, malformed requests and domain
errors to status codes.

It runs on the asyncio server (:mod:`services.core.server`). Handlers may be plain functions (run
in the server's thread pool) or coroutines and async generators (run on the event loop, so an
idle stream costs no thread); the guard keeps each one's kind. Like kserve's exception
interceptor, but every status also carries ``google.rpc`` details (BadRequest, RetryInfo,
PreconditionFailure) through ``grpc-status-details-bin``; unknown errors become INTERNAL with a
generic message and a trace id in the log; a client that goes away is not an error.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import grpc
import redis
import sqlalchemy as sa
from grpc.aio import AbortError
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.core.errors import (
    Code,
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    TesseraError,
    Unavailable,
    Violation,
)
from services.core.status import error_status, internal_status
from services.core.telemetry import current_trace_id, meter, tracer
from services.core.tenancy import Authenticator, Tenant, reset_current_tenant, set_current_tenant

log = logging.getLogger(__name__)

PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# Health checks answer whatever else is happening: they never wait for a stream slot.
UNCAPPED_PREFIXES = ("/grpc.health.v1.Health/Check",)
NO_DEADLINE_SECONDS = 86_400.0
STATUS_DETAILS_KEY = "grpc-status-details-bin"

Behavior = Callable[..., Any]
_GRPC_CODES = {c.value[0]: c for c in grpc.StatusCode}
_rpc_duration = meter.create_histogram("tessera.rpc.duration", unit="s", description="RPC latency by method and code")


def grpc_code(code: Code) -> grpc.StatusCode:
    """The gRPC status code of a domain code (they share their numbers)."""
    return _GRPC_CODES[int(code)]


def time_remaining(context: Any) -> float | None:
    """Seconds left before the caller's deadline, or None when it set none (grpc reports ~forever)."""
    remaining = context.time_remaining()
    if remaining is None or remaining > NO_DEADLINE_SECONDS:
        return None
    return float(remaining)


class Malformed:
    """What a request that does not parse deserializes to, so the guard can refuse it by name."""

    def __init__(self, type_name: str, error: Exception) -> None:
        self.type_name = type_name
        self.error = error

    def refusal(self) -> InvalidArgument:
        reason = str(self.error).splitlines()[0][:200] if str(self.error) else type(self.error).__name__
        return InvalidArgument(
            f"request is not a valid {self.type_name}",
            [Violation("request", f"not a valid {self.type_name} message: {reason}", "MALFORMED")],
        )


def _safe(deserializer: Callable[[bytes], Any] | None, type_name: str) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as exc:  # DecodeError, RecursionError, invalid UTF-8...
            return Malformed(type_name, exc)

    return deserialize


def first_nul(message: Any, path: str = "") -> str | None:
    """The path of the first string (or map key) holding a NUL character, anywhere in ``message``.

    PostgreSQL text and jsonb cannot store U+0000, so a request carrying one would fail deep in
    storage as INTERNAL; refusing it up front names the field instead.
    """
    for field, value in message.ListFields():
        name = f"{path}.{field.name}" if path else field.name
        if field.type == field.TYPE_STRING:
            values = value if field.is_repeated else (value,)
            for i, v in enumerate(values):
                if "\x00" in v:
                    return f"{name}[{i}]" if field.is_repeated else name
        elif field.type == field.TYPE_MESSAGE:
            if field.message_type.GetOptions().map_entry:
                val_f = field.message_type.fields_by_name["value"]
                for k, v in value.items():
                    if isinstance(k, str) and "\x00" in k:
                        return name
                    if val_f.type == val_f.TYPE_STRING and "\x00" in v:
                        return f"{name}[{k!r}]"
                    if val_f.type == val_f.TYPE_MESSAGE:
                        found = first_nul(v, f"{name}[{k!r}]")
                        if found:
                            return found
            elif field.is_repeated:
                for i, item in enumerate(value):
                    found = first_nul(item, f"{name}[{i}]")
                    if found:
                        return found
            else:
                found = first_nul(value, name)
                if found:
                    return found
    return None


def _nul_refusal(path: str) -> InvalidArgument:
    return InvalidArgument(
        f"{path} contains the NUL character (U+0000)",
        [Violation(path, "must not contain the NUL character (U+0000)", "INVALID_CHARACTER")],
    )


def _request_type(method: str) -> str:
    return method.rsplit("/", 1)[-1] + " request"


class StreamSlots:
    """How many streaming calls each tenant holds open, and all unauthenticated ones together, so
    neither one tenant nor anonymous clients can take every stream a process can serve."""

    def __init__(self, per_tenant: int, public: int) -> None:
        self.per_tenant = per_tenant
        self.public = public
        self._open: dict[str, int] = {}

    def take(self, tenant: Tenant | None) -> str:
        """Take a slot (the event loop is the only caller, so no lock); raise when none is left."""
        key = tenant.tenant_id if tenant is not None else ""
        limit = self.per_tenant if tenant is not None else self.public
        held = self._open.get(key, 0)
        if held >= limit:
            who = f"tenant {key}" if key else "unauthenticated callers"
            raise ResourceExhausted(
                f"{who} already hold {held} open streams (the limit); close one or retry later",
                retry_after=1.0,
                subject=f"tenant:{key}" if key else "streams:public",
            )
        self._open[key] = held + 1
        return key

    def give_back(self, key: str) -> None:
        left = self._open.get(key, 1) - 1
        if left > 0:
            self._open[key] = left
        else:
            self._open.pop(key, None)

    def held(self, tenant_id: str = "") -> int:
        return self._open.get(tenant_id, 0)


_fields: frozenset[str] | None = None


def _trace_fields() -> frozenset[str]:
    """The metadata keys the configured propagators read (traceparent, baggage, b3...)."""
    global _fields
    if _fields is None:
        _fields = frozenset(propagate.get_global_textmap().fields)
    return _fields


class _Call:
    """One RPC's bookkeeping: its span, its tenant, and how it ended."""

    def __init__(self, method: str, metadata: tuple[tuple[str, Any], ...], tracer_: trace.Tracer) -> None:
        self.method = method
        self.tracer = tracer_
        self.metadata = metadata
        self.started = time.perf_counter()
        self.code = grpc.StatusCode.OK

    def authorization(self) -> str | None:
        for key, value in self.metadata:
            if key == "authorization":
                return str(value)
        return None

    @contextmanager
    def span(self, current: bool = True) -> Iterator[trace.Span]:
        """The RPC's server span; ``current=False`` leaves it unattached (an async stream attaches
        it per step, since its generator may be closed from another task's context)."""
        # Most calls carry no trace context: skip the propagators' work for them.
        carrier = {k: v for k, v in self.metadata if isinstance(v, str)}
        parent = propagate.extract(carrier) if not _trace_fields().isdisjoint(carrier) else None
        service, _, name = self.method.lstrip("/").partition("/")
        span = self.tracer.start_span(
            self.method.lstrip("/"),
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
            record_exception=False,
            set_status_on_exception=False,
        )
        try:
            if current:
                with trace.use_span(span, record_exception=False, set_status_on_exception=False):
                    yield span
            else:
                yield span
        finally:
            span.set_attribute("rpc.grpc.status_code", self.code.value[0])
            if self.code not in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):
                span.set_status(Status(StatusCode.ERROR, self.code.name))
            span.end()
            _rpc_duration.record(
                time.perf_counter() - self.started,
                {"rpc.method": self.method, "rpc.grpc.status_code": self.code.name},
            )

    def status_of(self, exc: BaseException) -> Any:
        """The ``google.rpc.Status`` to answer ``exc`` with (logging what was not a domain error)."""
        if isinstance(exc, TesseraError):
            status = error_status(exc)
        elif (down := dependency_down(exc)) is not None:
            # Not a bug: a backend is out. UNAVAILABLE tells the caller (and the channels' retry
            # policies) to try again; the message names the backend, never its address.
            log.warning(
                "%s unavailable in %s", down, self.method, extra={"method": self.method, "error": type(exc).__name__}
            )
            status = error_status(Unavailable(f"{down} is unavailable; retry shortly"))
        else:
            log.error("unhandled error in %s", self.method, exc_info=exc, extra={"method": self.method})
            status = internal_status(current_trace_id())
        self.code = _GRPC_CODES.get(status.code, grpc.StatusCode.UNKNOWN)
        return status


def dependency_down(exc: BaseException) -> str | None:
    """ "PostgreSQL" or "Redis" when ``exc`` is a lost or refused connection to it, else None."""
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return "Redis"
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return "PostgreSQL"
    if isinstance(exc, sa.exc.TimeoutError):  # no pooled connection within the pool timeout
        return "PostgreSQL"
    if isinstance(exc, sa.exc.OperationalError) and "connect" in str(exc.orig).lower():
        return "PostgreSQL"
    return None


def _trailers(status: Any) -> tuple[tuple[str, bytes], ...]:
    return ((STATUS_DETAILS_KEY, status.SerializeToString()),)


def _abort_sync(context: Any, call: _Call, exc: BaseException) -> None:
    if isinstance(exc, AbortError):
        raise exc  # the handler called context.abort() itself: its status stands
    status = call.status_of(exc)
    try:
        context.abort(_GRPC_CODES[status.code], status.message, _trailers(status))
    except AbortError:
        raise
    except Exception:  # the call already ended (the client went away): nobody to answer
        log.debug("call ended before its status could be sent", extra={"method": call.method})


async def _abort_async(context: Any, call: _Call, exc: BaseException) -> None:
    if isinstance(exc, AbortError):
        raise exc
    if context.done() or context.cancelled():
        call.code = grpc.StatusCode.CANCELLED
        log.debug("call ended by the client", extra={"method": call.method})
        return
    status = call.status_of(exc)
    await context.abort(_GRPC_CODES[status.code], status.message, _trailers(status))


class GuardInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Authenticates every non-public RPC, re-checks the credential of long streams, refuses
    malformed requests, and maps every exception a handler raises to a status."""

    def __init__(
        self,
        authenticator: Authenticator | None,
        executor: Any = None,
        tracer_: trace.Tracer | None = None,
        stream_slots: StreamSlots | None = None,
        own_text_checks: frozenset[str] = frozenset(),
    ) -> None:
        self.authenticator = authenticator
        self.executor = executor
        self.tracer = tracer_ or tracer
        self.slots = stream_slots
        # Methods that check their requests' text themselves, item by item (ingest's batches,
        # whose events are rejected one by one rather than the whole request refused).
        self.own_text_checks = own_text_checks
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    # -- credentials ----------------------------------------------------------------------------

    def _tenant(self, call: _Call, public: bool) -> Tenant | None:
        if public:
            return None
        assert self.authenticator is not None
        return self.authenticator.authenticate(call.authorization())

    async def _tenant_async(self, call: _Call, public: bool) -> Tenant | None:
        if public:
            return None
        assert self.authenticator is not None
        cached = self.authenticator.cached(call.authorization())
        if cached is not None:
            return cached
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self.authenticator.authenticate, call.authorization())

    def _recheck(self, call: _Call, public: bool) -> None:
        """A stream outlives its credential check: look again (a cache hit until it expires), so a
        revoked key stops an open stream within the authentication cache's lifetime."""
        if not public:
            assert self.authenticator is not None
            if self.authenticator.cached(call.authorization()) is None:
                self.authenticator.authenticate(call.authorization())

    # -- the wrappers ---------------------------------------------------------------------------

    async def intercept_service(self, continuation: Callable[[Any], Any], handler_call_details: Any) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        # The wrapped handler depends only on the method (each call reads its own metadata), so it
        # is built once per method, not on every call.
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped_handler = self._wrap(method, handler)
        self._wrapped[method] = (handler, wrapped_handler)
        return wrapped_handler

    def _wrap(self, method: str, handler: Any) -> Any:
        public = self.authenticator is None or method.startswith(PUBLIC_PREFIXES)
        deserializer = _safe(handler.request_deserializer, _request_type(method))
        guard = self

        scan_text = method not in self.own_text_checks

        def check_request(request: Any) -> None:
            if isinstance(request, Malformed):
                raise request.refusal()
            if scan_text and hasattr(request, "ListFields"):
                path = first_nul(request)
                if path is not None:
                    raise _nul_refusal(path)

        def sync_unary(behavior: Behavior) -> Behavior:
            def wrapped(request: Any, context: Any) -> Any:
                call = _Call(method, _metadata_of(context), guard.tracer)
                with call.span():
                    token = None
                    try:
                        token = _enter(guard._tenant(call, public), context)
                        if hasattr(request, "__next__"):
                            request = _checked_iter(request, check_request)
                        else:
                            check_request(request)
                        return behavior(request, context)
                    except Exception as exc:
                        _abort_sync(context, call, exc)
                    finally:
                        _leave(token)
                return None

            return wrapped

        def sync_stream(behavior: Behavior) -> Behavior:
            def wrapped(request: Any, context: Any) -> Iterator[Any]:
                call = _Call(method, _metadata_of(context), guard.tracer)
                with call.span():
                    token = None
                    try:
                        token = _enter(guard._tenant(call, public), context)
                        if hasattr(request, "__next__"):
                            request = _checked_iter(request, check_request)
                        else:
                            check_request(request)
                        for response in behavior(request, context):
                            guard._recheck(call, public)
                            yield response
                    except Exception as exc:
                        _abort_sync(context, call, exc)
                    finally:
                        _leave(token)

            return wrapped

        def async_unary(behavior: Behavior) -> Behavior:
            async def wrapped(request: Any, context: Any) -> Any:
                call = _Call(method, _metadata_of(context), guard.tracer)
                with call.span():
                    token = None
                    try:
                        token = _enter(await guard._tenant_async(call, public), context)
                        if hasattr(request, "__anext__"):
                            request = _checked_aiter(request, check_request, lambda: guard._recheck(call, public))
                        else:
                            check_request(request)
                        return await behavior(request, context)
                    except Exception as exc:
                        await _abort_async(context, call, exc)
                    finally:
                        _leave(token)
                return None

            return wrapped

        def async_stream(behavior: Behavior) -> Behavior:
            async def wrapped(request: Any, context: Any) -> AsyncIterator[Any]:
                # The span and tenant are attached only while the servicer runs (each step below),
                # never across a yield: grpc may finalize this generator from another task.
                call = _Call(method, _metadata_of(context), guard.tracer)
                with call.span(current=False) as span:
                    slot: str | None = None
                    responses: AsyncIterator[Any] | None = None
                    try:
                        with trace.use_span(span, record_exception=False, set_status_on_exception=False):
                            tenant = await guard._tenant_async(call, public)
                            if guard.slots is not None and not method.startswith(UNCAPPED_PREFIXES):
                                slot = guard.slots.take(tenant)
                            _enter(None, context)
                            if hasattr(request, "__anext__"):
                                request = _checked_aiter(request, check_request, lambda: guard._recheck(call, public))
                            else:
                                check_request(request)
                            responses = behavior(request, context)
                        while True:
                            token = set_current_tenant(tenant) if tenant is not None else None
                            try:
                                with trace.use_span(span, record_exception=False, set_status_on_exception=False):
                                    response = await responses.__anext__()
                            except StopAsyncIteration:
                                break
                            finally:
                                _leave(token)
                            guard._recheck(call, public)
                            yield response
                    except Exception as exc:
                        await _abort_async(context, call, exc)
                    finally:
                        if responses is not None and hasattr(responses, "aclose"):
                            await responses.aclose()
                        if slot is not None and guard.slots is not None:
                            guard.slots.give_back(slot)

            return wrapped

        def wrap(behavior: Behavior, streaming: bool) -> Behavior:
            if inspect.isasyncgenfunction(behavior):
                return async_stream(behavior)
            if inspect.iscoroutinefunction(behavior):
                return async_unary(behavior)
            return sync_stream(behavior) if streaming else sync_unary(behavior)

        serializer = _passthrough(handler.response_serializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary, False), deserializer, serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary, False), deserializer, serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream, True), deserializer, serializer)
        return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream, True), deserializer, serializer)


def _metadata_of(context: Any) -> tuple[tuple[str, Any], ...]:
    return tuple(context.invocation_metadata() or ())


def _passthrough(serializer: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    """A servicer may answer with its response already serialized (bytes from a cache): sent as is."""
    if serializer is None:
        return None

    def serialize(response: Any) -> bytes:
        return response if type(response) is bytes else serializer(response)

    return serialize


def _enter(tenant: Tenant | None, context: Any) -> Any:
    remaining = time_remaining(context)
    if remaining is not None and remaining <= 0:
        raise DeadlineExceeded("deadline expired before the request was served")
    return set_current_tenant(tenant) if tenant is not None else None


def _leave(token: Any) -> None:
    if token is not None:
        with suppress(ValueError):  # a generator closed from another context: that context is gone anyway
            reset_current_tenant(token)


def _checked_iter(requests: Iterator[Any], check: Callable[[Any], None]) -> Iterator[Any]:
    for request in requests:
        check(request)
        yield request


async def _checked_aiter(
    requests: AsyncIterator[Any], check: Callable[[Any], None], recheck: Callable[[], None]
) -> AsyncIterator[Any]:
    async for request in requests:
        check(request)
        recheck()
        yield request
