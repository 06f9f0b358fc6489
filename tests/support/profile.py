"""Helpers for profile tests: events of every kind, and waiting for the profile consumer."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import sqlalchemy as sa
from google.protobuf import field_mask_pb2, json_format, struct_pb2, timestamp_pb2
from sqlalchemy.engine import Engine

from tessera.v1 import (
    event_pb2,
    identity_pb2,
    identity_pb2_grpc,
    ingest_pb2,
    ingest_pb2_grpc,
    profile_pb2,
    profile_pb2_grpc,
)
from tests.support.events import uid

T = TypeVar("T")
NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)


def base(
    *idents: tuple[str, str],
    at: dt.datetime | None = None,
    channel: int = event_pb2.CHANNEL_WEB,
    source: str = "tests",
    message_id: str | None = None,
) -> event_pb2.Event:
    ev = event_pb2.Event(
        message_id=message_id or uid("p"),
        channel=channel,  # type: ignore[arg-type]
        source=source,
        identifiers=[event_pb2.Identifier(type=t, value=v) for t, v in idents],
    )
    ev.timestamp.FromDatetime(at or dt.datetime.now(dt.UTC))
    return ev


def identify(*idents: tuple[str, str], traits: Mapping[str, Any], **kw: Any) -> event_pb2.Event:
    ev = base(*idents, **kw)
    s = struct_pb2.Struct()
    s.update(dict(traits))
    ev.identify.traits.CopyFrom(s)
    return ev


def track(
    *idents: tuple[str, str], name: str = "Viewed", properties: Mapping[str, Any] | None = None, **kw: Any
) -> event_pb2.Event:
    ev = base(*idents, **kw)
    ev.track.event = name
    if properties:
        ev.properties.update(dict(properties))
    return ev


def interaction(
    *idents: tuple[str, str],
    interaction_id: str,
    reason: str = "billing",
    agent: str = "agent-1",
    talk: float = 120.0,
    case_id: str = "",
    case_status: int = 0,
    leg_id: str = "",
    transferred: bool = False,
    disposition: str = "resolved",
    channel: int = event_pb2.CHANNEL_VOICE,
    **kw: Any,
) -> event_pb2.Event:
    ev = base(*idents, channel=channel, **kw)
    i = ev.interaction
    i.interaction_id = interaction_id
    i.direction = event_pb2.DIRECTION_INBOUND
    i.queue = "support"
    i.agent_id = agent
    i.reason = reason
    i.disposition = disposition
    i.case_id = case_id
    i.case_status = case_status  # type: ignore[assignment]
    i.talk_seconds = talk
    i.hold_seconds = 10.0
    i.after_contact_work_seconds = 20.0
    i.leg_id = leg_id
    i.transferred = transferred
    i.started_at.CopyFrom(ev.timestamp)
    return ev


def survey(*idents: tuple[str, str], kind: int, score: int, **kw: Any) -> event_pb2.Event:
    ev = base(*idents, **kw)
    ev.survey_response.type = kind  # type: ignore[assignment]
    ev.survey_response.score = score
    return ev


def applied_count(engine: Engine, tenant_id: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text("SELECT count(*) FROM profile.timeline WHERE tenant_id = :t"), {"t": tenant_id}
            ).scalar_one()
        )


def wait_applied(engine: Engine, tenant_id: str, count: int, timeout: float = 20.0) -> None:
    """Until the profile consumer has recorded ``count`` events of the tenant."""
    wait_until(lambda: applied_count(engine, tenant_id) >= count, timeout, f"profile applied {count} events")


def wait_until(check: Callable[[], T | None], timeout: float = 20.0, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


# ---- the public APIs, as a test drives them ----------------------------------------------------


@dataclass(frozen=True)
class Apis:
    """Stubs of the three services a profile test drives, and the tenant it acts as."""

    ingest: ingest_pb2_grpc.IngestServiceStub
    identity: identity_pb2_grpc.IdentityServiceStub
    profile: profile_pb2_grpc.ProfileServiceStub
    engine: Engine
    tenant_id: str
    metadata: tuple[tuple[str, str], ...]

    def send(self, *events: event_pb2.Event) -> list[str]:
        """Ingest one batch; every event must be accepted. Returns their event ids, in order."""
        resp = self.ingest.IngestEvents(
            ingest_pb2.IngestEventsRequest(events=list(events)), metadata=self.metadata, timeout=10
        )
        assert [r.status for r in resp.results] == [ingest_pb2.EVENT_STATUS_ACCEPTED] * len(events), resp
        return [r.event_id for r in resp.results]

    def send_statuses(self, *events: event_pb2.Event) -> list[int]:
        resp = self.ingest.IngestEvents(
            ingest_pb2.IngestEventsRequest(events=list(events)), metadata=self.metadata, timeout=10
        )
        return [r.status for r in resp.results]

    def wait_applied(self, count: int, timeout: float = 20.0) -> None:
        wait_applied(self.engine, self.tenant_id, count, timeout)

    def get(self, name: str = "", ident: tuple[str, str] | None = None) -> profile_pb2.Profile:
        req = (
            profile_pb2.GetProfileRequest(identifier=event_pb2.Identifier(type=ident[0], value=ident[1]))
            if ident is not None
            else profile_pb2.GetProfileRequest(name=name)
        )
        resp: profile_pb2.GetProfileResponse = self.profile.GetProfile(req, metadata=self.metadata, timeout=10)
        return resp.profile

    def context(
        self, name: str = "", ident: tuple[str, str] | None = None, limit: int = 0
    ) -> profile_pb2.GetCustomerContextResponse:
        req = (
            profile_pb2.GetCustomerContextRequest(
                identifier=event_pb2.Identifier(type=ident[0], value=ident[1]), interaction_limit=limit
            )
            if ident is not None
            else profile_pb2.GetCustomerContextRequest(name=name, interaction_limit=limit)
        )
        resp: profile_pb2.GetCustomerContextResponse = self.profile.GetCustomerContext(
            req, metadata=self.metadata, timeout=10
        )
        return resp

    def timeline(self, parent: str, **kw: Any) -> profile_pb2.ListTimelineEventsResponse:
        resp: profile_pb2.ListTimelineEventsResponse = self.profile.ListTimelineEvents(
            profile_pb2.ListTimelineEventsRequest(parent=parent, **kw), metadata=self.metadata, timeout=10
        )
        return resp

    def all_timeline(self, parent: str, page_size: int = 0, **kw: Any) -> list[profile_pb2.TimelineEvent]:
        """Every page, following next_page_token."""
        out: list[profile_pb2.TimelineEvent] = []
        token = ""
        for _ in range(1000):
            page = self.timeline(parent, page_size=page_size, page_token=token, **kw)
            out.extend(page.events)
            token = page.next_page_token
            if not token:
                return out
        raise AssertionError("the timeline never ended")

    def update_traits(
        self, name: str, values: Mapping[str, Any], paths: list[str], source: str = "crm"
    ) -> profile_pb2.Profile:
        traits = struct_pb2.Struct()
        traits.update(dict(values))
        req = profile_pb2.UpdateTraitsRequest(
            profile=name, traits=traits, update_mask=field_mask_pb2.FieldMask(paths=paths), source=source
        )
        resp: profile_pb2.UpdateTraitsResponse = self.profile.UpdateTraits(req, metadata=self.metadata, timeout=10)
        return resp.profile

    def settings(
        self, settings: profile_pb2.ProfileSettings, paths: list[str] | None = None
    ) -> profile_pb2.ProfileSettings:
        req = profile_pb2.UpdateProfileSettingsRequest(
            settings=settings, update_mask=field_mask_pb2.FieldMask(paths=paths or [])
        )
        resp: profile_pb2.UpdateProfileSettingsResponse = self.profile.UpdateProfileSettings(
            req, metadata=self.metadata, timeout=10
        )
        return resp.settings

    def merge(self, survivor: str, absorbed: str, reason: str = "same person") -> identity_pb2.Merge:
        resp: identity_pb2.MergeProfilesResponse = self.identity.MergeProfiles(
            identity_pb2.MergeProfilesRequest(survivor_profile=survivor, absorbed_profile=absorbed, reason=reason),
            metadata=self.metadata,
            timeout=10,
        )
        return resp.merge

    def unmerge(self, profile: str, *idents: tuple[str, str], reason: str = "two people") -> identity_pb2.Merge:
        resp: identity_pb2.UnmergeProfileResponse = self.identity.UnmergeProfile(
            identity_pb2.UnmergeProfileRequest(
                profile=profile,
                identifiers=[event_pb2.Identifier(type=t, value=v) for t, v in idents],
                reason=reason,
            ),
            metadata=self.metadata,
            timeout=10,
        )
        return resp.merge

    def wait_merged(self, absorbed: str, survivor: str, timeout: float = 20.0) -> None:
        """Until the profile service answers for ``absorbed`` with ``survivor``."""

        def done() -> bool:
            try:
                got = self.get(absorbed)
            except grpc.RpcError:
                return False
            return got.name == survivor and got.redirected

        wait_until(done, timeout, f"{absorbed} redirecting to {survivor}")

    def wait_owner(self, ident: tuple[str, str], name: str, timeout: float = 20.0) -> profile_pb2.Profile:
        """Until ``ident`` belongs to profile ``name`` here."""

        def done() -> profile_pb2.Profile | None:
            try:
                got = self.get(ident=ident)
            except grpc.RpcError:
                return None
            return got if got.name == name else None

        found = wait_until(done, timeout, f"{ident} owned by {name}")
        assert found is not None
        return found


def apis(
    ingest_channel: grpc.Channel,
    identity_channel: grpc.Channel,
    profile_channel: grpc.Channel,
    engine: Engine,
    tenant_id: str,
    metadata: tuple[tuple[str, str], ...],
) -> Apis:
    return Apis(
        ingest_pb2_grpc.IngestServiceStub(ingest_channel),
        identity_pb2_grpc.IdentityServiceStub(identity_channel),
        profile_pb2_grpc.ProfileServiceStub(profile_channel),
        engine,
        tenant_id,
        metadata,
    )


def traits_of(profile: profile_pb2.Profile) -> dict[str, Any]:
    """Trait key -> its value as plain Python (numbers are floats, as a Struct carries them)."""
    return {t.key: json_format.MessageToDict(t.value) for t in profile.traits}


def trait(profile: profile_pb2.Profile, key: str) -> profile_pb2.Trait:
    found = [t for t in profile.traits if t.key == key]
    assert len(found) == 1, f"trait {key!r} not on the profile: {traits_of(profile)}"
    return found[0]


def computed_of(profile: profile_pb2.Profile) -> dict[str, tuple[Any, int]]:
    """Computed trait key -> (value or None when unset, sample size)."""
    return {
        c.key: (json_format.MessageToDict(c.value) if c.HasField("value") else None, c.sample_size)
        for c in profile.computed_traits
    }


def at(ts: timestamp_pb2.Timestamp) -> dt.datetime:
    return ts.ToDatetime(tzinfo=dt.UTC)


def code_of(call: Callable[[], Any]) -> grpc.RpcError:
    """The error a call fails with (it must fail)."""
    try:
        call()
    except grpc.RpcError as err:
        return err
    raise AssertionError("the call succeeded")
