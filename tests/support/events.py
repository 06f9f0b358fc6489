"""Small builders for valid events; a test changes only the field it is about."""

from __future__ import annotations

import secrets

from tessera.v1 import event_pb2


def uid(label: str = "m") -> str:
    return f"{label}-{secrets.token_hex(6)}"


def track(
    message_id: str | None = None, email: str = "ada@example.com", name: str = "Order Completed"
) -> event_pb2.Event:
    ev = event_pb2.Event(
        message_id=message_id or uid(),
        channel=event_pb2.CHANNEL_WEB,
        source="tests",
        identifiers=[event_pb2.Identifier(type="email", value=email)],
        track=event_pb2.Track(event=name),
    )
    ev.properties.update({"revenue": 42.5, "currency": "EUR"})
    ev.timestamp.GetCurrentTime()
    return ev


def survey(score: int | None, kind: int = event_pb2.SURVEY_TYPE_NPS, message_id: str | None = None) -> event_pb2.Event:
    ev = event_pb2.Event(
        message_id=message_id or uid("s"),
        channel=event_pb2.CHANNEL_EMAIL,
        identifiers=[event_pb2.Identifier(type="email", value="ada@example.com")],
        survey_response=event_pb2.SurveyResponse(type=kind, comment="fine"),  # type: ignore[arg-type]
    )
    if score is not None:
        ev.survey_response.score = score
    return ev


def interaction(message_id: str | None = None) -> event_pb2.Event:
    ev = event_pb2.Event(
        message_id=message_id or uid("i"),
        channel=event_pb2.CHANNEL_VOICE,
        source="genesys",
        identifiers=[event_pb2.Identifier(type="phone", value="+14155550100")],
        interaction=event_pb2.Interaction(
            interaction_id="call-1",
            direction=event_pb2.DIRECTION_INBOUND,
            queue="billing",
            agent_id="agent-7",
            reason="billing",
            talk_seconds=300,
            hold_seconds=20,
            after_contact_work_seconds=45,
        ),
    )
    ev.interaction.started_at.FromSeconds(1_700_000_000)
    ev.interaction.ended_at.FromSeconds(1_700_000_365)
    return ev
