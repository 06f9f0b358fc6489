"""Channels from one service to another: the same limits everywhere, TLS when the deployment has
it, gRPC's own retries for calls that never reached a server (UNAVAILABLE), and the caller's trace
context on every call, so the callee's span continues the caller's trace."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Final, NamedTuple

import grpc
from opentelemetry import propagate

from services.core.settings import Settings

_RETRY: Final = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{}],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "0.5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)


def channel_options(*, retries: bool = True) -> list[tuple[str, Any]]:
    """``retries=False``: no retry policy, for calls whose deadline is too short for its back-offs
    (an unreachable server then fails them at once); gRPC's transparent retries remain."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", 16 * 1024 * 1024),
        ("grpc.max_receive_message_length", 16 * 1024 * 1024),
        ("grpc.enable_retries", 1),
        ("grpc.keepalive_time_ms", 60_000),
    ]
    if retries:
        options.append(("grpc.service_config", _RETRY))
    return options


def _credentials(settings: Settings) -> grpc.ChannelCredentials | None:
    if settings.tls_cert_file is None:
        return None
    # The deployment's certificate is its own root (the chart's, or one signed by the CA in it).
    return grpc.ssl_channel_credentials(settings.tls_cert_file.read_bytes())


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


class TraceContext(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    """Adds the active trace context (``traceparent``...) to each outgoing call's metadata: one
    propagator injection per call, the same as the server's extraction on the other side."""

    def _with_context(self, details: Any) -> Any:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        if not carrier:
            return details
        metadata = [*(details.metadata or ()), *carrier.items()]
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._with_context(details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._with_context(details), request)

    def intercept_stream_unary(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return continuation(self._with_context(details), requests)

    def intercept_stream_stream(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return continuation(self._with_context(details), requests)


def service_channel(target: str, settings: Settings, *, retries: bool = True) -> grpc.Channel:
    creds = _credentials(settings)
    if creds is not None:
        channel = grpc.secure_channel(target, creds, options=channel_options(retries=retries))
    else:
        channel = grpc.insecure_channel(target, options=channel_options(retries=retries))
    return grpc.intercept_channel(channel, TraceContext())


def service_aio_channel(target: str, settings: Settings) -> grpc.aio.Channel:
    creds = _credentials(settings)
    if creds is not None:
        return grpc.aio.secure_channel(target, creds, options=channel_options())
    return grpc.aio.insecure_channel(target, options=channel_options())
