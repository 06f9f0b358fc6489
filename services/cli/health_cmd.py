"""``tessera health ADDRESS``: one ``grpc.health.v1.Health/Check``, as an exit code.

It is what the chart's ``helm test`` Pod and its TLS probes run (kubelet's native gRPC probes
speak no TLS), so it imports only gRPC and the health stubs: it starts fast and needs no settings.
Exit codes: 0 SERVING; 1 the server answered anything else (NOT_SERVING, UNKNOWN, or an unknown
service name); 2 no answer (connection refused, deadline, TLS handshake failed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

SERVING_EXIT = 0
NOT_SERVING_EXIT = 1
UNREACHABLE_EXIT = 2


def check(
    address: str,
    service: str = "",
    *,
    tls: bool = False,
    ca_file: Path | None = None,
    server_name: str | None = None,
    timeout: float = 5.0,
) -> tuple[int, str]:
    """The exit code and a one-word status (or the error) for ``service`` at ``address``."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    options: list[tuple[str, Any]] = []
    if tls:
        if server_name:
            # A probe dials localhost inside the pod, but the certificate names the Service.
            options.append(("grpc.ssl_target_name_override", server_name))
        roots = ca_file.read_bytes() if ca_file else None
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(roots), options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    with channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            if code == grpc.StatusCode.NOT_FOUND:  # the server answered: it has no such service name
                return NOT_SERVING_EXIT, "SERVICE_UNKNOWN"
            return UNREACHABLE_EXIT, f"{code.name}: {exc.details()}"  # type: ignore[attr-defined]
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    return (SERVING_EXIT if resp.status == health_pb2.HealthCheckResponse.SERVING else NOT_SERVING_EXIT), name


def cmd_health(args: argparse.Namespace) -> int:
    if args.ca_file is not None and not args.ca_file.is_file():
        print(f"tessera health: no such file: {args.ca_file}", file=sys.stderr)
        return UNREACHABLE_EXIT
    code, status = check(
        args.address,
        args.service,
        tls=args.tls or args.ca_file is not None,
        ca_file=args.ca_file,
        server_name=args.server_name,
        timeout=args.timeout,
    )
    label = f"{args.address} {args.service or '(server)'}"
    print(f"{label}: {status}", file=sys.stdout if code == SERVING_EXIT else sys.stderr)
    return code


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "health",
        help="check a service's gRPC health: exit 0 only when SERVING (1: not serving, 2: no answer)",
    )
    p.add_argument("address", help="host:port, e.g. localhost:50051")
    p.add_argument("--service", default="", help="health service name (default: the whole server)")
    p.add_argument("--tls", action="store_true", help="connect with TLS (system roots unless --ca-file)")
    p.add_argument("--ca-file", type=Path, help="PEM roots to verify the server with (implies --tls)")
    p.add_argument("--server-name", help="TLS: the name the certificate must carry, when ADDRESS is not it")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer (default 5)")
    p.set_defaults(func=cmd_health)


__all__ = ["add_parser", "check", "cmd_health"]
