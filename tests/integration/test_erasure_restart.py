"""An erasure survives a restart of any service midway: ingest, identity and profile run as real
processes (``tessera serve``) on a database and key prefix of their own, and are killed (kill -9)
or frozen (SIGSTOP) at the worst moments; the same request then runs to DONE, and nothing of the
person remains anywhere (the scan of test_erasure)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from services.cli import registry
from services.core import db, harness, tenancy
from services.core.bus import RedisClient, connect
from services.core.harness import ServiceProcess, free_port, wait_serving
from services.profile.erasure_store import STEPS
from tessera.v1 import event_pb2, ingest_pb2, ingest_pb2_grpc, profile_pb2, profile_pb2_grpc
from tests.conftest import SERVICE_TOKEN, TenantKey
from tests.integration.test_erasure import mentions, redis_mentions
from tests.support.identity import send
from tests.support.profile import base, identify, interaction, wait_applied, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SERVICES = ("ingest", "identity", "profile")
GRPC_NAMES = {
    "ingest": "tessera.v1.IngestService",
    "identity": "tessera.v1.IdentityService",
    "profile": "tessera.v1.ProfileService",
}
#: Where each step is in ErasureRequest.steps (profile's own part first).
STEP = {name: i for i, name in enumerate(("profile", *STEPS))}
#: How long a worker holds a request while it runs a step; a worker killed inside a step holds
#: it this long after its death.
LEASE_SECONDS = 3
RUNNING = profile_pb2.ERASURE_STATE_RUNNING
DONE = profile_pb2.ERASURE_STATE_DONE


@dataclass
class Stack:
    """The three services as processes; each keeps its port across restarts."""

    engine: Engine
    redis: RedisClient
    redis_prefix: str
    procs: dict[str, ServiceProcess]
    ports: dict[str, int]
    _channels: dict[str, grpc.Channel] = field(default_factory=dict)

    def target(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def start(self, *names: str) -> None:
        for name in names:
            self.procs[name].start()
        for name in names:
            wait_serving(self.target(name), self.procs[name], timeout=60, service=GRPC_NAMES[name])

    def kill(self, name: str) -> None:
        """kill -9, as a crash or an OOM kill would; the client channel goes with it."""
        self.procs[name].kill()
        channel = self._channels.pop(name, None)
        if channel is not None:
            channel.close()

    def channel(self, name: str) -> grpc.Channel:
        if name not in self._channels:
            self._channels[name] = grpc.insecure_channel(self.target(name))
        return self._channels[name]

    @property
    def ingest(self) -> ingest_pb2_grpc.IngestServiceStub:
        return ingest_pb2_grpc.IngestServiceStub(self.channel("ingest"))

    @property
    def profile(self) -> profile_pb2_grpc.ProfileServiceStub:
        return profile_pb2_grpc.ProfileServiceStub(self.channel("profile"))

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()


@pytest.fixture(scope="module")
def stack(backends: harness.Scratch, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A database and key prefix of their own (so no in-process server of another test module
    takes these requests), and the three services on them."""
    logs = tmp_path_factory.mktemp("erasure-restart")
    with harness.scratch(
        "erasure_restart",
        registry.migration_sets(),
        database_url=backends.admin_url,
        redis_url=backends.redis_url,
    ) as own:
        ports = {name: free_port() for name in SERVICES}
        env = own.env(
            TESSERA_INGEST_PORT=str(ports["ingest"]),
            TESSERA_IDENTITY_PORT=str(ports["identity"]),
            TESSERA_PROFILE_PORT=str(ports["profile"]),
            TESSERA_PROFILE_IDENTITY_ADDRESS=f"127.0.0.1:{ports['identity']}",
            TESSERA_PROFILE_INGEST_ADDRESS=f"127.0.0.1:{ports['ingest']}",
            TESSERA_PROFILE_METRICS_ADDRESS="none",
            TESSERA_SERVICE_TOKEN=SERVICE_TOKEN,
            TESSERA_HEALTH_INTERVAL_SECONDS="0.1",
            TESSERA_TENANT_REFRESH_SECONDS="0.2",
            TESSERA_AUTH_CACHE_SECONDS="0",
            TESSERA_OUTBOX_SWEEP_SECONDS="0.2",
            TESSERA_OUTBOX_GRACE_SECONDS="1",
            TESSERA_CONSUMER_BLOCK_MS="100",
            TESSERA_CONSUMER_CLAIM_IDLE_MS="1000",
            TESSERA_SHUTDOWN_GRACE_SECONDS="2",
            TESSERA_INGEST_SUPPRESSION_CACHE_SECONDS="0.2",
            TESSERA_IDENTITY_RULES_CACHE_SECONDS="0",
            TESSERA_PROFILE_RULES_CACHE_SECONDS="0.5",
            TESSERA_PROFILE_ERASURE_SETTLE_SECONDS="1",
            TESSERA_PROFILE_ERASURE_POLL_SECONDS="0.1",
            TESSERA_PROFILE_ERASURE_LEASE_SECONDS=str(LEASE_SECONDS),
        )
        engine = db.make_engine(
            own.database_url, application_name="tests-erasure-restart", pool_size=2, instrument=False
        )
        client = connect(own.redis_url)
        procs = {name: ServiceProcess.service(name, env, logs / f"{name}.log") for name in SERVICES}
        running = Stack(engine, client, own.redis_prefix, procs, ports)
        try:
            running.start(*SERVICES)
            yield running
        finally:
            running.close()
            for proc in reversed(procs.values()):
                proc.send_signal(signal.SIGCONT)
                proc.stop(5)
            client.close()
            engine.dispose()


@pytest.fixture
def services(stack: Stack) -> Iterator[Stack]:
    """The stack with every service up, whatever the test before did to it."""
    for proc in stack.procs.values():
        proc.send_signal(signal.SIGCONT)
    stack.start(*(name for name in SERVICES if not stack.procs[name].alive()))
    yield stack
    for proc in stack.procs.values():
        proc.send_signal(signal.SIGCONT)


# ---- the person ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Person:
    tenant: TenantKey
    email: str
    phone: str
    event_ids: list[str]
    needles: list[str]  # what must be gone: identifiers, traits, free text


def new_tenant(stack: Stack, label: str) -> TenantKey:
    tenant_id = f"{label}-{harness.run_token()}"
    return TenantKey(tenant_id, tenancy.create_tenant(stack.engine, tenant_id))


def load_person(stack: Stack, label: str) -> Person:
    """Ada (an Identify with traits, a call, a chat message) and Grace, who must keep everything;
    through the whole pipeline, until profile has applied every event."""
    tenant = new_tenant(stack, label)
    email, phone, device = "ada.lovelace@example.org", "+14155550177", "dev-ada-93c1"
    secret = "my card ending 4242 was charged twice"
    chat = base(("device_id", device), ("email", email), channel=event_pb2.CHANNEL_CHAT)
    chat.message.interaction_id = "chat-ada-1"
    chat.message.author = event_pb2.AUTHOR_CUSTOMER
    chat.message.text = secret
    ids = send(
        stack.ingest,
        tenant.metadata,
        identify(("email", email), ("phone", phone), traits={"first_name": "Augusta", "city": "Marylebone"}),
        interaction(("phone", phone), interaction_id="call-ada-1", reason="double charge"),
        chat,
    )
    send(stack.ingest, tenant.metadata, identify(("email", "grace.hopper@example.org"), traits={"first_name": "Grace"}))
    wait_applied(stack.engine, tenant.tenant_id, 4, timeout=30)
    needles = [email, phone, device, "Augusta", "Marylebone", secret]
    assert mentions(stack.engine, tenant.tenant_id, needles), "the scan must find her before the erasure"
    return Person(tenant, email, phone, ids, needles)


def by_name(name: str) -> profile_pb2.ErasePersonRequest:
    return profile_pb2.ErasePersonRequest(name=name, reason="GDPR art. 17 request #81")


def by_identifier(id_type: str, value: str) -> profile_pb2.ErasePersonRequest:
    return profile_pb2.ErasePersonRequest(
        identifier=event_pb2.Identifier(type=id_type, value=value), reason="GDPR art. 17 request #81"
    )


def erase(stack: Stack, person: Person, request: profile_pb2.ErasePersonRequest) -> profile_pb2.ErasureRequest:
    resp = stack.profile.ErasePerson(request, metadata=person.tenant.metadata, timeout=10, wait_for_ready=True)
    return resp.request  # type: ignore[no-any-return]


def progress(stack: Stack, person: Person, name: str) -> profile_pb2.ErasureRequest | None:
    """GetErasureRequest; None while profile does not answer (it is being restarted)."""
    try:
        resp = stack.profile.GetErasureRequest(
            profile_pb2.GetErasureRequestRequest(name=name), metadata=person.tenant.metadata, timeout=5
        )
    except grpc.RpcError as err:
        if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return None
        raise
    return resp.request  # type: ignore[no-any-return]


def wait_step(
    stack: Stack, person: Person, name: str, step: str, *, done: bool = True, detail: str = "", timeout: float = 30
) -> profile_pb2.ErasureRequest:
    """Until the request's ``step`` is done (or, with ``done=False``, not done and its detail
    starting with ``detail``)."""

    def check() -> profile_pb2.ErasureRequest | None:
        r = progress(stack, person, name)
        if r is None:
            return None
        s = r.steps[STEP[step]]
        if done:
            return r if s.done else None
        return r if not s.done and s.detail.startswith(detail) else None

    found = wait_until(check, timeout, f"step {step} {'done' if done else repr(detail)}")
    assert found is not None
    return found


def wait_done(stack: Stack, person: Person, name: str, timeout: float = 40) -> profile_pb2.ErasureRequest:
    def check() -> profile_pb2.ErasureRequest | None:
        r = progress(stack, person, name)
        return r if r is not None and r.state == DONE else None

    try:
        found = wait_until(check, timeout, "the erasure to finish")
    except AssertionError:
        raise AssertionError(f"{progress(stack, person, name)}\n{rows(stack, person)}") from None
    assert found is not None
    assert all(s.done for s in found.steps), found
    return found


def rows(stack: Stack, person: Person) -> list[Any]:
    """The tenant's erasure requests as stored, with how far ahead their next try (or lease) is."""
    with stack.engine.connect() as conn:
        return list(
            conn.execute(
                sa.text(
                    "SELECT request_id::text AS request_id, state, attempts, steps, "
                    "extract(epoch FROM next_try_at - now()) AS ahead FROM profile.erasure_requests "
                    "WHERE tenant_id = :t ORDER BY created_at"
                ),
                {"t": person.tenant.tenant_id},
            ).all()
        )


def assert_nothing_remains(stack: Stack, person: Person, done: profile_pb2.ErasureRequest) -> None:
    """test_erasure's checks: no row of any schema, no stream entry or cache holds anything of
    her; her event ids only as idempotency records; every look-up NOT_FOUND; a new event of hers
    is dropped at ingest; Grace keeps everything."""
    tenant_id = person.tenant.tenant_id
    assert mentions(stack.engine, tenant_id, person.needles) == {}
    left = mentions(stack.engine, tenant_id, person.event_ids)
    assert set(left) <= {"identity.event_links"} | {t for t in left if t.startswith("ingest.dedupe_")}, left
    assert all("{}" in row for row in left.get("identity.event_links", [])), "event links keep no identifiers"
    assert redis_mentions(stack.redis, stack.redis_prefix, tenant_id, person.needles + person.event_ids) == {}
    for req in (
        profile_pb2.GetProfileRequest(identifier=event_pb2.Identifier(type="email", value=person.email)),
        profile_pb2.GetProfileRequest(identifier=event_pb2.Identifier(type="phone", value=person.phone)),
        profile_pb2.GetProfileRequest(name=done.profile),
    ):
        with pytest.raises(grpc.RpcError) as err:
            stack.profile.GetProfile(req, metadata=person.tenant.metadata, timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    again = stack.ingest.IngestEvents(
        ingest_pb2.IngestEventsRequest(events=[identify(("email", "  ADA.Lovelace@Example.ORG"), traits={"a": 1})]),
        metadata=person.tenant.metadata,
        timeout=10,
        wait_for_ready=True,
    )
    assert again.results[0].status == ingest_pb2.EVENT_STATUS_SUPPRESSED
    grace = stack.profile.GetProfile(
        profile_pb2.GetProfileRequest(identifier=event_pb2.Identifier(type="email", value="grace.hopper@example.org")),
        metadata=person.tenant.metadata,
        timeout=10,
    ).profile
    assert {t.key: t.value.string_value for t in grace.traits} == {"first_name": "Grace"}


def assert_one_request(stack: Stack, person: Person, name: str) -> None:
    stored = rows(stack, person)
    assert [f"erasureRequests/{r.request_id}" for r in stored] == [name], stored


# ---- profile ------------------------------------------------------------------------------------


def test_profile_killed_right_after_erase_person_finishes_the_same_request(services: Stack) -> None:
    person = load_person(services, "restart-profile")
    started = erase(services, person, by_identifier("phone", "(415) 555-0177"))
    services.kill("profile")
    assert started.state == RUNNING and not all(s.done for s in started.steps), started
    assert started.steps[STEP["profile"]].done
    (at_kill,) = rows(services, person)
    assert at_kill.state == 1 and not all(s["done"] for s in at_kill.steps), "it was midway when profile died"

    services.start("profile")
    done = wait_done(services, person, started.name)
    assert done.name == started.name and done.profile == started.profile
    assert {s.type for s in done.suppressed} == {"email", "phone", "device_id"}
    assert all(not s.value for s in done.suppressed)
    assert_one_request(services, person, started.name)
    assert_nothing_remains(services, person, done)

    # Erasing her again finds nobody, and starts nothing.
    for request in (by_name(started.profile), by_identifier("email", person.email)):
        with pytest.raises(grpc.RpcError) as err:
            erase(services, person, request)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert_one_request(services, person, started.name)


def test_profile_killed_inside_a_step_resumes_once_its_lease_runs_out(services: Stack) -> None:
    """The worst moment: the worker is inside a step (ingest frozen, so the suppress call hangs)
    and holds the request's lease when it dies. The restarted profile answers for the same
    request at once and takes it up again once the dead worker's lease has run out."""
    person = load_person(services, "restart-lease")
    ingest = services.procs["ingest"]
    ingest.send_signal(signal.SIGSTOP)
    try:
        started = erase(services, person, by_identifier("email", person.email))

        def leased() -> bool:
            (r,) = rows(services, person)
            return r.attempts == 0 and not r.steps[STEP["suppress"]]["done"] and float(r.ahead) > 1.0

        wait_until(leased, 10, "the worker to hold the request inside the suppress step")
        services.kill("profile")
        services.start("profile")

        # While it waits, ErasePerson is idempotent: the same request, however she is named.
        for request in (
            by_name(started.profile),
            by_identifier("email", "  ADA.Lovelace@Example.ORG"),
            by_identifier("phone", "(415) 555-0177"),
        ):
            again = erase(services, person, request)
            assert (again.name, again.state) == (started.name, RUNNING), again
        assert_one_request(services, person, started.name)
    finally:
        ingest.send_signal(signal.SIGCONT)
    done = wait_done(services, person, started.name)
    assert_one_request(services, person, started.name)
    assert_nothing_remains(services, person, done)


# ---- identity -----------------------------------------------------------------------------------


def test_identity_down_mid_erasure_is_retried_until_it_is_back(services: Stack) -> None:
    person = load_person(services, "restart-identity")
    started = erase(services, person, by_identifier("phone", person.phone))
    wait_step(services, person, started.name, "suppress")
    services.kill("identity")

    # Not failed for good: the identity step says it will retry, and does, again and again.
    waiting = wait_step(services, person, started.name, "identity", done=False, detail="will retry")
    assert waiting.state == RUNNING
    assert [s.done for s in waiting.steps[: STEP["identity"]]] == [True] * STEP["identity"], waiting
    wait_until(lambda: rows(services, person)[0].attempts >= 2, 10, "a second attempt")
    again = erase(services, person, by_name(started.profile))
    assert (again.name, again.state) == (started.name, RUNNING)
    assert not again.steps[STEP["identity"]].done

    services.start("identity")
    done = wait_done(services, person, started.name)
    assert "identifiers" in done.steps[STEP["identity"]].detail and "erased" in done.steps[STEP["identity"]].detail
    assert_one_request(services, person, started.name)
    assert_nothing_remains(services, person, done)


# ---- ingest -------------------------------------------------------------------------------------


def test_ingest_down_at_the_purge_is_retried_until_it_is_back(services: Stack) -> None:
    person = load_person(services, "restart-ingest")
    started = erase(services, person, by_identifier("email", person.email))
    wait_step(services, person, started.name, "suppress")
    services.kill("ingest")

    waiting = wait_step(services, person, started.name, "purge", done=False, detail="will retry")
    assert waiting.state == RUNNING
    assert waiting.steps[STEP["identity"]].done and waiting.steps[STEP["metrics"]].done
    with services.engine.connect() as conn:
        kept = conn.execute(
            sa.text("SELECT count(*) FROM ingest.events WHERE tenant_id = :t AND event_id::text = ANY(:e)"),
            {"t": person.tenant.tenant_id, "e": person.event_ids},
        ).scalar_one()
    assert kept == len(person.event_ids), "her events wait in ingest's log for the purge"

    services.start("ingest")
    done = wait_done(services, person, started.name)
    assert done.steps[STEP["purge"]].detail.startswith(f"{len(person.event_ids)} events deleted"), done
    assert_one_request(services, person, started.name)
    assert_nothing_remains(services, person, done)
