"""A pipelining, retrying StreamEvents client, shared by ``tessera import``, the demo loader
and the benchmark.

Batches go out with at most ``window`` unanswered; each answer releases the next. If the
stream breaks (the server restarted, a network blip), the unanswered batches are sent
again on a new stream: ingest dedupes by message id, so a retry never duplicates.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import grpc
from google.rpc import code_pb2, error_details_pb2

from tessera.v1 import event_pb2, ingest_pb2, ingest_pb2_grpc

log = logging.getLogger(__name__)

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED}


def open_channel(target: str, *, tls: bool = False, root_cert: bytes | None = None) -> grpc.Channel:
    options = [
        ("grpc.max_send_message_length", 16 * 1024 * 1024),
        ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ]
    if tls:
        return grpc.secure_channel(target, grpc.ssl_channel_credentials(root_cert), options=options)
    return grpc.insecure_channel(target, options=options)


def auth_metadata(api_key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),)


def batches_of(
    events: Iterable[event_pb2.Event], size: int = 200, max_bytes: int = 3_500_000
) -> Iterator[list[event_pb2.Event]]:
    """Cut a stream of events into batches under the server's count and byte limits."""
    batch: list[event_pb2.Event] = []
    nbytes = 0
    for ev in events:
        n = ev.ByteSize() + 8
        if batch and (len(batch) >= size or nbytes + n > max_bytes):
            yield batch
            batch, nbytes = [], 0
        batch.append(ev)
        nbytes += n
    if batch:
        yield batch


def retry_delay(status: object) -> float:
    for detail in getattr(status, "details", []):
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return float(info.retry_delay.seconds + info.retry_delay.nanos / 1e9)
    return 0.5


@dataclass
class Tally:
    accepted: int = 0
    duplicate: int = 0
    rejected: int = 0
    batches: int = 0
    retries: int = 0
    # (batch key, result) for rejected events, in order
    rejections: list[tuple[object, ingest_pb2.EventResult]] = field(default_factory=list)
    refused: list[tuple[object, str]] = field(default_factory=list)


class StreamIngester:
    """Sends keyed batches and calls ``on_result(key, response)`` for each answered batch."""

    def __init__(
        self,
        channel: grpc.Channel,
        api_key: str,
        *,
        window: int = 8,
        max_attempts: int = 8,
        timeout: float | None = None,
    ) -> None:
        self.stub = ingest_pb2_grpc.IngestServiceStub(channel)
        self.metadata = auth_metadata(api_key)
        self.window = window
        self.max_attempts = max_attempts
        self.timeout = timeout

    def send(
        self,
        batches: Iterable[tuple[object, list[event_pb2.Event]]],
        on_result: Callable[[object, ingest_pb2.StreamEventsResponse], None] | None = None,
    ) -> Tally:
        """Send every batch until each is answered; returns the totals."""
        tally = Tally()
        items: Iterator[tuple[object, list[event_pb2.Event]]] = iter(batches)
        retry: list[tuple[object, list[event_pb2.Event]]] = []
        attempt = 0
        while True:
            pending: dict[str, tuple[object, list[event_pb2.Event]]] = {}
            lock = threading.Lock()
            sem = threading.Semaphore(self.window)
            closed = [False]
            items = _chain(retry, items)  # what was not answered goes first, then the rest
            retry = []

            def requests(
                items: Iterator[tuple[object, list[event_pb2.Event]]] = items,
                pending: dict[str, tuple[object, list[event_pb2.Event]]] = pending,
                sem: threading.Semaphore = sem,
                lock: threading.Lock = lock,
                closed: list[bool] = closed,
            ) -> Iterator[ingest_pb2.StreamEventsRequest]:
                # Items are taken from the source only under the lock and only while the stream
                # is open, so a broken stream can never strand a batch outside ``pending``.
                counter = 0
                while True:
                    sem.acquire()
                    with lock:
                        if closed[0]:
                            return
                        item = next(items, None)
                        if item is None:
                            return
                        counter += 1
                        batch_id = str(counter)
                        pending[batch_id] = item
                    yield ingest_pb2.StreamEventsRequest(batch_id=batch_id, events=item[1])

            try:
                for resp in self.stub.StreamEvents(requests(), metadata=self.metadata, timeout=self.timeout):
                    with lock:
                        key, events = pending.pop(resp.batch_id)
                    sem.release()
                    self._record(tally, retry, key, events, resp, on_result)
                attempt = 0
            except grpc.RpcError as err:
                code = err.code() if hasattr(err, "code") else None
                if code not in RETRYABLE or attempt >= self.max_attempts:
                    raise
                attempt += 1
                tally.retries += 1
                delay = min(0.2 * 2**attempt, 5.0)
                log.warning("stream broke (%s); resending %d unanswered batches in %.1fs", code, len(pending), delay)
                time.sleep(delay)
            finally:
                with lock:
                    closed[0] = True
                    retry = list(pending.values()) + retry
                    pending.clear()
                for _ in range(self.window):
                    sem.release()
            if not retry:
                rest = next(items, None)  # a clean end means the source is used up
                if rest is None:
                    return tally
                retry.append(rest)

    @staticmethod
    def _record(
        tally: Tally,
        retry: list[tuple[object, list[event_pb2.Event]]],
        key: object,
        events: list[event_pb2.Event],
        resp: ingest_pb2.StreamEventsResponse,
        on_result: Callable[[object, ingest_pb2.StreamEventsResponse], None] | None,
    ) -> None:
        if resp.HasField("error") and resp.error.code != code_pb2.OK:
            if resp.error.code == code_pb2.RESOURCE_EXHAUSTED:
                time.sleep(retry_delay(resp.error))
                retry.append((key, events))
                tally.retries += 1
                return
            tally.refused.append((key, resp.error.message))
            tally.rejected += len(events)
            return
        tally.batches += 1
        tally.accepted += resp.accepted_count
        tally.duplicate += resp.duplicate_count
        tally.rejected += resp.rejected_count
        for r in resp.results:
            if r.status == ingest_pb2.EVENT_STATUS_REJECTED:
                tally.rejections.append((key, r))
        if on_result:
            on_result(key, resp)


def _chain(
    first: list[tuple[object, list[event_pb2.Event]]], rest: Iterator[tuple[object, list[event_pb2.Event]]]
) -> Iterator[tuple[object, list[event_pb2.Event]]]:
    yield from first
    yield from rest
