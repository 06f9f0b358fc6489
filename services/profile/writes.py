"""The write side the servicer talks to: trait updates, settings, erasure requests and exports.
Every write invalidates the caches it affects after its commit."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
from google.protobuf import json_format

from services.core.errors import InvalidArgument, NotFound, Violation
from services.core.ids import canonical_uuid
from services.profile.cache import ContextCache
from services.profile.clients import Metadata, MetricsScores, forwarded
from services.profile.consumer import ConfigCache
from services.profile.erasure import request_name
from services.profile.erasure_store import DONE, SERVICE_OF, ErasureStore, Request
from services.profile.reads import PROFILE_PREFIX, Located, ProfileReads, build_context, parse_name
from services.profile.storage import ProfileStore, suppression_hash
from services.profile.tenant_settings import ProfileConfig, apply_update
from tessera.v1 import identity_pb2, identity_pb2_grpc, profile_pb2

log = logging.getLogger(__name__)
ERASURE_PREFIX = "erasureRequests/"
EXPORT_PAGE = 1000


def erasure_proto(req: Request) -> profile_pb2.ErasureRequest:
    msg = profile_pb2.ErasureRequest(
        name=request_name(req.request_id),
        profile=PROFILE_PREFIX + req.profile_id,
        state=profile_pb2.ERASURE_STATE_DONE if req.state == DONE else profile_pb2.ERASURE_STATE_RUNNING,
        reason=req.reason,
    )
    msg.create_time.FromDatetime(req.created_at)
    if req.done_at is not None:
        msg.done_time.FromDatetime(req.done_at)
    for s in req.steps:
        msg.steps.add(service=SERVICE_OF.get(s["step"], s["step"]), done=bool(s["done"]), detail=s["detail"])
    for t in req.types:
        msg.suppressed.add(type=t)
    return msg


class ProfileWrites:
    def __init__(
        self,
        store: ProfileStore,
        erasures: ErasureStore,
        configs: ConfigCache,
        cache: ContextCache,
        reads: ProfileReads,
        scores: MetricsScores,
        identity_channel: Any,
    ) -> None:
        self.store = store
        self.erasures = erasures
        self.configs = configs
        self.cache = cache
        self.reads = reads
        self.scores = scores
        self.identity_channel = identity_channel

    def config(self, tenant_id: str) -> ProfileConfig:
        return self.store.config(tenant_id)

    def update_settings(self, tenant_id: str, new: profile_pb2.ProfileSettings, mask: Sequence[str]) -> ProfileConfig:
        updated = apply_update(self.store.config(tenant_id), new, list(mask))
        saved = self.store.save_config(tenant_id, updated)
        self.configs.forget(tenant_id)
        return saved

    def update_traits(
        self, tenant_id: str, profile_id: str, values: Mapping[str, Any], removed: Sequence[str], source: str
    ) -> None:
        out = self.store.update_traits(tenant_id, profile_id, values, removed, source, self.configs.get(tenant_id))
        self.cache.invalidate(tenant_id, out.touched)

    # -- privacy -------------------------------------------------------------------------------

    def erase(self, tenant_id: str, profile_id: str, reason: str) -> profile_pb2.ErasureRequest:
        try:
            req, members, identifiers = self.erasures.create(tenant_id, profile_id, reason)
        except LookupError:
            raise NotFound(f"profiles/{profile_id} not found") from None
        self.cache.invalidate(tenant_id, members, identifiers, forget=True)
        log.info("erasure requested", extra={"tenant": tenant_id, "request": req.request_id, "profiles": len(members)})
        return erasure_proto(req)

    def running_erasure(
        self, tenant_id: str, request: profile_pb2.ErasePersonRequest, metadata: Metadata
    ) -> profile_pb2.ErasureRequest | None:
        """The erasure running for the person an ErasePerson request names (by a profile id the
        erasure covers, or by one of their identifiers, now suppressed), if there is one."""
        if request.WhichOneof("profile") == "identifier":
            id_type, value = self.reads.normalize(tenant_id, request.identifier, metadata, "identifier")
            req = self.erasures.running(tenant_id, id_hash=suppression_hash(tenant_id, id_type, value))
        else:
            req = self.erasures.running(tenant_id, profile_id=parse_name(request.name))
        return erasure_proto(req) if req is not None else None

    def erasure(self, tenant_id: str, name: str) -> profile_pb2.ErasureRequest:
        rid = canonical_uuid(name.removeprefix(ERASURE_PREFIX)) if name.startswith(ERASURE_PREFIX) else None

        if rid is None:
            raise InvalidArgument(
                "name is not an erasure request", [Violation("name", "expected erasureRequests/{id}")]
            )
        req = self.erasures.get(tenant_id, rid)
        if req is None:
            raise NotFound(f"{name} not found")
        return erasure_proto(req)

    def export(self, tenant_id: str, located: Located, metadata: Metadata) -> dict[str, Any]:
        """Everything held about the person: profile, timeline, contacts and cases here; their
        identity graph and merges from identity; their scores from metrics."""
        config = self.configs.get(tenant_id)
        rows = self.store.profile_rows(tenant_id, located.profile_id, config, interactions=100_000)
        if rows is None:
            raise NotFound(f"profiles/{located.profile_id} not found")
        scores = self.scores.get(located.profile_id, metadata)
        context = build_context(rows, config, located, scores.to_proto())
        events: list[dict[str, Any]] = []
        after: tuple[dt.datetime, str] | None = None
        while True:
            page = self.reads.timeline(tenant_id, located, EXPORT_PAGE, after, profile_pb2.ListTimelineEventsRequest())
            events.extend(json_format.MessageToDict(e, preserving_proto_field_name=True) for e in page)
            if len(page) < EXPORT_PAGE:
                break
            last = page[-1]
            after = (last.timestamp.ToDatetime(tzinfo=dt.UTC), last.event_id)
        cases = [
            {"case_id": c["case_id"], "status": c["status"], "reason": c["reason"], "update_time": c["update_time"]}
            for c in rows["cases"]
        ]
        doc: dict[str, Any] = {
            "profile": json_format.MessageToDict(context.profile, preserving_proto_field_name=True),
            "interactions": [
                json_format.MessageToDict(i, preserving_proto_field_name=True) for i in context.recent_interactions
            ],
            "open_cases": cases,
            "timeline": events,
            "ingest": {
                "note": "ingest's event log holds exactly the events of the timeline above, as they were received",
                "events": len(events),
            },
            "identity": self._identity_section(located, metadata),
            "metrics": (
                json_format.MessageToDict(scores.metrics, preserving_proto_field_name=True)
                if scores.metrics is not None
                else {"missing": scores.missing_reason}
            ),
        }
        return doc

    def _identity_section(self, located: Located, metadata: Metadata) -> dict[str, Any]:
        stub = identity_pb2_grpc.IdentityServiceStub(self.identity_channel)
        name = PROFILE_PREFIX + located.profile_id
        try:
            graph = stub.GetIdentityGraph(
                identity_pb2.GetIdentityGraphRequest(name=name), metadata=forwarded(metadata), timeout=5
            )
            merges = stub.ListMerges(
                identity_pb2.ListMergesRequest(profile=name, page_size=1000), metadata=forwarded(metadata), timeout=5
            )
        except grpc.RpcError as err:
            return {"missing": f"identity answered {err.code().name}"}
        return {
            "graph": json_format.MessageToDict(graph, preserving_proto_field_name=True),
            "merges": json_format.MessageToDict(merges, preserving_proto_field_name=True),
        }
