"""The transport-only baseline: a bare gRPC server for IngestService that parses each request
(deserializes it into the generated message and touches ``len(events)``) and answers an empty
response. No interceptors, no telemetry, no database, no Redis: what gRPC and protobuf alone cost
in this Python, with the same thread pool and options as the real server.

Run as its own process: ``python -m bench.transport_server PORT [WORKERS]``.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tessera.v1 import ingest_pb2

SERVICE = "tessera.v1.IngestService"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class Counter:
    def __init__(self) -> None:
        self.events = 0  # not locked: a rough tally for the log only


def build(port: int, workers: int) -> tuple[grpc.Server, Counter]:
    counter = Counter()

    def ingest_events(request: ingest_pb2.IngestEventsRequest, _ctx: Any) -> ingest_pb2.IngestEventsResponse:
        counter.events += len(request.events)
        return ingest_pb2.IngestEventsResponse()

    def stream_events(
        requests: Iterator[ingest_pb2.StreamEventsRequest], _ctx: Any
    ) -> Iterator[ingest_pb2.StreamEventsResponse]:
        for request in requests:
            counter.events += len(request.events)
            yield ingest_pb2.StreamEventsResponse(batch_id=request.batch_id)

    handlers = {
        "IngestEvents": grpc.unary_unary_rpc_method_handler(
            ingest_events,
            request_deserializer=ingest_pb2.IngestEventsRequest.FromString,
            response_serializer=ingest_pb2.IngestEventsResponse.SerializeToString,
        ),
        "StreamEvents": grpc.stream_stream_rpc_method_handler(
            stream_events,
            request_deserializer=ingest_pb2.StreamEventsRequest.FromString,
            response_serializer=ingest_pb2.StreamEventsResponse.SerializeToString,
        ),
    }
    # The same executor size, limits and message sizes as services.core.server.start_server.
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc"),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=workers * 8,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    server.add_insecure_port(f"127.0.0.1:{port}")
    return server, counter


def main(argv: list[str]) -> int:
    port = int(argv[0])
    workers = int(argv[1]) if len(argv) > 1 else 16
    server, counter = build(port, workers)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server.start()
    print(f"transport server on 127.0.0.1:{port} with {workers} workers", file=sys.stderr, flush=True)
    stop.wait()
    server.stop(1).wait()
    print(f"transport server stopped after {counter.events} events", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
