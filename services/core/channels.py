"""Channels from one service to another: the same limits everywhere, TLS when the deployment has
it, and gRPC's own retries for calls that never reached a server (UNAVAILABLE)."""

from __future__ import annotations

import json
from typing import Any, Final

import grpc

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


def service_channel(target: str, settings: Settings, *, retries: bool = True) -> grpc.Channel:
    creds = _credentials(settings)
    if creds is not None:
        return grpc.secure_channel(target, creds, options=channel_options(retries=retries))
    return grpc.insecure_channel(target, options=channel_options(retries=retries))


def service_aio_channel(target: str, settings: Settings) -> grpc.aio.Channel:
    creds = _credentials(settings)
    if creds is not None:
        return grpc.aio.secure_channel(target, creds, options=channel_options())
    return grpc.aio.insecure_channel(target, options=channel_options())
