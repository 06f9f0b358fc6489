"""What the profile service asks of the other services over gRPC.

- identity's normalization rules (cached per tenant; the last good copy is kept while identity
  does not answer), so an identifier is looked up normalized exactly as identity linked it;
- metrics' scores for a context, with a short deadline: when metrics is slow, down or absent
  the context says the scores are missing, and why;
- the erasure steps of identity, ingest and metrics, with service credentials (the tenant is in
  the credential), because an erasure resumes after restarts when no client call is there.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from services.core.errors import Unavailable
from services.core.identity_rules import IdentityRules, validate_rules
from services.core.tenancy import service_authorization
from tessera.v1 import (
    event_pb2,
    identity_pb2,
    identity_pb2_grpc,
    ingest_pb2,
    ingest_pb2_grpc,
    metrics_pb2,
    metrics_pb2_grpc,
    profile_pb2,
)

log = logging.getLogger(__name__)
Metadata = Sequence[tuple[str, str]]
ChannelFactory = Callable[[str], grpc.Channel]


def rules_from_proto(msg: identity_pb2.IdentityRules) -> IdentityRules:
    return validate_rules(
        {
            "default_region": msg.default_region,
            "blocked": list(msg.blocked_values),
            "types": [
                {
                    "name": t.type,
                    "normalizer": t.normalizer,
                    "priority": t.priority,
                    "max_per_profile": t.max_per_profile,
                    "blocked": list(t.blocked_values),
                }
                for t in msg.types
            ],
        }
    )


def forwarded(metadata: Metadata) -> tuple[tuple[str, str], ...]:
    """The caller's credentials, to ask another service on its behalf (same tenant, same key)."""
    return tuple((k, v) for k, v in metadata if k == "authorization")


class _Channels:
    def __init__(self, factory: ChannelFactory) -> None:
        self.factory = factory
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()

    def get(self, target: str) -> grpc.Channel:
        with self._lock:
            ch = self._channels.get(target)
            if ch is None:
                ch = self._channels[target] = self.factory(target)
            return ch

    def close(self) -> None:
        with self._lock:
            for ch in self._channels.values():
                ch.close()
            self._channels.clear()


class RulesSource:
    """A tenant's identity rules for normalizing look-ups."""

    def __init__(self, channels: _Channels, address: str, ttl: float, timeout: float = 2.0) -> None:
        self.channels = channels
        self.address = address
        self.ttl = ttl
        self.timeout = timeout
        self._cache: dict[str, tuple[float, IdentityRules]] = {}
        self._lock = threading.Lock()

    def cached(self, tenant_id: str) -> IdentityRules | None:
        """The rules if a fresh copy is at hand (no call)."""
        with self._lock:
            hit = self._cache.get(tenant_id)
        return hit[1] if hit is not None and hit[0] > time.monotonic() else None

    def get(self, tenant_id: str, metadata: Metadata) -> IdentityRules:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(tenant_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        try:
            stub = identity_pb2_grpc.IdentityServiceStub(self.channels.get(self.address))
            resp = stub.GetIdentityRules(
                identity_pb2.GetIdentityRulesRequest(), metadata=forwarded(metadata), timeout=self.timeout
            )
            rules = rules_from_proto(resp.rules)
        except grpc.RpcError as err:
            if hit is not None:
                log.warning("identity rules unavailable, using the last copy", extra={"code": str(err.code())})
                # Kept for another period, so look-ups (and the context cache's hit path) do not
                # ask identity again on every call while it does not answer.
                with self._lock:
                    if self._cache.get(tenant_id) is hit:
                        self._cache[tenant_id] = (time.monotonic() + self.ttl, hit[1])
                return hit[1]
            raise Unavailable("identity does not answer, so identifiers cannot be normalized; retry soon") from None
        with self._lock:
            self._cache[tenant_id] = (now + self.ttl, rules)
        return rules


@dataclass(frozen=True)
class Scores:
    metrics: metrics_pb2.CustomerMetrics | None
    missing_reason: str
    # Missing for a reason that may pass soon (down, slow, no facts yet): a context holding them
    # is cached briefly, so the scores come back. "Not configured" does not pass.
    transient: bool = True

    def to_proto(self) -> profile_pb2.CustomerScores:
        out = profile_pb2.CustomerScores(missing_reason=self.missing_reason)
        if self.metrics is not None:
            out.metrics.CopyFrom(self.metrics)
        return out


class MetricsScores:
    """Scores with a short deadline. After metrics was unreachable, calls are skipped for
    ``pause_s`` (the context says so at once instead of waiting out a connection each time)."""

    def __init__(self, channels: _Channels, address: str, deadline_s: float, pause_s: float = 2.0) -> None:
        self.channels = channels
        self.address = address
        self.deadline_s = deadline_s
        self.pause_s = pause_s
        self._down_until = 0.0

    def get(self, profile_id: str, metadata: Metadata) -> Scores:
        return self.start(profile_id, metadata).result()

    def start(self, profile_id: str, metadata: Metadata) -> PendingScores:
        """Ask now, read the answer later: a cache miss asks before it reads the profile's rows,
        so the metrics round trip overlaps the SQL instead of following it."""
        if not self.address:
            return PendingScores.ready(
                Scores(None, "no metrics service is configured (TESSERA_PROFILE_METRICS_ADDRESS)", transient=False)
            )
        if time.monotonic() < self._down_until:
            return PendingScores.ready(Scores(None, "metrics service unavailable"))
        stub = metrics_pb2_grpc.MetricsServiceStub(self.channels.get(self.address))
        call = stub.GetCustomerMetrics.future(
            metrics_pb2.GetCustomerMetricsRequest(profile=f"profiles/{profile_id}"),
            metadata=forwarded(metadata),
            timeout=self.deadline_s,
            wait_for_ready=False,
        )
        return PendingScores(call, self)

    def answer_of(self, call: Any) -> Scores:
        """The scores a finished (or failed) call gives; an unreachable service is skipped a while."""
        try:
            resp = call.result()
            self._down_until = 0.0
        except grpc.RpcError as err:
            code = err.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return Scores(None, f"metrics service did not answer within {self.deadline_s * 1000:.0f} ms")
            if code == grpc.StatusCode.UNIMPLEMENTED:
                return Scores(None, "metrics service does not serve customer metrics")
            if code == grpc.StatusCode.NOT_FOUND:
                return Scores(None, "metrics service has no facts about this customer yet")
            if code == grpc.StatusCode.UNAVAILABLE:
                self._down_until = time.monotonic() + self.pause_s
                return Scores(None, "metrics service unavailable")
            return Scores(None, f"metrics service answered {code.name}")
        return Scores(resp.metrics, "")


class PendingScores:
    """A ``GetCustomerMetrics`` call in flight (or an answer known without one)."""

    def __init__(self, call: Any, source: MetricsScores | None, known: Scores | None = None) -> None:
        self._call = call
        self._source = source
        self._known = known

    @classmethod
    def ready(cls, scores: Scores) -> PendingScores:
        return cls(None, None, scores)

    def result(self) -> Scores:
        if self._known is None:
            if self._source is None:  # pragma: no cover - ready() always sets an answer
                raise RuntimeError("no call and no answer")
            self._known = self._source.answer_of(self._call)
        return self._known

    def cancel(self) -> None:
        """Not needed after all (the profile is not there): stop the call."""
        if self._call is not None and self._known is None:
            self._call.cancel()


class ErasureCalls:
    """The other services' parts of an erasure, with service credentials."""

    def __init__(
        self, channels: _Channels, token: str | None, identity: str, ingest: str, metrics: str, timeout: float = 30.0
    ) -> None:
        self.channels = channels
        self.token = token
        self.identity = identity
        self.ingest = ingest
        self.metrics = metrics
        self.timeout = timeout

    def _metadata(self, tenant_id: str) -> tuple[tuple[str, str], ...]:
        if not self.token:
            raise Unavailable(
                "TESSERA_SERVICE_TOKEN is not set, so profile cannot act for the tenant in other services"
            )
        return (("authorization", service_authorization(tenant_id, self.token)),)

    def erase_identity(self, tenant_id: str, profile_id: str, reason: str) -> identity_pb2.EraseProfileResponse:
        stub = identity_pb2_grpc.IdentityServiceStub(self.channels.get(self.identity))
        return stub.EraseProfile(  # type: ignore[no-any-return]
            identity_pb2.EraseProfileRequest(name=f"profiles/{profile_id}", reason=reason),
            metadata=self._metadata(tenant_id),
            timeout=self.timeout,
        )

    def identity_rules(self, tenant_id: str) -> identity_pb2.IdentityRules:
        stub = identity_pb2_grpc.IdentityServiceStub(self.channels.get(self.identity))
        resp = stub.GetIdentityRules(
            identity_pb2.GetIdentityRulesRequest(), metadata=self._metadata(tenant_id), timeout=self.timeout
        )
        return resp.rules  # type: ignore[no-any-return]

    def suppress(
        self,
        tenant_id: str,
        identifiers: Sequence[tuple[str, str]],
        normalizers: Sequence[tuple[str, str]],
        region: str,
        request: str,
    ) -> int:
        stub = ingest_pb2_grpc.IngestServiceStub(self.channels.get(self.ingest))
        added = 0
        for i in range(0, max(len(identifiers), 1), 1000):
            chunk = identifiers[i : i + 1000]
            resp = stub.SuppressIdentifiers(
                ingest_pb2.SuppressIdentifiersRequest(
                    identifiers=[event_pb2.Identifier(type=t, value=v) for t, v in chunk],
                    normalizers=[ingest_pb2.SuppressionNormalizer(type=t, normalizer=n) for t, n in normalizers],
                    default_region=region,
                    erasure_request=request,
                ),
                metadata=self._metadata(tenant_id),
                timeout=self.timeout,
            )
            added += resp.added_count
        return added

    def purge(self, tenant_id: str, event_ids: Sequence[str], request: str) -> int:
        stub = ingest_pb2_grpc.IngestServiceStub(self.channels.get(self.ingest))
        resp = stub.PurgeEvents(
            ingest_pb2.PurgeEventsRequest(event_ids=list(event_ids), erasure_request=request),
            metadata=self._metadata(tenant_id),
            timeout=self.timeout,
        )
        return int(resp.purged_count)

    def erase_metrics(self, tenant_id: str, profile_ids: Sequence[str], request: str) -> str:
        """What metrics forgot, or why there was nothing to ask."""
        if not self.metrics:
            return "no metrics service is configured"
        stub = metrics_pb2_grpc.MetricsServiceStub(self.channels.get(self.metrics))
        try:
            resp = stub.EraseCustomerMetrics(
                metrics_pb2.EraseCustomerMetricsRequest(profile_ids=list(profile_ids), erasure_request=request),
                metadata=self._metadata(tenant_id),
                timeout=self.timeout,
            )
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                return "the metrics service keeps no per-customer facts yet"
            raise
        return f"{resp.erased_count} customer facts erased"


def channels(factory: ChannelFactory) -> _Channels:
    return _Channels(factory)


__all__ = [
    "ErasureCalls",
    "MetricsScores",
    "PendingScores",
    "RulesSource",
    "Scores",
    "channels",
    "forwarded",
    "rules_from_proto",
]
