"""One batch's way through ingest: limits, rate limit, validation, suppression, commit, hand-off
to the outbox.

:class:`Ingestor` is the facade the servicer talks to. The pure steps (validate, stamp,
serialize) are in :mod:`services.ingest.prepare`, matching against the suppression list in
:mod:`services.ingest.suppression`; this wires them to storage and Redis. It also serves the
erasure's two calls, SuppressIdentifiers and PurgeEvents.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import sqlalchemy.exc

from services.core import streams
from services.core.bus import tenant_key
from services.core.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from services.core.outbox import Outbox, Pending
from services.core.ratelimit import RateLimiter
from services.core.telemetry import inject_traceparent, meter
from services.core.tenancy import Tenant
from services.ingest import suppression, validation
from services.ingest.prepare import prepare
from services.ingest.storage import EventStore, StoredEvent, SuppressionStore
from tessera.v1 import event_pb2, ingest_pb2

log = logging.getLogger(__name__)

ACCEPTED = ingest_pb2.EVENT_STATUS_ACCEPTED
DUPLICATE = ingest_pb2.EVENT_STATUS_DUPLICATE
REJECTED = ingest_pb2.EVENT_STATUS_REJECTED
SUPPRESSED = ingest_pb2.EVENT_STATUS_SUPPRESSED

_events = meter.create_counter("tessera.ingest.events", description="events by outcome")
_batch_latency = meter.create_histogram("tessera.ingest.batch.duration", unit="s", description="batch latency")
_rate_limited = meter.create_counter("tessera.ingest.rate_limited", description="batches refused by rate limit")
_suppressions_added = meter.create_counter(
    "tessera.ingest.suppressions.added", description="identifiers added to suppression lists"
)
_purged = meter.create_counter("tessera.ingest.purged", description="events purged from the event log")


#: Metric attributes, built once (building them per batch showed in profiles). No tenant id in
#: them: tenants are unbounded, and each would be a series of its own (the SDK folds everything
#: past 2,000 series of an instrument into one overflow series). Logs name the tenant.
_STATUS = {status: {"status": status} for status in ("accepted", "duplicate", "rejected", "suppressed")}


@dataclass
class BatchOutcome:
    results: list[ingest_pb2.EventResult] = field(default_factory=list)
    accepted: int = 0
    duplicate: int = 0
    rejected: int = 0
    suppressed: int = 0


class Ingestor:
    def __init__(
        self,
        store: EventStore,
        outbox: Outbox,
        limiter: RateLimiter,
        *,
        redis_prefix: str,
        default_rate: float,
        default_burst: float,
        dedupe_window_days: int = 7,
        limits: validation.Limits = validation.DEFAULT_LIMITS,
        suppression_cache_seconds: float = 2.0,
    ) -> None:
        self.store = store
        self.suppression_store = SuppressionStore(store.engine)
        #: See :mod:`services.ingest.suppression`: a suppression applies here within this time.
        self.suppressions = suppression.SuppressionCache(self.suppression_store, suppression_cache_seconds)
        self.outbox = outbox
        self.limiter = limiter
        self.prefix = redis_prefix
        self.default_rate = default_rate
        self.default_burst = default_burst
        self.dedupe_window_days = dedupe_window_days
        self.limits = limits

    def ingest(
        self,
        tenant: Tenant,
        events: Sequence[event_pb2.Event],
        request_bytes: int,
        time_remaining: float | None = None,
    ) -> BatchOutcome:
        started = time.perf_counter()
        validation.check_batch(events, request_bytes, self.limits)
        self._rate_limit(tenant, len(events))
        received_at = dt.datetime.now(dt.UTC)
        prep = prepare(events, received_at, self.limits)
        outcome = BatchOutcome(results=prep.results)
        try:
            listed = self.suppressions.get(tenant.tenant_id)
        except sqlalchemy.exc.OperationalError as exc:
            # Never store unchecked: an erased person's events would slip in.
            raise Unavailable("the suppression list is unavailable; nothing was written, retry the batch") from exc
        if listed is not None:
            prep, _ = suppression.drop_suppressed(prep, events, listed)
        if prep.to_store:
            if time_remaining is not None:
                time_remaining -= time.perf_counter() - started
                if time_remaining <= 0:
                    raise DeadlineExceeded("deadline expired before the batch was committed; nothing was written")
            traceparent = inject_traceparent()
            try:
                written = self.store.write_batch(
                    tenant.tenant_id,
                    prep.to_store,
                    received_at,
                    traceparent,
                    timeout_seconds=time_remaining,
                    window_days=tenant.dedupe_window_days or self.dedupe_window_days,
                )
            except sqlalchemy.exc.OperationalError as exc:
                if "statement timeout" in str(exc.orig):
                    raise DeadlineExceeded("deadline expired while committing; nothing was written") from exc
                raise Unavailable("the event store is unavailable; nothing was written, retry the batch") from exc
            payloads: list[bytes] = []
            for new, pos in zip(prep.to_store, prep.positions, strict=True):
                result = prep.results[pos]
                if new.event_id in written.accepted:
                    result.status = ACCEPTED
                    result.event_id = new.event_id
                    payloads.append(new.payload)
                else:
                    result.status = DUPLICATE
                    result.event_id = written.duplicates.get(new.message_id, "")
            if written.outbox_seq is not None:
                envelopes = streams.event_envelopes(tenant.tenant_id, traceparent, payloads)
                self.outbox.submit(Pending(tenant.tenant_id, streams.EVENTS.name, (written.outbox_seq,), envelopes))
        for i, first in prep.in_batch_duplicates.items():
            prep.results[i].status = DUPLICATE
            prep.results[i].event_id = prep.results[first].event_id
        for r in prep.results:
            if r.status == ACCEPTED:
                outcome.accepted += 1
            elif r.status == DUPLICATE:
                outcome.duplicate += 1
            elif r.status == SUPPRESSED:
                outcome.suppressed += 1
            else:
                outcome.rejected += 1
        for status, count in (
            ("accepted", outcome.accepted),
            ("duplicate", outcome.duplicate),
            ("rejected", outcome.rejected),
            ("suppressed", outcome.suppressed),
        ):
            if count:
                _events.add(count, _STATUS[status])
        _batch_latency.record(time.perf_counter() - started)
        return outcome

    def stored_events(
        self, tenant_id: str, limit: int, after: tuple[str, str] | None, message_ids: Sequence[str] = ()
    ) -> list[StoredEvent]:
        """The tenant's events, newest first, after a (received_at, event_id) position."""
        return self.store.list_events(tenant_id, limit, after, message_ids)

    def suppress_identifiers(self, tenant: Tenant, request: ingest_pb2.SuppressIdentifiersRequest) -> int:
        """Put an erased person's identifiers on the tenant's suppression list (validated first);
        returns how many entries are new. This replica applies it from its next batch, every other
        one within ``suppression_cache_seconds``."""
        parsed = suppression.parse_suppression(tenant.tenant_id, request)
        try:
            added = self.suppression_store.add(tenant.tenant_id, parsed)
        except sqlalchemy.exc.OperationalError as exc:
            raise Unavailable("the suppression list is unavailable; nothing was changed, retry") from exc
        self.suppressions.invalidate()
        if added:
            _suppressions_added.add(added)
        log.info(
            "suppression list grew",
            extra={"tenant": tenant.tenant_id, "added": added, "erasure_request": parsed.erasure_request},
        )
        return added

    def purge_events(self, tenant: Tenant, request: ingest_pb2.PurgeEventsRequest) -> int:
        """Delete the tenant's events with these ids from the event log and the outbox (validated
        first); returns how many were deleted now (0 on a retry)."""
        parsed = suppression.parse_purge(request)
        try:
            purged = self.store.purge(tenant.tenant_id, parsed.event_ids, parsed.ranges)
        except sqlalchemy.exc.OperationalError as exc:
            raise Unavailable("the event store is unavailable; nothing was purged, retry") from exc
        if purged:
            _purged.add(purged)
        log.info(
            "events purged",
            extra={"tenant": tenant.tenant_id, "purged": purged, "erasure_request": parsed.erasure_request},
        )
        return purged

    def _rate_limit(self, tenant: Tenant, cost: int) -> None:
        rate = tenant.ingest_rate_limit or self.default_rate
        burst = tenant.ingest_rate_burst or max(self.default_burst, rate)
        decision = self.limiter.acquire(
            tenant_key(self.prefix, tenant.tenant_id, "ratelimit", "ingest"), cost, rate, burst
        )
        if not decision.allowed:
            _rate_limited.add(1)
            raise ResourceExhausted(
                f"tenant {tenant.tenant_id} is over its ingest rate of {rate:g} events/s; nothing was written, "
                f"retry after {decision.retry_after:.3f}s",
                retry_after=decision.retry_after,
                subject=f"tenant:{tenant.tenant_id}",
            )
