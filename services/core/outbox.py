"""The transactional outbox: what a service commits, it publishes, even across crashes.

A service writes its outbox rows in the same transaction as the change they announce. After the
commit it hands them to :meth:`Outbox.submit`, and the outbox's one background thread publishes:

- **fast path:** what was just submitted, many batches per round trip: delete the rows, publish,
  then commit. A row is published by whoever deleted it, so the fast path and a sweep (here or in
  another replica) never both publish it. The delete commits without waiting for the WAL flush:
  a lost delete only means a republish, and consumers are idempotent.
- **sweep:** rows older than a grace period that no fast path took (Redis was down, a process died
  after its commit), claimed with ``SKIP LOCKED`` so replicas share the work, tenant by tenant
  (every index leads with tenant_id), each tenant's oldest first.
- **degraded:** while Redis is down the fast path stops and the sweep drains everything, whatever
  its age, once Redis is back. Nothing committed is lost; a message may go out twice.

Where the rows live is an :class:`OutboxTable`: :class:`EnvelopeTable` stores encoded envelopes
(``<schema>.outbox``); ingest's table refers to its event log instead, so an event's bytes are
written once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import redis
import sqlalchemy.exc
from sqlalchemy.engine import Engine

from services.core import db
from services.core.bus import Bus
from services.core.telemetry import meter

log = logging.getLogger(__name__)

_published = meter.create_counter("tessera.outbox.published", description="stream entries published by the outbox")


@dataclass(frozen=True)
class Pending:
    """Committed outbox rows of one tenant and stream, and the envelopes they publish."""

    tenant_id: str
    stream: str
    seqs: tuple[int, ...]
    envelopes: list[bytes]


class OutboxTable(Protocol):
    """The two statements the relay needs from wherever a service keeps its outbox."""

    name: str

    def claim(self, cur: Any, min_age_seconds: float, limit: int) -> list[Pending]:
        """Lock (``FOR UPDATE SKIP LOCKED``) and return the oldest unpublished rows."""

    def delete(self, cur: Any, keys: Sequence[tuple[str, int]]) -> set[int]:
        """Delete ``(tenant_id, seq)`` rows; return the seqs this transaction removed."""


class EnvelopeTable:
    """``<schema>.outbox (tenant_id, seq, stream, envelope, created_at)``: one row per entry."""

    def __init__(self, schema: str) -> None:
        self.name = f'"{schema}".outbox'

    def insert(self, cur: Any, tenant_id: str, stream: str, envelopes: Sequence[bytes]) -> Pending:
        """Insert inside the caller's transaction."""
        cur.execute(
            f"INSERT INTO {self.name} (tenant_id, stream, envelope) "  # noqa: S608 - schema is ours, not input
            "SELECT %s, %s, e FROM unnest(%s::bytea[]) WITH ORDINALITY AS m(e, n) ORDER BY n RETURNING seq",
            (tenant_id, stream, list(envelopes)),
        )
        return Pending(tenant_id, stream, tuple(int(r[0]) for r in cur.fetchall()), list(envelopes))

    def claim(self, cur: Any, min_age_seconds: float, limit: int) -> list[Pending]:
        """Tenant by tenant (the age index leads with tenant_id), each tenant's oldest first; only
        the rows returned are locked, since the outer LIMIT stops pulling from the locking scans.
        The cutoff is an InitPlan, computed once, so it bounds the index scan instead of filtering it."""
        oldest = (
            f"SELECT o.tenant_id, o.seq, o.stream, o.envelope FROM tenants t, LATERAL (SELECT * FROM {self.name} "  # noqa: S608 - ours
            "WHERE tenant_id = t.tenant_id "
            "AND created_at < (SELECT clock_timestamp() - make_interval(secs => %(age)s)) "
            "ORDER BY created_at, seq LIMIT %(n)s FOR UPDATE SKIP LOCKED) o "
            "WHERE t.tenant_id IS NOT NULL LIMIT %(n)s"
        )
        cur.execute(db.with_tenants_of(self.name, oldest), {"age": min_age_seconds, "n": limit})
        return [Pending(t, stream, (int(seq),), [bytes(env)]) for t, seq, stream, env in cur.fetchall()]

    def delete(self, cur: Any, keys: Sequence[tuple[str, int]]) -> set[int]:
        if not keys:
            return set()
        cur.execute(
            f"DELETE FROM {self.name} WHERE tenant_id = ANY(%s) AND seq = ANY(%s) RETURNING seq",  # noqa: S608
            (sorted({t for t, _ in keys}), [s for _, s in keys]),
        )
        return {int(r[0]) for r in cur.fetchall()}


class Outbox:
    """The relay for one outbox table: a background thread doing the fast path and the sweep."""

    def __init__(
        self,
        engine: Engine,
        bus: Bus,
        table: OutboxTable,
        *,
        sweep_seconds: float = 1.0,
        grace_seconds: float = 5.0,
        sweep_limit: int = 100,
        fast_batch: int = 100,
    ) -> None:
        self.engine = engine
        self.bus = bus
        self.table = table
        self.sweep_seconds = sweep_seconds
        self.grace_seconds = grace_seconds
        self.sweep_limit = sweep_limit
        self.fast_batch = fast_batch
        self._queue: queue.SimpleQueue[Pending | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"outbox {table.name}", daemon=True)
        self._degraded = False
        self._next_sweep = 0.0

    # Producers.
    def enqueue(self, cur: Any, tenant_id: str, stream: str, envelopes: Sequence[bytes]) -> Pending | None:
        """Write envelopes in the caller's transaction (:class:`EnvelopeTable` only); submit the result
        once the transaction has committed."""
        if not envelopes:
            return None
        if not isinstance(self.table, EnvelopeTable):
            raise TypeError(f"{self.table.name} is written by its service's own statements")
        return self.table.insert(cur, tenant_id, stream, envelopes)

    def submit(self, pending: Pending | None) -> None:
        """Called after the commit; never blocks the caller."""
        if pending is not None and pending.envelopes:
            self._queue.put(pending)

    @property
    def degraded(self) -> bool:
        return self._degraded

    # Background protocol.
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self._stop.set()
        self._queue.put(None)  # wake the thread
        self._thread.join(timeout)

    def _run(self) -> None:
        """The relay must outlive any single failure: what it does not publish now stays in the
        table for the next sweep, so an unexpected error is logged and the loop goes on."""
        while True:
            try:
                if self._cycle():
                    return
            except Exception:
                log.exception("outbox cycle failed; what it held stays in the table", extra={"table": self.table.name})
                if self._stop.wait(0.5):
                    return

    def _cycle(self) -> bool:
        """One round of publishing; True once stopped and drained."""
        stopping = self._stop.is_set()
        timeout = max(0.0, self._next_sweep - time.monotonic())
        items: list[Pending] = []
        try:
            item = self._queue.get(timeout=0 if stopping else min(timeout, 0.5) or 0.0001)
            while True:
                if item is not None:
                    items.append(item)
                if len(items) >= self.fast_batch:
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
            self.sweep()
        return False

    def _publish_fresh(self, items: list[Pending]) -> None:
        if self._degraded:
            return  # the sweep drains the table, each tenant oldest first, until Redis is back
        try:
            with db.raw_transaction(self.engine, f"DELETE {self.table.name}", len(items)) as (cur, _):
                cur.execute("SET LOCAL synchronous_commit = off")
                taken = self.table.delete(cur, [(i.tenant_id, s) for i in items for s in i.seqs])
                live = [i for i in items if all(s in taken for s in i.seqs)]
                self._publish(live)
        except redis.RedisError as exc:
            self._enter_degraded(exc)
            return
        except sqlalchemy.exc.SQLAlchemyError:
            log.warning("fast publish failed; the sweep will retry", exc_info=True)
            return
        _published.add(sum(len(i.envelopes) for i in live), {"path": "fast"})

    def _publish(self, items: Sequence[Pending]) -> None:
        """One append per tenant and stream, in the order the rows were committed."""
        groups: dict[tuple[str, str], list[bytes]] = {}
        for i in items:
            groups.setdefault((i.tenant_id, i.stream), []).extend(i.envelopes)
        for (tenant_id, stream), envelopes in groups.items():
            self.bus.append(tenant_id, stream, envelopes)

    def _enter_degraded(self, exc: Exception) -> None:
        if not self._degraded:
            log.warning("redis unavailable; messages stay in the outbox until it returns", extra={"error": str(exc)})
        self._degraded = True

    def sweep(self) -> int:
        """Publish what the fast path did not, each tenant oldest first, until the table is empty; returns how many."""
        total = 0
        for _ in range(10_000):
            try:
                with db.raw_transaction(self.engine, f"SELECT {self.table.name} FOR UPDATE") as (cur, _):
                    rows = self.table.claim(cur, 0.0 if self._degraded else self.grace_seconds, self.sweep_limit)
                    self._publish(rows)
                    self.table.delete(cur, [(r.tenant_id, s) for r in rows for s in r.seqs])
            except redis.RedisError as exc:
                self._enter_degraded(exc)
                return total
            except sqlalchemy.exc.SQLAlchemyError:
                log.warning("outbox sweep failed; will retry", exc_info=True)
                return total
            published = sum(len(r.envelopes) for r in rows)
            if published:
                _published.add(published, {"path": "sweep"})
                total += published
            if len(rows) < self.sweep_limit:
                if self._degraded:
                    log.info("outbox drained; back to the fast path", extra={"table": self.table.name})
                    self._degraded = False
                return total
            if self._stop.is_set():
                return total
        return total
