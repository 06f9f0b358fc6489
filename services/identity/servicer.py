"""IdentityService over gRPC. Another tenant's ids are always NOT_FOUND, never PERMISSION_DENIED,
so their existence does not leak: every query is scoped by the tenant from the credentials.

Writes go through the :class:`~services.identity.resolver.Resolver`, reads through
:class:`~services.identity.reads.IdentityReads`; protos are built from their views only."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from services.core import pagination
from services.core.errors import InvalidArgument, NotFound, Violation
from services.core.identity_rules import IdentityRules
from services.core.ids import canonical_uuid
from services.core.tenancy import current_tenant
from services.identity.reads import IdentityReads, MergeView, ScoreView, SuggestionView
from services.identity.resolver import Resolver
from services.identity.rules_store import apply_update, to_proto
from services.identity.stitching import Key
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


# One request names at most this many identifiers (a person's identifiers, not a bulk export).
MAX_REQUEST_IDENTIFIERS = 100


def normalize_all(rules: IdentityRules, idents: Sequence[event_pb2.Identifier], field: str) -> list[Key]:
    """Normalized keys in request order, or INVALID_ARGUMENT with one violation per bad identifier."""
    if len(idents) > MAX_REQUEST_IDENTIFIERS:
        raise InvalidArgument(
            f"too many {field}",
            [Violation(field, f"at most {MAX_REQUEST_IDENTIFIERS} identifiers, got {len(idents)}", "TOO_MANY")],
        )
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


def merge_proto(m: MergeView) -> identity_pb2.Merge:
    msg = identity_pb2.Merge(
        name=f"merges/{m.merge_id}",
        kind=m.kind,  # type: ignore[arg-type]
        survivor_profile_id=m.survivor_profile_id,
        absorbed_profile_id=m.absorbed_profile_id,
        identifiers=[event_pb2.Identifier(type=t, value=v) for t, v in m.identifiers],
        event_id=m.event_id,
        rule=m.rule,
        reason=m.reason,
        score=m.score,
        evidence=m.evidence,
    )
    if m.scored is not None:
        msg.field_evidence.extend(_field_evidence(m.scored))
        msg.total_bits = m.scored.total_bits
        msg.prior_bits = m.scored.prior_bits
    msg.create_time.FromDatetime(m.created_at)
    return msg


def _field_evidence(scored: ScoreView) -> list[identity_pb2.FieldEvidence]:
    return [
        identity_pb2.FieldEvidence(
            field=f.field,
            level=f.level,
            weight_bits=f.weight_bits,
            tf_adjustment_bits=f.tf_adjustment_bits,
            counted=f.counted,
        )
        for f in scored.fields
    ]


def event_text(event_id: str, message_id: str) -> str:
    """An evidence event as the summary names it: our id, and the client's message_id when known."""
    return f"event {event_id}" + (f" (message_id {json.dumps(message_id, ensure_ascii=False)})" if message_id else "")


def _suggestion_position(position: Any) -> bool:
    """[score, suggestion id], as ListMatchSuggestions issues it."""
    return (
        isinstance(position, list)
        and len(position) == 2
        and isinstance(position[0], int | float)
        and isinstance(position[1], int)
        and not isinstance(position[1], bool)
    )


def suggestion_proto(s: SuggestionView) -> identity_pb2.MatchSuggestion:
    msg = identity_pb2.MatchSuggestion(
        name=f"{SUGGESTION_PREFIX}{s.suggestion_id}",
        profile_a=profile_name(s.profile_a),
        profile_b=profile_name(s.profile_b),
        score=s.score,
        evidence=s.evidence,
        state=s.state,  # type: ignore[arg-type]
    )
    if s.scored is not None:
        msg.field_evidence.extend(_field_evidence(s.scored))
        msg.total_bits = s.scored.total_bits
        msg.held_back = s.scored.held_back
    msg.create_time.FromDatetime(s.created_at)
    return msg


@dataclass(frozen=True, slots=True)
class _Side:
    """One side of an ExplainLink request, located."""

    label: str
    start: str  # where its merge path starts
    owner: str  # its active profile
    event_id: str = ""  # the event that first brought it (an identifier side)
    message_id: str = ""


class IdentityServicer(identity_pb2_grpc.IdentityServiceServicer):
    def __init__(self, resolver: Resolver, reads: IdentityReads | None = None) -> None:
        self.resolver = resolver
        self.reads = reads if reads is not None else IdentityReads(resolver.store)

    def _survivor(self, tenant_id: str, pid: str) -> str:
        final = self.reads.survivor(tenant_id, pid)
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
        owners = {k: o.profile_id for k, o in self.reads.owners(tenant, keys).items()}
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
        for i in self.reads.identifiers(tenant, pid):
            item = graph.identifiers.add(type=i.type, value=i.value, source=i.source, first_event_id=i.first_event_id)
            item.first_seen.FromDatetime(i.first_seen)
            item.last_seen.FromDatetime(i.last_seen)
        graph.merges.extend(merge_proto(m) for m in self.reads.merges(tenant, profile_ids=[pid]))
        return identity_pb2.GetIdentityGraphResponse(graph=graph)

    def ExplainLink(
        self, request: identity_pb2.ExplainLinkRequest, context: grpc.ServicerContext
    ) -> identity_pb2.ExplainLinkResponse:
        tenant = current_tenant().tenant_id
        rules = self.resolver.rules.get(tenant)
        a, b = (self._anchor(tenant, rules, request, side) for side in ("a", "b"))
        if a.owner != b.owner:
            return identity_pb2.ExplainLinkResponse(
                linked=False,
                summary=f"not linked: {a.label} is on {profile_name(a.owner)}, {b.label} on {profile_name(b.owner)}",
            )
        path_a = {m.merge_id: m for m in self.reads.merge_path(tenant, a.start)}
        path_b = {m.merge_id: m for m in self.reads.merge_path(tenant, b.start)}
        paths = {**path_a, **path_b}
        chain = [paths[i] for i in sorted(set(path_a) ^ set(path_b))]
        if not chain:
            # No merge joined them: each joined this profile with the event that first carried it
            # (alongside an identifier the profile already had).
            joined = [f"{s.label} joined it with {event_text(s.event_id, s.message_id)}" for s in (a, b) if s.event_id]
            how = "no merge was needed; " + "; ".join(joined) if joined else "they are the same profile"
        else:
            steps = [
                f"profiles/{m.absorbed_profile_id} merged into profiles/{m.survivor_profile_id}"
                + (f" by {event_text(m.event_id, m.message_id)}" if m.event_id else f" ({m.rule})")
                + (
                    f" (probabilistic: score {m.score:.4f}, {m.scored.total_bits:.1f} bits over"
                    f" {sum(f.counted for f in m.scored.fields)} fields"
                    + "".join(f"; {text}" for text in m.scored.raw.get("overruled", ()))
                    + ")"
                    if m.scored is not None
                    else ""
                )
                for m in chain
            ]
            how = "; ".join(steps)
        return identity_pb2.ExplainLinkResponse(
            linked=True, chain=[merge_proto(m) for m in chain], summary=f"linked on {profile_name(a.owner)}: {how}"
        )

    def _anchor(self, tenant: str, rules: IdentityRules, request: identity_pb2.ExplainLinkRequest, side: str) -> _Side:
        """One side located: its label, merge path start, active profile and (identifiers) first event."""
        which = request.WhichOneof(side)  # type: ignore[call-overload]
        if which is None:
            raise InvalidArgument(
                f"side {side} is missing",
                [Violation(f"identifier_{side}", f"set identifier_{side} or profile_{side}", "REQUIRED")],
            )
        if which.startswith("identifier"):
            ident = getattr(request, which)
            (key,) = normalize_all(rules, [ident], which)
            found = self.reads.owners(tenant, [key]).get(key)
            if found is None:
                raise NotFound(f"identifier {key[0]}:{key[1]} is not known")
            label = f"{key[0]}:{key[1]}"
            return _Side(label, found.origin_profile_id, found.profile_id, found.first_event_id, found.first_message_id)
        pid = parse_profile_name(getattr(request, which), which)
        return _Side(profile_name(pid), pid, self._survivor(tenant, pid))

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
        return merge_proto(self.reads.merge(tenant, merge_id))

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
        merges = self.reads.merges(tenant, profile_ids=pids, limit=size + 1, before=before)
        resp = identity_pb2.ListMergesResponse(merges=[merge_proto(m) for m in merges[:size]])
        if len(merges) > size:
            resp.next_page_token = pagination.encode_token(merges[size - 1].merge_id, query)
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
        found = self.reads.suggestions(tenant, int(state), size + 1, tuple(after) if after else None)
        resp = identity_pb2.ListMatchSuggestionsResponse(suggestions=[suggestion_proto(s) for s in found[:size]])
        if len(found) > size:
            last = found[size - 1]
            resp.next_page_token = pagination.encode_token([last.score, last.suggestion_id], query)
        return resp

    def ReviewMatchSuggestion(
        self, request: identity_pb2.ReviewMatchSuggestionRequest, context: grpc.ServicerContext
    ) -> identity_pb2.ReviewMatchSuggestionResponse:
        tenant = current_tenant().tenant_id
        raw = request.name.removeprefix(SUGGESTION_PREFIX)
        if not (raw.isascii() and raw.isdigit()) or not request.name.startswith(SUGGESTION_PREFIX):
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
        reviewed, recorded, _pubs = self.resolver.review(tenant, int(raw), request.accept, reason)
        resp = identity_pb2.ReviewMatchSuggestionResponse(suggestion=suggestion_proto(reviewed))
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
