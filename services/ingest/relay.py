"""Moves committed events from the outbox to the tenant's Redis stream.

Fast path: the servicer hands over what it just committed, and this thread publishes it
in one pipelined round trip and deletes the outbox rows in one statement, amortised over
every batch that arrived meanwhile. Sweep: rows the fast path never handled (Redis was
down, the process died after commit) are claimed from the outbox with ``SKIP LOCKED``
and published. One thread does both, so no event is published twice by one process.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence

import redis
import sqlalchemy.exc

from services.core import db
from services.core.bus import EVENTS, Bus
from services.core.telemetry import meter
from services.ingest.storage import EventStore, OutboxBatch

log = logging.getLogger(__name__)

_published = meter.create_counter("tessera.ingest.published", description="events published to the stream")


class OutboxRelay:
    def __init__(
        self,
        store: EventStore,
        bus: Bus,
        *,
        sweep_seconds: float = 1.0,
        grace_seconds: float = 5.0,
        sweep_limit: int = 50,
        partition_check_seconds: float = 3600.0,
    ) -> None:
        self.store = store
        self.bus = bus
        self.sweep_seconds = sweep_seconds
        self.grace_seconds = grace_seconds
        self.sweep_limit = sweep_limit
        self.partition_check_seconds = partition_check_seconds
        self._queue: queue.SimpleQueue[OutboxBatch | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox-relay", daemon=True)
        self._degraded = False
        self._next_sweep = 0.0
        self._next_partition_check = 0.0

    # Background protocol.
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self._stop.set()
        self._queue.put(None)  # wake the thread
        self._thread.join(timeout)

    def submit(self, batch: OutboxBatch) -> None:
        """Called after commit; never blocks the RPC."""
        self._queue.put(batch)

    @property
    def degraded(self) -> bool:
        return self._degraded

    def _run(self) -> None:
        """The relay must outlive any single failure: what it does not publish now stays in
        the outbox for the next sweep, so an unexpected error is logged and the loop goes on."""
        while True:
            try:
                if self._cycle():
                    return
            except Exception:
                log.exception("outbox relay cycle failed; what it held stays in the outbox")
                if self._stop.wait(0.5):
                    return

    def _cycle(self) -> bool:
        """One round of publishing; True once stopped and drained."""
        stopping = self._stop.is_set()
        timeout = max(0.0, self._next_sweep - time.monotonic())
        items: list[OutboxBatch] = []
        try:
            item = self._queue.get(timeout=0 if stopping else min(timeout, 0.5) or 0.0001)
            while True:
                if item is not None:
                    items.append(item)
                if len(items) >= 100:
                    break
                item = self._queue.get_nowait()
        except queue.Empty:
            pass
        if items:
            self._publish_fresh(items)
        if stopping and self._queue.empty():
            return True
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + self.sweep_seconds
            self._sweep()
        if now >= self._next_partition_check:
            self._next_partition_check = now + self.partition_check_seconds
            self._keep_partitions()
        return False

    def _publish_fresh(self, items: list[OutboxBatch]) -> None:
        """Delete the rows, publish, then commit: a row is published by whoever deleted it,
        so the fast path and a sweep (here or in another replica) never both publish it."""
        if self._degraded:
            return  # the sweep drains the outbox, oldest first, until Redis is back
        try:
            with db.raw_transaction(self.store.engine, "DELETE ingest.outbox", len(items)) as (cursor, _):
                # Losing this commit in a crash only means the batch is published again later, and
                # consumers are idempotent: no need to wait for the WAL flush.
                cursor.execute("SET LOCAL synchronous_commit = off")
                taken = self.store.delete_outbox(cursor, [(i.tenant_id, i.seq) for i in items])
                live = [i for i in items if i.seq in taken]
                self._append(live)
        except redis.RedisError as exc:
            self._enter_degraded(exc)
            return
        except sqlalchemy.exc.SQLAlchemyError:
            log.warning("fast publish failed; the sweep will retry", exc_info=True)
            return
        _published.add(sum(len(b.event_ids) for b in live), {"path": "fast"})

    def _append(self, batches: Sequence[OutboxBatch]) -> None:
        by_tenant: dict[str, list[OutboxBatch]] = {}
        for b in batches:
            by_tenant.setdefault(b.tenant_id, []).append(b)
        for tenant_id, group in by_tenant.items():
            ids = [i.encode() for b in group for i in b.event_ids]
            if not ids:
                continue
            self.bus.append_columns(
                tenant_id,
                EVENTS,
                {
                    "event_id": ids,
                    "payload": [p for b in group for p in b.payloads],
                    "traceparent": [b.traceparent.encode() for b in group for _ in b.event_ids],
                },
            )

    def _enter_degraded(self, exc: Exception) -> None:
        if not self._degraded:
            log.warning("redis unavailable; events stay in the outbox until it returns", extra={"error": str(exc)})
        self._degraded = True

    def _sweep(self) -> None:
        """Publish what the fast path did not, oldest first, until the outbox is drained."""
        for _ in range(10_000):
            try:
                with db.raw_transaction(self.store.engine, "SELECT ingest.outbox FOR UPDATE") as (cursor, _):
                    min_age = 0.0 if self._degraded else self.grace_seconds
                    rows = self.store.claim_outbox(cursor, min_age, self.sweep_limit)
                    self._append(rows)
                    self.store.delete_outbox(cursor, [(r.tenant_id, r.seq) for r in rows])
            except redis.RedisError as exc:
                self._enter_degraded(exc)
                return
            except sqlalchemy.exc.SQLAlchemyError:
                log.warning("outbox sweep failed; will retry", exc_info=True)
                return
            if rows:
                _published.add(sum(len(r.event_ids) for r in rows), {"path": "sweep"})
            if len(rows) < self.sweep_limit:
                if self._degraded:
                    log.info("outbox drained; back to the fast path")
                    self._degraded = False
                return
            if self._stop.is_set():
                return

    def _keep_partitions(self) -> None:
        try:
            created = self.store.ensure_partitions()
            if created:
                log.info("created event partitions", extra={"count": created})
        except sqlalchemy.exc.SQLAlchemyError:
            log.warning("partition upkeep failed; will retry", exc_info=True)
            self._next_partition_check = time.monotonic() + 60
