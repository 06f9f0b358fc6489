"""A transactional outbox for stream messages a service must never lose.

The message is inserted in the same transaction as the change it announces; after the commit it
is published and its row deleted. If Redis is down, or the process dies in between, the sweeper
(a background worker in every replica, ``SKIP LOCKED`` so replicas share the work) publishes what
is older than a grace period. A message may then go out twice; consumers are idempotent.

Each service keeps its own ``<schema>.outbox`` table (tenant_id, seq, stream, fields jsonb,
created_at), created by its migrations.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from typing import Any

from sqlalchemy.engine import Engine

from services.core import db
from services.core.bus import Bus, Publication
from services.core.telemetry import meter

log = logging.getLogger(__name__)

_swept = meter.create_counter("tessera.outbox.swept", description="messages published by the outbox sweeper")


class Outbox:
    def __init__(
        self, engine: Engine, bus: Bus, schema: str, *, grace_seconds: float = 5.0, sweep_seconds: float = 1.0
    ) -> None:
        self.engine = engine
        self.bus = bus
        self.table = f'"{schema}".outbox'
        self.grace_seconds = grace_seconds
        self.sweep_seconds = sweep_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{schema}-outbox", daemon=True)

    def enqueue(self, cur: Any, items: Sequence[Publication]) -> list[tuple[str, int]]:
        """Insert inside the caller's transaction; returns the rows' keys for :meth:`flush`."""
        if not items:
            return []
        cur.execute(
            f"INSERT INTO {self.table} (tenant_id, stream, fields) "  # noqa: S608 - schema is ours, not input
            "SELECT t, s, f::jsonb FROM unnest(%s::text[], %s::text[], %s::text[]) AS m(t, s, f) "
            "RETURNING tenant_id, seq",
            (
                [i.tenant_id for i in items],
                [i.stream for i in items],
                [json.dumps({k: _text(v) for k, v in i.fields.items()}) for i in items],
            ),
        )
        return [(t, int(s)) for t, s in cur.fetchall()]

    def flush(self, items: Sequence[Publication], keys: Sequence[tuple[str, int]]) -> None:
        """Publish what was just committed and delete its rows; on failure the sweeper takes over."""
        if not items:
            return
        try:
            self.bus.publish(items)
            with db.raw_transaction(self.engine, f"DELETE {self.table}", len(keys)) as (cur, _):
                cur.execute("SET LOCAL synchronous_commit = off")  # a lost delete only republishes
                self._delete(cur, keys)
        except Exception:
            log.warning("publish after commit failed; the outbox sweeper will retry", exc_info=True)

    def sweep(self, limit: int = 500) -> int:
        """Publish rows older than the grace period (their own process did not); returns how many."""
        with db.raw_transaction(self.engine, f"SELECT {self.table} FOR UPDATE") as (cur, _):
            cur.execute(
                f"SELECT tenant_id, seq, stream, fields FROM {self.table} "  # noqa: S608 - schema is ours
                "WHERE created_at < clock_timestamp() - make_interval(secs => %s) "
                "ORDER BY created_at, seq LIMIT %s FOR UPDATE SKIP LOCKED",
                (self.grace_seconds, limit),
            )
            rows = cur.fetchall()
            if not rows:
                return 0
            items = [Publication(t, s, dict(f)) for t, _seq, s, f in rows]
            self.bus.publish(items)
            self._delete(cur, [(t, seq) for t, seq, _s, _f in rows])
        _swept.add(len(rows))
        return len(rows)

    def _delete(self, cur: Any, keys: Sequence[tuple[str, int]]) -> None:
        cur.execute(
            f"DELETE FROM {self.table} WHERE tenant_id = ANY(%s) AND seq = ANY(%s)",  # noqa: S608 - schema is ours
            (sorted({t for t, _ in keys}), [s for _, s in keys]),
        )

    # Background protocol.
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.sweep_seconds):
            try:
                while self.sweep() and not self._stop.is_set():
                    pass
            except Exception:
                log.warning("outbox sweep failed; will retry", exc_info=True)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
