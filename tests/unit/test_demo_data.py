"""The demo dataset: reproducible, well-formed, and rich enough to exercise identity and CX metrics."""

from __future__ import annotations

import io
import json
import re
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf import json_format

from services.cli import demo as demo_data
from services.cli.demo import PERSONA, generate, to_jsonl
from tessera.v1 import event_pb2

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
CUSTOMERS = 200
DAYS = 90
BLOCKED = {"test@test.com", "0000000000", "+10000000000", "unknown", "null", "00000000-0000-0000-0000-000000000000"}
SNAKE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")


@pytest.fixture(scope="module")
def events() -> list[event_pb2.Event]:
    return list(generate(seed=11, customers=CUSTOMERS, days=DAYS, now=NOW))


def _wire(evs: list[event_pb2.Event]) -> list[bytes]:
    # Struct is a proto map, so only deterministic serialization has a fixed byte order.
    return [ev.SerializeToString(deterministic=True) for ev in evs]


def _payloads(evs: list[event_pb2.Event], kind: str) -> list[event_pb2.Event]:
    return [ev for ev in evs if ev.WhichOneof("payload") == kind]


def test_same_arguments_give_identical_bytes(events: list[event_pb2.Event]) -> None:
    again = list(generate(seed=11, customers=CUSTOMERS, days=DAYS, now=NOW))
    assert _wire(again) == _wire(events)
    assert again == events


def test_other_seed_gives_other_data(events: list[event_pb2.Event]) -> None:
    other = list(generate(seed=12, customers=CUSTOMERS, days=DAYS, now=NOW))
    assert _wire(other) != _wire(events)
    assert all(ev.message_id.startswith("demo-12-") for ev in other)


def test_default_now_is_the_current_hour() -> None:
    before = datetime.now(UTC)
    first = list(generate(customers=3, days=2))
    second = list(generate(customers=3, days=2))
    after = datetime.now(UTC)
    latest = max(ev.timestamp.ToDatetime(tzinfo=UTC) for ev in first)
    assert latest <= after
    if before.replace(minute=0, second=0, microsecond=0) == after.replace(minute=0, second=0, microsecond=0):
        assert _wire(first) == _wire(second)
        assert latest <= before.replace(minute=0, second=0, microsecond=0)


def test_volume_is_about_twenty_events_per_customer(events: list[event_pb2.Event]) -> None:
    assert 15 * CUSTOMERS <= len(events) <= 25 * CUSTOMERS


def test_every_channel_and_payload_kind_is_present(events: list[event_pb2.Event]) -> None:
    channels = {ev.channel for ev in events}
    assert channels == set(event_pb2.Channel.values()) - {event_pb2.CHANNEL_UNSPECIFIED}
    kinds = Counter(ev.WhichOneof("payload") for ev in events)
    assert set(kinds) == {"identify", "track", "interaction", "survey_response", "message"}
    interaction_channels = {ev.channel for ev in _payloads(events, "interaction")}
    assert {
        event_pb2.CHANNEL_VOICE,
        event_pb2.CHANNEL_CHAT,
        event_pb2.CHANNEL_EMAIL,
        event_pb2.CHANNEL_SMS,
        event_pb2.CHANNEL_SOCIAL,
    } <= interaction_channels


def test_timestamps_are_in_the_window_and_sorted(events: list[event_pb2.Event]) -> None:
    start = NOW - timedelta(days=DAYS)
    stamps = [ev.timestamp.ToDatetime(tzinfo=UTC) for ev in events]
    assert stamps == sorted(stamps)
    assert all(start <= ts <= NOW for ts in stamps)
    for ev in _payloads(events, "interaction"):
        assert ev.interaction.ended_at.ToDatetime(tzinfo=UTC) <= NOW


def test_message_ids_are_unique_and_server_fields_unset(events: list[event_pb2.Event]) -> None:
    ids = [ev.message_id for ev in events]
    assert len(set(ids)) == len(ids)
    assert ids[0] == "demo-11-0000001"
    for ev in events:
        assert 0 < len(ev.message_id) <= 100
        assert not ev.HasField("received_at")
        assert ev.event_id == ""
        assert ev.profile_id == ""


def test_limits_and_required_fields_hold(events: list[event_pb2.Event]) -> None:
    for ev in events:
        assert ev.ByteSize() < 32 * 1024
        assert ev.channel != event_pb2.CHANNEL_UNSPECIFIED
        assert ev.source
        assert ev.WhichOneof("payload") is not None
        assert len(ev.identifiers) >= 1
        for ident in ev.identifiers:
            assert SNAKE.match(ident.type), ident.type
            assert 0 < len(ident.value) <= 256
        kind = ev.WhichOneof("payload")
        if kind == "track":
            assert 0 < len(ev.track.event) <= 200
        elif kind == "message":
            assert 0 < len(ev.message.text) <= 16_384
            assert ev.message.interaction_id
            assert ev.message.author != event_pb2.AUTHOR_UNSPECIFIED
            assert bool(ev.message.agent_id) == (ev.message.author == event_pb2.AUTHOR_AGENT)
        elif kind == "identify":
            assert ev.identify.traits.fields


def test_interaction_durations_are_consistent(events: list[event_pb2.Event]) -> None:
    for ev in _payloads(events, "interaction"):
        ix = ev.interaction
        assert ix.interaction_id
        for value in (ix.talk_seconds, ix.hold_seconds, ix.after_contact_work_seconds, ix.wait_seconds):
            assert value >= 0
        started, ended = ix.started_at.ToSeconds(), ix.ended_at.ToSeconds()
        assert ended >= started
        assert ended - started == ix.talk_seconds + ix.hold_seconds
        assert started - ev.timestamp.ToSeconds() == ix.wait_seconds


def test_transfers_and_abandons_exist(events: list[event_pb2.Event]) -> None:
    legs: dict[str, list[event_pb2.Interaction]] = defaultdict(list)
    for ev in _payloads(events, "interaction"):
        legs[ev.interaction.interaction_id].append(ev.interaction)
    transfers = [group for group in legs.values() if len(group) > 1]
    assert transfers
    for group in transfers:
        assert len(group) == 2
        first, second = group
        assert first.transferred and not second.transferred
        assert first.leg_id and second.leg_id and first.leg_id != second.leg_id
        assert first.agent_id and second.agent_id and first.agent_id != second.agent_id
        assert second.started_at.ToSeconds() >= first.ended_at.ToSeconds()
    abandoned = [ix for group in legs.values() for ix in group if ix.abandoned]
    assert abandoned
    for ix in abandoned:
        assert ix.agent_id == ""
        assert ix.talk_seconds == 0 and ix.hold_seconds == 0 and ix.after_contact_work_seconds == 0
        assert ix.wait_seconds > 0


def test_repeat_contacts_share_a_case_and_reason(events: list[event_pb2.Event]) -> None:
    by_case: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for ev in _payloads(events, "interaction"):
        if ev.interaction.case_id:
            by_case[ev.interaction.case_id].add((ev.interaction.interaction_id, ev.interaction.reason))
    repeats = [contacts for contacts in by_case.values() if len(contacts) > 1]
    assert len(repeats) >= 5
    for contacts in repeats:
        assert len({reason for _, reason in contacts}) == 1


def test_agent_pool_is_about_forty(events: list[event_pb2.Event]) -> None:
    agents = {ev.interaction.agent_id for ev in _payloads(events, "interaction")} - {""}
    assert 25 <= len(agents) <= 40


def test_survey_scores_are_explicit_and_in_range(events: list[event_pb2.Event]) -> None:
    surveys = _payloads(events, "survey_response")
    ranges = {event_pb2.SURVEY_TYPE_NPS: (0, 10), event_pb2.SURVEY_TYPE_CSAT: (1, 5), event_pb2.SURVEY_TYPE_CES: (1, 7)}
    assert {ev.survey_response.type for ev in surveys} == set(ranges)
    interaction_ids = {ev.interaction.interaction_id for ev in _payloads(events, "interaction")}
    for ev in surveys:
        sr = ev.survey_response
        assert sr.HasField("score")
        lo, hi = ranges[sr.type]
        assert lo <= sr.score <= hi
        assert sr.survey_id
        if sr.interaction_id:
            assert sr.interaction_id in interaction_ids
    assert any(ev.survey_response.comment for ev in surveys)
    assert any(ev.survey_response.interaction_id for ev in surveys)


def test_zero_nps_survives_the_wire() -> None:
    evs = list(generate(seed=3, customers=1500, days=DAYS, now=NOW))
    zeros = [
        ev
        for ev in evs
        if ev.WhichOneof("payload") == "survey_response"
        and ev.survey_response.type == event_pb2.SURVEY_TYPE_NPS
        and ev.survey_response.score == 0
    ]
    assert zeros
    back = event_pb2.Event.FromString(zeros[0].SerializeToString())
    assert back.survey_response.HasField("score") and back.survey_response.score == 0


def test_messages_have_varied_sentiment_and_link_to_interactions(events: list[event_pb2.Event]) -> None:
    messages = _payloads(events, "message")
    interaction_ids = {ev.interaction.interaction_id for ev in _payloads(events, "interaction")}
    assert {ev.message.interaction_id for ev in messages} <= interaction_ids
    assert {ev.message.author for ev in messages} == {
        event_pb2.AUTHOR_CUSTOMER,
        event_pb2.AUTHOR_AGENT,
        event_pb2.AUTHOR_BOT,
    }
    texts = {ev.message.text for ev in messages}
    assert len(texts) > 50
    joined = " ".join(texts).lower()
    for word in ("thank", "frustrat", "disappoint", "great", "order"):
        assert word in joined
    assert {ev.channel for ev in messages} == {event_pb2.CHANNEL_CHAT, event_pb2.CHANNEL_SMS, event_pb2.CHANNEL_SOCIAL}


def test_identifiers_overlap_across_channels(events: list[event_pb2.Event]) -> None:
    channels_by_value: dict[str, set[int]] = defaultdict(set)
    for ev in events:
        for ident in ev.identifiers:
            if ident.value not in BLOCKED:
                channels_by_value[ident.value.strip().lower()].add(ev.channel)
    shared = [value for value, chans in channels_by_value.items() if len(chans) > 1]
    assert len(shared) > CUSTOMERS // 2
    types = {ident.type for ev in events for ident in ev.identifiers}
    assert {"anonymous_id", "user_id", "email", "phone", "device_id", "chat_id", "loyalty_id", "crm_id"} <= types


def test_phones_come_in_e164_and_national_formats(events: list[event_pb2.Event]) -> None:
    phones = {ident.value for ev in events for ident in ev.identifiers if ident.type == "phone"} - BLOCKED
    assert any(re.fullmatch(r"\+1\d{10}", p) for p in phones)
    assert any(re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", p) for p in phones)


def test_about_one_percent_carry_blocked_placeholders(events: list[event_pb2.Event]) -> None:
    junk = sum(any(ident.value in BLOCKED for ident in ev.identifiers) for ev in events)
    assert 0.003 <= junk / len(events) <= 0.03
    # A placeholder never stands alone: the event still carries a real identifier.
    for ev in events:
        assert any(ident.value not in BLOCKED for ident in ev.identifiers)


def test_identify_traits_look_like_a_person(events: list[event_pb2.Event]) -> None:
    identifies = _payloads(events, "identify")
    keys = Counter(key for ev in identifies for key in ev.identify.traits.fields)
    for key in ("first_name", "last_name", "email", "phone", "date_of_birth", "address", "city", "postcode"):
        assert keys[key] > 0, key
    for ev in identifies:
        traits = json_format.MessageToDict(ev.identify.traits)
        if "date_of_birth" in traits:
            datetime.strptime(traits["date_of_birth"], "%Y-%m-%d")


def test_sources_and_context_fit_the_channel(events: list[event_pb2.Event]) -> None:
    sources: dict[int, set[str]] = defaultdict(set)
    for ev in events:
        sources[ev.channel].add(ev.source)
        if ev.channel == event_pb2.CHANNEL_WEB:
            assert {"user_agent", "ip", "locale"} <= set(ev.context.fields)
        elif ev.channel == event_pb2.CHANNEL_MOBILE_APP:
            assert "app_version" in ev.context.fields
        elif ev.channel == event_pb2.CHANNEL_IN_STORE:
            assert "store_id" in ev.context.fields
    assert sources[event_pb2.CHANNEL_WEB] == {"web-sdk"}
    assert sources[event_pb2.CHANNEL_MOBILE_APP] <= {"ios-app", "android-app"}
    assert sources[event_pb2.CHANNEL_VOICE] == {"genesys-cloud"}
    assert sources[event_pb2.CHANNEL_IN_STORE] == {"pos"}
    assert "salesforce-marketing" in sources[event_pb2.CHANNEL_EMAIL]


def test_persona_identifiers_appear_on_their_channels(events: list[event_pb2.Event]) -> None:
    seen: dict[tuple[str, str], set[int]] = defaultdict(set)
    for ev in events:
        for ident in ev.identifiers:
            seen[(ident.type, ident.value)].add(ev.channel)
    assert event_pb2.CHANNEL_WEB in seen[("email", PERSONA.email)]
    assert event_pb2.CHANNEL_VOICE in seen[("phone", PERSONA.phone)]
    assert event_pb2.CHANNEL_CHAT in seen[("chat_id", PERSONA.chat_id)]
    assert event_pb2.CHANNEL_IN_STORE in seen[("loyalty_id", PERSONA.loyalty_id)]
    assert PERSONA.name == f"{PERSONA.first_name} {PERSONA.last_name}"
    assert re.fullmatch(r"\+\d{11,15}", PERSONA.phone)


def test_persona_stitches_into_one_component(events: list[event_pb2.Event]) -> None:
    """Union-find over the persona's events, as a deterministic resolver would link them."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    mine = {
        PERSONA.email,
        PERSONA.phone,
        PERSONA.phone_national,
        PERSONA.chat_id,
        PERSONA.loyalty_id,
        PERSONA.user_id,
        PERSONA.anonymous_id,
        PERSONA.crm_id,
    }
    persona_events = [ev for ev in events if any(ident.value in mine for ident in ev.identifiers)]
    for ev in persona_events:
        keys = [f"{i.type}:{i.value}" for i in ev.identifiers]
        for key in keys[1:]:
            parent[find(key)] = find(keys[0])
    roots = {
        find(f"{t}:{v}")
        for t, v in (
            ("email", PERSONA.email),
            ("phone", PERSONA.phone),
            ("chat_id", PERSONA.chat_id),
            ("loyalty_id", PERSONA.loyalty_id),
        )
    }
    assert len(roots) == 1
    kinds = Counter(ev.WhichOneof("payload") for ev in persona_events)
    assert kinds["identify"] >= 2
    assert kinds["interaction"] >= 3
    assert kinds["survey_response"] >= 1
    assert kinds["message"] >= 3


def test_jsonl_round_trips(events: list[event_pb2.Event]) -> None:
    buf = io.StringIO()
    assert to_jsonl(events, buf) == len(events)
    lines = buf.getvalue().splitlines()
    assert len(lines) == len(events)
    parsed = [json_format.ParseDict(json.loads(line), event_pb2.Event()) for line in lines]
    assert parsed == events
    # Compact and with sorted keys, so the same dataset always writes the same file.
    assert lines[0] == json.dumps(json.loads(lines[0]), separators=(",", ":"), sort_keys=True)
    again = io.StringIO()
    to_jsonl(generate(seed=11, customers=CUSTOMERS, days=DAYS, now=NOW), again)
    assert again.getvalue() == buf.getvalue()


def test_short_windows_still_work() -> None:
    now = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
    evs = list(generate(customers=50, days=1, now=now))
    assert evs
    start = now - timedelta(days=1)
    assert all(start <= ev.timestamp.ToDatetime(tzinfo=UTC) <= now for ev in evs)
    assert any(ident.value == PERSONA.loyalty_id for ev in evs for ident in ev.identifiers)


def test_naive_now_is_utc() -> None:
    naive = list(generate(customers=5, days=7, now=datetime(2025, 6, 1, 12)))
    aware = list(generate(customers=5, days=7, now=NOW))
    assert naive == aware


@pytest.mark.parametrize(("customers", "days", "message"), [(10, 0, "days"), (-1, 10, "customers")])
def test_bad_arguments_are_rejected(customers: int, days: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        list(generate(customers=customers, days=days, now=NOW))


def test_persona_is_frozen() -> None:
    with pytest.raises(AttributeError):
        PERSONA.email = "someone@example.com"  # type: ignore[misc]
    assert isinstance(PERSONA, demo_data.DemoPersona)
