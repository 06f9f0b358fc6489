"""IdentityService over gRPC. Another tenant's ids are always NOT_FOUND, never PERMISSION_DENIED,
so their existence does not leak: every query is scoped by the tenant from the credentials."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import grpc

from services.core import pagination
from services.core.errors import InvalidArgument, NotFound, Violation
from services.core.tenancy import current_tenant
from services.identity.resolver import Resolver
from services.identity.rules import IdentityRules
from services.identity.rules_store import apply_update, to_proto
from services.identity.stitching import Key
from services.identity.storage import IdentityStore, canonical_uuid
from tessera.v1 import event_pb2, identity_pb2, identity_pb2_grpc

log = logging.getLogger(__name__)

PROFILE_PREFIX = "profiles/"
SUGGESTION_PREFIX = "matchSuggestions/"


def profile_name(profile_id: str) -> str:
    return PROFILE_PREFIX + profile_id


def parse_profile_name(name: str, field: str) -> str:
    """The id in ``profiles/{id}`` (a bare id is accepted too), or INVALID_ARGUMENT naming the field."""
    if not name:
        raise InvalidArgument(f"{field} is required", [Violation(field, "required: profiles/{profile_id}", "REQUIRED")])
    pid = canonical_uuid(name.removeprefix(PROFILE_PREFIX))
    if pid is None:
        raise InvalidArgument(
            f"{field} is not a profile name",
            [Violation(field, "must be profiles/{profile_id} with a UUID profile id", "INVALID_FORMAT")],
        )
    return pid


def normalize_all(rules: IdentityRules, idents: Sequence[event_pb2.Identifier], field: str) -> list[Key]:
    """Normalized keys in request order, or INVALID_ARGUMENT with one violation per bad identifier."""
    keys: list[Key] = []
    violations: list[Violation] = []
    for i, ident in enumerate(idents):
        result = rules.normalize(ident.type, ident.value)
        if result.value is None:
            why = {
                "UNKNOWN_TYPE": f"identifier type {ident.type!r} is not configured for this tenant",
                "INVALID": f"not a valid {ident.type} value",
                "BLOCKED": "a blocked placeholder value; it never links a profile",
            }[str(result.dropped)]
            path = f"{field}[{i}].type" if str(result.dropped) == "UNKNOWN_TYPE" else f"{field}[{i}].value"
            violations.append(Violation(path, why, str(result.dropped)))
        else:
            keys.append((ident.type, result.value))
    if violations:
        raise InvalidArgument("invalid identifiers", violations)
    return keys


def merge_proto(row: Sequence[Any]) -> identity_pb2.Merge:
    merge_id, kind, survivor, absorbed, idents, event_id, rule, reason, created_at, score, evidence = row
    idents = json.loads(idents) if isinstance(idents, str) else idents
    evidence = json.loads(evidence) if isinstance(evidence, str) else evidence
    msg = identity_pb2.Merge(
        name=f"merges/{merge_id}",
        kind=kind,
        survivor_profile_id=survivor,
        absorbed_profile_id=absorbed,
        identifiers=[event_pb2.Identifier(type=t, value=v) for t, v in idents],
        event_id=event_id,
        rule=rule,
        reason=reason,
        score=score,
        evidence={str(k): float(v) for k, v in (evidence or {}).items()},
    )
    msg.create_time.FromDatetime(created_at)
    return msg


def _suggestion_position(position: Any) -> bool:
    """[score, suggestion id], as ListMatchSuggestions issues it."""
    return (
        isinstance(position, list)
        and len(position) == 2
        and isinstance(position[0], int | float)
        and isinstance(position[1], int)
        and not isinstance(position[1], bool)
    )


def suggestion_proto(row: Sequence[Any]) -> identity_pb2.MatchSuggestion:
    suggestion_id, a, b, score, evidence, state, created_at = row
    evidence = json.loads(evidence) if isinstance(evidence, str) else evidence
    msg = identity_pb2.MatchSuggestion(
        name=f"{SUGGESTION_PREFIX}{suggestion_id}",
        profile_a=profile_name(a),
        profile_b=profile_name(b),
        score=score,
        evidence={str(k): float(v) for k, v in (evidence or {}).items()},
        state=state,
    )
    msg.create_time.FromDatetime(created_at)
    return msg


class IdentityServicer(identity_pb2_grpc.IdentityServiceServicer):
    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self.store: IdentityStore = resolver.store

    def _survivor(self, tenant_id: str, pid: str) -> str:
        final = self.store.survivor(tenant_id, pid)
        if final is None:
            raise NotFound(f"{profile_name(pid)} not found")
        return final

    # ------------------------------------------------------------------------------------------

    def ResolveIdentifiers(
        self, request: identity_pb2.ResolveIdentifiersRequest, context: grpc.ServicerContext
    ) -> identity_pb2.ResolveIdentifiersResponse:
        tenant = current_tenant().tenant_id
        if not request.identifiers:
            raise InvalidArgument(
                "identifiers are required", [Violation("identifiers", "name at least one", "REQUIRED")]
            )
        rules = self.resolver.rules.get(tenant)
        keys = normalize_all(rules, request.identifiers, "identifiers")
        owners = {k: row[0] for k, row in self.store.identifier_rows(tenant, keys).items()}
        if not owners:
            raise NotFound("no profile has these identifiers")
        # Several profiles (merge protection kept them apart): the most trusted identifier decides.
        best = min(owners, key=lambda k: (-rules.types[k[0]].priority, k))
        pid = owners[best]
        return identity_pb2.ResolveIdentifiersResponse(profile=profile_name(pid), profile_id=pid)

    def GetIdentityGraph(
        self, request: identity_pb2.GetIdentityGraphRequest, context: grpc.ServicerContext
    ) -> identity_pb2.GetIdentityGraphResponse:
        tenant = current_tenant().tenant_id
        asked = parse_profile_name(request.name, "name")
        pid = self._survivor(tenant, asked)
        graph = identity_pb2.IdentityGraph(profile=profile_name(pid), profile_id=pid, redirected=pid != asked)
        for id_type, value, first, last, source, first_event, _origin in self.store.identifiers(tenant, pid):
            item = graph.identifiers.add(type=id_type, value=value, source=source, first_event_id=first_event)
            item.first_seen.FromDatetime(first)
            item.last_seen.FromDatetime(last)
        graph.merges.extend(merge_proto(r) for r in self.store.merges(tenant, profile_ids=[pid]))
        return identity_pb2.GetIdentityGraphResponse(graph=graph)

    def ExplainLink(
        self, request: identity_pb2.ExplainLinkRequest, context: grpc.ServicerContext
    ) -> identity_pb2.ExplainLinkResponse:
        tenant = current_tenant().tenant_id
        rules = self.resolver.rules.get(tenant)
        sides = [self._anchor(tenant, rules, request, side) for side in ("a", "b")]
        (label_a, start_a, owner_a, ev_a), (label_b, start_b, owner_b, ev_b) = sides
        if owner_a != owner_b:
            return identity_pb2.ExplainLinkResponse(
                linked=False,
                summary=f"not linked: {label_a} is on {profile_name(owner_a)}, {label_b} on {profile_name(owner_b)}",
            )
        path_a = {r[0]: r for r in self.store.merge_path(tenant, start_a)}
        path_b = {r[0]: r for r in self.store.merge_path(tenant, start_b)}
        chain_ids = sorted(set(path_a) ^ set(path_b))
        chain = [merge_proto({**path_a, **path_b}[i]) for i in chain_ids]
        if not chain:
            # No merge joined them: each joined this profile with the event that first carried it
            # (alongside an identifier the profile already had).
            joined = [f"{label} joined it with event {ev}" for label, ev in ((label_a, ev_a), (label_b, ev_b)) if ev]
            how = "no merge was needed; " + "; ".join(joined) if joined else "they are the same profile"
        else:
            steps = [
                f"profiles/{m.absorbed_profile_id} merged into profiles/{m.survivor_profile_id}"
                + (f" by event {m.event_id}" if m.event_id else f" ({m.rule})")
                for m in chain
            ]
            how = "; ".join(steps)
        return identity_pb2.ExplainLinkResponse(
            linked=True, chain=chain, summary=f"linked on {profile_name(owner_a)}: {how}"
        )

    def _anchor(
        self, tenant: str, rules: IdentityRules, request: identity_pb2.ExplainLinkRequest, side: str
    ) -> tuple[str, str, str, str]:
        """(label, where its merge path starts, its active profile, its first event) for one side."""
        which = request.WhichOneof(side)  # type: ignore[call-overload]
        if which is None:
            raise InvalidArgument(
                f"side {side} is missing",
                [Violation(f"identifier_{side}", f"set identifier_{side} or profile_{side}", "REQUIRED")],
            )
        if which.startswith("identifier"):
            ident = getattr(request, which)
            (key,) = normalize_all(rules, [ident], which)
            row = self.store.identifier_rows(tenant, [key]).get(key)
            if row is None:
                raise NotFound(f"identifier {key[0]}:{key[1]} is not known")
            owner, origin, first_event = row
            return f"{key[0]}:{key[1]}", origin, owner, first_event
        pid = parse_profile_name(getattr(request, which), which)
        return profile_name(pid), pid, self._survivor(tenant, pid), ""

    def MergeProfiles(
        self, request: identity_pb2.MergeProfilesRequest, context: grpc.ServicerContext
    ) -> identity_pb2.MergeProfilesResponse:
        tenant = current_tenant().tenant_id
        survivor = parse_profile_name(request.survivor_profile, "survivor_profile")
        absorbed = parse_profile_name(request.absorbed_profile, "absorbed_profile")
        reason = _require_reason(request.reason)
        recorded, _pubs = self.resolver.merge(tenant, survivor, absorbed, reason)
        return identity_pb2.MergeProfilesResponse(merge=self._merge(tenant, recorded.merge_id))

    def UnmergeProfile(
        self, request: identity_pb2.UnmergeProfileRequest, context: grpc.ServicerContext
    ) -> identity_pb2.UnmergeProfileResponse:
        tenant = current_tenant().tenant_id
        pid = parse_profile_name(request.profile, "profile")
        if not request.identifiers:
            raise InvalidArgument(
                "identifiers are required", [Violation("identifiers", "name the identifiers to split off", "REQUIRED")]
            )
        reason = _require_reason(request.reason)
        keys = normalize_all(self.resolver.rules.get(tenant), request.identifiers, "identifiers")
        recorded, _moved, _pubs = self.resolver.unmerge(tenant, pid, keys, reason)
        return identity_pb2.UnmergeProfileResponse(merge=self._merge(tenant, recorded.merge_id))

    def _merge(self, tenant: str, merge_id: int) -> identity_pb2.Merge:
        rows = self.store.merges(tenant, limit=1, before=merge_id + 1)
        return merge_proto(rows[0])

    def ListMerges(
        self, request: identity_pb2.ListMergesRequest, context: grpc.ServicerContext
    ) -> identity_pb2.ListMergesResponse:
        tenant = current_tenant().tenant_id
        size = pagination.page_size(request.page_size)
        query = {"profile": request.profile}
        before = pagination.decode_token(
            request.page_token, query, valid=lambda p: isinstance(p, int) and not isinstance(p, bool)
        )
        pids = None
        if request.profile:
            pids = [self._survivor(tenant, parse_profile_name(request.profile, "profile"))]
        rows = self.store.merges(tenant, profile_ids=pids, limit=size + 1, before=before)
        resp = identity_pb2.ListMergesResponse(merges=[merge_proto(r) for r in rows[:size]])
        if len(rows) > size:
            resp.next_page_token = pagination.encode_token(rows[size - 1][0], query)
        return resp

    def GetIdentityRules(
        self, request: identity_pb2.GetIdentityRulesRequest, context: grpc.ServicerContext
    ) -> identity_pb2.GetIdentityRulesResponse:
        tenant = current_tenant().tenant_id
        return identity_pb2.GetIdentityRulesResponse(rules=to_proto(self.resolver.rules.get_full(tenant)))

    def UpdateIdentityRules(
        self, request: identity_pb2.UpdateIdentityRulesRequest, context: grpc.ServicerContext
    ) -> identity_pb2.UpdateIdentityRulesResponse:
        tenant = current_tenant().tenant_id
        if not request.HasField("rules"):
            raise InvalidArgument("rules are required", [Violation("rules", "required", "REQUIRED")])
        current = self.resolver.rules.get_full(tenant)
        rules, prob = apply_update(current, request.rules, list(request.update_mask.paths))
        updated = self.resolver.rules.update(tenant, rules, prob)
        return identity_pb2.UpdateIdentityRulesResponse(rules=to_proto(updated))

    def EraseProfile(
        self, request: identity_pb2.EraseProfileRequest, context: grpc.ServicerContext
    ) -> identity_pb2.EraseProfileResponse:
        tenant = current_tenant().tenant_id
        pid = parse_profile_name(request.name, "name")
        reason = _require_reason(request.reason)
        target, deleted, ids = self.resolver.erase(tenant, pid)
        log.info("erasure requested", extra={"tenant": tenant, "profile": target, "reason": reason})
        return identity_pb2.EraseProfileResponse(
            profile=profile_name(target), identifiers_erased=deleted, erased_profile_ids=ids
        )

    def ListMatchSuggestions(
        self, request: identity_pb2.ListMatchSuggestionsRequest, context: grpc.ServicerContext
    ) -> identity_pb2.ListMatchSuggestionsResponse:
        tenant = current_tenant().tenant_id
        state = request.state or identity_pb2.MATCH_SUGGESTION_STATE_OPEN
        size = pagination.page_size(request.page_size)
        query = {"state": int(state)}
        after = pagination.decode_token(request.page_token, query, valid=_suggestion_position)
        rows = self.store.suggestions(tenant, int(state), size + 1, tuple(after) if after else None)
        resp = identity_pb2.ListMatchSuggestionsResponse(suggestions=[suggestion_proto(r) for r in rows[:size]])
        if len(rows) > size:
            last = rows[size - 1]
            resp.next_page_token = pagination.encode_token([last[3], last[0]], query)
        return resp

    def ReviewMatchSuggestion(
        self, request: identity_pb2.ReviewMatchSuggestionRequest, context: grpc.ServicerContext
    ) -> identity_pb2.ReviewMatchSuggestionResponse:
        tenant = current_tenant().tenant_id
        raw = request.name.removeprefix(SUGGESTION_PREFIX)
        if not raw.isdigit() or not request.name.startswith(SUGGESTION_PREFIX):
            raise InvalidArgument(
                "name is not a suggestion name",
                [
                    Violation(
                        "name", "must be matchSuggestions/{id} as ListMatchSuggestions returns it", "INVALID_FORMAT"
                    )
                ],
            )
        reason = request.reason.strip()
        if len(reason) > 1000:
            raise InvalidArgument("reason is too long", [Violation("reason", "at most 1000 characters", "TOO_LONG")])
        row, recorded, _pubs = self.resolver.review(tenant, int(raw), request.accept, reason)
        resp = identity_pb2.ReviewMatchSuggestionResponse(suggestion=suggestion_proto(row))
        if recorded is not None:
            resp.merge.CopyFrom(self._merge(tenant, recorded.merge_id))
        return resp


def _require_reason(reason: str) -> str:
    reason = reason.strip()
    if not reason:
        raise InvalidArgument("a reason is required", [Violation("reason", "say why, for the audit trail", "REQUIRED")])
    if len(reason) > 1000:
        raise InvalidArgument("reason is too long", [Violation("reason", "at most 1000 characters", "TOO_LONG")])
    return reason
