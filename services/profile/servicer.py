"""ProfileService over gRPC: thin; reads go through :class:`~services.profile.reads.ProfileReads`,
writes through the :class:`~services.profile.writes.ProfileWrites` facade. Another tenant's ids are
always NOT_FOUND. Plain methods run in the server's pool; ``GetCustomerContext`` (its cache hits)
and the ``WatchProfiles`` stream run on the event loop."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import json_format

from services.core import pagination
from services.core.errors import FailedPrecondition, InvalidArgument, NotFound, Violation
from services.core.tenancy import current_tenant
from services.profile.reads import DEFAULT_INTERACTIONS, MAX_INTERACTIONS, PROFILE_PREFIX, Located, ProfileReads
from services.profile.tenant_settings import to_proto
from services.profile.writes import ProfileWrites
from tessera.v1 import profile_pb2, profile_pb2_grpc

InPool = Callable[..., Awaitable[Any]]
MAX_TRAITS = 200
MAX_SOURCE = 128
MAX_REASON = 1000
TRAIT_KEY_MAX = 128
FEED_BATCH = 500


def _metadata(context: Any) -> tuple[tuple[str, str], ...]:
    return tuple((k, v) for k, v in (context.invocation_metadata() or ()) if isinstance(v, str))


def _timeline_position(position: Any) -> bool:
    if not (isinstance(position, list) and len(position) == 2 and all(isinstance(x, str) for x in position)):
        return False
    try:
        dt.datetime.fromisoformat(position[0])
    except ValueError:
        return False
    return True


def _string_position(position: Any) -> bool:
    return isinstance(position, str) and 0 < len(position) <= 1024


class ProfileServicer(profile_pb2_grpc.ProfileServiceServicer):
    def __init__(self, reads: ProfileReads, writes: ProfileWrites, pool: InPool, poll_seconds: float) -> None:
        self.reads = reads
        self.writes = writes
        self.pool = pool
        self.poll_seconds = poll_seconds

    def _locate(self, request: Any, context: Any) -> Located:
        which = request.WhichOneof("profile")
        return self.reads.locate(
            current_tenant().tenant_id,
            request.name,
            request.identifier if which == "identifier" else None,
            _metadata(context),
            which=which,
        )

    # -- reads ---------------------------------------------------------------------------------

    def GetProfile(self, request: profile_pb2.GetProfileRequest, context: Any) -> profile_pb2.GetProfileResponse:
        located = self._locate(request, context)
        return profile_pb2.GetProfileResponse(profile=self.reads.profile(current_tenant().tenant_id, located))

    async def GetCustomerContext(  # type: ignore[override]  # a cache hit answers serialized bytes
        self, request: profile_pb2.GetCustomerContextRequest, context: Any
    ) -> profile_pb2.GetCustomerContextResponse | bytes:
        limit = request.interaction_limit or DEFAULT_INTERACTIONS
        if not 0 < limit <= MAX_INTERACTIONS:
            raise InvalidArgument(
                "interaction_limit out of range", [Violation("interaction_limit", f"1 to {MAX_INTERACTIONS} (0: 10)")]
            )
        which = request.WhichOneof("profile")
        return await self.reads.context(
            current_tenant().tenant_id,
            request.name,
            request.identifier if which == "identifier" else None,
            which,
            limit,
            lambda: _metadata(context),
            self.pool,
        )

    def ListTimelineEvents(
        self, request: profile_pb2.ListTimelineEventsRequest, context: Any
    ) -> profile_pb2.ListTimelineEventsResponse:
        tenant = current_tenant().tenant_id
        located = self.reads.by_name(tenant, request.parent, "parent")
        size = pagination.page_size(request.page_size)
        violations = [
            Violation(f"kinds[{i}]", "one of identify, track, interaction, survey_response, message")
            for i, k in enumerate(request.kinds)
            if k not in ("identify", "track", "interaction", "survey_response", "message")
        ]
        violations += [
            Violation(f"channels[{i}]", "a known channel") for i, c in enumerate(request.channels) if c <= 0 or c > 9
        ]
        if (
            request.HasField("start_time")
            and request.HasField("end_time")
            and request.end_time.ToDatetime() <= request.start_time.ToDatetime()
        ):
            violations.append(Violation("end_time", "must be after start_time"))
        if violations:
            raise InvalidArgument("invalid timeline filter", violations)
        query = {
            "p": located.profile_id,
            "c": sorted(int(c) for c in request.channels),
            "k": sorted(request.kinds),
            "s": request.start_time.ToJsonString() if request.HasField("start_time") else "",
            "e": request.end_time.ToJsonString() if request.HasField("end_time") else "",
        }
        after = pagination.decode_token(request.page_token, query, valid=_timeline_position)
        position = (dt.datetime.fromisoformat(after[0]), after[1]) if after else None
        events = self.reads.timeline(tenant, located, size + 1, position, request)
        resp = profile_pb2.ListTimelineEventsResponse()
        for ev in events[:size]:
            resp.events.add(
                event_id=ev.event_id,
                channel=ev.channel,
                kind=ev.WhichOneof("payload") or "",
                event_time=ev.timestamp,
                event=ev,
            )
        if len(events) > size:
            last = events[size - 1]
            resp.next_page_token = pagination.encode_token(
                [last.timestamp.ToDatetime(tzinfo=dt.UTC).isoformat(), last.event_id], query
            )
        return resp

    def SearchProfiles(
        self, request: profile_pb2.SearchProfilesRequest, context: Any
    ) -> profile_pb2.SearchProfilesResponse:
        tenant = current_tenant().tenant_id
        size = pagination.page_size(request.page_size, default=20, maximum=100)
        prefix = request.match == profile_pb2.SEARCH_MATCH_PREFIX
        which = request.WhichOneof("query")
        resp = profile_pb2.SearchProfilesResponse()
        if which == "trait":
            key, value = request.trait.key, request.trait.value
            problems = []
            if not key or len(key) > TRAIT_KEY_MAX:
                problems.append(Violation("trait.key", "1-128 characters"))
            if not value or len(value) > 512:
                problems.append(Violation("trait.value", "1-512 characters"))
            if problems:
                raise InvalidArgument("invalid trait query", problems)
            query = {"t": key, "v": value.lower(), "m": prefix}
            after = pagination.decode_token(request.page_token, query, valid=_string_position)
            ids = self.reads.search_traits(tenant, key, value.lower(), prefix, size + 1, after)
            resp.profiles.extend(self.reads.profiles(tenant, ids[:size]))
            if len(ids) > size:
                resp.next_page_token = pagination.encode_token(ids[size - 1], query)
            return resp
        if which == "identifier":
            ident = request.identifier
            if prefix:
                if not ident.type or not ident.value or len(ident.value) > 256:
                    raise InvalidArgument(
                        "invalid identifier query", [Violation("identifier", "a type and a 1-256 character prefix")]
                    )
                id_type, value = ident.type, ident.value.strip()
                if id_type == "email":
                    value = value.lower()
            else:
                id_type, value = self.reads.normalize(tenant, ident, _metadata(context), "identifier")
            query = {"t": id_type, "v": value, "m": prefix}
            after = pagination.decode_token(request.page_token, query, valid=_string_position)
            found = self.reads.search_identifiers(tenant, id_type, value, prefix, size + 1, after)
            seen: list[str] = []
            for pid, _ in found[:size]:
                if pid not in seen:
                    seen.append(pid)
            resp.profiles.extend(self.reads.profiles(tenant, seen))
            if len(found) > size:
                resp.next_page_token = pagination.encode_token(found[size - 1][1], query)
            return resp
        raise InvalidArgument("say what to search for", [Violation("query", "set trait or identifier")])

    # -- writes --------------------------------------------------------------------------------

    def UpdateTraits(self, request: profile_pb2.UpdateTraitsRequest, context: Any) -> profile_pb2.UpdateTraitsResponse:
        tenant = current_tenant().tenant_id
        located = self.reads.by_name(tenant, request.profile, "profile")
        values = json_format.MessageToDict(request.traits) if request.HasField("traits") else {}
        violations: list[Violation] = []
        if not request.source or len(request.source) > MAX_SOURCE:
            violations.append(Violation("source", "required: who sets these traits, such as 'crm' (1-128 characters)"))
        paths = list(request.update_mask.paths)
        if not paths:
            violations.append(
                Violation("update_mask", "name the traits to change ('traits.<key>', or 'traits' for all given)")
            )
        keys: list[str] = []
        for i, p in enumerate(paths):
            if p == "traits":
                keys.extend(values)
            elif p.startswith("traits.") and 0 < len(p) - 7 <= TRAIT_KEY_MAX:
                keys.append(p[7:])
            else:
                violations.append(Violation(f"update_mask.paths[{i}]", "must be 'traits' or 'traits.<key>'"))
        keys = list(dict.fromkeys(keys))
        if len(keys) > MAX_TRAITS:
            violations.append(Violation("update_mask", f"at most {MAX_TRAITS} traits per update"))
        for k in values:
            if k not in keys:
                violations.append(Violation(f"traits.{k}", "not named in update_mask"))
        if violations:
            raise InvalidArgument("invalid trait update", violations)
        setting = {k: values[k] for k in keys if k in values and values[k] is not None}
        removing = [k for k in keys if values.get(k) is None]
        self.writes.update_traits(tenant, located.profile_id, setting, removing, request.source)
        return profile_pb2.UpdateTraitsResponse(profile=self.reads.profile(tenant, located))

    def GetProfileSettings(
        self, request: profile_pb2.GetProfileSettingsRequest, context: Any
    ) -> profile_pb2.GetProfileSettingsResponse:
        tenant = current_tenant().tenant_id
        return profile_pb2.GetProfileSettingsResponse(settings=to_proto(self.writes.config(tenant)))

    def UpdateProfileSettings(
        self, request: profile_pb2.UpdateProfileSettingsRequest, context: Any
    ) -> profile_pb2.UpdateProfileSettingsResponse:
        tenant = current_tenant().tenant_id
        saved = self.writes.update_settings(tenant, request.settings, list(request.update_mask.paths))
        return profile_pb2.UpdateProfileSettingsResponse(settings=to_proto(saved))

    # -- privacy -------------------------------------------------------------------------------

    def ErasePerson(self, request: profile_pb2.ErasePersonRequest, context: Any) -> profile_pb2.ErasePersonResponse:
        tenant = current_tenant().tenant_id
        if not request.reason or len(request.reason) > MAX_REASON:
            raise InvalidArgument("a reason is required", [Violation("reason", "required, at most 1000 characters")])
        try:
            located = self._locate(request, context)
        except NotFound:
            # The person is gone from the first request's commit on: a repeated request (a retry)
            # answers with the erasure still running for them, and starts none.
            running = self.writes.running_erasure(tenant, request, _metadata(context))
            if running is None:
                raise
            return profile_pb2.ErasePersonResponse(request=running)
        return profile_pb2.ErasePersonResponse(request=self.writes.erase(tenant, located.profile_id, request.reason))

    def GetErasureRequest(
        self, request: profile_pb2.GetErasureRequestRequest, context: Any
    ) -> profile_pb2.GetErasureRequestResponse:
        tenant = current_tenant().tenant_id
        return profile_pb2.GetErasureRequestResponse(request=self.writes.erasure(tenant, request.name))

    def ExportPerson(self, request: profile_pb2.ExportPersonRequest, context: Any) -> profile_pb2.ExportPersonResponse:
        tenant = current_tenant().tenant_id
        located = self._locate(request, context)
        document = self.writes.export(tenant, located, _metadata(context))
        resp = profile_pb2.ExportPersonResponse(
            profile=PROFILE_PREFIX + located.profile_id, json=json.dumps(document, indent=2, ensure_ascii=False)
        )
        resp.export_time.GetCurrentTime()
        return resp

    # -- the change feed -----------------------------------------------------------------------

    async def WatchProfiles(
        self, request: profile_pb2.WatchProfilesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[profile_pb2.WatchProfilesResponse]:
        """Every change after the cursor, in commit order, then new ones as they commit. The cursor
        of each change resumes right after it; a cursor older than the feed keeps is refused
        (FAILED_PRECONDITION), never silently skipped."""
        tenant = current_tenant().tenant_id
        kinds = set(request.kinds)
        bad = [Violation(f"kinds[{i}]", "a known kind") for i, k in enumerate(request.kinds) if not 0 < k <= 5]
        if bad:
            raise InvalidArgument("invalid kinds", bad)
        position = pagination.decode_feed_cursor(tenant, request.cursor)
        rows, head, pruned = await self.pool(self.reads.feed, tenant, position or 0, 1)
        if position is None:
            position = head
        elif position > head:  # no change has this cursor yet: forged, or from another feed
            raise InvalidArgument("invalid cursor", [Violation("cursor", "not a cursor this API issued")])
        elif position < pruned:
            raise FailedPrecondition(
                "the cursor is older than the change feed keeps",
                type_="CURSOR_EXPIRED",
                subject="cursor",
                description="resync (read the profiles again) and watch from an empty cursor",
            )
        while True:
            rows, _head, pruned = await self.pool(self.reads.feed, tenant, position, FEED_BATCH)
            if position < pruned:
                raise FailedPrecondition(
                    "the change feed moved past this cursor while it was being read",
                    type_="CURSOR_EXPIRED",
                    subject="cursor",
                    description="resync and watch from an empty cursor",
                )
            for seq, kind, pid, other, changed, at in rows:
                position = int(seq)
                if kinds and kind not in kinds:
                    continue
                msg = profile_pb2.WatchProfilesResponse(
                    cursor=pagination.encode_feed_cursor(tenant, position),
                    kind=kind,
                    profile=PROFILE_PREFIX + pid,
                    other_profile=PROFILE_PREFIX + other if other else "",
                    changed_traits=list(changed or ()),
                )
                msg.change_time.FromDatetime(at)
                yield msg
            if len(rows) < FEED_BATCH:
                await asyncio.sleep(self.poll_seconds)


__all__ = ["ProfileServicer"]
