"""The erasure worker: drives each ErasePerson request through the other services' parts, one
idempotent step at a time, its progress stored after each, so it survives a restart of any
service (this one included) midway.

Order matters, so no copy of the person can come back:

1. **suppress** at ingest (normalized as identity's rules say), so no new event of theirs is stored;
2. **settle**: wait until every ingest replica applies it (its cache lifetime plus a margin);
3. **drain**: wait until identity has processed every event ingested before that, then until
   this service has processed what identity made of them (dropping them, since the profile is
   erased and its identifiers suppressed here too, and noting their ids for the purge);
4. **identity**: its EraseProfile (now nothing in flight can re-create the person there);
5. **metrics**: its per-customer facts;
6. **purge** ingest's event log of every event of theirs;
7. **streams**: delete their entries from the events and resolved streams and dead letters.

Profile's own part is done when the request is created.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import grpc

from services.core import streams
from services.core.bus import Bus
from services.core.errors import TesseraError
from services.core.leader import Leader
from services.profile.cache import ContextCache
from services.profile.clients import ErasureCalls
from services.profile.consumer import CHANGES_GROUP, RESOLVED_GROUP
from services.profile.erasure_store import ErasureStore, Request

log = logging.getLogger(__name__)
IDENTITY_GROUP = "identity"
LEASE_SECONDS = 120.0
PURGE_CHUNK = 1000


def request_name(request_id: str) -> str:
    return f"erasureRequests/{request_id}"


class ErasureWorker:
    """A background thread. Given a ``leader``, it works only while this process leads (pending
    erasures are singleton work); two leaders overlapping briefly still never run one step twice at
    once, since each request is claimed with a lease."""

    def __init__(
        self,
        store: ErasureStore,
        calls: ErasureCalls,
        bus: Bus,
        cache: ContextCache,
        *,
        settle_seconds: float,
        poll_seconds: float,
        lease_seconds: float = LEASE_SECONDS,
        leader: Leader | None = None,
    ) -> None:
        self.store = store
        self.calls = calls
        self.bus = bus
        self.cache = cache
        self.settle_seconds = settle_seconds
        self.poll_seconds = poll_seconds
        self.lease_seconds = lease_seconds
        self.leader = leader
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="profile-erasure", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.leader is not None and not self.leader.wait_leading(self.poll_seconds):
                continue
            try:
                worked = self.run_once()
            except Exception:
                log.exception("erasure worker cycle failed")
                worked = False
            if not worked:
                self._stop.wait(self.poll_seconds)

    def run_once(self) -> bool:
        """Advance one due request by one step; False when none was due."""
        req = self.store.claim(self.lease_seconds)
        if req is None:
            return False
        self.advance(req)
        return True

    def advance(self, req: Request) -> None:
        step = req.next_step()
        if step is None:
            self.store.save(req)
            return
        name = step["step"]
        try:
            wait, forget = getattr(self, f"_{name}")(req, step)
        except (grpc.RpcError, TesseraError, OSError) as exc:
            reason = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)  # type: ignore[union-attr]
            step["detail"] = f"will retry: {reason}"
            delay = min(60.0, 0.5 * 2 ** min(req.attempts, 7))
            log.warning("erasure step failed", extra={"step": name, "tenant": req.tenant_id, "retry_in": delay})
            self.store.save(req, delay_seconds=delay, failed=True)
            return
        if wait is not None:
            self.store.save(req, delay_seconds=wait)
            return
        step["done"] = True
        self.store.save(req, forget_identifiers=forget)
        if req.state == 2:
            self.cache.invalidate(req.tenant_id, req.member_ids, forget=True)
            log.info("erasure done", extra={"tenant": req.tenant_id, "request": req.request_id})

    # -- steps: each returns (seconds to wait before looking again or None when done, forget identifiers)

    def _suppress(self, req: Request, step: dict[str, Any]) -> tuple[float | None, bool]:
        if not req.identifiers:
            step["detail"] = "no identifiers to suppress"
            req.marks["suppressed_at"] = time.time()
            return None, False
        rules = self.calls.identity_rules(req.tenant_id)
        normalizers = sorted({(t.type, t.normalizer) for t in rules.types})
        added = self.calls.suppress(
            req.tenant_id, req.identifiers, normalizers, rules.default_region, request_name(req.request_id)
        )
        req.marks["suppressed_at"] = time.time()
        step["detail"] = f"{len(req.identifiers)} identifiers on ingest's suppression list ({added} new)"
        return None, True

    def _settle(self, req: Request, step: dict[str, Any]) -> tuple[float | None, bool]:
        left = float(req.marks.get("suppressed_at", 0)) + self.settle_seconds - time.time()
        if left > 0:
            step["detail"] = "waiting for every ingest replica to apply the suppression"
            return left, False
        step["detail"] = "suppression in effect on every ingest replica"
        return None, False

    def _drain(self, req: Request, step: dict[str, Any]) -> tuple[float | None, bool]:
        t = req.tenant_id
        if "events_mark" not in req.marks:
            req.marks["events_mark"] = self.bus.last_id(t, streams.EVENTS.name)
        if not self.bus.caught_up(t, streams.EVENTS.name, IDENTITY_GROUP, req.marks["events_mark"]):
            step["detail"] = "waiting for identity to process the events ingested before the suppression"
            return 0.25, False
        if "resolved_mark" not in req.marks:
            req.marks["resolved_mark"] = self.bus.last_id(t, streams.RESOLVED.name)
        if not self.bus.caught_up(t, streams.RESOLVED.name, RESOLVED_GROUP, req.marks["resolved_mark"]):
            step["detail"] = "waiting for profile to process what identity resolved before the suppression"
            return 0.25, False
        if not self.bus.caught_up(t, streams.CHANGES.name, CHANGES_GROUP, self.bus.last_id(t, streams.CHANGES.name)):
            step["detail"] = "waiting for profile to apply identity's pending changes"
            return 0.25, False
        step["detail"] = "nothing of theirs is in flight"
        return None, False

    def _identity(self, req: Request, step: dict[str, Any]) -> tuple[float | None, bool]:
        try:
            resp = self.calls.erase_identity(req.tenant_id, req.profile_id, req.reason)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                raise
            step["detail"] = "identity holds nothing of theirs"
            return None, False
        step["detail"] = f"{resp.identifiers_erased} identifiers and {len(resp.erased_profile_ids)} profile ids erased"
        return None, False

    def _metrics(self, req: Request, step: dict[str, Any]) -> tuple[float | None, bool]:
        step["detail"] = self.calls.erase_metrics(req.tenant_id, req.member_ids, request_name(req.request_id))
        return None, False

    def _purge(self, req: Request, step: dict[str, Any]) -> tuple[float | None, bool]:
        ids = self.store.event_ids(req.tenant_id, req.request_id, 10_000_000)
        purged = 0
        for i in range(0, len(ids), PURGE_CHUNK):
            purged += self.calls.purge(req.tenant_id, ids[i : i + PURGE_CHUNK], request_name(req.request_id))
        req.marks["events"] = len(ids)
        step["detail"] = f"{purged} events deleted from ingest's event log ({len(ids)} known)"
        return None, False

    def _streams(self, req: Request, step: dict[str, Any]) -> tuple[float | None, bool]:
        ids = set(self.store.event_ids(req.tenant_id, req.request_id, 10_000_000))
        deleted = 0
        if ids:
            for spec in (streams.EVENTS, streams.RESOLVED):

                def doomed(raw: bytes, spec: Any = spec) -> bool:
                    try:
                        env = streams.decode(spec, raw)
                    except streams.UndecodableEntry:
                        return False
                    return env.event.event_id in ids  # type: ignore[attr-defined]

                deleted += self.bus.scrub(req.tenant_id, spec.name, doomed)
        self.store.forget_events(req.tenant_id, req.request_id, sorted(ids))
        step["detail"] = f"{deleted} stream entries deleted"
        return None, False
