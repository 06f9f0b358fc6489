"""Tenant isolation of ProfileService, on real PostgreSQL and Redis, fuzzed over every RPC.

Tenant A ingests events through the public ingest API until it has live, merged-away and erased
profiles, identifiers under rules of its own (a custom type, region GB), traits, an interaction with
an open case, a trait update, settings of its own, a finished erasure request, page tokens and
change-feed cursors. Tenant B has a little data of its own, including an email that A has too.
Then B calls every RPC with requests built from A's secrets (A's profile ids in several spellings,
A's identifiers, A's trait values, A's page tokens and cursors, A's erasure request), mixed with B's
own ids, random ids and garbage. Every answer must:

- be the one answer the API documents for that request, as a small model of B's own data (read
  from PostgreSQL before every call) predicts it: OK with B's data only, NOT_FOUND (A's ids and
  identifiers are NOT_FOUND, never PERMISSION_DENIED), or INVALID_ARGUMENT with a BadRequest naming
  only the malformed fields (A's page tokens and feed cursors are malformed for B). INTERNAL,
  UNKNOWN, UNIMPLEMENTED and PERMISSION_DENIED are never an answer;
- carry no id, identifier, trait value, event or erasure of A that B did not send itself;
- be the same, code and message, as for a "twin" request in which every secret of A is replaced by
  a look-alike that exists nowhere: so nothing B can observe depends on whether A has the id.

Afterwards A's rows (profile, identity and ingest schemas), A's Redis streams and A's view through
the API are as they were at setup. B's own changes (trait updates, settings) carry over from one
example to the next, so the model is re-read before every call; a failure names the call and answer.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import pytest
import redis
import sqlalchemy as sa
from google.protobuf import field_mask_pb2, struct_pb2, text_format
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy.engine import Engine

from services.core.identity_rules import DEFAULT_RULES, DropReason
from services.core.ids import canonical_uuid
from services.core.pagination import encode_feed_cursor as encode_cursor
from services.profile.storage import ACTIVE, ERASED, MERGED
from tessera.v1 import event_pb2, identity_pb2, profile_pb2, profile_pb2_grpc
from tests.conftest import make_tenant
from tests.support import twins
from tests.support.grpc_errors import bad_request
from tests.support.identity import wait_outbox_drained
from tests.support.profile import Apis, apis, applied_count, identify, interaction, wait_until
from tests.support.twins import UUID_RE, IdentArg, Pick, Side, Tok, names_field, real, side_toks, twin

T = TypeVar("T")

pytestmark = pytest.mark.integration

P = profile_pb2
Ident = event_pb2.Identifier
Code = grpc.StatusCode
Stub = profile_pb2_grpc.ProfileServiceStub

RPCS = (
    "GetProfile",
    "GetCustomerContext",
    "ListTimelineEvents",
    "UpdateTraits",
    "SearchProfiles",
    "WatchProfiles",
    "ErasePerson",
    "GetErasureRequest",
    "ExportPerson",
    "GetProfileSettings",
    "UpdateProfileSettings",
)
MUTATING = {"UpdateTraits", "ErasePerson", "UpdateProfileSettings"}
#: How long a watch that is not refused is read (it ends with DEADLINE_EXCEEDED: the feed never ends).
WATCH_SECONDS = 1.0

# A's identifiers that B never had: (type, normalized value, a look-alike that exists nowhere).
A_ONLY: tuple[tuple[str, str, str], ...] = (
    ("email", "alpha.one@tenant-a.example", "alpha.twin@tenant-a.example"),
    ("device_id", "dev-alpha-1", "dev-twin-1"),
    ("phone", "+442079460011", "+442079460999"),
    ("loyalty_id", "L-ALPHA-9", "L-TWIN-9"),  # a type only A configured
    ("email", "gone@tenant-a.example", "gone.twin@tenant-a.example"),  # A erased this person
)
# A's trait values: (key, value, a look-alike no tenant has).
A_TRAITS: tuple[tuple[str, str, str], ...] = (
    ("plan", "platinum-alpha", "platinum-twin"),
    ("name", "Alpha Secret", "Twinned Secret"),
    ("city", "Alphaville", "Twinville"),
    ("tier", "gold-alpha", "gold-twin"),
    ("vip", "alpha-vip", "twin-vip"),
    ("plan", "keeper-alpha", "keeper-twin"),
)
# Both tenants have these; for B they always mean B's own profile.
SHARED = ("email", "shared@both.example")
ERASE_SHARED = ("email", "erase-shared@both.example")  # B erases its own person with this email at the end
B_PHONE = ("phone", "+14155550142")
B_DEVICE = ("device_id", "dev-bravo-1")
B_SOLO = ("email", "bravo.solo@tenant-b.example")
UNKNOWN: tuple[tuple[str, str], ...] = (
    ("email", "nobody@nowhere.example"),
    ("device_id", "dev-nobody"),
    ("phone", "+14155550999"),
    ("anonymous_id", "anon-nobody"),
)
JUNK: tuple[tuple[str, str], ...] = (
    ("email", "not-an-email"),
    ("email", "test@test.com"),  # a blocked placeholder
    ("phone", "call me maybe"),
    ("device_id", "   "),
    ("", "x"),
    ("Email", "alpha.one@tenant-a.example"),  # type names are case-sensitive
    ("crm_id", "c-1"),
)
SCHEMAS = ("profile", "identity", "ingest")


# ----------------------------------------------------------------------------------------------
# What the fuzzer puts into requests.


PROFILE_FORMS: dict[str, Callable[[str], str]] = {
    **twins.PROFILE_FORMS,
    "urn": lambda u: f"profiles/urn:uuid:{u}",
}
GARBLED_FORMS = twins.garbled_forms("timeline", ("erasure", "erasureRequests"))
VALUE_FORMS = twins.VALUE_FORMS
# How an erasure request id is spelled.
ERASURE_FORMS: dict[str, Callable[[str], str]] = {
    "name": lambda u: f"erasureRequests/{u}",
    "upper": lambda u: f"erasureRequests/{u.upper()}",
    "hex": lambda u: f"erasureRequests/{u.replace('-', '')}",
    "braces": lambda u: f"erasureRequests/{{{u}}}",
}


def b64json(data: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def unb64json(token: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))


# ----------------------------------------------------------------------------------------------
# The world: A's secrets and a snapshot of A, B's credentials and its issued tokens.


@dataclass
class World:
    a: Apis
    b: Apis
    redis: redis.Redis
    prefix: str
    a_live: list[str]
    a_merged: list[str]
    a_erased: list[str]
    a_keep: str  # A's profile with ERASE_SHARED
    a_secrets: set[str]  # lower-case strings of A that B must never be shown
    twins: dict[str, str]  # A's uuids (profiles, events, erasure request) -> look-alikes
    pairs: list[tuple[str, str]]  # secret -> twin, for comparing messages
    a_erasure: str  # "erasureRequests/{id}" of A (done)
    a_timeline_token: Tok
    a_search_token: Tok
    a_cursors: list[Tok]
    a_settings: P.ProfileSettings
    a_snapshot: dict[str, Any]
    b_main: str  # B's live profile with SHARED
    b_absorbed: str  # B's profile merged into b_main
    b_timeline_token: str  # issued for b_main, no filters
    b_search_token: str  # issued for trait plan, prefix "p"
    b_cursors: dict[str, int]  # cursors B was issued -> the feed position they resume after
    b_settings: P.ProfileSettings = field(default_factory=P.ProfileSettings)


@dataclass
class BState:
    """B's profiles as stored, read before and after each call."""

    profiles: dict[str, tuple[int, str | None]]  # profile id -> (state, merged_into)
    owner: dict[tuple[str, str], str]  # identifier -> profile
    traits: list[tuple[str, str, str]]  # (profile id, key, search text)
    timeline: dict[str, list[tuple[str, str, int]]]  # profile id -> (event id, kind, channel)
    interactions: dict[str, set[str]]
    events: set[str]  # every event id of B, in profile and identity
    erasures: set[str]
    feed: list[tuple[int, int, str, str | None]]  # (seq, kind, profile, other)
    head: int

    @property
    def ids(self) -> set[str]:
        return set(self.profiles) | self.events | self.erasures

    def keys_of(self, pid: str) -> set[tuple[str, str]]:
        return {k for k, p in self.owner.items() if p == pid}

    def by_name(self, name: str) -> tuple[str, str | None]:
        """("invalid" | "missing" | "ok", the active profile) for a profile name."""
        pid = canonical_uuid(name.removeprefix("profiles/")) if name else None
        if pid is None:
            return "invalid", None
        found = self.profiles.get(pid)
        if found is None or found[0] == ERASED:
            return "missing", None
        final = found[1] if found[0] == MERGED and found[1] else pid
        again = self.profiles.get(final)
        if again is None or again[0] != ACTIVE:
            return "missing", None
        return "ok", final

    def ident(self, t: str, v: str) -> tuple[str, str | None]:
        """("ok", profile) | ("missing", None) | ("invalid", the malformed field) under B's rules."""
        if not t:
            return "invalid", "identifier.type"
        result = DEFAULT_RULES.normalize(t, v)
        if result.dropped == DropReason.UNKNOWN_TYPE:
            return "invalid", "identifier.type"
        if result.value is None:
            return "invalid", "identifier.value"
        pid = self.owner.get((t, result.value))
        if pid is None:
            return "missing", None
        status, final = self.by_name(pid)
        return ("ok", final) if status == "ok" else ("missing", None)


def load_b(w: World) -> BState:
    t = {"t": w.b.tenant_id}
    with w.a.engine.connect() as conn:

        def q(sql: str) -> Sequence[Any]:
            return conn.execute(sa.text(sql), t).all()

        profiles = q("SELECT profile_id::text, state, merged_into::text FROM profile.profiles WHERE tenant_id = :t")
        owner = q("SELECT id_type, id_value, profile_id::text FROM profile.identifiers WHERE tenant_id = :t")
        traits = q("SELECT profile_id::text, trait_key, search_text FROM profile.traits WHERE tenant_id = :t")
        timeline = q("SELECT profile_id::text, event_id, kind, channel FROM profile.timeline WHERE tenant_id = :t")
        interactions = q("SELECT profile_id::text, interaction_id FROM profile.interactions WHERE tenant_id = :t")
        links = q("SELECT event_id FROM identity.event_links WHERE tenant_id = :t")
        erasures = q("SELECT request_id::text FROM profile.erasure_requests WHERE tenant_id = :t")
        feed = q(
            "SELECT seq, kind, profile_id::text, other_profile::text FROM profile.feed WHERE tenant_id = :t "
            "ORDER BY seq"
        )
        head = conn.execute(
            sa.text("SELECT coalesce((SELECT seq FROM profile.feed_heads WHERE tenant_id = :t), 0)"), t
        ).scalar_one()
    per_profile: dict[str, list[tuple[str, str, int]]] = {}
    for pid, eid, kind, channel in timeline:
        per_profile.setdefault(pid, []).append((str(eid), kind, int(channel)))
    per_interactions: dict[str, set[str]] = {}
    for pid, iid in interactions:
        per_interactions.setdefault(pid, set()).add(iid)
    return BState(
        profiles={p: (int(s), m) for p, s, m in profiles},
        owner={(ty, v): p for ty, v, p in owner},
        traits=[(p, k, s) for p, k, s in traits],
        timeline=per_profile,
        interactions=per_interactions,
        events={str(e) for _, e, _, _ in timeline} | {str(e) for (e,) in links},
        erasures={r for (r,) in erasures},
        feed=[(int(s), int(k), p, o) for s, k, p, o in feed],
        head=int(head),
    )


def tenant_rows(engine: Engine, tenant_id: str) -> dict[str, list[str]]:
    """Every row of the tenant in every table with a tenant_id of the profile, identity and ingest
    schemas (found in information_schema, so none is left out), in text form. ``ONLY``: a
    partition's rows are read once, as its own table's."""
    out: dict[str, list[str]] = {}
    with engine.connect() as conn:
        tables = conn.execute(
            sa.text(
                "SELECT c.table_schema, c.table_name FROM information_schema.columns c JOIN "
                "information_schema.tables t ON t.table_schema = c.table_schema AND t.table_name = c.table_name "
                "WHERE c.table_schema = ANY(:s) AND c.column_name = 'tenant_id' AND t.table_type = 'BASE TABLE' "
                "ORDER BY 1, 2"
            ),
            {"s": list(SCHEMAS)},
        ).all()
        assert len(tables) > 10, tables
        for schema, table in tables:
            sql = f'SELECT r::text FROM ONLY {schema}."{table}" r WHERE r.tenant_id = :t'
            rows = sorted(conn.execute(sa.text(sql), {"t": tenant_id}).scalars())
            if rows:
                out[f"{schema}.{table}"] = rows
    return out


def stream_entries(client: redis.Redis, prefix: str, tenant_id: str) -> dict[str, list[str]]:
    """The entry ids of every Redis stream of the tenant (events, resolved, changes, dead letters)."""
    out: dict[str, list[str]] = {}
    for key in client.scan_iter(match=f"{prefix}:{{{tenant_id}}}:*", count=1000):
        if client.type(key) == b"stream":
            entries: Any = client.xrange(key)
            out[key.decode()] = [i.decode() if isinstance(i, bytes) else str(i) for i, _ in entries]
    return out


def without_clock(msg: T) -> T:
    """A copy without the fields that say when it was computed (not what it holds)."""
    assert isinstance(msg, Message)
    out = type(msg)()
    out.CopyFrom(msg)
    profiles: list[P.Profile] = []
    if isinstance(out, P.Profile):
        profiles = [out]
    elif isinstance(out, P.GetCustomerContextResponse):
        out.ClearField("build_time")
        profiles = [out.profile]
    elif isinstance(out, P.SearchProfilesResponse):
        profiles = list(out.profiles)
    for p in profiles:
        for c in p.computed_traits:
            c.ClearField("compute_time")
    return out  # type: ignore[return-value]


def api_view(w: World) -> dict[str, str]:
    """What A sees of its own data through the API."""
    a, md = w.a, w.a.metadata
    out: dict[str, str] = {}
    for pid in [*w.a_live, *w.a_merged, *w.a_erased]:
        name = f"profiles/{pid}"
        try:
            out[f"profile {pid}"] = str(without_clock(a.get(name)))
            out[f"context {pid}"] = str(without_clock(a.context(name, limit=50)))
            out[f"timeline {pid}"] = str(a.all_timeline(name, page_size=1000))
            doc = json.loads(a.profile.ExportPerson(P.ExportPersonRequest(name=name), metadata=md).json)
            for c in doc["profile"].get("computed_traits", []):
                c.pop("compute_time", None)  # when it was computed, not what it holds
            out[f"export {pid}"] = json.dumps(doc, sort_keys=True)
        except grpc.RpcError as err:
            out[f"profile {pid}"] = err.code().name  # type: ignore[attr-defined]
    out["settings"] = str(a.profile.GetProfileSettings(P.GetProfileSettingsRequest(), metadata=md, timeout=10))
    for key in ("plan", "name", "tier"):
        found = a.profile.SearchProfiles(
            P.SearchProfilesRequest(trait=P.TraitQuery(key=key, value="a"), match=P.SEARCH_MATCH_PREFIX, page_size=100),
            metadata=md,
            timeout=10,
        )
        out[f"search {key}"] = str(without_clock(found))
    for t, v in (SHARED, ERASE_SHARED):
        out[f"by {v}"] = str(without_clock(a.get(ident=(t, v))))
    out["erasure"] = str(a.profile.GetErasureRequest(P.GetErasureRequestRequest(name=w.a_erasure), metadata=md))
    for pid in w.a_live:
        graph = a.identity.GetIdentityGraph(identity_pb2.GetIdentityGraphRequest(name=f"profiles/{pid}"), metadata=md)
        out[f"graph {pid}"] = str(graph)
    return out


def snapshot(w: World) -> dict[str, Any]:
    return {
        "rows": tenant_rows(w.a.engine, w.a.tenant_id),
        "streams": stream_entries(w.redis, w.prefix, w.a.tenant_id),
        "api": api_view(w),
    }


def settled(read: Callable[[], T], what: str, quiet: float = 0.6, timeout: float = 30.0) -> T:
    """``read()`` once it has not changed for ``quiet`` seconds (background work has finished)."""
    deadline = time.monotonic() + timeout
    last, since = read(), time.monotonic()
    while time.monotonic() - since < quiet:
        assert time.monotonic() < deadline, f"{what} never settled"
        time.sleep(0.1)
        now = read()
        if now != last:
            last, since = now, time.monotonic()
    return last


def assert_a_unchanged(w: World) -> None:
    now = snapshot(w)
    for part in ("rows", "streams", "api"):
        before, after = w.a_snapshot[part], now[part]
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        assert not changed, f"tenant A's {part} changed while B called the API: {changed}"


def wait_ingest_drained(engine: Engine, tenant_id: str) -> None:
    def drained() -> bool:
        with engine.connect() as conn:
            left = conn.execute(
                sa.text("SELECT count(*) FROM ingest.outbox WHERE tenant_id = :t"), {"t": tenant_id}
            ).scalar_one()
        return int(left) == 0

    wait_until(drained, 20, "ingest's outbox drained")


def quiesce(api: Apis) -> None:
    wait_ingest_drained(api.engine, api.tenant_id)
    wait_outbox_drained(api.engine, api.tenant_id)
    settled(lambda: tenant_rows(api.engine, api.tenant_id), f"tenant {api.tenant_id}'s rows")


def feed(api: Apis, cursor: str, seconds: float = WATCH_SECONDS) -> list[P.WatchProfilesResponse]:
    """The changes after ``cursor`` that arrive within ``seconds``."""
    stream = api.profile.WatchProfiles(P.WatchProfilesRequest(cursor=cursor), metadata=api.metadata, timeout=seconds)
    out: list[P.WatchProfilesResponse] = []
    try:
        for msg in stream:
            out.append(msg)
    except grpc.RpcError as err:
        if err.code() != Code.DEADLINE_EXCEEDED:  # type: ignore[attr-defined]
            raise
    return out


def erase_and_wait(api: Apis, request: P.ErasePersonRequest) -> P.ErasureRequest:
    started = api.profile.ErasePerson(request, metadata=api.metadata, timeout=10).request

    def done() -> P.ErasureRequest | None:
        r = api.profile.GetErasureRequest(
            P.GetErasureRequestRequest(name=started.name), metadata=api.metadata, timeout=10
        ).request
        return r if r.state == P.ERASURE_STATE_DONE else None

    finished = wait_until(done, 60, "the erasure to finish")
    assert finished is not None
    return finished


def merged_into(api: Apis, one: tuple[str, str], other: tuple[str, str]) -> str:
    """Until both identifiers belong to one profile; returns it."""

    def same() -> str | None:
        try:
            x, y = api.get(ident=one), api.get(ident=other)
        except grpc.RpcError:
            return None
        return x.profile_id if x.profile_id == y.profile_id else None

    found = wait_until(same, 20, f"{one} and {other} on one profile")
    assert found is not None
    return found


@pytest.fixture(scope="module")
def world(
    engine: Engine,
    ingest_channel: grpc.Channel,
    identity_channel: grpc.Channel,
    profile_channel: grpc.Channel,
    redis_client: redis.Redis,
    redis_prefix: str,
) -> World:
    ta, tb = make_tenant(engine, "piso-a"), make_tenant(engine, "piso-b")
    a = apis(ingest_channel, identity_channel, profile_channel, engine, ta.tenant_id, ta.metadata)
    b = apis(ingest_channel, identity_channel, profile_channel, engine, tb.tenant_id, tb.metadata)

    # A's own identity rules: a custom type and British national numbers.
    rules = a.identity.GetIdentityRules(identity_pb2.GetIdentityRulesRequest(), metadata=a.metadata).rules
    rules.types.add(type="loyalty_id", normalizer="trim", priority=70, max_per_profile=5)
    rules.default_region = "GB"
    a.identity.UpdateIdentityRules(
        identity_pb2.UpdateIdentityRulesRequest(
            rules=rules, update_mask=field_mask_pb2.FieldMask(paths=["types", "default_region"])
        ),
        metadata=a.metadata,
    )
    a_settings = a.settings(
        P.ProfileSettings(
            trait_policies={"plan": P.TRAIT_POLICY_LATEST, "tier": P.TRAIT_POLICY_FIRST},
            source_priority=["crm", "web-alpha"],
            computed_traits=[
                P.ComputedTraitDefinition(
                    key="calls", aggregation=P.AGGREGATION_COUNT, filter=P.EventFilter(kinds=["interaction"])
                )
            ],
        )
    )
    email, device, phone, loyalty, gone = ((t, v) for t, v, _ in A_ONLY)
    a_messages = [f"msg-alpha-{secrets.token_hex(4)}-{i}" for i in range(7)]
    a_events = a.send(
        identify(
            ("email", "Alpha.One@Tenant-A.example"),
            device,
            traits={"plan": "platinum-alpha", "name": "Alpha Secret", "city": "Alphaville"},
            message_id=a_messages[0],
        ),
        interaction(
            ("phone", "020 7946 0011"),
            interaction_id="call-alpha-1",
            case_id="CASE-ALPHA-1",
            case_status=event_pb2.CASE_STATUS_OPEN,
            message_id=a_messages[1],
        ),
        identify(SHARED, loyalty, traits={"plan": "premium-alpha", "tier": "gold-alpha"}, message_id=a_messages[2]),
        identify(ERASE_SHARED, traits={"plan": "keeper-alpha"}, message_id=a_messages[3]),
        identify(gone, traits={"name": "Gone Alpha"}, message_id=a_messages[4]),
    )
    a.wait_applied(5)
    p_web, p_voice = a.get(ident=email).profile_id, a.get(ident=phone).profile_id
    p_gone = a.get(ident=gone).profile_id
    # The web and the voice profile turn out to be one person: a merge (one id is merged away).
    a_events += a.send(
        identify(email, ("phone", "+44 20 7946 0011"), traits={"plan": "platinum-alpha"}, message_id=a_messages[5])
    )
    survivor = merged_into(a, email, phone)
    absorbed = p_voice if survivor == p_web else p_web
    a.wait_merged(f"profiles/{absorbed}", f"profiles/{survivor}")
    a.update_traits(f"profiles/{survivor}", {"vip": "alpha-vip"}, ["traits.vip"])
    a_erasure = erase_and_wait(a, P.ErasePersonRequest(identifier=Ident(type=gone[0], value=gone[1]), reason="gdpr"))
    assert a_erasure.profile == f"profiles/{p_gone}"
    a_keep = a.get(ident=ERASE_SHARED).profile_id
    quiesce(a)

    # A's page tokens and feed cursors.
    a_page = a.timeline(f"profiles/{survivor}", page_size=1)
    assert a_page.next_page_token
    a_search = a.profile.SearchProfiles(
        P.SearchProfilesRequest(trait=P.TraitQuery(key="plan", value="p"), match=P.SEARCH_MATCH_PREFIX, page_size=1),
        metadata=a.metadata,
    )
    assert a_search.next_page_token
    a_feed = feed(a, encode_cursor(a.tenant_id, 0))
    assert len(a_feed) >= 5, a_feed

    # B: the shared email and a phone, a device, a call, then an event that joins them; a second person.
    b.send(
        identify(SHARED, B_PHONE, traits={"plan": "platinum-bravo", "name": "Bravo One"}),
        identify(B_DEVICE, traits={"plan": "premium-bravo"}),
    )
    b.wait_applied(2)
    b_shared, b_device = b.get(ident=SHARED).profile_id, b.get(ident=B_DEVICE).profile_id
    b.send(
        interaction(("phone", "(415) 555-0142"), interaction_id="call-bravo-1"),
        identify(B_DEVICE, ("email", "SHARED@both.example"), traits={"tier": "silver-bravo"}),
        identify(B_SOLO, traits={"plan": "pro-bravo"}),
    )
    b_main = merged_into(b, SHARED, B_DEVICE)
    b_absorbed = b_device if b_main == b_shared else b_shared
    b.wait_merged(f"profiles/{b_absorbed}", f"profiles/{b_main}")
    b.wait_applied(5)
    quiesce(b)
    b_page = b.timeline(f"profiles/{b_main}", page_size=1)
    assert b_page.next_page_token
    b_search = b.profile.SearchProfiles(
        P.SearchProfilesRequest(trait=P.TraitQuery(key="plan", value="p"), match=P.SEARCH_MATCH_PREFIX, page_size=1),
        metadata=b.metadata,
    )
    assert b_search.next_page_token
    b_feed = feed(b, encode_cursor(b.tenant_id, 0))
    assert len(b_feed) >= 3, b_feed
    b_cursors = {m.cursor: int(unb64json(m.cursor)["s"]) for m in (b_feed[0], b_feed[-1])}

    with engine.connect() as conn:
        a_profiles = conn.execute(
            sa.text("SELECT profile_id::text, state FROM profile.profiles WHERE tenant_id = :t"), {"t": a.tenant_id}
        ).all()
        stored = conn.execute(
            sa.text("SELECT event_id::text FROM ingest.events WHERE tenant_id = :t"), {"t": a.tenant_id}
        ).scalars()
        a_event_ids = sorted({*stored, *a_events})
    a_live = sorted(p for p, s in a_profiles if s == ACTIVE)
    a_merged = sorted(p for p, s in a_profiles if s == MERGED)
    a_erased = sorted(p for p, s in a_profiles if s == ERASED)
    assert (len(a_live), a_merged, a_erased) == (3, [absorbed], [p_gone]), a_profiles
    erasure_id = a_erasure.name.removeprefix("erasureRequests/")
    twins = {u: str(uuid.uuid4()) for u in [*a_live, *a_merged, *a_erased, *a_event_ids, erasure_id]}

    def token_twin(token: str) -> str:
        """A's page token with A's ids swapped, bound to no query of any tenant."""
        position = json.dumps(unb64json(token)["p"])
        for u, look_alike in twins.items():
            position = position.replace(u, look_alike)
        return b64json({"p": json.loads(position), "q": "0" * 16})

    nobody = f"nobody-{secrets.token_hex(4)}"
    a_cursors = [
        Tok(m.cursor, encode_cursor(nobody, int(unb64json(m.cursor)["s"]))) for m in (a_feed[0], a_feed[-1])
    ] + [Tok(encode_cursor(a.tenant_id, 10**6), encode_cursor(nobody, 10**6))]
    pairs = [*twins.items(), *((v, tw) for _, v, tw in A_ONLY), *((v, tw) for _, v, tw in A_TRAITS)]
    pairs += [(u.replace("-", ""), t.replace("-", "")) for u, t in twins.items()]
    a_strings = [v for _, v, _ in A_ONLY] + [v for _, v, _ in A_TRAITS] + a_messages
    a_strings += ["call-alpha-1", "case-alpha-1", "premium-alpha", "gone alpha", "+442079460011"]
    w = World(
        a=a,
        b=b,
        redis=redis_client,
        prefix=redis_prefix,
        a_live=a_live,
        a_merged=a_merged,
        a_erased=a_erased,
        a_keep=a_keep,
        a_secrets={s.lower() for s in [*twins, *a_strings]},
        twins=twins,
        pairs=sorted(pairs, key=lambda p: -len(p[0])),
        a_erasure=a_erasure.name,
        a_timeline_token=Tok(a_page.next_page_token, token_twin(a_page.next_page_token)),
        a_search_token=Tok(a_search.next_page_token, token_twin(a_search.next_page_token)),
        a_cursors=a_cursors,
        a_settings=a_settings,
        a_snapshot={},
        b_main=b_main,
        b_absorbed=b_absorbed,
        b_timeline_token=b_page.next_page_token,
        b_search_token=b_search.next_page_token,
        b_cursors=b_cursors,
        b_settings=b.profile.GetProfileSettings(P.GetProfileSettingsRequest(), metadata=b.metadata).settings,
    )
    w.a_snapshot = snapshot(w)
    return w


# ----------------------------------------------------------------------------------------------
# Calls: a request built from Toks, and what B's own data says the answer must be.

# Every answer a ProfileService RPC documents for a tenant with valid credentials, in this setup
# (FAILED_PRECONDITION is only for a cursor older than the feed keeps, which none here is).
DOCUMENTED = frozenset({Code.OK, Code.NOT_FOUND, Code.INVALID_ARGUMENT})
NEVER = frozenset({Code.INTERNAL, Code.UNKNOWN, Code.UNIMPLEMENTED, Code.PERMISSION_DENIED})


@dataclass(frozen=True)
class Expect:
    """The answer the API documents for a call, given B's data before it."""

    codes: frozenset[grpc.StatusCode]
    # Checks of an OK response against B's data before the call.
    check: Callable[[Any], None] | None = None
    # INVALID_ARGUMENT: the malformed request fields. The BadRequest must name at least one field
    # violation, and every one it names must be (inside) one of these.
    fields: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        assert self.codes and self.codes <= DOCUMENTED, f"an oracle accepting {self.codes}"
        assert (Code.INVALID_ARGUMENT in self.codes) == bool(self.fields), "INVALID_ARGUMENT names its fields"


def ok(check: Callable[[Any], None] | None = None) -> Expect:
    return Expect(frozenset({Code.OK}), check)


NOT_FOUND = Expect(frozenset({Code.NOT_FOUND}))


def invalid(*fields: str) -> Expect:
    """INVALID_ARGUMENT, with a BadRequest naming (some of) these request fields."""
    return Expect(frozenset({Code.INVALID_ARGUMENT}), fields=frozenset(fields))


@dataclass
class Call:
    rpc: str
    build: Callable[[Pick], Message]
    toks: list[Tok]
    expect: Callable[[BState], Expect]

    def __repr__(self) -> str:
        return f"{self.rpc}({text_format.MessageToString(self.build(real), as_one_line=True, as_utf8=True)})"


def put_side(req: Any, side: Side, pick: Pick) -> Any:
    if isinstance(side, Tok):
        req.name = pick(side)  # sets the oneof, even to ""
    elif side is not None:
        req.identifier.CopyFrom(Ident(type=side[0], value=pick(side[1])))
    return req


@dataclass(frozen=True)
class Found:
    profile_id: str
    redirected: bool


def locate(b: BState, side: Side) -> Expect | Found:
    """What locating the `profile` oneof gives for B: an error answer, or B's profile."""
    if side is None:
        return invalid("profile")
    if isinstance(side, Tok):
        status, final = b.by_name(side.real)
        if status == "invalid":
            return invalid("name")
        if final is None:
            return NOT_FOUND
        return Found(final, final != canonical_uuid(side.real.removeprefix("profiles/")))
    status, got = b.ident(side[0], side[1].real)
    if status == "invalid":
        assert got is not None
        return invalid(got)
    return NOT_FOUND if got is None else Found(got, False)


def get_profile_call(side: Side) -> Call:
    def expect(b: BState) -> Expect:
        found = locate(b, side)
        if isinstance(found, Expect):
            return found

        def check(resp: P.GetProfileResponse) -> None:
            p = resp.profile
            assert (p.profile_id, p.name, p.redirected) == (
                found.profile_id,
                f"profiles/{found.profile_id}",
                found.redirected,
            )
            assert {(i.type, i.value) for i in p.identifiers} == b.keys_of(found.profile_id)
            assert p.event_count == len(b.timeline.get(found.profile_id, []))

        return ok(check)

    return Call("GetProfile", lambda pick: put_side(P.GetProfileRequest(), side, pick), side_toks(side), expect)


def context_call(side: Side, limit: int) -> Call:
    def expect(b: BState) -> Expect:
        if not 0 < (limit or 10) <= 50:
            return invalid("interaction_limit")
        found = locate(b, side)
        if isinstance(found, Expect):
            return found

        def check(resp: P.GetCustomerContextResponse) -> None:
            assert resp.profile.profile_id == found.profile_id
            assert {(i.type, i.value) for i in resp.profile.identifiers} == b.keys_of(found.profile_id)
            mine = b.interactions.get(found.profile_id, set())
            assert {i.interaction_id for i in resp.recent_interactions} == mine
            assert {c.interaction_id for c in resp.open_cases} <= mine

        return ok(check)

    def build(pick: Pick) -> Message:
        return put_side(P.GetCustomerContextRequest(interaction_limit=limit), side, pick)  # type: ignore[no-any-return]

    return Call("GetCustomerContext", build, side_toks(side), expect)


TIMELINE_KINDS = ("identify", "track", "interaction", "survey_response", "message")


def timeline_call(w: World, parent: Tok, size: int, token: Tok, kinds: Sequence[str], channels: Sequence[int]) -> Call:
    def expect(b: BState) -> Expect:
        status, final = b.by_name(parent.real)
        if status == "invalid":
            return invalid("parent")
        if final is None:
            return NOT_FOUND
        if size < 0:
            return invalid("page_size")
        bad = [f"kinds[{i}]" for i, k in enumerate(kinds) if k not in TIMELINE_KINDS]
        bad += [f"channels[{i}]" for i, c in enumerate(channels) if not 0 < c <= 9]
        if bad:
            return invalid(*bad)
        issued = token.real == w.b_timeline_token and final == w.b_main and not kinds and not channels
        if token.real and not issued:
            return invalid("page_token")
        rows = [
            r for r in b.timeline.get(final, []) if (not kinds or r[1] in kinds) and (not channels or r[2] in channels)
        ]
        limit = min(size or 50, 1000)

        def check(resp: P.ListTimelineEventsResponse) -> None:
            got = [e.event_id for e in resp.events]
            assert len(got) == len(set(got)) and set(got) <= {r[0] for r in rows}, (got, rows)
            if not token.real:
                assert len(got) == min(limit, len(rows)), (got, rows)
                assert bool(resp.next_page_token) == (len(rows) > limit)
            assert all(e.event.profile_id == final for e in resp.events)

        return ok(check)

    def build(pick: Pick) -> Message:
        return P.ListTimelineEventsRequest(
            parent=pick(parent),
            page_size=size,
            page_token=pick(token),
            kinds=list(kinds),
            channels=list(channels),  # type: ignore[arg-type]
        )

    return Call("ListTimelineEvents", build, [parent, token], expect)


@dataclass(frozen=True)
class TraitSearch:
    key: str
    value: Tok


@dataclass(frozen=True)
class IdentSearch:
    type: str
    value: Tok


def search_call(w: World, query: TraitSearch | IdentSearch | None, match: int, size: int, token: Tok) -> Call:
    prefix = match == P.SEARCH_MATCH_PREFIX

    def expect(b: BState) -> Expect:
        if size < 0:
            return invalid("page_size")
        limit = min(size or 20, 100)
        active = {p for p, (s, _) in b.profiles.items() if s == ACTIVE}
        expected: list[str]
        if query is None:
            return invalid("query")
        if isinstance(query, TraitSearch):
            key, value = query.key, query.value.real
            bad = (["trait.key"] if not key or len(key) > 128 else []) + (
                ["trait.value"] if not value or len(value) > 512 else []
            )
            if bad:
                return invalid(*bad)
            issued = token.real == w.b_search_token and (key, value.lower(), prefix) == ("plan", "p", True)
            text = value.lower()
            expected = sorted(
                p for p, k, s in b.traits if k == key and (s.startswith(text) if prefix else s == text) and p in active
            )
        else:
            t, raw = query.type, query.value.real
            issued = False
            if prefix:
                if not t or not raw or len(raw) > 256:
                    return invalid("identifier")
                value = raw.strip().lower() if t == "email" else raw.strip()
                matches = sorted((v, p) for (ty, v), p in b.owner.items() if ty == t and v.startswith(value))
            else:
                status, got = b.ident(t, raw)
                if status == "invalid":
                    assert got is not None
                    return invalid(got)
                matches = [("", got)] if got is not None else []
            expected = list(dict.fromkeys(p for _, p in matches[:limit] if p in active))
        if token.real and not issued:
            return invalid("page_token")

        def check(resp: P.SearchProfilesResponse) -> None:
            got = [p.profile_id for p in resp.profiles]
            if token.real:
                assert set(got) <= set(expected), (got, expected)
            else:
                assert sorted(got) == sorted(expected[:limit]), (got, expected)
            for p in resp.profiles:
                assert {(i.type, i.value) for i in p.identifiers} == b.keys_of(p.profile_id)

        return ok(check)

    def build(pick: Pick) -> Message:
        req = P.SearchProfilesRequest(match=match, page_size=size, page_token=pick(token))  # type: ignore[arg-type]
        if isinstance(query, TraitSearch):
            req.trait.CopyFrom(P.TraitQuery(key=query.key, value=pick(query.value)))
        elif isinstance(query, IdentSearch):
            req.identifier.CopyFrom(Ident(type=query.type, value=pick(query.value)))
        return req

    toks = [token] + ([query.value] if query is not None else [])
    return Call("SearchProfiles", build, toks, expect)


def update_traits_call(ref: Tok, values: dict[str, Any], paths: Sequence[str], source: str) -> Call:
    def expect(b: BState) -> Expect:
        status, final = b.by_name(ref.real)
        if status == "invalid":
            return invalid("profile")
        if final is None:
            return NOT_FOUND
        bad = ["source"] if not source or len(source) > 128 else []
        bad += ["update_mask"] if not paths else []
        keys: list[str] = []
        for i, p in enumerate(paths):
            if p == "traits":
                keys += list(values)
            elif p.startswith("traits.") and 0 < len(p) - 7 <= 128:
                keys.append(p[7:])
            else:
                bad.append(f"update_mask.paths[{i}]")
        bad += [f"traits.{k}" for k in values if k not in keys]
        if bad:
            return invalid(*bad)

        def check(resp: P.UpdateTraitsResponse) -> None:
            assert resp.profile.profile_id == final

        return ok(check)

    def build(pick: Pick) -> Message:
        traits = struct_pb2.Struct()
        traits.update(values)
        return P.UpdateTraitsRequest(
            profile=pick(ref), traits=traits, update_mask=field_mask_pb2.FieldMask(paths=list(paths)), source=source
        )

    return Call("UpdateTraits", build, [ref], expect)


def get_settings_call(w: World) -> Call:
    def expect(b: BState) -> Expect:
        def check(resp: P.GetProfileSettingsResponse) -> None:
            assert resp.settings == w.b_settings, "B's settings are not what B last set"

        return ok(check)

    return Call("GetProfileSettings", lambda pick: P.GetProfileSettingsRequest(), [], expect)


def settings_updates(w: World) -> dict[str, tuple[P.ProfileSettings, list[str], set[str]]]:
    """B's possible settings changes: (settings, mask, the fields a refusal names; empty if valid)."""
    copy = P.ProfileSettings()
    copy.CopyFrom(w.a_settings)
    copy.ClearField("update_time")
    return {
        "policies": (P.ProfileSettings(trait_policies={"plan": P.TRAIT_POLICY_FIRST}), ["trait_policies"], set()),
        "sources": (P.ProfileSettings(source_priority=["crm", "web"]), ["source_priority"], set()),
        "copy of A": (copy, [], set()),
        "clear": (P.ProfileSettings(), [], set()),
        "bad policy": (
            P.ProfileSettings(trait_policies={"plan": 9}),  # type: ignore[dict-item]
            ["trait_policies"],
            {"settings.trait_policies['plan']"},
        ),
        "bad mask": (P.ProfileSettings(), ["bogus"], {"update_mask.paths[0]"}),
    }


def update_settings_call(w: World, choice: str) -> Call:
    settings, mask, bad = settings_updates(w)[choice]

    def expect(b: BState) -> Expect:
        if bad:
            return invalid(*bad)

        def check(resp: P.UpdateProfileSettingsResponse) -> None:
            if not mask:
                assert dict(resp.settings.trait_policies) == dict(settings.trait_policies)
                assert list(resp.settings.source_priority) == list(settings.source_priority)
                assert [c.key for c in resp.settings.computed_traits] == [c.key for c in settings.computed_traits]
            w.b_settings = resp.settings

        return ok(check)

    request = P.UpdateProfileSettingsRequest(settings=settings, update_mask=field_mask_pb2.FieldMask(paths=mask))
    return Call("UpdateProfileSettings", lambda pick: request, [], expect)


def watch_call(w: World, cursor: Tok, kinds: Sequence[int]) -> Call:
    def expect(b: BState) -> Expect:
        if bad := [f"kinds[{i}]" for i, k in enumerate(kinds) if not 0 < k <= 5]:
            return invalid(*bad)
        if cursor.real and cursor.real not in w.b_cursors:
            return invalid("cursor")  # A's, forged, from the future or garbage
        after = w.b_cursors.get(cursor.real, b.head)
        wanted = [(k, p, o) for s, k, p, o in b.feed if s > after and (not kinds or k in kinds)]

        def check(resp: list[P.WatchProfilesResponse]) -> None:
            got = [
                (m.kind, m.profile.removeprefix("profiles/"), m.other_profile.removeprefix("profiles/") or None)
                for m in resp
            ]
            assert got == wanted, f"B's feed after its cursor is not B's changes: {got} != {wanted}"

        return ok(check)

    def build(pick: Pick) -> Message:
        return P.WatchProfilesRequest(cursor=pick(cursor), kinds=list(kinds))  # type: ignore[arg-type]

    return Call("WatchProfiles", build, [cursor], expect)


def erase_call(side: Side, reason: str) -> Call:
    """B asks to erase a person. The fuzz never names one of B's own (that would empty B's world),
    so anything that parses is someone else's or nobody's: NOT_FOUND."""

    def expect(b: BState) -> Expect:
        if not reason or len(reason) > 1000:
            return invalid("reason")
        found = locate(b, side)
        assert isinstance(found, Expect), "the fuzz must not erase B's own profiles"
        return found

    def build(pick: Pick) -> Message:
        return put_side(P.ErasePersonRequest(reason=reason), side, pick)  # type: ignore[no-any-return]

    return Call("ErasePerson", build, side_toks(side), expect)


def erasure_call(name: Tok) -> Call:
    def expect(b: BState) -> Expect:
        rid = (
            canonical_uuid(name.real.removeprefix("erasureRequests/"))
            if name.real.startswith("erasureRequests/")
            else None
        )
        if rid is None:
            return invalid("name")
        if rid not in b.erasures:
            return NOT_FOUND

        def check(resp: P.GetErasureRequestResponse) -> None:
            assert resp.request.name == f"erasureRequests/{rid}"
            assert resp.request.profile.removeprefix("profiles/") in b.profiles

        return ok(check)

    return Call("GetErasureRequest", lambda pick: P.GetErasureRequestRequest(name=pick(name)), [name], expect)


def export_call(side: Side) -> Call:
    def expect(b: BState) -> Expect:
        found = locate(b, side)
        if isinstance(found, Expect):
            return found

        def check(resp: P.ExportPersonResponse) -> None:
            assert resp.profile == f"profiles/{found.profile_id}"
            doc = json.loads(resp.json)
            assert doc["profile"]["profile_id"] == found.profile_id
            assert {e["event_id"] for e in doc["timeline"]} == {r[0] for r in b.timeline.get(found.profile_id, [])}
            graph = doc["identity"]["graph"]["graph"]
            assert graph["profile_id"] == found.profile_id, doc["identity"]

        return ok(check)

    return Call("ExportPerson", lambda pick: put_side(P.ExportPersonRequest(), side, pick), side_toks(side), expect)


# ----------------------------------------------------------------------------------------------
# Running a call as B and judging the answer.


@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    response: Any
    text: str
    violations: tuple[tuple[str, str], ...] = ()


DETAIL_TYPES = (
    error_details_pb2.BadRequest,
    error_details_pb2.PreconditionFailure,
    error_details_pb2.ResourceInfo,
    error_details_pb2.ErrorInfo,
    error_details_pb2.QuotaFailure,
    error_details_pb2.RetryInfo,
    error_details_pb2.DebugInfo,
)


def invoke(stub: Stub, rpc: str, request: Message, metadata: Sequence[tuple[str, str]] | None) -> Outcome:
    try:
        if rpc == "WatchProfiles":
            stream = stub.WatchProfiles(request, metadata=metadata, timeout=WATCH_SECONDS)
            msgs: list[P.WatchProfilesResponse] = []
            try:
                for msg in stream:
                    msgs.append(msg)
            except grpc.RpcError as err:
                if err.code() != Code.DEADLINE_EXCEEDED:  # type: ignore[attr-defined]
                    raise
            text = "\n".join(text_format.MessageToString(m, as_one_line=True) for m in msgs)
            return Outcome(Code.OK, msgs, text)
        resp = getattr(stub, rpc)(request, metadata=metadata, timeout=10)
    except grpc.RpcError as err:
        text = f"{err.code().name}: {err.details()}"  # type: ignore[attr-defined]
        status = rpc_status.from_call(err)  # type: ignore[arg-type]
        for detail in status.details if status is not None else ():
            for kind in DETAIL_TYPES:
                msg = kind()
                if detail.Unpack(msg):
                    text += f"\n{kind.__name__} {text_format.MessageToString(msg, as_utf8=True)}"
                    break
            else:
                text += f"\n{detail.type_url} {detail.value!r}"
        violations = tuple(bad_request(err)) if status is not None else ()
        return Outcome(err.code(), None, text, violations)  # type: ignore[attr-defined]
    return Outcome(Code.OK, resp, text_format.MessageToString(resp, as_utf8=True))


def nul_paths(message: Message, path: str = "") -> list[str]:
    """The field paths of every string in a request that holds NUL (the drawn requests hold none in
    map keys or Struct values)."""
    out: list[str] = []
    for fd, value in message.ListFields():
        name = f"{path}.{fd.name}" if path else fd.name
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            continue
        values = list(value) if fd.is_repeated else [value]
        for i, v in enumerate(values):
            at = f"{name}[{i}]" if fd.is_repeated else name
            if fd.type == fd.TYPE_STRING and "\x00" in v:
                out.append(at)
            elif fd.type == fd.TYPE_MESSAGE:
                out.extend(nul_paths(v, at))
    return out


def swap(text: str, toks: Sequence[Tok], w: World) -> str:
    """``text`` with every secret of A the request carried replaced by its twin."""
    pairs = [(t.real, t.twin) for t in toks if t.secret] + [(t.real.lower(), t.twin.lower()) for t in toks if t.secret]
    mapping: dict[str, str] = {}
    for old, new in [*pairs, *w.pairs]:
        if old:
            mapping.setdefault(old, new)
    if not mapping:
        return text
    # One pass, longest first at every position: a replacement is never replaced again.
    pattern = re.compile("|".join(re.escape(k) for k in sorted(mapping, key=len, reverse=True)))
    return pattern.sub(lambda m: mapping[m.group(0)], text)


def issued_tokens(resp: Any) -> list[str]:
    """The page tokens and feed cursors an answer hands out."""
    if isinstance(resp, list):
        return [m.cursor for m in resp]
    token = getattr(resp, "next_page_token", "")
    return [token] if token else []


def opened(token: str) -> str:
    """What an opaque token encodes (base64 of JSON, as every token of this API is), or itself."""
    try:
        return json.dumps(unb64json(token))
    except ValueError:
        return token


def identifiers_in(request: Message) -> list[event_pb2.Identifier]:
    return [v for fd, v in request.ListFields() if fd.message_type is event_pb2.Identifier.DESCRIPTOR]


def run(w: World, call: Call, *, want: grpc.StatusCode | None = None) -> Outcome:
    """Call as B; check the answer against the model, for leaks, and against the twin request."""
    before = load_b(w)
    request = call.build(real)
    # A string holding NUL is refused before anything is looked up (and names only its own field).
    expect = invalid(*nul) if (nul := nul_paths(request)) else call.expect(before)
    out = invoke(w.b.profile, call.rpc, request, w.b.metadata)
    what = f"{call!r} -> {out.text[:3000]}"
    assert out.code not in NEVER, f"{out.code.name} is never a documented answer: {what}"
    assert out.code in expect.codes, f"expected {sorted(c.name for c in expect.codes)}: {what}"
    if want is not None:
        assert out.code is want, f"expected {want.name}: {what}"
    if out.code is Code.INVALID_ARGUMENT:
        named = [f for f, _ in out.violations]
        assert named, f"INVALID_ARGUMENT without a field violation: {what}"
        stray = [f for f in named if not names_field(f, expect.fields)]
        assert not stray, f"field violations {stray}, expected only {sorted(expect.fields)}: {what}"
    after = load_b(w)

    # Nothing of A's that B did not send itself.
    sent = text_format.MessageToString(request, as_utf8=True).lower()
    # The server may echo an id B sent in its canonical spelling (hyphenated, lower case).
    hexes = re.findall(r"[0-9a-f]{32}", re.sub(r"[-{}]", "", sent))
    sent += " " + " ".join(str(uuid.UUID(h)) for h in hexes)
    # ...and an identifier B sent as B's rules normalize it.
    normalized = (DEFAULT_RULES.normalize(i.type, i.value).value for i in identifiers_in(request))
    sent += " " + " ".join(v.lower() for v in normalized if v is not None)
    # Page tokens and cursors are opaque, not secret: what they encode is shown to B as well.
    shown = (out.text + " " + " ".join(opened(t) for t in issued_tokens(out.response))).lower()
    leaked = {s for s in w.a_secrets if s in shown and s not in sent}
    assert not leaked, f"A's data in B's answer {leaked}: {what}"
    foreign = set(UUID_RE.findall(shown)) - set(UUID_RE.findall(sent)) - after.ids
    assert not foreign, f"ids that are not B's in B's answer {foreign}: {what}"
    if out.code is Code.OK and expect.check is not None:
        try:
            expect.check(out.response)
        except AssertionError as err:
            raise AssertionError(f"{err}: {what}") from None

    if call.rpc == "UpdateProfileSettings":
        a_now = w.a.profile.GetProfileSettings(P.GetProfileSettingsRequest(), metadata=w.a.metadata).settings
        assert a_now == w.a_settings, "B's UpdateProfileSettings changed A's settings"

    # The twin: the same request with A's secrets swapped for look-alikes that exist nowhere.
    if any(t.secret for t in call.toks):
        assert not (out.code is Code.OK and call.rpc in MUTATING), f"B changed something with A's ids: {what}"
        twin_out = invoke(w.b.profile, call.rpc, call.build(twin), w.b.metadata)
        assert (out.code, swap(out.text, call.toks, w)) == (twin_out.code, twin_out.text), (
            f"B can tell A's secret from one that does not exist: {what} | twin -> {twin_out.text}"
        )
    return out


# ----------------------------------------------------------------------------------------------
# Strategies.


PROFILE_KINDS = ["a_live", "a_merged", "a_erased"] * 2 + ["b", "b"] + ["random", "garbled", "garbage"]
IDENT_KINDS = ["a"] * 3 + ["shared", "b", "unknown", "junk", "text"]
A_SPELLINGS = ["exact", "exact", "upper", "padded", "spaced", "gb_national", "nul"]


def pick(data: st.DataObject, pool: Sequence[T]) -> T:
    """One of ``pool``, which may change between examples (B's live data): an index, not a
    ``sampled_from``, keeps the shape of the drawn data the same, as hypothesis requires."""
    return pool[data.draw(st.integers(0, 2**16), label="index") % len(pool)]


def any_text(max_size: int) -> st.SearchStrategy[str]:
    """Any text, NUL included (the core guard refuses it as INVALID_ARGUMENT naming the field)."""
    text = st.text(st.characters(codec="utf-8"), max_size=max_size)
    return text | st.tuples(text, text).map(lambda p: f"{p[0]}\x00{p[1]}")


def draw_profile(data: st.DataObject, w: World, b: BState, *, own: bool = True) -> Tok:
    kinds = PROFILE_KINDS if own else [k for k in PROFILE_KINDS if k != "b"]
    kind = data.draw(st.sampled_from(kinds), label="profile")
    if kind == "garbage":
        garbage = st.sampled_from(["", "profiles/", "profiles/nope", "erasureRequests/1", "\x00"]) | any_text(30)
        return Tok(data.draw(garbage))
    if kind.startswith("a") or kind == "garbled":
        pool = (
            [*w.a_live, *w.a_merged, *w.a_erased]
            if kind == "garbled"
            else {"a_live": w.a_live, "a_merged": w.a_merged, "a_erased": w.a_erased}[kind]
        )
        pid = data.draw(st.sampled_from(pool))
        base = Tok(pid, w.twins[pid])
    elif kind == "b":
        base = Tok(pick(data, sorted(b.profiles)))
    else:
        base = Tok(str(data.draw(st.uuids())))
    forms = GARBLED_FORMS if kind == "garbled" else PROFILE_FORMS
    form = forms[data.draw(st.sampled_from(sorted(forms)), label="form")]
    return Tok(form(base.real), form(base.twin))


def draw_ident(data: st.DataObject, w: World, b: BState, *, own: bool = True) -> IdentArg:
    kinds = IDENT_KINDS if own else [k for k in IDENT_KINDS if k not in ("shared", "b")]
    kind = data.draw(st.sampled_from(kinds), label="identifier")
    if kind == "a":
        t, value, look_alike = data.draw(st.sampled_from(A_ONLY))
        form = VALUE_FORMS[data.draw(st.sampled_from(A_SPELLINGS), label="spelling")]
        return t, Tok(form(value), form(look_alike))
    if kind == "text":
        t = data.draw(st.sampled_from(["email", "phone", "device_id", "loyalty_id", "crm_id"]))
        return t, Tok(data.draw(any_text(30)))
    pool = {
        "shared": [SHARED],
        "b": sorted(b.owner) or [SHARED],
        "unknown": list(UNKNOWN),
        "junk": list(JUNK),
    }[kind]
    t, value = pick(data, pool)
    form = VALUE_FORMS[data.draw(st.sampled_from(["exact", "exact", "upper", "padded", "nul"]), label="spelling")]
    return t, Tok(form(value))


def draw_side(data: st.DataObject, w: World, b: BState, *, own: bool = True) -> Side:
    kind = data.draw(st.sampled_from(["identifier", "profile"] * 3 + ["unset"]), label="side")
    if kind == "unset":
        return None
    return draw_ident(data, w, b, own=own) if kind == "identifier" else draw_profile(data, w, b, own=own)


def draw_token(data: st.DataObject, w: World, own: str) -> Tok:
    kind = data.draw(st.sampled_from(["none", "none", "a_timeline", "a_search", "own", "garbage"]), label="token")
    return {
        "none": Tok(""),
        "a_timeline": w.a_timeline_token,
        "a_search": w.a_search_token,
        "own": Tok(own),
        "garbage": Tok("@@@"),
    }[kind]


def draw_trait_value(data: st.DataObject) -> Tok:
    kind = data.draw(st.sampled_from(["a", "a", "a_prefix", "b", "common", "text"]), label="trait value")
    if kind in ("a", "a_prefix"):
        _, value, look_alike = data.draw(st.sampled_from(A_TRAITS))
        if kind == "a_prefix":  # the secret part of A's value, cut short: still nobody's but A's
            n = data.draw(st.integers(len(value) - 3, len(value)))
            return Tok(value[:n], look_alike[:n])
        forms: list[Callable[[str], str]] = [str, str.upper, str.lower]
        form = forms[data.draw(st.integers(0, len(forms) - 1))]
        return Tok(form(value), form(look_alike))
    if kind == "b":
        return Tok(
            data.draw(st.sampled_from(["platinum-bravo", "premium-bravo", "pro-bravo", "Bravo One", "silver-bravo"]))
        )
    if kind == "common":
        return Tok(data.draw(st.sampled_from(["p", "pl", "PLAT", "premium-", "", "x" * 513, "b\x00"])))
    return Tok(data.draw(st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=12)))


def draw_query(data: st.DataObject, w: World, b: BState) -> TraitSearch | IdentSearch | None:
    kind = data.draw(st.sampled_from(["trait", "trait", "identifier", "identifier", "unset"]), label="query")
    if kind == "unset":
        return None
    if kind == "trait":
        key = data.draw(st.sampled_from(["plan", "plan", "name", "city", "tier", "vip", "note", "", "k" * 129]))
        return TraitSearch(key, draw_trait_value(data))
    t, v = draw_ident(data, w, b)
    if data.draw(st.booleans(), label="cut"):  # a prefix of it
        n = data.draw(st.integers(1, 12))
        v = Tok(v.real[:n], v.twin[:n]) if v.real[:n] != v.twin[:n] else Tok(v.real[:n])
    return IdentSearch(t, v)


REASONS = st.sampled_from(["fuzz: gdpr"] * 6 + ["", "   ", "x" * 1001, "fuzz\x00"])
TRAIT_VALUES: list[dict[str, Any]] = [{"note": "fuzz-note"}, {"score": 7}, {"note": None}, {"note": "n", "score": 1}]
TRAIT_PATHS: list[list[str]] = [["traits.note"], ["traits.note", "traits.score"], ["traits"], [], ["note"]]
SOURCES = ["crm", "crm", "agent", "", "s" * 129]


def draw_call(data: st.DataObject, w: World, b: BState) -> Call:
    rpc = data.draw(st.sampled_from(RPCS), label="rpc")
    if rpc == "GetProfile":
        return get_profile_call(draw_side(data, w, b))
    if rpc == "GetCustomerContext":
        return context_call(draw_side(data, w, b), data.draw(st.sampled_from([0, 0, 5, 50, 51, -1])))
    if rpc == "ListTimelineEvents":
        return timeline_call(
            w,
            draw_profile(data, w, b),
            data.draw(st.sampled_from([0, 1, 1000, -1])),
            draw_token(data, w, w.b_timeline_token),
            data.draw(st.sampled_from([[], [], ["track"], ["identify", "interaction"], ["call"]])),
            data.draw(st.sampled_from([[], [], [event_pb2.CHANNEL_WEB], [99]])),
        )
    if rpc == "UpdateTraits":
        return update_traits_call(
            draw_profile(data, w, b),
            data.draw(st.sampled_from(TRAIT_VALUES)),
            data.draw(st.sampled_from(TRAIT_PATHS)),
            data.draw(st.sampled_from(SOURCES)),
        )
    if rpc == "SearchProfiles":
        return search_call(
            w,
            draw_query(data, w, b),
            data.draw(st.sampled_from([0, 1, 2, 2])),
            data.draw(st.sampled_from([0, 1, 100, -1])),
            draw_token(data, w, w.b_search_token),
        )
    if rpc == "WatchProfiles":
        kind = data.draw(st.sampled_from(["a", "a", "b", "none", "garbage", "future"]), label="cursor")
        cursor = {
            "a": data.draw(st.sampled_from(w.a_cursors)),
            "b": Tok(data.draw(st.sampled_from(sorted(w.b_cursors)))),
            "none": Tok(""),
            "garbage": Tok(data.draw(st.sampled_from(["garbage!", "eyJzIjogLTF9", w.a_timeline_token.real]))),
            "future": Tok(encode_cursor(w.b.tenant_id, 10**6)),
        }[kind]
        kind_lists: list[list[int]] = [[], [], [P.PROFILE_EVENT_KIND_UPDATED], [1, 3], [0], [9]]
        kinds = data.draw(st.sampled_from(kind_lists))
        return watch_call(w, cursor, kinds)
    if rpc == "ErasePerson":  # never one of B's own people (see erase_call)
        return erase_call(draw_side(data, w, b, own=False), data.draw(REASONS))
    if rpc == "GetErasureRequest":
        kind = data.draw(st.sampled_from(["a", "a", "a_profile", "random", "garbage"]), label="erasure")
        rid = w.a_erasure.removeprefix("erasureRequests/")
        if kind == "a":
            form = ERASURE_FORMS[data.draw(st.sampled_from(sorted(ERASURE_FORMS)))]
            return erasure_call(Tok(form(rid), form(w.twins[rid])))
        if kind == "a_profile":
            pid = data.draw(st.sampled_from(w.a_live))
            return erasure_call(Tok(f"erasureRequests/{pid}", f"erasureRequests/{w.twins[pid]}"))
        if kind == "random":
            return erasure_call(Tok(f"erasureRequests/{data.draw(st.uuids())}"))
        garbage = ["", "erasureRequests/", "erasureRequests/nope", f"profiles/{w.b_main}", "erasureRequests/\x00"]
        return erasure_call(Tok(data.draw(st.sampled_from(garbage))))
    if rpc == "ExportPerson":
        return export_call(draw_side(data, w, b))
    if rpc == "GetProfileSettings":
        return get_settings_call(w)
    return update_settings_call(w, data.draw(st.sampled_from(sorted(settings_updates(w))), label="settings"))


# ----------------------------------------------------------------------------------------------
# Tests.


def restore_b_settings(w: World) -> None:
    w.b_settings = w.b.settings(P.ProfileSettings())


def test_every_rpc_is_covered() -> None:
    service = profile_pb2.DESCRIPTOR.services_by_name["ProfileService"]
    assert sorted(m.name for m in service.methods) == sorted(RPCS)


def a_ident(i: int, form: str = "exact") -> IdentArg:
    t, value, look_alike = A_ONLY[i]
    f = VALUE_FORMS[form]
    return t, Tok(f(value), f(look_alike))


def a_trait(i: int) -> Tok:
    _, value, look_alike = A_TRAITS[i]
    return Tok(value, look_alike)


def test_a_secrets_are_not_found_for_b_on_every_rpc(world: World) -> None:
    """The table: each RPC with each kind of A's secret, and the answer it must get."""
    w = world
    nf, bad, good = Code.NOT_FOUND, Code.INVALID_ARGUMENT, Code.OK
    a_refs = [
        Tok(PROFILE_FORMS[f](p), PROFILE_FORMS[f](w.twins[p]))
        for p in w.a_live + w.a_merged + w.a_erased
        for f in PROFILE_FORMS
    ]
    b_ref = Tok(f"profiles/{w.b_main}")
    email, device, phone, loyalty, gone = (a_ident(i) for i in range(5))
    found = [email, device, phone, gone, a_ident(0, "upper"), a_ident(1, "padded"), a_ident(2, "spaced")]
    table: list[tuple[Call, grpc.StatusCode | None]] = []
    for ref in a_refs:
        table += [
            (get_profile_call(ref), nf),
            (context_call(ref, 0), nf),
            (context_call(ref, 50), nf),
            (timeline_call(w, ref, 0, Tok(""), [], []), nf),
            (timeline_call(w, ref, 1, w.a_timeline_token, [], []), nf),
            (update_traits_call(ref, {"plan": "hijacked"}, ["traits.plan"], "crm"), nf),
            (update_traits_call(ref, {"plan": None}, ["traits.plan"], "crm"), nf),
            (erase_call(ref, "gdpr"), nf),
            (export_call(ref), nf),
        ]
    for ident in found:
        table += [
            (get_profile_call(ident), nf),
            (context_call(ident, 0), nf),
            (erase_call(ident, "gdpr"), nf),
            (export_call(ident), nf),
            # A search is no look-up: nobody's identifier is an empty page, A's too.
            (search_call(w, IdentSearch(ident[0], ident[1]), P.SEARCH_MATCH_EXACT, 0, Tok("")), good),
            (search_call(w, IdentSearch(ident[0], ident[1]), P.SEARCH_MATCH_PREFIX, 0, Tok("")), good),
        ]
    # B has no loyalty_id type: malformed for B, whoever has the value. A's British national
    # spelling of a phone number is whatever B's region (US) makes of it: the model says.
    for ident in (loyalty, a_ident(2, "gb_national")):
        table += [
            (get_profile_call(ident), None),
            (context_call(ident, 0), None),
            (erase_call(ident, "gdpr"), None),
            (export_call(ident), None),
        ]
    table += [(get_profile_call(loyalty), bad)]
    # Prefixes of A's identifiers and trait values find nothing of A's.
    table += [
        (search_call(w, IdentSearch("email", Tok("alpha", "twinn")), P.SEARCH_MATCH_PREFIX, 0, Tok("")), good),
        (search_call(w, IdentSearch("device_id", Tok("dev-a", "dev-t")), P.SEARCH_MATCH_PREFIX, 0, Tok("")), good),
        (search_call(w, IdentSearch("phone", Tok("+44", "+49")), P.SEARCH_MATCH_PREFIX, 0, Tok("")), good),
        (search_call(w, IdentSearch("email", Tok("gone@", "went@")), P.SEARCH_MATCH_PREFIX, 0, Tok("")), good),
    ]
    for i, (key, _, _) in enumerate(A_TRAITS):
        value = a_trait(i)
        cut = Tok(value.real[:-2], value.twin[:-2])
        for match in (P.SEARCH_MATCH_UNSPECIFIED, P.SEARCH_MATCH_EXACT, P.SEARCH_MATCH_PREFIX):
            table.append((search_call(w, TraitSearch(key, value), match, 0, Tok("")), good))
        table.append((search_call(w, TraitSearch(key, cut), P.SEARCH_MATCH_PREFIX, 0, Tok("")), good))
    # A's page tokens are malformed for B, on B's own profile and query too.
    plan_p = TraitSearch("plan", Tok("p"))
    table += [
        (timeline_call(w, b_ref, 0, w.a_timeline_token, [], []), bad),
        (timeline_call(w, b_ref, 1, w.a_search_token, [], []), bad),
        (search_call(w, plan_p, P.SEARCH_MATCH_PREFIX, 1, w.a_search_token), bad),
        (search_call(w, plan_p, P.SEARCH_MATCH_PREFIX, 1, w.a_timeline_token), bad),
        (search_call(w, IdentSearch(SHARED[0], Tok(SHARED[1])), 0, 0, w.a_search_token), bad),
        # B's own tokens still work.
        (timeline_call(w, b_ref, 1, Tok(w.b_timeline_token), [], []), good),
        (search_call(w, plan_p, P.SEARCH_MATCH_PREFIX, 1, Tok(w.b_search_token)), good),
    ]
    # A's feed cursors are malformed for B, with or without a kinds filter.
    for cursor in w.a_cursors:
        table += [(watch_call(w, cursor, []), bad), (watch_call(w, cursor, [P.PROFILE_EVENT_KIND_UPDATED]), bad)]
    table += [(watch_call(w, Tok(c), []), good) for c in w.b_cursors]
    # A's erasure request, in every spelling; A's profile ids are no erasure request either.
    rid = w.a_erasure.removeprefix("erasureRequests/")
    table += [(erasure_call(Tok(f(rid), f(w.twins[rid]))), nf) for f in ERASURE_FORMS.values()]
    table += [(erasure_call(Tok(f"erasureRequests/{p}", f"erasureRequests/{w.twins[p]}")), nf) for p in w.a_erased]
    table += [(erasure_call(Tok(f"{w.a_erasure}/x", f"erasureRequests/{w.twins[rid]}/x")), bad)]
    # The email both have is B's own profile for B.
    shared = (SHARED[0], Tok(SHARED[1]))
    table += [
        (get_profile_call(shared), good),
        (context_call(shared, 0), good),
        (export_call(shared), good),
        (get_profile_call(b_ref), good),
        (get_profile_call(Tok(f"profiles/{w.b_absorbed}")), good),
        (search_call(w, IdentSearch(shared[0], shared[1]), 0, 0, Tok("")), good),
        (search_call(w, plan_p, P.SEARCH_MATCH_PREFIX, 0, Tok("")), good),
        (get_settings_call(w), good),
    ]
    # Malformed: INVALID_ARGUMENT naming the field, A's id inside it or not.
    garbled = [
        Tok(GARBLED_FORMS[f](p), GARBLED_FORMS[f](w.twins[p])) for p in w.a_live + w.a_merged for f in GARBLED_FORMS
    ]
    table += [(get_profile_call(ref), bad) for ref in garbled]
    table += [(timeline_call(w, ref, 0, Tok(""), [], []), bad) for ref in garbled[:6]]
    table += [(update_traits_call(ref, {"note": "x"}, ["traits.note"], "crm"), bad) for ref in garbled[:6]]
    table += [
        (get_profile_call(None), bad),
        (erase_call(a_refs[0], ""), bad),  # the reason is checked first: the same for any name
        (erase_call(a_refs[0], "x" * 1001), bad),
        (erase_call(email, "gdpr\x00"), bad),
        (context_call(a_refs[0], 51), bad),  # the limit is checked first
        (timeline_call(w, a_refs[0], -1, Tok(""), ["call"], [99]), nf),  # the parent is located first
        (update_traits_call(a_refs[0], {"a": 1}, ["bogus"], ""), nf),  # the profile is located first
        (watch_call(w, w.a_cursors[0], [9]), bad),
    ]
    for call, want in table:
        run(w, call, want=want)
    assert_a_unchanged(w)


def test_b_never_finds_a_profiles_by_trait_or_identifier(world: World) -> None:
    """What an agent of B gets from searches and look-ups on values both tenants hold, or only A."""
    w = world
    md = w.b.metadata

    def search(**kw: Any) -> list[P.Profile]:
        return list(w.b.profile.SearchProfiles(P.SearchProfilesRequest(page_size=100, **kw), metadata=md).profiles)

    def ids(profiles: Sequence[P.Profile]) -> set[str]:
        return {p.profile_id for p in profiles}

    b_profiles = set(load_b(w).profiles)
    a_all = set(w.a_live + w.a_merged + w.a_erased)
    # Both tenants have plans starting with "p" (A: platinum-alpha, premium-alpha): B sees only its own.
    by_plan = search(trait=P.TraitQuery(key="plan", value="P"), match=P.SEARCH_MATCH_PREFIX)
    assert ids(by_plan) and ids(by_plan) <= b_profiles and not ids(by_plan) & a_all
    assert {t.value.string_value for p in by_plan for t in p.traits if t.key == "plan"} <= {
        "platinum-bravo",
        "premium-bravo",
        "pro-bravo",
    }
    for key, value, _ in A_TRAITS:
        for match in (P.SEARCH_MATCH_EXACT, P.SEARCH_MATCH_PREFIX):
            assert search(trait=P.TraitQuery(key=key, value=value), match=match) == []
    for t, v, _ in A_ONLY[:3]:
        assert search(identifier=Ident(type=t, value=v)) == []
        assert search(identifier=Ident(type=t, value=v[:-2]), match=P.SEARCH_MATCH_PREFIX) == []
    # The email both have: B's profile, with B's traits and identifiers only.
    for query in (Ident(type="email", value=" SHARED@both.example"), Ident(type="email", value="shared@")):
        match = P.SEARCH_MATCH_PREFIX if query.value.endswith("@") else P.SEARCH_MATCH_EXACT
        (found,) = search(identifier=query, match=match)
        assert found.profile_id == w.b_main
        values = {t.value.string_value for t in found.traits}
        assert {"Bravo One", "silver-bravo"} <= values and not {v.lower() for v in values} & w.a_secrets
        assert {(i.type, i.value) for i in found.identifiers} == {SHARED, B_PHONE, B_DEVICE}
    # Page by page, B's pages hold B's profiles only, none left short by A's, and B's page tokens
    # encode nothing of A's.
    b = load_b(w)
    expected = sorted(
        {p for p, k, text in b.traits if k == "plan" and text.startswith("p") and b.profiles[p][0] == ACTIVE}
    )
    assert len(expected) >= 2, expected
    walked: list[str] = []
    token = ""
    for _ in range(10):
        page = w.b.profile.SearchProfiles(
            P.SearchProfilesRequest(
                trait=P.TraitQuery(key="plan", value="p"), match=P.SEARCH_MATCH_PREFIX, page_size=1, page_token=token
            ),
            metadata=md,
        )
        walked += [p.profile_id for p in page.profiles]
        token = page.next_page_token
        assert len(page.profiles) == 1 or not token, page
        assert not {s for s in w.a_secrets if s in opened(token).lower()}, opened(token)
        if not token:
            break
    assert walked == expected
    profile = w.b.get(ident=SHARED)
    assert profile.profile_id == w.b_main and "premium-alpha" not in str(profile)
    context = w.b.context(ident=SHARED)
    assert [i.interaction_id for i in context.recent_interactions] == ["call-bravo-1"]
    assert not context.open_cases  # A's open case is A's
    # And A, the other way round, sees its own.
    a_found = w.a.profile.SearchProfiles(
        P.SearchProfilesRequest(identifier=Ident(type="email", value="shared@both.example")), metadata=w.a.metadata
    ).profiles
    assert [p.profile_id for p in a_found] == [w.a.get(ident=SHARED).profile_id]
    assert_a_unchanged(w)


def test_each_tenant_reads_identifiers_by_its_own_rules_back_to_back(world: World) -> None:
    """Agents of both tenants look customers up at the same moment: each identifier is normalized
    by the caller's own rules (A: loyalty_id and region GB; B: the defaults, region US), whatever
    the other tenant asked just before, on every RPC that takes an identifier."""
    w = world
    a_card = w.a.get(ident=(A_ONLY[3][0], A_ONLY[3][1])).profile_id
    a_phone = w.a.get(ident=("phone", "020 7946 0011")).profile_id
    loyalty, gb_phone, shared = a_ident(3), a_ident(2, "gb_national"), (SHARED[0], Tok(SHARED[1]))
    for _ in range(3):
        for call in (
            get_profile_call(loyalty),
            context_call(loyalty, 0),
            export_call(loyalty),
            search_call(w, IdentSearch(loyalty[0], loyalty[1]), 0, 0, Tok("")),
            get_profile_call(gb_phone),
            context_call(gb_phone, 0),
            erase_call(gb_phone, "gdpr"),
            get_profile_call(shared),
        ):
            # A's look-up fills every cache it has (rules, identifier owners, contexts) right before B's.
            assert w.a.get(ident=(A_ONLY[3][0], A_ONLY[3][1])).profile_id == a_card
            assert w.a.context(ident=("phone", "020 7946 0011")).profile.profile_id == a_phone
            assert w.a.get(ident=SHARED).profile_id != w.b_main
            run(w, call)
            # ...and B's look-up right before A's changes nothing for A.
            assert w.a.get(ident=("phone", "020 7946 0011")).profile_id == a_phone
    run(w, get_profile_call(loyalty), want=Code.INVALID_ARGUMENT)
    assert_a_unchanged(w)


def test_b_settings_are_its_own(world: World) -> None:
    w = world
    get = w.b.profile.GetProfileSettings(P.GetProfileSettingsRequest(), metadata=w.b.metadata).settings
    assert not get.trait_policies and not get.source_priority and not get.computed_traits, get
    assert (dict(w.a_settings.trait_policies), list(w.a_settings.source_priority)) != ({}, [])
    # B changing its settings, even to exactly A's, leaves A's alone, update time included.
    for choice in ("policies", "sources", "copy of A", "bad policy", "bad mask", "clear"):
        run(w, update_settings_call(w, choice))
        run(w, get_settings_call(w), want=Code.OK)
    run(w, update_settings_call(w, "copy of A"), want=Code.OK)
    # A's trait policy FIRST for "tier" now holds for B too, but on B's data: B's profile reads as before.
    assert w.b.get(ident=SHARED).profile_id == w.b_main
    restore_b_settings(w)
    assert not w.b_settings.trait_policies
    assert_a_unchanged(w)


def test_b_watch_never_shows_a_changes(world: World) -> None:
    """Two agents watch the feed at once, each with its own key: each sees only its own tenant's
    changes, live and on resume; a cursor of the other tenant is INVALID_ARGUMENT, like a forged one."""
    w = world
    # Cursors at each feed's head now, as the API spells them.
    b_start = encode_cursor(w.b.tenant_id, load_b(w).head)
    with w.a.engine.connect() as conn:
        a_head = conn.execute(
            sa.text("SELECT seq FROM profile.feed_heads WHERE tenant_id = :t"), {"t": w.a.tenant_id}
        ).scalar_one()
    a_start = encode_cursor(w.a.tenant_id, int(a_head))
    a_profiles = set(w.a_live + w.a_merged + w.a_erased)

    class Collector(threading.Thread):
        def __init__(self, api: Apis, cursor: str) -> None:
            super().__init__(daemon=True)
            self.stream = api.profile.WatchProfiles(
                P.WatchProfilesRequest(cursor=cursor), metadata=api.metadata, timeout=60
            )
            self.got: list[P.WatchProfilesResponse] = []
            self.error: grpc.RpcError | None = None

        def run(self) -> None:
            try:
                for msg in self.stream:
                    self.got.append(msg)
            except grpc.RpcError as err:
                if err.code() != Code.CANCELLED:  # type: ignore[attr-defined]
                    self.error = err

        def stop(self) -> list[P.WatchProfilesResponse]:
            self.stream.cancel()  # type: ignore[attr-defined]
            self.join(5)
            assert self.error is None, self.error
            return self.got

    b_watch, a_watch = Collector(w.b, b_start), Collector(w.a, a_start)
    b_watch.start()
    a_watch.start()
    survivor = w.a.get(ident=("email", A_ONLY[0][1])).name
    w.a.update_traits(survivor, {"watched": "alpha-change"}, ["traits.watched"])
    a_count = len(w.a.all_timeline(survivor))
    w.a.send(identify(("email", A_ONLY[0][1]), traits={"watched": "alpha-event"}))
    w.b.update_traits(f"profiles/{w.b_main}", {"watched": "bravo-change"}, ["traits.watched"])
    wait_until(lambda: any(m.profile == f"profiles/{w.b_main}" for m in b_watch.got), 20, "B's change on B's feed")
    wait_until(lambda: len(w.a.all_timeline(survivor)) > a_count, 20, "A's event applied")
    wait_until(lambda: len(a_watch.got) >= 2, 20, "A's changes on A's feed")
    time.sleep(0.5)  # anything that would leak has had time to arrive
    b_got, a_got = b_watch.stop(), a_watch.stop()
    assert [(m.kind, m.profile, list(m.changed_traits)) for m in b_got] == [
        (P.PROFILE_EVENT_KIND_UPDATED, f"profiles/{w.b_main}", ["watched"])
    ]
    assert {m.profile.removeprefix("profiles/") for m in a_got} <= a_profiles
    assert f"profiles/{w.b_main}" not in {m.profile for m in a_got}
    # Resuming from B's cursor gives B's change again, and none of A's; A's cursor is refused for B,
    # exactly as a cursor no tenant was issued.
    assert [m.profile for m in feed(w.b, b_start)] == [f"profiles/{w.b_main}"]
    w.b_cursors[b_got[-1].cursor] = int(unb64json(b_got[-1].cursor)["s"])
    assert b_got[-1].cursor != b_start
    for m in a_got[-1:]:
        cursor = Tok(m.cursor, encode_cursor("nobody-at-all", int(unb64json(m.cursor)["s"])))
        run(w, watch_call(w, cursor, []), want=Code.INVALID_ARGUMENT)
    for cursor in w.a_cursors:
        run(w, watch_call(w, cursor, []), want=Code.INVALID_ARGUMENT)
    # A changed itself: that is A's new state.
    quiesce(w.a)
    w.a_snapshot = snapshot(w)


def test_fuzz_b_with_a_secrets_over_every_rpc(world: World) -> None:
    w = world
    seen: set[str] = set()
    answers: set[grpc.StatusCode] = set()

    @hsettings(
        max_examples=70,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(data=st.data())
    def fuzz(data: st.DataObject) -> None:
        call = draw_call(data, w, load_b(w))
        seen.add(call.rpc)
        answers.add(run(w, call).code)

    try:
        fuzz()
    finally:
        restore_b_settings(w)
    assert len(seen) >= 8, f"the strategy hardly varies the RPC: {seen}"
    assert {Code.OK, Code.NOT_FOUND, Code.INVALID_ARGUMENT} <= answers, f"the fuzz hardly varies the answer: {answers}"
    # Whatever B updated, A's profiles, timeline, settings, feed and streams are as at setup.
    assert_a_unchanged(w)


def test_no_credentials_is_unauthenticated_on_every_rpc(world: World) -> None:
    w = world
    name = f"profiles/{w.a_live[0]}"
    email = Ident(type=A_ONLY[0][0], value=A_ONLY[0][1])
    requests: dict[str, Message] = {
        "GetProfile": P.GetProfileRequest(name=name),
        "GetCustomerContext": P.GetCustomerContextRequest(identifier=email),
        "ListTimelineEvents": P.ListTimelineEventsRequest(parent=name),
        "UpdateTraits": update_traits_call(Tok(name), {"plan": "x"}, ["traits.plan"], "crm").build(real),
        "SearchProfiles": P.SearchProfilesRequest(trait=P.TraitQuery(key="plan", value="p")),
        "WatchProfiles": P.WatchProfilesRequest(cursor=w.a_cursors[0].real),
        "ErasePerson": P.ErasePersonRequest(name=name, reason="no key"),
        "GetErasureRequest": P.GetErasureRequestRequest(name=w.a_erasure),
        "ExportPerson": P.ExportPersonRequest(identifier=email),
        "GetProfileSettings": P.GetProfileSettingsRequest(),
        "UpdateProfileSettings": P.UpdateProfileSettingsRequest(settings=P.ProfileSettings()),
    }
    assert sorted(requests) == sorted(RPCS)
    credentials: list[Sequence[tuple[str, str]] | None] = [
        None,
        (("authorization", ""),),
        (("authorization", "Bearer "),),
        (("authorization", f"Basic {w.a.metadata[0][1].removeprefix('Bearer ')}"),),
        (("authorization", f"{w.a.metadata[0][1]}x"),),
        (("x-api-key", w.a.metadata[0][1].removeprefix("Bearer ")),),
    ]
    for rpc, request in requests.items():
        for metadata in credentials:
            out = invoke(w.a.profile, rpc, request, metadata)
            assert out.code is Code.UNAUTHENTICATED, (rpc, metadata, out.text)
            assert not {s for s in w.a_secrets if s in out.text.lower()}, (rpc, out.text)
    assert_a_unchanged(w)


def test_b_erasing_the_email_a_also_has_leaves_a_intact(world: World) -> None:
    """B's customer with an email that A's customer has too asks B to be forgotten. B's person goes,
    in every service; A's person with the same email keeps their profile, timeline, identity graph,
    events and stream entries, and A's next event with that email is accepted and applied, not
    suppressed. Neither tenant can read the other's erasure request."""
    w = world
    applied = applied_count(w.b.engine, w.b.tenant_id)
    w.b.send(identify(ERASE_SHARED, traits={"plan": "doomed-bravo"}))
    w.b.wait_applied(applied + 1)
    b_person = w.b.get(ident=ERASE_SHARED)
    assert b_person.profile_id != w.a_keep
    quiesce(w.b)
    # B cannot erase A's people, by A's identifiers or names, and A's erased person is long gone.
    sides: list[Side] = [a_ident(0), a_ident(1), a_ident(4)]
    sides += [Tok(f"profiles/{p}", f"profiles/{w.twins[p]}") for p in w.a_live]
    for side in sides:
        run(w, erase_call(side, "gdpr"), want=Code.NOT_FOUND)
    done = erase_and_wait(
        w.b,
        P.ErasePersonRequest(identifier=Ident(type="email", value=" Erase-Shared@Both.example "), reason="gdpr"),
    )
    assert done.profile == b_person.name
    assert [s.service for s in done.steps if not s.done] == []
    with pytest.raises(grpc.RpcError) as gone:
        w.b.get(ident=ERASE_SHARED)
    assert gone.value.code() == Code.NOT_FOUND  # type: ignore[attr-defined]
    # A's person with the same email: exactly as before, in every schema, stream and answer.
    assert w.a.get(ident=ERASE_SHARED).profile_id == w.a_keep
    assert_a_unchanged(w)
    # The erasure requests are each tenant's own.
    for api, name in ((w.a, done.name), (w.b, w.a_erasure)):
        with pytest.raises(grpc.RpcError) as err:
            api.profile.GetErasureRequest(P.GetErasureRequestRequest(name=name), metadata=api.metadata, timeout=10)
        assert err.value.code() == Code.NOT_FOUND, name  # type: ignore[attr-defined]
    run(w, erasure_call(Tok(done.name)), want=Code.OK)
    # B's suppression list is B's: A's next event with that email is stored and applied to A's person.
    before = w.a.get(f"profiles/{w.a_keep}").event_count
    w.a.send(identify(ERASE_SHARED, traits={"plan": "still-here-alpha"}))
    wait_until(lambda: w.a.get(f"profiles/{w.a_keep}").event_count == before + 1, 20, "A's event applied")
    kept = w.a.get(ident=ERASE_SHARED)
    assert kept.profile_id == w.a_keep
    assert {t.key: t.value.string_value for t in kept.traits}["plan"] == "still-here-alpha"
