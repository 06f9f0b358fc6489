"""Helpers for profile tests: events of every kind, and waiting for the profile consumer."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import sqlalchemy as sa
from google.protobuf import struct_pb2
from sqlalchemy.engine import Engine

from tessera.v1 import event_pb2
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


def wait_until(check: Callable[[], T], timeout: float = 20.0, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
