"""IngestService over gRPC: thin, all logic is in :mod:`services.ingest.pipeline`."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from services.core import pagination
from services.core.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable, Violation
from services.core.interceptors import time_remaining
from services.core.status import error_status
from services.core.tenancy import current_tenant
from services.ingest.pipeline import Ingestor
from tessera.v1 import ingest_pb2, ingest_pb2_grpc

MAX_LISTED_MESSAGE_IDS = 1000
#: Runs blocking work off the event loop (ServiceContext.in_pool).
InPool = Callable[..., Awaitable[Any]]


def _event_position(position: Any) -> bool:
    """[received_at ISO timestamp, event uuid], as ListEvents issues it."""
    if not (isinstance(position, list) and len(position) == 2 and all(isinstance(x, str) for x in position)):
        return False
    try:
        dt.datetime.fromisoformat(position[0])
        uuid.UUID(position[1])
    except ValueError:
        return False
    return True


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    """Unary methods are plain functions (the server runs them in its pool); ``StreamEvents`` is
    an async generator, so an open stream waiting for its next batch holds no thread."""

    def __init__(self, ingestor: Ingestor, pool: InPool, idle_seconds: float = 300.0) -> None:
        self.ingestor = ingestor
        self.pool = pool
        self.idle_seconds = idle_seconds

    def ListEvents(
        self, request: ingest_pb2.ListEventsRequest, context: grpc.ServicerContext
    ) -> ingest_pb2.ListEventsResponse:
        tenant = current_tenant()
        size = pagination.page_size(request.page_size)
        if len(request.message_ids) > MAX_LISTED_MESSAGE_IDS:
            raise InvalidArgument(
                "too many message_ids",
                [
                    Violation(
                        "message_ids",
                        f"at most {MAX_LISTED_MESSAGE_IDS} per request, got {len(request.message_ids)}",
                        "TOO_MANY",
                    )
                ],
            )
        query = {"m": sorted(request.message_ids)}
        after = pagination.decode_token(request.page_token, query, valid=_event_position)
        rows = self.ingestor.stored_events(
            tenant.tenant_id, size + 1, tuple(after) if after else None, list(request.message_ids)
        )
        resp = ingest_pb2.ListEventsResponse()
        for row in rows[:size]:
            resp.events.add().ParseFromString(row.payload)
        if len(rows) > size:
            last = rows[size - 1]
            resp.next_page_token = pagination.encode_token([last.received_at.isoformat(), last.event_id], query)
        return resp

    def IngestEvents(
        self, request: ingest_pb2.IngestEventsRequest, context: grpc.ServicerContext
    ) -> ingest_pb2.IngestEventsResponse:
        out = self.ingestor.ingest(current_tenant(), request.events, request.ByteSize(), time_remaining(context))
        return ingest_pb2.IngestEventsResponse(
            results=out.results,
            accepted_count=out.accepted,
            duplicate_count=out.duplicate,
            rejected_count=out.rejected,
            suppressed_count=out.suppressed,
        )

    def SuppressIdentifiers(
        self, request: ingest_pb2.SuppressIdentifiersRequest, context: grpc.ServicerContext
    ) -> ingest_pb2.SuppressIdentifiersResponse:
        added = self.ingestor.suppress_identifiers(current_tenant(), request)
        return ingest_pb2.SuppressIdentifiersResponse(added_count=added)

    def PurgeEvents(
        self, request: ingest_pb2.PurgeEventsRequest, context: grpc.ServicerContext
    ) -> ingest_pb2.PurgeEventsResponse:
        purged = self.ingestor.purge_events(current_tenant(), request)
        return ingest_pb2.PurgeEventsResponse(purged_count=purged)

    async def StreamEvents(
        self, request_iterator: AsyncIterator[ingest_pb2.StreamEventsRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ingest_pb2.StreamEventsResponse]:
        """Answers each batch in order. A refused batch gets an in-band error and the stream stays
        open, so one oversized or rate-limited batch does not cost the pipeline. The stream waits
        for its next batch on the event loop (no thread), and is ended, UNAVAILABLE, after
        ``idle_seconds`` without one."""
        tenant = current_tenant()
        requests = aiter(request_iterator)
        while True:
            try:
                request = await asyncio.wait_for(anext(requests), self.idle_seconds)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise Unavailable(f"no batch for {self.idle_seconds:g}s; open a new stream to send more") from None
            try:
                out = await self.pool(
                    self.ingestor.ingest, tenant, request.events, request.ByteSize(), time_remaining(context)
                )
            except (InvalidArgument, ResourceExhausted, DeadlineExceeded) as err:
                yield ingest_pb2.StreamEventsResponse(batch_id=request.batch_id, error=error_status(err))
                continue
            yield ingest_pb2.StreamEventsResponse(
                batch_id=request.batch_id,
                results=out.results,
                accepted_count=out.accepted,
                duplicate_count=out.duplicate,
                rejected_count=out.rejected,
                suppressed_count=out.suppressed,
            )
