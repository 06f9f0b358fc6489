"""The read side the servicer talks to: locating a profile by name or identifier, and building
profiles, customer contexts, timeline pages and searches from storage, through the caches.

A context is served from Redis when its cache version is current (one round trip, on the event
loop); otherwise it is built in a handful of indexed queries sent as one statement, the scores are
asked of metrics with a short deadline, and the result is cached under the version read before
the build (see :mod:`services.profile.cache`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from google.protobuf import json_format, struct_pb2

from services.core.errors import InvalidArgument, NotFound, Violation
from services.core.identity_rules import DropReason
from services.core.ids import canonical_uuid
from services.profile import computed
from services.profile.cache import ContextCache, Lookup
from services.profile.clients import Metadata, MetricsScores, PendingScores, RulesSource
from services.profile.storage import ACTIVE, ERASED, MERGED, ProfileStore, state_of_row
from services.profile.tenant_settings import ProfileConfig
from tessera.v1 import event_pb2, identity_pb2, profile_pb2

T = TypeVar("T")
InPool = Callable[..., Awaitable[Any]]
# What a context build leaves to cache: tenant, profile, variant, version, payload, seconds.
Store = tuple[str, str, str, str, bytes, float]
PROFILE_PREFIX = "profiles/"
DEFAULT_INTERACTIONS = 10
MAX_INTERACTIONS = 50


@dataclass(frozen=True)
class Located:
    """The profile a request names: its current id, and whether the id asked for was merged away."""

    profile_id: str
    redirected: bool = False


def parse_name(name: str, field: str = "name") -> str:
    """The profile id of ``profiles/{uuid}`` (a bare id is accepted too, as identity accepts it),
    or INVALID_ARGUMENT naming the field."""
    if not name:
        raise InvalidArgument(f"{field} is required", [Violation(field, "required: profiles/{profile_id}", "REQUIRED")])
    pid = canonical_uuid(name.removeprefix(PROFILE_PREFIX))
    if pid is None:
        raise InvalidArgument(
            f"{field} is not a profile name",
            [Violation(field, "must be profiles/{profile_id} with a UUID profile id", "INVALID_FORMAT")],
        )
    return pid


def _ts(raw: Any) -> dt.datetime | None:
    if raw is None:
        return None
    return raw if isinstance(raw, dt.datetime) else dt.datetime.fromisoformat(raw)


def _set_ts(target: Any, raw: Any) -> None:
    when = _ts(raw)
    if when is not None:
        target.FromDatetime(when)


def _value(raw: Any) -> struct_pb2.Value:
    return json_format.ParseDict(raw, struct_pb2.Value())


class ProfileReads:
    def __init__(
        self,
        store: ProfileStore,
        cache: ContextCache,
        rules: RulesSource,
        scores: MetricsScores,
        configs: Callable[[str], ProfileConfig],
        *,
        context_seconds: float,
        degraded_seconds: float,
    ) -> None:
        self.store = store
        self.cache = cache
        self.rules = rules
        self.scores = scores
        self.configs = configs
        self.context_seconds = context_seconds
        self.degraded_seconds = degraded_seconds

    # ------------------------------------------------------------------------------------------
    # Locating.

    def normalize(self, tenant_id: str, ident: event_pb2.Identifier, metadata: Metadata, field: str) -> tuple[str, str]:
        """The identifier as identity normalizes it, or INVALID_ARGUMENT saying why it cannot be one."""
        rules = self.rules.get(tenant_id, metadata)
        if not ident.type:
            raise InvalidArgument("identifier.type is required", [Violation(f"{field}.type", "required")])
        result = rules.normalize(ident.type, ident.value)
        if result.dropped == DropReason.UNKNOWN_TYPE:
            known = ", ".join(sorted(rules.types))
            raise InvalidArgument(
                "unknown identifier type",
                [Violation(f"{field}.type", f"not configured; configured: {known}", "UNKNOWN_TYPE")],
            )
        if result.dropped == DropReason.BLOCKED:
            raise InvalidArgument(
                "that value identifies nobody",
                [Violation(f"{field}.value", "a placeholder value that never identifies a customer", "BLOCKED")],
            )
        if result.value is None:
            raise InvalidArgument(
                "invalid identifier", [Violation(f"{field}.value", f"not a valid {ident.type}", "INVALID")]
            )
        return ident.type, result.value

    def by_name(self, tenant_id: str, name: str, field: str = "name") -> Located:
        asked = parse_name(name, field)
        found = self.store.resolve(tenant_id, asked)
        if found is None or found[0] == ERASED:
            raise NotFound(f"{name} not found")
        state, final = found
        if state == MERGED:
            again = self.store.resolve(tenant_id, final)
            if again is None or again[0] != ACTIVE:
                raise NotFound(f"{name} not found")
        return Located(final, redirected=final != asked)

    def by_identifier(
        self, tenant_id: str, ident: event_pb2.Identifier, metadata: Metadata, field: str = "identifier"
    ) -> Located:
        profile_id, _version = self.owned(tenant_id, ident, metadata, field)
        return Located(profile_id)

    def owned(
        self, tenant_id: str, ident: event_pb2.Identifier, metadata: Metadata, field: str, epoch: str | None = None
    ) -> tuple[str, str]:
        """The active profile an identifier belongs to (its survivor, when its owner was merged
        away) and that profile's cache version, in one statement and one Redis call; the owner is
        cached unless the identifier epoch moved since ``epoch`` (read before the statement)."""
        id_type, value = self.normalize(tenant_id, ident, metadata, field)
        if epoch is None:
            epoch = self.cache.epoch(tenant_id)
        found = self.store.locate_identifier(tenant_id, id_type, value)
        if found is None or found[3] != ACTIVE:
            raise NotFound(f"no profile has {id_type} {ident.value!r}")
        profile_id = found[2]
        version = self.cache.own_and_version(tenant_id, ContextCache.identifier(id_type, value), profile_id, epoch)
        return profile_id, version

    def locate(
        self, tenant_id: str, name: str, ident: event_pb2.Identifier | None, metadata: Metadata, *, which: str | None
    ) -> Located:
        if which == "identifier" and ident is not None:
            return self.by_identifier(tenant_id, ident, metadata)
        if which == "name":
            return self.by_name(tenant_id, name)
        raise InvalidArgument("name the profile", [Violation("profile", "set name or identifier")])

    # ------------------------------------------------------------------------------------------
    # Profiles.

    def profile(self, tenant_id: str, located: Located) -> profile_pb2.Profile:
        config = self.configs(tenant_id)
        rows = self.store.profile_rows(tenant_id, located.profile_id, config)
        if rows is None or rows["profile"]["state"] != ACTIVE:
            raise NotFound(f"profiles/{located.profile_id} not found")
        return build_profile(rows, config, located)

    def context_now(
        self,
        tenant_id: str,
        located: Located,
        limit: int,
        metadata: Metadata,
        version: str | None,
        later: list[Store] | None = None,
    ) -> profile_pb2.GetCustomerContextResponse:
        """Build a context from storage (a cache miss) and cache it (or leave the storing to the
        caller in ``later``)."""
        config = self.configs(tenant_id)
        current = version or self.cache.version(tenant_id, located.profile_id)
        scores = self.scores.start(located.profile_id, metadata)
        rows = self.store.profile_rows(tenant_id, located.profile_id, config, interactions=limit)
        if rows is None or rows["profile"]["state"] != ACTIVE:
            scores.cancel()
            raise NotFound(f"profiles/{located.profile_id} not found")
        resp = self._built(tenant_id, located.profile_id, limit, scores, current, rows, config, later)
        if located.redirected:
            resp.profile.redirected = True
        return resp

    async def context(
        self,
        tenant_id: str,
        name: str,
        ident: event_pb2.Identifier | None,
        which: str | None,
        limit: int,
        metadata: Callable[[], Metadata],
        in_pool: InPool,
    ) -> profile_pb2.GetCustomerContextResponse | bytes:
        """The hit path runs on the event loop: one Redis round trip, no thread, no SQL, and the
        cached bytes go out as they are (the interceptor sends bytes unserialized). ``metadata``
        (forwarded to identity and metrics) is only read on a miss."""
        look: Lookup | None = None
        if which == "identifier" and ident is not None:
            rules = self.rules.cached(tenant_id)
            if rules is not None:
                result = rules.normalize(ident.type, ident.value)
                if result.value is not None:
                    key = ContextCache.identifier(ident.type, result.value)
                    look = await self.cache.alookup(tenant_id, str(limit), identifier=key)
        elif which == "name":
            try:
                asked = parse_name(name)
            except InvalidArgument:
                asked = ""
            if asked:
                look = await self.cache.alookup(tenant_id, str(limit), profile_id=asked)
        if look is not None and look.context is not None:
            self.cache.record(True)
            return look.context
        self.cache.record(False)
        later: list[Store] = []
        resp: profile_pb2.GetCustomerContextResponse = await in_pool(
            self.context_miss, tenant_id, name, ident, which, limit, metadata(), look, later
        )
        for store in later:  # on the loop's hot connection, not a blocking call in the pool thread
            await self.cache.astore_context(*store)
        return resp

    def context_miss(
        self,
        tenant_id: str,
        name: str,
        ident: event_pb2.Identifier | None,
        which: str | None,
        limit: int,
        metadata: Metadata,
        look: Lookup | None,
        later: list[Store] | None = None,
    ) -> profile_pb2.GetCustomerContextResponse:
        """A context the cache did not hold, in as few round trips as the look-up allows:
        - owner (or name) and version known to the cache: the profile's rows (one statement);
        - an identifier the cache does not know: ``owned`` (one statement, one Redis call), then
          the rows.
        A name of a merged-away or erased profile takes the general path (``locate``)."""
        config = self.configs(tenant_id)
        if look is not None and look.profile_id is not None and look.version is not None:
            built = self._context_if_active(tenant_id, look.profile_id, limit, metadata, look.version, config, later)
            if built is not None:
                return built
        elif look is not None and which == "identifier" and ident is not None:
            profile_id, version = self.owned(tenant_id, ident, metadata, "identifier", look.epoch or "")
            built = self._context_if_active(tenant_id, profile_id, limit, metadata, version, config, later)
            if built is not None:
                return built
        located = self.locate(tenant_id, name, ident, metadata, which=which)
        return self.context_now(tenant_id, located, limit, metadata, None, later)

    def _context_if_active(
        self,
        tenant_id: str,
        profile_id: str,
        limit: int,
        metadata: Metadata,
        version: str,
        config: ProfileConfig,
        later: list[Store] | None,
    ) -> profile_pb2.GetCustomerContextResponse | None:
        scores = self.scores.start(profile_id, metadata)  # in flight while the rows are read
        rows = self.store.profile_rows(tenant_id, profile_id, config, interactions=limit)
        if rows is None or rows["profile"]["state"] != ACTIVE:
            scores.cancel()
            return None
        return self._built(tenant_id, profile_id, limit, scores, version, rows, config, later)

    def _built(
        self,
        tenant_id: str,
        profile_id: str,
        limit: int,
        pending: PendingScores,
        version: str,
        rows: dict[str, Any],
        config: ProfileConfig,
        later: list[Store] | None = None,
    ) -> profile_pb2.GetCustomerContextResponse:
        """The context from its rows, cached under the version read before them."""
        scores = pending.result()
        resp = build_context(rows, config, Located(profile_id), scores.to_proto())
        seconds = self.degraded_seconds if scores.missing_reason and scores.transient else self.context_seconds
        store: Store = (tenant_id, profile_id, str(limit), version, resp.SerializeToString(), seconds)
        if later is None:
            self.cache.store_context(*store)
        else:
            later.append(store)
        return resp

    def timeline(
        self,
        tenant_id: str,
        located: Located,
        size: int,
        after: tuple[dt.datetime, str] | None,
        request: profile_pb2.ListTimelineEventsRequest,
    ) -> list[event_pb2.Event]:
        start = request.start_time.ToDatetime(tzinfo=dt.UTC) if request.HasField("start_time") else None
        end = request.end_time.ToDatetime(tzinfo=dt.UTC) if request.HasField("end_time") else None
        payloads = self.store.timeline(
            tenant_id, located.profile_id, size, after, list(request.channels), list(request.kinds), start, end
        )
        events = [event_pb2.Event.FromString(p) for p in payloads]
        for ev in events:
            # The payload keeps the profile it was first applied to; merges and splits move the row.
            ev.profile_id = located.profile_id
        return events

    def search_traits(
        self, tenant_id: str, key: str, text: str, prefix: bool, limit: int, after: str | None
    ) -> list[str]:
        return self.store.search_traits(tenant_id, key, text, prefix, limit, after)

    def search_identifiers(
        self, tenant_id: str, id_type: str, value: str, prefix: bool, limit: int, after: str | None
    ) -> list[tuple[str, str]]:
        return self.store.search_identifiers(
            tenant_id, id_type, value, prefix, limit, (id_type, after) if after else None
        )

    def feed(self, tenant_id: str, seq: int, limit: int) -> tuple[list[tuple[Any, ...]], int, int]:
        return self.store.feed_after(tenant_id, seq, limit)

    def profiles(self, tenant_id: str, ids: Sequence[str]) -> list[profile_pb2.Profile]:
        out = []
        config = self.configs(tenant_id)
        for pid in ids:
            rows = self.store.profile_rows(tenant_id, pid, config)
            if rows is not None and rows["profile"]["state"] == ACTIVE:
                out.append(build_profile(rows, config, Located(pid)))
        return out


# ---- building messages from rows ------------------------------------------------------------------


def build_profile(rows: Mapping[str, Any], config: ProfileConfig, located: Located) -> profile_pb2.Profile:
    p = rows["profile"]
    msg = profile_pb2.Profile(
        name=PROFILE_PREFIX + located.profile_id,
        profile_id=located.profile_id,
        redirected=located.redirected,
        event_count=int(p["event_count"]),
    )
    _set_ts(msg.first_seen, p["first_seen"])
    _set_ts(msg.last_seen, p["last_seen"])
    _set_ts(msg.update_time, p["updated_at"])
    for t in rows["traits"]:
        trait = msg.traits.add(
            key=t["trait_key"],
            source=t["source"],
            event_id=t["event_id"],
            policy=int(t["policy"]),  # type: ignore[arg-type]
            observations=int(t["observations"]),
        )
        trait.value.CopyFrom(_value(t["value"]))
        _set_ts(trait.observe_time, t["observed_at"])
    for i in rows["identifiers"]:
        ident = msg.identifiers.add(
            type=i["id_type"], value=i["id_value"], source=i["source"], first_event_id=i["first_event_id"]
        )
        _set_ts(ident.first_seen, i["first_seen"])
        _set_ts(ident.last_seen, i["last_seen"])
    msg.computed_traits.extend(computed_traits(rows, config))
    return msg


def computed_traits(rows: Mapping[str, Any], config: ProfileConfig) -> list[profile_pb2.ComputedTrait]:
    states = {s["trait_key"]: state_of_row(s) for s in rows["computed"]}
    windows = {w["trait_key"]: w for w in rows["windowed"]}
    now: dt.datetime = rows["now"]
    out = []
    for d in config.computed_traits:
        if d.windowed:
            w = windows.get(d.key)
            state = computed.State()
            if w is not None:
                first = computed.Point(now, "", w["first_value"])
                last = computed.Point(now, "", w["last_value"])
                state = computed.State(
                    int(w["n"]),
                    int(w["num_n"]),
                    float(w["total"]),
                    w["low"],
                    w["high"],
                    first,
                    last,
                    int(w["distinct_n"]),
                )
        else:
            state = states.get(d.key, computed.State())
        value, sample = computed.value_of(d, state)
        ct = profile_pb2.ComputedTrait(key=d.key, sample_size=sample)
        if value is not None:
            ct.value.CopyFrom(_value(value))
        ct.compute_time.FromDatetime(now)
        out.append(ct)
    return out


def build_context(
    rows: Mapping[str, Any], config: ProfileConfig, located: Located, scores: profile_pb2.CustomerScores
) -> profile_pb2.GetCustomerContextResponse:
    resp = profile_pb2.GetCustomerContextResponse(profile=build_profile(rows, config, located))
    for i in rows["interactions"]:
        s = resp.recent_interactions.add(
            interaction_id=i["interaction_id"],
            channel=int(i["channel"]),  # type: ignore[arg-type]
            direction=int(i["direction"]),  # type: ignore[arg-type]
            queue=i["queue"],
            agent_id=i["agent_id"],
            reason=i["reason"],
            disposition=i["disposition"],
            case_id=i["case_id"],
            case_status=int(i["case_status"]),  # type: ignore[arg-type]
            handle_seconds=float(i["handle_seconds"]),
            legs=int(i["legs"]),
            transferred=bool(i["transferred"]),
            abandoned=bool(i["abandoned"]),
            messages=int(i["messages"]),
        )
        _set_ts(s.start_time, i["start_time"])
        _set_ts(s.end_time, i["end_time"])
    for c in rows["cases"]:
        case = resp.open_cases.add(
            case_id=c["case_id"],
            status=int(c["status"]),
            reason=c["reason"],
            interaction_id=c["interaction_id"],  # type: ignore[arg-type]
        )
        _set_ts(case.open_time, c["open_time"])
        _set_ts(case.update_time, c["update_time"])
    last_7, last_30 = rows["counts"]
    resp.contacts.last_7_days = int(last_7)
    resp.contacts.last_30_days = int(last_30)
    if rows["interactions"]:
        latest = rows["interactions"][0]
        resp.contacts.last_reason = latest["reason"]
        resp.contacts.last_channel = int(latest["channel"])  # type: ignore[assignment]
        _set_ts(resp.contacts.last_contact_time, latest["start_time"])
    resp.scores.CopyFrom(scores)
    resp.build_time.FromDatetime(rows["now"])
    return resp


def identifier_of(msg: identity_pb2.ProfileIdentifier) -> event_pb2.Identifier:
    return event_pb2.Identifier(type=msg.type, value=msg.value)
