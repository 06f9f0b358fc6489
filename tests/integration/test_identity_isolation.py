"""Tenant isolation of IdentityService, on real PostgreSQL and Redis, fuzzed over every RPC.

Tenant A ingests events through the public ingest API until it has profiles, identifiers,
deterministic, manual and unmerge records, a match suggestion and its own rules (a custom type,
region GB). Tenant B has a little data of its own, including an email that A has too. Then B calls
every RPC with requests built from A's secrets (A's profile ids, live and merged away, in several
spellings, A's identifiers, A's page token, A's match suggestion), mixed with B's own ids, random
ids and garbage. Every answer must:

- be the one answer the API documents for that request, as a small model of B's own data predicts
  it: OK, NOT_FOUND (A's ids and identifiers are NOT_FOUND, never PERMISSION_DENIED),
  INVALID_ARGUMENT with a BadRequest naming only the malformed fields (at least one of them), or
  FAILED_PRECONDITION where documented (a merge that breaks a limit names the rule). INTERNAL,
  UNKNOWN, UNIMPLEMENTED and PERMISSION_DENIED are never an answer;
- carry no id, event, identifier or merge of A that B did not send itself;
- be the same, code and message, as for a "twin" request in which every secret of A is replaced
  by a look-alike that exists nowhere: so nothing B can observe depends on whether A has the id.

Afterwards A's rows and A's view through the API are exactly as they were at setup. B's own state
carries over from one example to the next (its merges, splits and rule changes are real), so the
model is re-read from PostgreSQL before every call, and a failure message names the call and answer.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import field_mask_pb2, text_format
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy.engine import Engine

from services.core.identity_rules import DEFAULT_RULES, IdentityRules, validate_rules
from services.core.server import RunningServer
from services.identity.rules_store import TenantRules, to_proto
from tessera.v1 import event_pb2, identity_pb2, identity_pb2_grpc, ingest_pb2_grpc
from tests.conftest import TenantKey, make_tenant
from tests.support import twins
from tests.support.grpc_errors import bad_request, precondition_failures
from tests.support.identity import event_profile, person_event, send, wait_linked
from tests.support.twins import UUID_RE, IdentArg, Pick, Side, Tok, names_field, real, side_toks, twin

T = TypeVar("T")

pytestmark = pytest.mark.integration

Ident = event_pb2.Identifier
Code = grpc.StatusCode
Stub = identity_pb2_grpc.IdentityServiceStub

RPCS = (
    "ResolveIdentifiers",
    "GetIdentityGraph",
    "ExplainLink",
    "MergeProfiles",
    "UnmergeProfile",
    "ListMerges",
    "GetIdentityRules",
    "UpdateIdentityRules",
    "ListMatchSuggestions",
    "ReviewMatchSuggestion",
    "EraseProfile",
)
MUTATING = {"MergeProfiles", "UnmergeProfile", "UpdateIdentityRules", "ReviewMatchSuggestion", "EraseProfile"}

# A's identifiers that B never saw: (type, normalized value, a look-alike that exists nowhere).
A_ONLY: tuple[tuple[str, str, str], ...] = (
    ("email", "alpha.one@tenant-a.example", "alpha.twin@tenant-a.example"),
    ("device_id", "dev-alpha-1", "dev-twin-1"),
    ("phone", "+442079460011", "+442079460999"),
    ("loyalty_id", "L-ALPHA-1", "L-TWIN-1"),
    ("loyalty_id", "L-ALPHA-9", "L-TWIN-9"),
)
# Both tenants have this one; for B it must always mean B's profile.
SHARED = ("email", "shared@both.example")
B_PHONE = ("phone", "+14155550142")
B_DEVICE = ("device_id", "dev-bravo-1")
UNKNOWN: tuple[tuple[str, str], ...] = (
    ("email", "nobody@nowhere.example"),
    ("device_id", "dev-nobody"),
    ("phone", "+14155550999"),
    ("loyalty_id", "L-NOBODY"),
    ("anonymous_id", "anon-nobody"),
)
JUNK: tuple[tuple[str, str], ...] = (
    ("email", "not-an-email"),
    ("email", "test@test.com"),  # a blocked placeholder
    ("phone", "call me maybe"),
    ("phone", "000-000-0000"),
    ("device_id", "   "),
    ("", "x"),
    ("Email", "alpha.one@tenant-a.example"),  # type names are case-sensitive
    ("crm_id", "c-1"),
)
A_BLOCKED = "alpha-placeholder"


# ----------------------------------------------------------------------------------------------
# What the fuzzer puts into requests.


PROFILE_FORMS = twins.PROFILE_FORMS
GARBLED_FORMS = twins.garbled_forms("identifiers", ("merge", "merges"))
VALUE_FORMS = twins.VALUE_FORMS


# ----------------------------------------------------------------------------------------------
# The world: A's secrets and a snapshot of A, B's credentials.


@dataclass
class World:
    stub: Stub
    engine: Engine
    a: TenantKey
    b: TenantKey
    a_live: list[str]
    a_merged: list[str]
    a_secrets: set[str]  # lower-case strings of A that B must never be shown
    a_merge_names: set[str]
    a_suggestions: list[str]  # "matchSuggestions/{id}" of A
    a_page_token: str
    a_token_position: int  # the merge id A's page token continues before
    a_rules: identity_pb2.IdentityRules
    a_snapshot: dict[str, Any]
    b_rules_initial: identity_pb2.IdentityRules
    twins: dict[str, str]  # A's profile ids -> look-alikes
    pairs: list[tuple[str, str]] = field(default_factory=list)  # secret -> twin, for messages
    b_rules: identity_pb2.IdentityRules = field(default_factory=identity_pb2.IdentityRules)


@dataclass
class BState:
    """B's graph and rules as stored, read before and after each call."""

    survivor: dict[str, str]  # every profile id of B -> its active profile
    owner: dict[tuple[str, str], str]  # every identifier of B -> its profile
    merge_ids: list[int]  # newest first
    events: set[str]
    rules: IdentityRules
    suggestions: list[tuple[int, int, float]]  # (suggestion id, state, score)

    @property
    def ids(self) -> set[str]:
        return set(self.survivor) | self.events

    @property
    def merge_names(self) -> set[str]:
        return {f"merges/{m}" for m in self.merge_ids}

    def ident(self, t: str, v: str) -> tuple[str, tuple[str, str] | None]:
        """("invalid" | "missing" | "ok", normalized key) under B's rules."""
        result = self.rules.normalize(t, v)
        if result.value is None:
            return "invalid", None
        key = (t, result.value)
        return ("ok" if key in self.owner else "missing"), key

    def profile(self, name: str) -> tuple[str, str | None]:
        """("invalid" | "missing" | "ok", B's active profile) for a profile name."""
        pid = name.removeprefix("profiles/")
        if not name:
            return "invalid", None
        try:
            canonical = str(uuid.UUID(pid))
        except ValueError:
            return "invalid", None
        final = self.survivor.get(canonical)
        return ("missing", None) if final is None else ("ok", final)

    def keys_of(self, pid: str) -> set[tuple[str, str]]:
        return {k for k, p in self.owner.items() if p == pid}

    def broken_limits(self, survivor: str, absorbed: str) -> frozenset[str]:
        """The identifier types of which the merged profile would hold more values than the rules
        allow (max_per_profile; a profile already over a since-lowered limit may keep what it has)."""
        per = [Counter(t for t, _ in self.keys_of(p)) for p in (survivor, absorbed)]
        broken = set()
        for t, n in (per[0] + per[1]).items():
            rule = self.rules.types.get(t)
            if n > max(rule.max_per_profile if rule else 0, per[0][t], per[1][t]):
                broken.add(t)
        return frozenset(broken)


def load_b(w: World) -> BState:
    t = {"t": w.b.tenant_id}
    with w.engine.connect() as conn:
        survivor = conn.execute(
            sa.text(
                "SELECT profile_id::text, coalesce(merged_into, profile_id)::text FROM identity.profiles "
                "WHERE tenant_id = :t"
            ),
            t,
        ).all()
        owner = conn.execute(
            sa.text("SELECT id_type, id_value, profile_id::text FROM identity.identifiers WHERE tenant_id = :t"), t
        ).all()
        merges = conn.execute(
            sa.text("SELECT merge_id FROM identity.merges WHERE tenant_id = :t ORDER BY merge_id DESC"), t
        ).scalars()
        events = conn.execute(sa.text("SELECT event_id FROM identity.event_links WHERE tenant_id = :t"), t).scalars()
        spec = conn.execute(sa.text("SELECT spec FROM identity.rules WHERE tenant_id = :t"), t).scalar()
        suggestions = conn.execute(
            sa.text("SELECT suggestion_id, state, score FROM identity.match_suggestions WHERE tenant_id = :t"), t
        ).all()
        return BState(
            survivor={p: s for p, s in survivor},
            owner={(ty, v): p for ty, v, p in owner},
            merge_ids=[int(m) for m in merges],
            events={str(e) for e in events},
            rules=DEFAULT_RULES if spec is None else validate_rules(spec),
            suggestions=[(int(i), int(state), float(score)) for i, state, score in suggestions],
        )


SNAPSHOT_SQL = {
    "rules": "SELECT spec::text, probabilistic::text, updated_at FROM identity.rules WHERE tenant_id = :t",
    "profiles": "SELECT profile_id::text, created_at, merged_into::text, merged_at FROM identity.profiles "
    "WHERE tenant_id = :t ORDER BY 1",
    "identifiers": "SELECT id_type, id_value, profile_id::text, origin_profile_id::text, first_seen, last_seen, "
    "source, first_event_id FROM identity.identifiers WHERE tenant_id = :t ORDER BY 1, 2",
    "merges": "SELECT merge_id, kind, survivor_id::text, absorbed_id::text, identifiers::text, event_id, rule, "
    "reason, score, evidence::text, created_at FROM identity.merges WHERE tenant_id = :t ORDER BY 1",
    "event_links": "SELECT event_id, profile_id::text, identifiers, occurred_at, processed_at "
    "FROM identity.event_links WHERE tenant_id = :t ORDER BY 1",
}


# Any other table of the identity schema with a tenant_id (match suggestions and records...).
OTHER_TABLES_SQL = (
    "SELECT table_name FROM information_schema.columns WHERE table_schema = 'identity' "
    "AND column_name = 'tenant_id' AND table_name <> ALL(:known) ORDER BY 1"
)


def snapshot(stub: Stub, engine: Engine, tenant: TenantKey) -> dict[str, Any]:
    """Every stored row of the tenant, and what the tenant itself sees through the API."""
    out: dict[str, Any] = {}
    t = {"t": tenant.tenant_id}
    with engine.connect() as conn:
        for name, sql in SNAPSHOT_SQL.items():
            out[name] = [tuple(r) for r in conn.execute(sa.text(sql), t).all()]
        for table in conn.execute(sa.text(OTHER_TABLES_SQL), {"known": list(SNAPSHOT_SQL)}).scalars():
            sql = f'SELECT to_jsonb(x)::text FROM identity."{table}" x WHERE tenant_id = :t ORDER BY 1'
            out[f"table {table}"] = list(conn.execute(sa.text(sql), t).scalars())
    md = tenant.metadata
    for pid, *_ in out["profiles"]:
        graph = stub.GetIdentityGraph(identity_pb2.GetIdentityGraphRequest(name=f"profiles/{pid}"), metadata=md)
        out[f"graph {pid}"] = text_format.MessageToString(graph)
    out["list"] = text_format.MessageToString(
        stub.ListMerges(identity_pb2.ListMergesRequest(page_size=1000), metadata=md)
    )
    out["rules api"] = text_format.MessageToString(
        stub.GetIdentityRules(identity_pb2.GetIdentityRulesRequest(), metadata=md)
    )
    return out


def assert_a_unchanged(w: World) -> None:
    now = snapshot(w.stub, w.engine, w.a)
    for name, before in w.a_snapshot.items():
        assert now.get(name) == before, f"tenant A's {name} changed while B called the API"
    assert now.keys() == w.a_snapshot.keys(), "tenant A gained profiles while B called the API"


def seed_suggestion(engine: Engine, tenant: TenantKey, profile_a: str, profile_b: str) -> list[str]:
    """An open match suggestion of the tenant (written directly: what matters here is that A has
    one, not how the matcher scores)."""
    with engine.begin() as conn:
        sid = conn.execute(
            sa.text(
                "INSERT INTO identity.match_suggestions (tenant_id, profile_a, profile_b, score) "
                "VALUES (:t, :a, :b, 0.7) RETURNING suggestion_id"
            ),
            {"t": tenant.tenant_id, "a": profile_a, "b": profile_b},
        ).scalar_one()
    return [f"matchSuggestions/{sid}"]


@pytest.fixture(scope="module")
def world(
    engine: Engine, ingest_channel: grpc.Channel, identity_channel: grpc.Channel, identity_server: RunningServer
) -> World:
    ingest = ingest_pb2_grpc.IngestServiceStub(ingest_channel)
    stub = identity_pb2_grpc.IdentityServiceStub(identity_channel)
    a, b = make_tenant(engine, "iso-a"), make_tenant(engine, "iso-b")
    md = a.metadata

    # A's own rules: a custom type, British national numbers, a placeholder of its own.
    rules = stub.GetIdentityRules(identity_pb2.GetIdentityRulesRequest(), metadata=md).rules
    rules.types.add(type="loyalty_id", normalizer="trim", priority=70, max_per_profile=5)
    rules.default_region = "GB"
    rules.blocked_values.append(A_BLOCKED)
    stub.UpdateIdentityRules(
        identity_pb2.UpdateIdentityRulesRequest(
            rules=rules, update_mask=field_mask_pb2.FieldMask(paths=["types", "default_region", "blocked_values"])
        ),
        metadata=md,
    )

    # Three profiles, then an event that joins two of them (a deterministic merge).
    (web,) = send(ingest, md, person_event(("email", "Alpha.One@Tenant-A.example"), ("device_id", "dev-alpha-1")))
    wait_linked(engine, a.tenant_id, 1)
    (voice,) = send(ingest, md, person_event(("phone", "020 7946 0011"), channel=event_pb2.CHANNEL_VOICE))
    (store,) = send(ingest, md, person_event(SHARED, ("loyalty_id", "L-ALPHA-9")))
    wait_linked(engine, a.tenant_id, 3)
    send(
        ingest,
        md,
        person_event(
            ("email", "alpha.one@tenant-a.example"), ("phone", "+44 20 7946 0011"), ("loyalty_id", "L-ALPHA-1")
        ),
    )
    wait_linked(engine, a.tenant_id, 4)
    p_web, p_voice, p_store = (event_profile(engine, a.tenant_id, e) for e in (web, voice, store))
    assert p_web and p_voice and p_store and len({p_web, p_voice, p_store}) == 3
    # A splits the loyalty card off (an unmerge), then merges the store profile into it by hand.
    split = stub.UnmergeProfile(
        identity_pb2.UnmergeProfileRequest(
            profile=f"profiles/{p_web}", identifiers=[Ident(type="loyalty_id", value="L-ALPHA-1")], reason="card"
        ),
        metadata=md,
    ).merge
    p_card = split.absorbed_profile_id
    stub.MergeProfiles(
        identity_pb2.MergeProfilesRequest(
            survivor_profile=f"profiles/{p_card}", absorbed_profile=f"profiles/{p_store}", reason="same card holder"
        ),
        metadata=md,
    )

    # B: the shared email and a phone, a device, then an event that joins them.
    send(ingest, b.metadata, person_event(SHARED, B_PHONE))
    wait_linked(engine, b.tenant_id, 1)
    send(ingest, b.metadata, person_event(B_DEVICE))
    wait_linked(engine, b.tenant_id, 2)
    send(ingest, b.metadata, person_event(B_DEVICE, ("email", "SHARED@both.example")))
    wait_linked(engine, b.tenant_id, 3)

    a_suggestions = seed_suggestion(engine, a, p_web, p_card)

    a_snapshot = snapshot(stub, engine, a)
    profiles = a_snapshot["profiles"]
    a_live = sorted(p for p, _c, merged, _m in profiles if merged is None)
    a_merged = sorted(p for p, _c, merged, _m in profiles if merged is not None)
    assert len(a_live) == 2 and len(a_merged) == 2, profiles
    graph_types = {(r[0], r[1]) for r in a_snapshot["identifiers"]}
    assert {(t, v) for t, v, _ in A_ONLY} | {SHARED} == graph_types
    a_list = stub.ListMerges(identity_pb2.ListMergesRequest(), metadata=md).merges
    assert sorted(m.kind for m in a_list) == [
        identity_pb2.MERGE_KIND_DETERMINISTIC,
        identity_pb2.MERGE_KIND_MANUAL,
        identity_pb2.MERGE_KIND_UNMERGE,
    ]
    page = stub.ListMerges(identity_pb2.ListMergesRequest(page_size=1), metadata=md)
    assert page.next_page_token
    twins = {p: str(uuid.uuid4()) for p in a_live + a_merged}
    pairs = [(p, t) for p, t in twins.items()] + [(v, tw) for _, v, tw in A_ONLY]
    pairs += [(p.replace("-", ""), t.replace("-", "")) for p, t in twins.items()]
    a_events = {r[0] for r in a_snapshot["event_links"]}
    # What B must see until it changes them: the defaults, whatever A configured.
    b_rules = to_proto(TenantRules(DEFAULT_RULES, {}, None))
    w = World(
        stub=stub,
        engine=engine,
        a=a,
        b=b,
        a_live=a_live,
        a_merged=a_merged,
        a_secrets={s.lower() for s in [*twins, *a_events, *(v for _, v, _ in A_ONLY)]},
        a_merge_names={m.name for m in a_list},
        a_suggestions=a_suggestions,
        a_page_token=page.next_page_token,
        a_token_position=int(page.merges[0].name.split("/")[1]),
        a_rules=stub.GetIdentityRules(identity_pb2.GetIdentityRulesRequest(), metadata=md).rules,
        a_snapshot=a_snapshot,
        b_rules_initial=b_rules,
        twins=twins,
        pairs=sorted(pairs, key=lambda p: -len(p[0])),
        b_rules=b_rules,
    )
    return w


# ----------------------------------------------------------------------------------------------
# Calls: a request built from Toks, and what B's own data says the answer must be.


@dataclass(frozen=True)
class Expect:
    """The answer the API documents for a call, given B's data before it."""

    codes: frozenset[grpc.StatusCode]
    # Checks of an OK response against B's data before the call.
    check: Callable[[Any], None] | None = None
    # INVALID_ARGUMENT: the malformed request fields. The BadRequest must name at least one field
    # violation, and every one it names must be (inside) one of these.
    fields: frozenset[str] = frozenset()
    # FAILED_PRECONDITION naming a rule: the PreconditionFailure subjects it may name.
    subjects: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        assert self.codes and self.codes <= DOCUMENTED, f"an oracle accepting {self.codes}"
        assert (Code.INVALID_ARGUMENT in self.codes) == bool(self.fields), "INVALID_ARGUMENT names its fields"
        assert not self.subjects or Code.FAILED_PRECONDITION in self.codes


# Every answer an IdentityService RPC documents for a tenant with valid credentials. Nothing else
# is ever accepted: INTERNAL, UNKNOWN, UNIMPLEMENTED (every RPC has shipped), PERMISSION_DENIED...
DOCUMENTED = frozenset({Code.OK, Code.NOT_FOUND, Code.INVALID_ARGUMENT, Code.FAILED_PRECONDITION})
NEVER = frozenset({Code.INTERNAL, Code.UNKNOWN, Code.UNIMPLEMENTED, Code.PERMISSION_DENIED})


def only(*codes: grpc.StatusCode, check: Callable[[Any], None] | None = None) -> Expect:
    return Expect(frozenset(codes), check)


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


def ident_proto(arg: IdentArg, pick: Pick) -> event_pb2.Identifier:
    return Ident(type=arg[0], value=pick(arg[1]))


def bad_idents(b: BState, idents: Sequence[IdentArg], field: str = "identifiers") -> list[str]:
    """The request fields of the identifiers B's rules reject (unknown type, invalid or blocked)."""
    return [f"{field}[{i}]" for i, (t, v) in enumerate(idents) if b.ident(t, v.real)[0] == "invalid"]


def resolve_call(idents: Sequence[IdentArg]) -> Call:
    def expect(b: BState) -> Expect:
        if not idents:
            return invalid("identifiers")
        if bad := bad_idents(b, idents):
            return invalid(*bad)
        looked = [b.ident(t, v.real) for t, v in idents]
        owners = {b.owner[k] for s, k in looked if s == "ok" and k is not None}
        if not owners:
            return only(Code.NOT_FOUND)

        def check(resp: identity_pb2.ResolveIdentifiersResponse) -> None:
            assert resp.profile_id in owners and resp.profile == f"profiles/{resp.profile_id}"

        return only(Code.OK, check=check)

    return Call(
        "ResolveIdentifiers",
        lambda pick: identity_pb2.ResolveIdentifiersRequest(identifiers=[ident_proto(i, pick) for i in idents]),
        [v for _, v in idents],
        expect,
    )


def graph_call(ref: Tok) -> Call:
    def expect(b: BState) -> Expect:
        status, final = b.profile(ref.real)
        if status == "invalid":
            return invalid("name")
        if final is None:
            return only(Code.NOT_FOUND)

        def check(resp: identity_pb2.GetIdentityGraphResponse) -> None:
            g = resp.graph
            assert g.profile_id == final
            assert {(i.type, i.value) for i in g.identifiers} == b.keys_of(final)
            assert {i.first_event_id for i in g.identifiers} <= b.events

        return only(Code.OK, check=check)

    return Call("GetIdentityGraph", lambda pick: identity_pb2.GetIdentityGraphRequest(name=pick(ref)), [ref], expect)


def explain_call(side_a: Side, side_b: Side) -> Call:
    def build(pick: Pick) -> Message:
        req = identity_pb2.ExplainLinkRequest()
        for name, side in (("a", side_a), ("b", side_b)):
            if isinstance(side, Tok):
                setattr(req, f"profile_{name}", pick(side))
            elif side is not None:
                getattr(req, f"identifier_{name}").CopyFrom(ident_proto(side, pick))
        return req

    def malformed(b: BState, name: str, side: Side) -> list[str]:
        """The request fields of one side (the oneof ``name``) that are malformed."""
        if side is None:  # the oneof is unset: naming either of its fields names it
            return [f"identifier_{name}", f"profile_{name}"]
        if isinstance(side, Tok):
            return [f"profile_{name}"] if b.profile(side.real)[0] == "invalid" else []
        return [f"identifier_{name}"] if b.ident(side[0], side[1].real)[0] == "invalid" else []

    def expect(b: BState) -> Expect:
        # Side a is located before side b is looked at: a NOT_FOUND side a decides, whatever b is.
        bad = malformed(b, "a", side_a) + malformed(b, "b", side_b)
        owners: list[str] = []
        for name, side in (("a", side_a), ("b", side_b)):
            if malformed(b, name, side):
                return invalid(*bad)
            if isinstance(side, Tok):
                final = b.profile(side.real)[1]
            else:
                assert side is not None
                key = b.ident(side[0], side[1].real)[1]
                final = b.owner.get(key) if key is not None else None
            if final is None:
                return only(Code.NOT_FOUND)
            owners.append(final)

        def check(resp: identity_pb2.ExplainLinkResponse) -> None:
            assert resp.linked == (owners[0] == owners[1]), resp

        return only(Code.OK, check=check)

    return Call("ExplainLink", build, side_toks(side_a) + side_toks(side_b), expect)


def reason_error(reason: str) -> bool:
    return not reason.strip() or len(reason.strip()) > 1000


def merge_call(survivor: Tok, absorbed: Tok, reason: str) -> Call:
    def expect(b: BState) -> Expect:
        (s_status, s_final), (a_status, a_final) = b.profile(survivor.real), b.profile(absorbed.real)
        bad = [
            name
            for name, wrong in (
                ("survivor_profile", s_status == "invalid"),
                ("absorbed_profile", a_status == "invalid"),
                ("reason", reason_error(reason)),
            )
            if wrong
        ]
        if bad:
            return invalid(*bad)
        if s_final is None or a_final is None:
            return only(Code.NOT_FOUND)
        if s_final == a_final:
            return only(Code.FAILED_PRECONDITION)  # already one customer
        if broken := b.broken_limits(s_final, a_final):
            # Documented: FAILED_PRECONDITION naming the rule (a type's max_per_profile) it would break.
            subjects = frozenset(f"identityRules/types/{t}" for t in broken)
            return Expect(frozenset({Code.FAILED_PRECONDITION}), subjects=subjects)

        def check(resp: identity_pb2.MergeProfilesResponse) -> None:
            assert (resp.merge.survivor_profile_id, resp.merge.absorbed_profile_id) == (s_final, a_final)

        return only(Code.OK, check=check)

    return Call(
        "MergeProfiles",
        lambda pick: identity_pb2.MergeProfilesRequest(
            survivor_profile=pick(survivor), absorbed_profile=pick(absorbed), reason=reason
        ),
        [survivor, absorbed],
        expect,
    )


def erase_call(ref: Tok, reason: str) -> Call:
    """B asks to erase a profile. The fuzz never names one of B's own (that would empty B's world),
    so anything that parses is someone else's or nobody's: NOT_FOUND."""

    def expect(b: BState) -> Expect:
        status, final = b.profile(ref.real)
        bad = [name for name, wrong in (("name", status == "invalid"), ("reason", reason_error(reason))) if wrong]
        if bad:
            return invalid(*bad)
        assert final is None, "the fuzz must not erase B's own profiles"
        return only(Code.NOT_FOUND)

    return Call(
        "EraseProfile",
        lambda pick: identity_pb2.EraseProfileRequest(name=pick(ref), reason=reason),
        [ref],
        expect,
    )


def unmerge_call(ref: Tok, idents: Sequence[IdentArg], reason: str) -> Call:
    def expect(b: BState) -> Expect:
        status, final = b.profile(ref.real)
        bad = [
            name
            for name, wrong in (
                ("profile", status == "invalid"),
                ("identifiers", not idents),
                ("reason", reason_error(reason)),
            )
            if wrong
        ] + bad_idents(b, idents)
        if bad:
            return invalid(*bad)
        if final is None:
            return only(Code.NOT_FOUND)
        looked = [b.ident(t, v.real)[1] for t, v in idents]
        if elsewhere := [f"identifiers[{i}]" for i, k in enumerate(looked) if k is None or b.owner.get(k) != final]:
            # Not on this profile: the same answer for A's identifier as for one nobody has (see the twin).
            return invalid(*elsewhere)
        keys = {k for k in looked if k is not None}
        if keys == b.keys_of(final):
            return only(Code.FAILED_PRECONDITION)  # a split must leave an identifier behind

        def check(resp: identity_pb2.UnmergeProfileResponse) -> None:
            assert resp.merge.survivor_profile_id == final
            assert {(i.type, i.value) for i in resp.merge.identifiers} == keys

        return only(Code.OK, check=check)

    return Call(
        "UnmergeProfile",
        lambda pick: identity_pb2.UnmergeProfileRequest(
            profile=pick(ref), identifiers=[ident_proto(i, pick) for i in idents], reason=reason
        ),
        [ref, *(v for _, v in idents)],
        expect,
    )


def page_errors(page_size: int, token: str) -> list[str]:
    """A negative page size; a page token at all: the fuzz only sends forged ones and A's, and a
    token is bound to the tenant and query it was issued for (AIP-158)."""
    return (["page_size"] if page_size < 0 else []) + (["page_token"] if token else [])


def list_merges_call(w: World, page_size: int, token: str, ref: Tok | None) -> Call:
    profile = ref or Tok("")

    def expect(b: BState) -> Expect:
        final: str | None = None
        status = "ok"
        if profile.real:
            status, final = b.profile(profile.real)
        bad = page_errors(page_size, token) + (["profile"] if status == "invalid" else [])
        if bad:
            return invalid(*bad)
        if profile.real and final is None:
            return only(Code.NOT_FOUND)
        size = min(page_size or 50, 1000)

        def check(resp: identity_pb2.ListMergesResponse) -> None:
            names = [m.name for m in resp.merges]
            if final is None:
                # Unfiltered: exactly B's merges.
                mine = [f"merges/{m}" for m in b.merge_ids]
                assert names == mine[:size]
            else:
                assert set(names) <= b.merge_names

        return only(Code.OK, check=check)

    return Call(
        "ListMerges",
        lambda pick: identity_pb2.ListMergesRequest(page_size=page_size, page_token=token, profile=pick(profile)),
        [profile],
        expect,
    )


def get_rules_call(w: World) -> Call:
    def expect(b: BState) -> Expect:
        def check(resp: identity_pb2.GetIdentityRulesResponse) -> None:
            assert resp.rules == w.b_rules, "B sees rules it did not set"

        return only(Code.OK, check=check)

    return Call("GetIdentityRules", lambda pick: identity_pb2.GetIdentityRulesRequest(), [], expect)


def rules_updates(w: World) -> dict[str, tuple[identity_pb2.UpdateIdentityRulesRequest, Expect]]:
    """Rule changes B may make, with the answer each must get."""
    mask = field_mask_pb2.FieldMask
    bad_types = identity_pb2.IdentityRules()
    bad_types.CopyFrom(w.b_rules_initial)
    bad_types.types.add(type="crm_id", normalizer="soundex", priority=10, max_per_profile=5)
    copy_of_a = identity_pb2.IdentityRules()
    copy_of_a.CopyFrom(w.a_rules)
    copy_of_a.ClearField("update_time")
    initial = identity_pb2.IdentityRules()
    initial.CopyFrom(w.b_rules_initial)
    req = identity_pb2.UpdateIdentityRulesRequest
    rules = identity_pb2.IdentityRules
    return {
        "region GB": (req(rules=rules(default_region="GB"), update_mask=mask(paths=["default_region"])), only(Code.OK)),
        "region DE": (req(rules=rules(default_region="DE"), update_mask=mask(paths=["default_region"])), only(Code.OK)),
        # B configures exactly what A has (A's custom type, region, placeholder): still B's own rules.
        "copy of A": (req(rules=copy_of_a), only(Code.OK)),
        "initial": (req(rules=initial), only(Code.OK)),
        "blocked": (
            req(rules=rules(blocked_values=["bravo-placeholder"]), update_mask=mask(paths=["blocked_values"])),
            only(Code.OK),
        ),
        "bad normalizer": (req(rules=bad_types, update_mask=mask(paths=["types"])), invalid("rules.types")),
        "bad mask": (
            req(rules=rules(default_region="GB"), update_mask=mask(paths=["tenant_id"])),
            invalid("update_mask.paths"),
        ),
        "no rules": (req(), invalid("rules")),
        # Probabilistic matching has shipped: B may switch it on (its thresholds stay valid).
        "probabilistic": (
            req(
                rules=rules(probabilistic=identity_pb2.ProbabilisticMatching(enabled=True)),
                update_mask=mask(paths=["probabilistic.enabled"]),
            ),
            only(Code.OK),
        ),
    }


def update_rules_call(w: World, which: str) -> Call:
    request, answer = rules_updates(w)[which]

    def expect(b: BState) -> Expect:
        def check(resp: identity_pb2.UpdateIdentityRulesResponse) -> None:
            w.b_rules = resp.rules
            if request.rules.default_region:
                assert resp.rules.default_region == request.rules.default_region
            if request.rules.probabilistic.enabled:
                assert resp.rules.probabilistic.enabled

        return dataclasses.replace(answer, check=check)

    return Call("UpdateIdentityRules", lambda pick: request, [], expect)


def suggestions_call(page_size: int, token: str, state: int) -> Call:
    def expect(b: BState) -> Expect:
        if bad := page_errors(page_size, token):
            return invalid(*bad)
        size = min(page_size or 50, 1000)
        wanted = state or identity_pb2.MATCH_SUGGESTION_STATE_OPEN  # default open

        def check(resp: identity_pb2.ListMatchSuggestionsResponse) -> None:
            # Exactly B's suggestions in that state (none, so far), highest score first.
            mine = sorted((-score, i) for i, st_, score in b.suggestions if st_ == wanted)
            assert [s.name for s in resp.suggestions] == [f"matchSuggestions/{i}" for _, i in mine][:size]
            assert all(s.state == wanted for s in resp.suggestions)

        return only(Code.OK, check=check)

    return Call(
        "ListMatchSuggestions",
        lambda pick: identity_pb2.ListMatchSuggestionsRequest(
            page_size=page_size,
            page_token=token,
            state=state,  # type: ignore[arg-type]
        ),
        [],
        expect,
    )


def review_call(name: Tok, accept: bool, reason: str) -> Call:
    def expect(b: BState) -> Expect:
        raw = name.real.removeprefix("matchSuggestions/")
        well_formed = name.real.startswith("matchSuggestions/") and raw.isascii() and raw.isdigit()
        # An empty reason is allowed here (a rejection needs none); a too long one is not.
        bad = [n for n, wrong in (("name", not well_formed), ("reason", len(reason.strip()) > 1000)) if wrong]
        if bad:
            return invalid(*bad)
        # B has no suggestions: whatever the id (A's, or nobody's), there is nothing to review.
        assert int(raw) not in {i for i, _, _ in b.suggestions}, "the fuzz must not review B's own suggestions"
        return only(Code.NOT_FOUND)

    return Call(
        "ReviewMatchSuggestion",
        lambda pick: identity_pb2.ReviewMatchSuggestionRequest(name=pick(name), accept=accept, reason=reason),
        [name],
        expect,
    )


def suggestion_tok(w: World, name: str) -> Tok:
    """A's suggestion name, its twin an id no tenant has."""
    return Tok(name, f"matchSuggestions/{int(name.split('/')[1]) + 10**12}")


# ----------------------------------------------------------------------------------------------
# Running a call as B and judging the answer.


@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    response: Any
    text: str
    violations: tuple[tuple[str, str], ...] = ()  # BadRequest (field, description)
    preconditions: tuple[tuple[str, str], ...] = ()  # PreconditionFailure (type, subject)


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
        resp = getattr(stub, rpc)(request, metadata=metadata, timeout=10)
    except grpc.RpcError as err:
        text = f"{err.code().name}: {err.details()}"
        status = rpc_status.from_call(err)
        for detail in status.details if status is not None else ():
            for kind in DETAIL_TYPES:
                msg = kind()
                if detail.Unpack(msg):
                    text += f"\n{kind.__name__} {text_format.MessageToString(msg, as_utf8=True)}"
                    break
            else:
                text += f"\n{detail.type_url} {detail.value!r}"
        # Without rich details there are no violations: run then names the call that lacks them.
        violations = tuple(bad_request(err)) if status is not None else ()
        preconditions = tuple(precondition_failures(err)) if status is not None else ()
        return Outcome(err.code(), None, text, violations, preconditions)
    return Outcome(Code.OK, resp, text_format.MessageToString(resp, as_utf8=True))


def nul_paths(message: Message, path: str = "") -> list[str]:
    """The field paths ("reason", "identifiers[1].value", "identifier_a.type") of every string in a
    request that holds NUL. The requests drawn here have no map fields."""
    out: list[str] = []
    for fd, value in message.ListFields():
        name = f"{path}.{fd.name}" if path else fd.name
        assert not (fd.message_type and fd.message_type.GetOptions().map_entry), f"a map in {name}"
        values = list(value) if fd.is_repeated else [value]
        for i, v in enumerate(values):
            at = f"{name}[{i}]" if fd.is_repeated else name
            if fd.type == fd.TYPE_STRING and "\x00" in v:
                out.append(at)
            elif fd.type == fd.TYPE_MESSAGE:
                out.extend(nul_paths(v, at))
    return out


def identifiers_in(request: Message) -> list[event_pb2.Identifier]:
    """Every identifier a request carries."""
    out: list[event_pb2.Identifier] = []
    for fd, value in request.ListFields():
        if fd.message_type is event_pb2.Identifier.DESCRIPTOR:
            out.extend(value if fd.is_repeated else [value])
    return out


def merges_in(resp: Any) -> list[identity_pb2.Merge]:
    if isinstance(resp, identity_pb2.ListMergesResponse):
        return list(resp.merges)
    if isinstance(resp, identity_pb2.GetIdentityGraphResponse):
        return list(resp.graph.merges)
    if isinstance(resp, identity_pb2.ExplainLinkResponse):
        return list(resp.chain)
    if isinstance(resp, identity_pb2.MergeProfilesResponse | identity_pb2.UnmergeProfileResponse):
        return [resp.merge]
    if isinstance(resp, identity_pb2.ReviewMatchSuggestionResponse) and resp.HasField("merge"):
        return [resp.merge]
    return []


def swap(text: str, toks: Sequence[Tok], w: World) -> str:
    """``text`` with every secret of A the request carried replaced by its twin."""
    pairs = [(t.real, t.twin) for t in toks if t.secret] + [(t.real.lower(), t.twin.lower()) for t in toks if t.secret]
    mapping: dict[str, str] = {}
    for old, new in [*pairs, *w.pairs]:
        if old:
            mapping.setdefault(old, new)
    if not mapping:
        return text
    # One pass, longest first at every position: a replacement is never replaced again, and a short
    # secret that starts a longer one does not break the longer one apart.
    pattern = re.compile("|".join(re.escape(k) for k in sorted(mapping, key=len, reverse=True)))
    return pattern.sub(lambda m: mapping[m.group(0)], text)


def run(w: World, call: Call, *, want: grpc.StatusCode | None = None) -> Outcome:
    """Call as B; check the answer against the model, for leaks, and against the twin request."""
    before = load_b(w)
    request = call.build(real)
    # A string holding NUL is refused before anything is looked up (and names only its own field).
    expect = invalid(*nul) if (nul := nul_paths(request)) else call.expect(before)
    out = invoke(w.stub, call.rpc, request, w.b.metadata)
    what = f"{call!r} -> {out.text}"
    assert out.code is not Code.PERMISSION_DENIED, f"PERMISSION_DENIED leaks existence: {what}"
    assert out.code not in NEVER, f"{out.code.name} is never a documented answer: {what}"
    assert out.code in expect.codes, f"expected {sorted(c.name for c in expect.codes)}: {what}"
    if want is not None:
        assert out.code is want, f"expected {want.name}: {what}"
    if out.code is Code.INVALID_ARGUMENT:
        named = [f for f, _ in out.violations]
        assert named, f"INVALID_ARGUMENT without a field violation: {what}"
        stray = [f for f in named if not names_field(f, expect.fields)]
        assert not stray, f"field violations {stray}, expected only {sorted(expect.fields)}: {what}"
    if out.code is Code.FAILED_PRECONDITION and expect.subjects:
        subjects = {s for _, s in out.preconditions}
        assert subjects and subjects <= expect.subjects, f"expected a violation of {sorted(expect.subjects)}: {what}"
    after = load_b(w)

    # Nothing of A's that B did not send itself.
    sent = text_format.MessageToString(request, as_utf8=True).lower()
    # The server may echo an id B sent in its canonical spelling (hyphenated, lower case).
    hexes = re.findall(r"[0-9a-f]{32}", re.sub(r"[-{}]", "", sent))
    sent += " " + " ".join(str(uuid.UUID(h)) for h in hexes)
    # ...and an identifier B sent as B's rules normalize it ("+44 20 7946 0011" -> "+442079460011").
    normalized = (before.rules.normalize(i.type, i.value).value for i in identifiers_in(request))
    sent += " " + " ".join(v.lower() for v in normalized if v is not None)
    shown = out.text.lower()
    leaked = {s for s in w.a_secrets if s in shown and s not in sent}
    assert not leaked, f"A's data in B's answer {leaked}: {what}"
    foreign = set(UUID_RE.findall(shown)) - set(UUID_RE.findall(sent.replace("{", "").replace("}", ""))) - after.ids
    assert not foreign, f"ids that are not B's in B's answer {foreign}: {what}"
    for m in merges_in(out.response):
        assert m.name not in w.a_merge_names and m.name in after.merge_names, f"not B's merge {m.name}: {what}"
        assert {m.survivor_profile_id, m.absorbed_profile_id} <= set(after.survivor), f"not B's profiles: {what}"
        assert not m.event_id or m.event_id in after.events, what
    suggestions = list(getattr(out.response, "suggestions", [])) + (
        [out.response.suggestion] if isinstance(out.response, identity_pb2.ReviewMatchSuggestionResponse) else []
    )
    for s in suggestions:
        assert s.name not in w.a_suggestions, f"A's suggestion in B's answer: {what}"
        assert {s.profile_a, s.profile_b} <= {f"profiles/{p}" for p in after.survivor}, f"not B's profiles: {what}"
    if out.code is Code.OK and expect.check is not None:
        expect.check(out.response)

    if call.rpc == "UpdateIdentityRules":
        # B's change is B's only: A's rules, update time included, are as A left them.
        a_rules = w.stub.GetIdentityRules(identity_pb2.GetIdentityRulesRequest(), metadata=w.a.metadata).rules
        assert a_rules == w.a_rules, "B's UpdateIdentityRules changed A's rules"
        b_rules = w.stub.GetIdentityRules(identity_pb2.GetIdentityRulesRequest(), metadata=w.b.metadata).rules
        assert b_rules == w.b_rules

    # The twin: the same request with A's secrets swapped for look-alikes that exist nowhere.
    if any(t.secret for t in call.toks):
        assert not (out.code is Code.OK and call.rpc in MUTATING), f"B changed something with A's ids: {what}"
        twin_out = invoke(w.stub, call.rpc, call.build(twin), w.b.metadata)
        assert (out.code, swap(out.text, call.toks, w)) == (twin_out.code, twin_out.text), (
            f"B can tell A's id from one that does not exist: {what} | twin -> {twin_out.text}"
        )
    return out


# ----------------------------------------------------------------------------------------------
# Strategies.


# Draw weights: mostly A's secrets, enough of B's own ids that B's merges and splits happen too.
PROFILE_KINDS = ["a_live", "a_merged", "b"] * 3 + ["random", "garbled", "garbage"]
IDENT_KINDS = ["a"] * 3 + ["shared", "b", "unknown", "junk", "text"]
A_SPELLINGS = ["exact", "exact", "upper", "padded", "spaced", "gb_national", "nul"]


def pick(data: st.DataObject, pool: Sequence[T]) -> T:
    """One of ``pool``, which may change between examples (B's live data): an index, not a
    ``sampled_from``, keeps the shape of the drawn data the same, as hypothesis requires."""
    return pool[data.draw(st.integers(0, 2**16), label="index") % len(pool)]


def draw_profile(data: st.DataObject, w: World, b: BState) -> Tok:
    kind = data.draw(st.sampled_from(PROFILE_KINDS), label="profile")
    if kind == "garbage":
        return Tok(data.draw(st.sampled_from(["", "profiles/", "profiles/nope", "merges/1", "\x00"]) | any_text(30)))
    if kind.startswith("a") or kind == "garbled":
        pid = data.draw(st.sampled_from(w.a_live if kind == "a_live" else w.a_merged))
        base = Tok(pid, w.twins[pid])
    elif kind == "b":
        base = Tok(pick(data, sorted(b.survivor)))
    else:
        base = Tok(str(data.draw(st.uuids())))
    forms = GARBLED_FORMS if kind == "garbled" else PROFILE_FORMS
    form = forms[data.draw(st.sampled_from(sorted(forms)), label="form")]
    return Tok(form(base.real), form(base.twin))


def any_text(max_size: int) -> st.SearchStrategy[str]:
    """Any text, NUL included (often: the core guard refuses a request string holding one as
    INVALID_ARGUMENT naming the field, before the servicer runs, for every tenant alike)."""
    text = st.text(st.characters(codec="utf-8"), max_size=max_size)
    with_nul = st.tuples(text, text).map(lambda p: f"{p[0]}\x00{p[1]}")
    return text | with_nul


def draw_ident(data: st.DataObject, w: World, b: BState) -> IdentArg:
    kind = data.draw(st.sampled_from(IDENT_KINDS), label="identifier")
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


def draw_side(data: st.DataObject, w: World, b: BState) -> Side:
    kind = data.draw(st.sampled_from(["identifier", "profile"] * 2 + ["unset"]), label="side")
    if kind == "unset":
        return None
    return draw_ident(data, w, b) if kind == "identifier" else draw_profile(data, w, b)


REASONS = st.sampled_from(["fuzz: same person", "fuzz: shared device"] * 4 + ["", "   ", "x" * 1001, "fuzz\x00"])


def draw_call(data: st.DataObject, w: World, b: BState) -> Call:
    rpc = data.draw(st.sampled_from(RPCS), label="rpc")
    idents = st.sampled_from([0, 1, 1, 2, 2, 3])
    if rpc == "ResolveIdentifiers":
        return resolve_call([draw_ident(data, w, b) for _ in range(data.draw(idents))])
    if rpc == "GetIdentityGraph":
        return graph_call(draw_profile(data, w, b))
    if rpc == "ExplainLink":
        return explain_call(draw_side(data, w, b), draw_side(data, w, b))
    if rpc == "MergeProfiles":
        return merge_call(draw_profile(data, w, b), draw_profile(data, w, b), data.draw(REASONS))
    if rpc == "UnmergeProfile":
        ref = draw_profile(data, w, b)
        return unmerge_call(ref, [draw_ident(data, w, b) for _ in range(data.draw(idents))], data.draw(REASONS))
    if rpc == "ListMerges":
        only_of = draw_profile(data, w, b) if data.draw(st.booleans(), label="filter") else None
        token = data.draw(st.sampled_from(["", "", w.a_page_token, "forged"]), label="token")
        size = data.draw(st.sampled_from([0, 1, 2, 1000, -1]), label="page_size")
        return list_merges_call(w, size, token, only_of)
    if rpc == "GetIdentityRules":
        return get_rules_call(w)
    if rpc == "UpdateIdentityRules":
        return update_rules_call(w, data.draw(st.sampled_from(sorted(rules_updates(w))), label="update"))
    if rpc == "EraseProfile":  # never one of B's own profiles (see erase_call)
        kind = data.draw(st.sampled_from(["a_live", "a_merged", "random", "garbage"]), label="erase")
        if kind == "garbage":
            ref = Tok(data.draw(st.sampled_from(["", "profiles/", "profiles/nope", "merges/1"])))
        elif kind == "random":
            ref = Tok(f"profiles/{data.draw(st.uuids())}")
        else:
            pid = data.draw(st.sampled_from(w.a_live if kind == "a_live" else w.a_merged))
            ref = Tok(f"profiles/{pid}", f"profiles/{w.twins[pid]}")
        return erase_call(ref, data.draw(REASONS))
    if rpc == "ListMatchSuggestions":
        token = data.draw(st.sampled_from(["", w.a_page_token, "forged"]))
        return suggestions_call(data.draw(st.sampled_from([0, 10, -1])), token, data.draw(st.integers(0, 3)))
    kind = data.draw(st.sampled_from(["a_suggestion", "a_profile", "small", "garbage"]), label="suggestion")
    if kind == "a_suggestion" and w.a_suggestions:
        name = suggestion_tok(w, data.draw(st.sampled_from(w.a_suggestions)))
    elif kind == "a_profile":
        pid = data.draw(st.sampled_from(w.a_live + w.a_merged))
        name = Tok(f"matchSuggestions/{pid}", f"matchSuggestions/{w.twins[pid]}")
    elif kind == "small":
        name = Tok(f"matchSuggestions/{data.draw(st.integers(0, 50))}")
    else:
        # Digits that are not ASCII ("²" is a digit Python's int() refuses) are no suggestion id either.
        garbage = ["", "matchSuggestions/", "matchSuggestions/-1", "merges/1", "matchSuggestions/1\x00"]
        garbage += ["matchSuggestions/\u00b2", "matchSuggestions/\u0663"]
        name = Tok(data.draw(st.sampled_from(garbage)))
    return review_call(name, data.draw(st.booleans()), data.draw(REASONS))


# ----------------------------------------------------------------------------------------------
# Tests.


def restore_b_rules(w: World) -> None:
    initial = identity_pb2.IdentityRules()
    initial.CopyFrom(w.b_rules_initial)
    w.b_rules = w.stub.UpdateIdentityRules(
        identity_pb2.UpdateIdentityRulesRequest(rules=initial), metadata=w.b.metadata
    ).rules


def test_every_rpc_is_covered() -> None:
    service = identity_pb2.DESCRIPTOR.services_by_name["IdentityService"]
    assert sorted(m.name for m in service.methods) == sorted(RPCS)


def test_b_sees_its_own_rules_not_those_of_a(world: World) -> None:
    w = world
    rules = w.stub.GetIdentityRules(identity_pb2.GetIdentityRulesRequest(), metadata=w.b.metadata).rules
    assert rules.default_region == "US" and w.a_rules.default_region == "GB"
    assert "loyalty_id" not in {t.type for t in rules.types}
    assert A_BLOCKED not in rules.blocked_values
    # B changing its rules, even to exactly A's, leaves A's alone, update time included.
    run(w, update_rules_call(w, "region DE"), want=Code.OK)
    run(w, update_rules_call(w, "copy of A"), want=Code.OK)
    run(w, update_rules_call(w, "probabilistic"), want=Code.OK)
    run(w, update_rules_call(w, "bad normalizer"), want=Code.INVALID_ARGUMENT)
    restore_b_rules(w)
    assert w.b_rules.default_region == "US" and not w.b_rules.probabilistic.enabled
    assert_a_unchanged(w)


def a_ident(i: int, form: str = "exact") -> IdentArg:
    t, value, look_alike = A_ONLY[i]
    f = VALUE_FORMS[form]
    return t, Tok(f(value), f(look_alike))


def test_a_secrets_are_not_found_for_b_on_every_rpc(world: World) -> None:
    """The table: each RPC with each kind of A's secret, and the answer it must get."""
    w = world
    b = load_b(w)
    b_live = sorted(set(b.survivor.values()))[0]
    b_ref = Tok(f"profiles/{b_live}")
    a_refs = [
        Tok(PROFILE_FORMS[f](p), PROFILE_FORMS[f](w.twins[p])) for p in w.a_live + w.a_merged for f in PROFILE_FORMS
    ]
    email, device, phone, loyalty, _ = (a_ident(i) for i in range(5))
    shared = (SHARED[0], Tok(SHARED[1]))
    nf, bad, ok = Code.NOT_FOUND, Code.INVALID_ARGUMENT, Code.OK
    assert w.a_suggestions, "A has a match suggestion"
    table: list[tuple[Call, grpc.StatusCode]] = [
        (resolve_call([email]), nf),
        (resolve_call([a_ident(0, "upper")]), nf),
        (resolve_call([device]), nf),
        (resolve_call([phone]), nf),
        (resolve_call([a_ident(2, "spaced")]), nf),
        # B's region is US: A's British national spelling is not a phone number for B at all.
        (resolve_call([a_ident(2, "gb_national")]), bad),
        # B has no loyalty_id type: malformed for B, whoever has the value.
        (resolve_call([loyalty]), bad),
        (resolve_call([email, phone, device]), nf),
        # The email both have is B's own profile for B, with or without A's identifiers beside it.
        (resolve_call([shared]), ok),
        (resolve_call([email, shared]), ok),
        (explain_call(email, device), nf),
        (explain_call(shared, email), nf),
        (explain_call(email, shared), nf),
        (explain_call(a_refs[0], a_refs[-1]), nf),
        (explain_call(b_ref, a_refs[0]), nf),
        (explain_call(shared, a_refs[-1]), nf),
        (merge_call(a_refs[0], a_refs[5], "fuzz"), nf),
        (merge_call(b_ref, a_refs[0], "fuzz"), nf),
        (merge_call(a_refs[0], b_ref, "fuzz"), nf),
        (merge_call(a_refs[-1], b_ref, "fuzz"), nf),
        (erase_call(a_refs[0], "fuzz"), nf),
        (erase_call(a_refs[-1], "fuzz"), nf),
        (unmerge_call(a_refs[0], [email], "fuzz"), nf),
        (unmerge_call(a_refs[0], [shared], "fuzz"), nf),
        (unmerge_call(a_refs[-1], [device], "fuzz"), nf),
        # On B's own profile, A's identifier is "not on this profile", exactly as one nobody has.
        (unmerge_call(b_ref, [email], "fuzz"), bad),
        (list_merges_call(w, 0, "", None), ok),
        (list_merges_call(w, 1000, w.a_page_token, None), bad),
        (list_merges_call(w, 0, w.a_page_token, a_refs[0]), bad),
        (get_rules_call(w), ok),
        # B's suggestions: none of A's (B has none at all).
        (suggestions_call(0, "", 0), ok),
        (suggestions_call(10, "", identity_pb2.MATCH_SUGGESTION_STATE_OPEN), ok),
        (suggestions_call(0, w.a_page_token, 0), bad),
        # A profile id is not a suggestion name, A's or not.
        (
            review_call(Tok(f"matchSuggestions/{w.a_live[0]}", f"matchSuggestions/{w.twins[w.a_live[0]]}"), True, "x"),
            bad,
        ),
    ]
    # A's real suggestions: NOT_FOUND for B, accepted or rejected, with or without a reason.
    table += [
        (review_call(suggestion_tok(w, n), accept, reason), nf)
        for n in w.a_suggestions
        for accept in (True, False)
        for reason in ("fuzz", "")
    ]
    table += [(graph_call(ref), nf) for ref in a_refs]
    table += [(list_merges_call(w, 0, "", ref), nf) for ref in a_refs]
    # Malformed: INVALID_ARGUMENT with a BadRequest naming the field, A's id inside it or not.
    garbled = [
        Tok(GARBLED_FORMS[f](p), GARBLED_FORMS[f](w.twins[p])) for p in w.a_live + w.a_merged for f in GARBLED_FORMS
    ]
    table += [(graph_call(ref), bad) for ref in [*garbled, Tok(""), Tok("profiles/")]]
    table += [(erase_call(ref, "fuzz"), bad) for ref in [*garbled[:5], Tok("")]]
    table += [(merge_call(b_ref, ref, "fuzz"), bad) for ref in garbled[:5]]
    table += [(list_merges_call(w, 0, "", ref), bad) for ref in garbled[-5:]]
    table += [
        (resolve_call([]), bad),
        (explain_call(None, email), bad),
        (explain_call(shared, None), bad),
        # Side a is located before side b is read: A's identifier there is NOT_FOUND, whatever b is.
        (explain_call(email, None), nf),
        (explain_call(garbled[0], a_refs[0]), bad),
        (merge_call(a_refs[0], Tok(""), "fuzz"), bad),
        (merge_call(a_refs[0], a_refs[5], ""), bad),
        (unmerge_call(a_refs[0], [], "fuzz"), bad),
        (unmerge_call(garbled[0], [email], "fuzz"), bad),
        (erase_call(a_refs[0], "x" * 1001), bad),
        (list_merges_call(w, -1, "", a_refs[0]), bad),
        (suggestions_call(-1, "", 0), bad),
        (review_call(Tok(""), True, "fuzz"), bad),
        # Not ASCII digits: "²" (int() refuses it) and "٣٣٣" (int() reads 333) name no suggestion.
        (review_call(Tok("matchSuggestions/\u00b2"), True, "fuzz"), bad),
        (review_call(Tok("matchSuggestions/\u0663\u0663\u0663"), True, "fuzz"), bad),
        (review_call(suggestion_tok(w, w.a_suggestions[0]), False, "x" * 1001), bad),
    ]
    # NUL anywhere: INVALID_ARGUMENT naming that field, before anything of A's is looked up.
    nul_email, nul_shared = a_ident(0, "nul"), (SHARED[0], Tok(f"{SHARED[1]}\x00"))
    table += [
        (resolve_call([nul_email]), bad),
        (resolve_call([email, nul_shared]), bad),
        (graph_call(Tok(f"{a_refs[0].real}\x00", f"{a_refs[0].twin}\x00")), bad),
        (explain_call(nul_email, email), bad),
        (explain_call(a_refs[0], nul_shared), bad),
        (merge_call(a_refs[0], a_refs[5], "fuzz\x00"), bad),
        (unmerge_call(a_refs[0], [email, nul_email], "fuzz"), bad),
        (erase_call(a_refs[0], "fuzz\x00"), bad),
        (list_merges_call(w, 0, "", Tok(f"{a_refs[-1].real}\x00", f"{a_refs[-1].twin}\x00")), bad),
        (review_call(suggestion_tok(w, w.a_suggestions[0]), True, "fuzz\x00"), bad),
        (
            review_call(
                Tok(f"{w.a_suggestions[0]}\x00", f"{suggestion_tok(w, w.a_suggestions[0]).twin}\x00"), True, "x"
            ),
            bad,
        ),
    ]
    for call, want in table:
        run(w, call, want=want)
    assert_a_unchanged(w)


def test_fuzz_b_with_a_secrets_over_every_rpc(world: World) -> None:
    w = world
    seen: set[str] = set()
    answers: set[grpc.StatusCode] = set()

    @hsettings(
        max_examples=60,
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
        restore_b_rules(w)
    assert len(seen) >= 6, f"the strategy hardly varies the RPC: {seen}"
    assert {Code.OK, Code.NOT_FOUND, Code.INVALID_ARGUMENT} <= answers, f"the fuzz hardly varies the answer: {answers}"
    # Whatever B merged, split or reconfigured, A's graph, rules and listings are as at setup.
    assert_a_unchanged(w)


def test_no_credentials_is_unauthenticated_on_every_rpc(world: World) -> None:
    w = world
    live, other = w.a_live
    email = a_ident(0)
    requests: dict[str, Message] = {
        "ResolveIdentifiers": resolve_call([email]).build(real),
        "GetIdentityGraph": graph_call(Tok(f"profiles/{live}")).build(real),
        "ExplainLink": explain_call(email, Tok(f"profiles/{other}")).build(real),
        "MergeProfiles": merge_call(Tok(f"profiles/{live}"), Tok(f"profiles/{other}"), "no key").build(real),
        "UnmergeProfile": unmerge_call(Tok(f"profiles/{live}"), [email], "no key").build(real),
        "ListMerges": identity_pb2.ListMergesRequest(),
        "GetIdentityRules": identity_pb2.GetIdentityRulesRequest(),
        "UpdateIdentityRules": identity_pb2.UpdateIdentityRulesRequest(
            rules=identity_pb2.IdentityRules(default_region="US"),
            update_mask=field_mask_pb2.FieldMask(paths=["default_region"]),
        ),
        "ListMatchSuggestions": identity_pb2.ListMatchSuggestionsRequest(),
        "ReviewMatchSuggestion": identity_pb2.ReviewMatchSuggestionRequest(name="matchSuggestions/1", accept=True),
        "EraseProfile": erase_call(Tok(f"profiles/{live}"), "no key").build(real),
    }
    assert sorted(requests) == sorted(RPCS)
    credentials: list[Sequence[tuple[str, str]] | None] = [
        None,
        (("authorization", ""),),
        (("authorization", "Bearer "),),
        (("authorization", f"Basic {w.a.api_key}"),),
        (("authorization", f"Bearer {w.a.api_key}x"),),
        (("authorization", "Bearer tsk_00000000_not-a-key"),),
        (("x-api-key", w.a.api_key),),
    ]
    for rpc, request in requests.items():
        for metadata in credentials:
            out = invoke(w.stub, rpc, request, metadata)
            assert out.code is Code.UNAUTHENTICATED, (rpc, metadata, out.text)
            assert not {s for s in w.a_secrets if s in out.text.lower()}, (rpc, out.text)
    assert_a_unchanged(w)
