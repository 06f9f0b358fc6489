"""The latency baseline for the profile benchmarks: a bare asyncio gRPC server (the same server
kind as the services) whose one method answers with the bytes it was sent. No interceptors, no
credentials, no Redis, no database: what one gRPC round trip costs in this Python.

Run as its own process: ``python -m bench.echo_server PORT``.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

SERVICE = "bench.Echo"
METHOD = f"/{SERVICE}/Echo"


async def serve(port: int) -> None:
    async def echo(request: bytes, _ctx: Any) -> bytes:
        return request

    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(echo)  # bytes in, bytes out: no (de)serializers
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Echo": handler}),))
    status = health.aio.HealthServicer()
    await status.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(status, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main(argv: list[str]) -> int:
    asyncio.run(serve(int(argv[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
