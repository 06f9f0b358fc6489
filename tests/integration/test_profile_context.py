"""GetCustomerContext as an agent desktop relies on it: it answers when metrics is absent, down or
slow (saying why the scores are missing) and carries the scores when metrics answers; a read
never gets a context older than a commit it started after, even when a slow build from old rows
stores its context late; cache hits and misses are counted; and identifier look-ups need no call
to identity once warm, while following identity's merges and splits.

The metrics service is a stand-in gRPC server in this process (our own peer, not a backend).
A change counts as committed the moment its row is visible in PostgreSQL: the consumer holds the
cached contexts it touches before it commits (``ContextCache.hold``), so even a read in the
instant between the commit and the invalidation that follows it gets the new state."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
import pytest
import redis
from opentelemetry.sdk.metrics.export import NumberDataPoint, Sum
from sqlalchemy.engine import Engine

from services.core import streams
from services.core.bus import Bus
from services.core.harness import free_port
from services.core.server import RunningServer
from services.core.settings import Settings
from services.core.streams import Stream
from services.profile.cache import ContextCache
from services.profile.consumer import CHANGES_GROUP, RESOLVED_GROUP
from tessera.v1 import metrics_pb2, metrics_pb2_grpc, profile_pb2
from tests.conftest import METRICS, TenantKey
from tests.support.profile import Apis, apis, applied_count, code_of, identify, interaction, traits_of, wait_until
from tests.support.proxy import CuttableProxy

pytestmark = [pytest.mark.integration]

T = TypeVar("T")
Context = profile_pb2.GetCustomerContextResponse


@pytest.fixture
def consumed(api: Apis, redis_client: redis.Redis, settings: Settings) -> Callable[[Stream[Any]], None]:
    """Waits until the profile consumers have read and acknowledged every entry of the tenant's
    stream (after their commit and the invalidation that follows it: the caches have settled)."""
    bus = Bus(redis_client, settings.redis_prefix)
    groups_of = {streams.RESOLVED.name: RESOLVED_GROUP, streams.CHANGES.name: CHANGES_GROUP}

    def wait(stream: Stream[Any]) -> None:
        key, group = bus.key(api.tenant_id, stream.name), groups_of[stream.name].encode()

        def caught_up() -> bool:
            last = redis_client.xinfo_stream(key)["last-generated-id"]
            groups = [g for g in redis_client.xinfo_groups(key) if g["name"] == group]
            return bool(groups) and groups[0]["pending"] == 0 and groups[0]["last-delivered-id"] == last

        wait_until(caught_up, 20, f"the profile consumers to acknowledge the {stream.name} stream")

    return wait


@pytest.fixture
def profile_with(
    start_profile_server: Callable[..., RunningServer],
    ingest_channel: grpc.Channel,
    identity_channel: grpc.Channel,
    engine: Engine,
    tenant: TenantKey,
) -> Iterator[Callable[..., Apis]]:
    """The test's tenant, through a profile server of its own with these settings."""
    channels: list[grpc.Channel] = []

    def make(**settings: object) -> Apis:
        server = start_profile_server(**settings)
        channels.append(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
        return apis(ingest_channel, identity_channel, channels[-1], engine, tenant.tenant_id, tenant.metadata)

    yield make
    for channel in channels:
        channel.close()


# ---- a stand-in metrics service -------------------------------------------------------------------


def scores_for(profile: str) -> metrics_pb2.CustomerMetrics:
    """What the stand-in answers: every kind of field, a present zero and an absent score among them."""
    m = metrics_pb2.CustomerMetrics(
        profile=profile,
        nps=metrics_pb2.Score(value=40.0, sample_size=5, ci_low=-12.5, ci_high=78.25),
        csat=metrics_pb2.Score(value=80.0, sample_size=10, ci_low=49.0, ci_high=94.5),
        ces_mean=metrics_pb2.Score(value=5.5, sample_size=4),
        ces_agree=metrics_pb2.Score(value=75.0, sample_size=4),
        fcr=metrics_pb2.Score(value=0.0, sample_size=3, ci_low=0.0, ci_high=56.1),
        aht_seconds=metrics_pb2.Score(value=150.0, sample_size=2),
        sentiment=metrics_pb2.Score(sample_size=0),
        fcr_pending=2,
        sentiment_trend=[
            metrics_pb2.SentimentPoint(interaction_id="chat-1", score=-0.4),
            metrics_pb2.SentimentPoint(interaction_id="chat-2", score=0.61),
        ],
    )
    m.sentiment_trend[0].time.FromSeconds(1_700_000_000)
    m.sentiment_trend[1].time.FromSeconds(1_700_086_400)
    m.compute_time.FromSeconds(1_700_100_000)
    return m


class StandInMetrics(metrics_pb2_grpc.MetricsServiceServicer):
    """Answers GetCustomerMetrics after ``delay`` seconds, once ``gate`` is open; records who asked."""

    def __init__(self) -> None:
        self.address = ""
        self.delay = 0.0
        self.gate = threading.Event()
        self.gate.set()
        self.stopping = threading.Event()
        self.asked: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def GetCustomerMetrics(
        self, request: metrics_pb2.GetCustomerMetricsRequest, context: grpc.ServicerContext
    ) -> metrics_pb2.GetCustomerMetricsResponse:
        auth = dict(context.invocation_metadata()).get("authorization", "")
        with self._lock:
            self.asked.append((request.profile, str(auth)))
        self.gate.wait(20)
        if self.delay:
            self.stopping.wait(self.delay)
        return metrics_pb2.GetCustomerMetricsResponse(metrics=scores_for(request.profile))

    def EraseCustomerMetrics(
        self, request: metrics_pb2.EraseCustomerMetricsRequest, context: grpc.ServicerContext
    ) -> metrics_pb2.EraseCustomerMetricsResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "the stand-in keeps no facts")
        raise AssertionError("abort raises")

    def asked_for(self, profile: str) -> int:
        with self._lock:
            return sum(1 for p, _ in self.asked if p == profile)


@pytest.fixture
def stand_in() -> Iterator[StandInMetrics]:
    servicer = StandInMetrics()  # type: ignore[abstract]  # only what profile calls
    server = grpc.server(ThreadPoolExecutor(max_workers=16))
    metrics_pb2_grpc.add_MetricsServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    servicer.address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    yield servicer
    servicer.stopping.set()
    servicer.gate.set()
    server.stop(0)


# ---- helpers --------------------------------------------------------------------------------------


def timed(call: Callable[[], T]) -> tuple[T, float]:
    start = time.monotonic()
    out = call()
    return out, time.monotonic() - start


def view(ctx: Context) -> dict[str, object]:
    """What a context says about the customer, without the parts a build stamps with its time."""
    p = ctx.profile
    return {
        "name": p.name,
        "traits": sorted((t.key, t.value.SerializeToString(), t.source, t.event_id, t.observations) for t in p.traits),
        "identifiers": sorted((i.type, i.value) for i in p.identifiers),
        "event_count": p.event_count,
        "interactions": [(i.interaction_id, i.reason, i.handle_seconds) for i in ctx.recent_interactions],
        "cases": sorted((c.case_id, c.status) for c in ctx.open_cases),
        "contacts": (ctx.contacts.last_7_days, ctx.contacts.last_30_days, ctx.contacts.last_reason),
        "scores": ctx.scores.SerializeToString(),
    }


def identifiers_of(profile: profile_pb2.Profile) -> set[tuple[str, str]]:
    return {(i.type, i.value) for i in profile.identifiers}


def cache_lookups() -> dict[str, int]:
    """The ``tessera.profile.context.cache`` counter so far, by its ``result`` attribute."""
    out = {"hit": 0, "miss": 0}
    data = METRICS.get_metrics_data()
    assert data is not None, "no metrics were recorded"
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name != "tessera.profile.context.cache":
                    continue
                assert isinstance(metric.data, Sum) and metric.data.is_monotonic
                for point in metric.data.data_points:
                    assert isinstance(point, NumberDataPoint)
                    out[str((point.attributes or {})["result"])] += int(point.value)
    return out


def counted(before: dict[str, int]) -> dict[str, int]:
    now = cache_lookups()
    return {k: now[k] - before[k] for k in now}


# ---- 1. metrics absent, down, slow, answering -------------------------------------------------------


def test_without_a_metrics_service_the_context_says_the_scores_are_missing_and_why(api: Apis) -> None:
    phone = ("phone", "+14155550161")
    api.send(identify(phone, traits={"plan": "gold"}), interaction(phone, interaction_id="call-1"))
    api.wait_applied(2)
    ctx = api.context(ident=phone)
    assert traits_of(ctx.profile) == {"plan": "gold"}
    assert [i.interaction_id for i in ctx.recent_interactions] == ["call-1"]
    assert not ctx.scores.HasField("metrics")
    assert ctx.scores.missing_reason == "no metrics service is configured (TESSERA_PROFILE_METRICS_ADDRESS)"


def test_with_metrics_down_the_context_answers_at_once_saying_it_is_unavailable(
    api: Apis, profile_with: Callable[..., Apis]
) -> None:
    """Nothing listens at the metrics address: with the default 150 ms deadline and with a long
    one (where waiting for metrics would show), every context answers at once, scores missing
    because metrics is unavailable (not because it was slow)."""
    phones = [("phone", f"+1415555017{i}") for i in range(6)]
    api.send(*(identify(p, traits={"n": i}) for i, p in enumerate(phones)))
    api.wait_applied(len(phones))
    servers = [
        profile_with(metrics_address=f"127.0.0.1:{free_port()}"),
        profile_with(metrics_address=f"127.0.0.1:{free_port()}", metrics_deadline_ms=3000),
    ]
    for k, server in enumerate(servers):
        for i in range(k, len(phones), 2):
            ctx, took = timed(lambda: server.context(ident=phones[i]))  # noqa: B023 (called at once)
            assert traits_of(ctx.profile) == {"n": i}
            assert not ctx.scores.HasField("metrics")
            assert (ctx.scores.missing_reason, k, i) == ("metrics service unavailable", k, i)
            assert took < 1.0, f"context {i} took {took:.2f}s with metrics down"


def test_slow_metrics_costs_the_context_only_its_deadline_and_prompt_scores_flow_into_it(
    api: Apis, profile_with: Callable[..., Apis], stand_in: StandInMetrics, tenant: TenantKey
) -> None:
    stand_in.delay = 5.0
    ctxs = profile_with(metrics_address=stand_in.address, metrics_deadline_ms=300, degraded_cache_seconds=1)
    slow_phone, prompt_phone = ("phone", "+14155550191"), ("phone", "+14155550192")
    api.send(identify(slow_phone, traits={"plan": "gold"}), identify(prompt_phone, traits={"plan": "tin"}))
    api.wait_applied(2)
    slow_name, prompt_name = api.get(ident=slow_phone).name, api.get(ident=prompt_phone).name

    ctx, took = timed(lambda: ctxs.context(ident=slow_phone))
    assert ctx.profile.name == slow_name and traits_of(ctx.profile) == {"plan": "gold"}
    assert not ctx.scores.HasField("metrics")
    assert ctx.scores.missing_reason == "metrics service did not answer within 300 ms"
    assert 0.3 <= took < 0.3 + 1.2, f"the context took {took:.2f}s with a 300 ms metrics deadline"
    # Metrics was asked for this customer, with the caller's credentials (the tenant is in them).
    assert stand_in.asked == [(slow_name, f"Bearer {tenant.api_key}")]

    # The same peer answering in time: its scores are the context's, field for field.
    stand_in.delay = 0.0
    ctx = ctxs.context(ident=prompt_phone)
    assert ctx.scores.missing_reason == ""
    assert ctx.scores.metrics == scores_for(prompt_name)
    assert ctx.scores.metrics.fcr.HasField("value") and ctx.scores.metrics.fcr.value == 0.0
    assert not ctx.scores.metrics.sentiment.HasField("value")

    # A cached context carries them the same: the very context built, served again. (Built again
    # instead when the profile consumer was still writing the profile, so it waits for a hit.)
    def cached() -> Context | None:
        first = ctxs.context(ident=prompt_phone)
        again = ctxs.context(ident=prompt_phone)
        return again if again == first else None

    hit = wait_until(cached, 10, "the prompt customer's context served from the cache")
    assert hit is not None and hit.scores == ctx.scores

    # The context cached without scores is kept only briefly: the scores come back by themselves.
    def with_scores() -> Context | None:
        got = ctxs.context(ident=slow_phone)
        return got if got.scores.HasField("metrics") else None

    back = wait_until(with_scores, 5, "the slow customer's scores to appear once metrics answers")
    assert back is not None and back.scores.metrics == scores_for(slow_name) and back.scores.missing_reason == ""


# ---- 2. invalidation racing reads -----------------------------------------------------------------


def test_a_context_built_from_rows_read_before_a_commit_is_never_served_after_it(
    api: Apis, profile_with: Callable[..., Apis], stand_in: StandInMetrics, consumed: Callable[[Stream[Any]], None]
) -> None:
    """A build that read the rows before a commit and stores its context after the invalidation
    (here: held in its metrics call until then) must not be what later reads get."""
    ctxs = profile_with(metrics_address=stand_in.address, metrics_deadline_ms=8000)
    phone = ("phone", "+14155550201")
    api.send(identify(phone, traits={"plan": "old"}))
    api.wait_applied(1)
    name = api.get(ident=phone).name
    stand_in.gate.clear()
    with ThreadPoolExecutor(1) as pool:
        early = pool.submit(ctxs.context, name)
        # It asks metrics after it has read the rows: from here on, it holds the old state.
        wait_until(lambda: stand_in.asked_for(name), 10, "the early build to ask metrics")
        api.send(identify(phone, traits={"plan": "new"}), interaction(phone, interaction_id="call-new"))
        api.wait_applied(3)
        consumed(streams.RESOLVED)
        stand_in.gate.set()
        old = early.result(timeout=10)
    # It started before the commit, so the old state is a fair answer for it...
    assert traits_of(old.profile) == {"plan": "old"} and not old.recent_interactions
    # ... but it stored that context after the invalidation, and no later read may get it.
    before = cache_lookups()
    first = ctxs.context(name)
    assert counted(before) == {"hit": 0, "miss": 1}
    assert traits_of(first.profile) == {"plan": "new"}
    assert [i.interaction_id for i in first.recent_interactions] == ["call-new"]
    # What is cached now is that fresh build.
    assert ctxs.context(name) == first
    assert counted(before) == {"hit": 1, "miss": 1}


def test_a_read_the_instant_a_commit_is_visible_in_the_database_already_sees_it(
    api: Apis, engine: Engine, consumed: Callable[[Stream[Any]], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The window between the consumer's commit and its cache invalidation (widened here to 150 ms,
    as a pause of the consumer's process would): the test watches PostgreSQL in a tight loop and
    asks for the cached context the moment the new event's row is there. Round after round, that
    read must already show the event."""
    invalidate = ContextCache.invalidate

    def late(self: ContextCache, *args: Any, **kw: Any) -> None:
        time.sleep(0.15)
        invalidate(self, *args, **kw)

    monkeypatch.setattr(ContextCache, "invalidate", late)
    phone = ("phone", "+14155550231")
    api.send(identify(phone, traits={"round": 0}))
    api.wait_applied(1)
    name = api.get(ident=phone).name
    stale: list[tuple[int, object]] = []
    rounds = 8
    for r in range(1, rounds + 1):
        assert traits_of(api.context(ident=phone).profile)["round"] == r - 1  # warm: the next read is a hit
        assert traits_of(api.context(ident=phone).profile)["round"] == r - 1
        api.send(identify(phone, traits={"round": r}))
        deadline = time.monotonic() + 20
        while applied_count(engine, api.tenant_id) < r + 1:
            assert time.monotonic() < deadline, f"round {r} was never applied"
        seen = traits_of(api.context(ident=phone).profile)["round"]
        if seen != r:
            stale.append((r, seen))
        consumed(streams.RESOLVED)
    assert not stale, f"{len(stale)} of {rounds} reads right after a commit got the context from before it: {stale}"
    assert traits_of(api.get(name))["round"] == rounds


def test_every_read_that_starts_after_a_commit_sees_it_while_threads_hammer_the_context(
    api: Apis, profile_with: Callable[..., Apis], stand_in: StandInMetrics, consumed: Callable[[Stream[Any]], None]
) -> None:
    """Four threads read one customer's context, by name and by phone, while eight rounds of
    events change a trait and add an interaction, and a fifth thread keeps setting another trait
    with UpdateTraits (which answers after its commit and invalidation). Builds are slowed
    (metrics answers in 20 ms), so many are in flight when a commit lands and store their contexts
    after its invalidation. No read that starts after a commit may miss it, and once it settles
    the cached context is what a fresh build says."""
    stand_in.delay = 0.02
    ctxs = profile_with(metrics_address=stand_in.address, metrics_deadline_ms=5000)
    phone = ("phone", "+14155550211")
    api.send(identify(phone, traits={"round": 0}))
    api.wait_applied(1)
    name = api.get(ident=phone).name
    rounds = 8
    reads: list[tuple[float, float, dict[str, Any], int]] = []  # start, end, traits, interactions seen
    updated: list[tuple[float, int]] = []  # when UpdateTraits answered, the value it set
    stop = threading.Event()

    def read(k: int) -> None:
        while not stop.is_set():
            start = time.monotonic()
            ctx = ctxs.context(name) if k % 2 else ctxs.context(ident=phone)
            reads.append((start, time.monotonic(), traits_of(ctx.profile), len(ctx.recent_interactions)))

    def write() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            ctxs.update_traits(name, {"noise": n}, ["traits.noise"], source="crm")
            updated.append((time.monotonic(), n))
            # Paced by the readers: some reads (builds, then hits) between two updates.
            while reads_since(updated[-1][0]) < 8 and not stop.is_set():
                time.sleep(0.002)

    def reads_since(when: float) -> int:
        return sum(1 for start, *_ in list(reads) if start > when)

    done: list[float] = []  # when round i + 1 was committed and invalidated
    before = cache_lookups()
    with ThreadPoolExecutor(5) as pool:
        workers = [pool.submit(read, k) for k in range(4)] + [pool.submit(write)]
        try:
            for r in range(1, rounds + 1):
                api.send(identify(phone, traits={"round": r}), interaction(phone, interaction_id=f"call-{r}"))
                api.wait_applied(1 + 2 * r)
                consumed(streams.RESOLVED)
                done.append(time.monotonic())
                wait_until(lambda: reads_since(done[-1]) >= 8, 10, f"reads after round {r}")
        finally:
            stop.set()
            for w in workers:
                w.result(timeout=20)
    lookups = counted(before)
    stale = []
    for start, _, traits, calls in reads:
        due = sum(1 for d in done if d < start)
        due_noise = max((n for at, n in updated if at < start), default=0)
        if traits["round"] < due or calls < due or traits.get("noise", 0) < due_noise:
            stale.append((due, due_noise, traits, calls))
    assert not stale, f"{len(stale)} of {len(reads)} reads started after a commit and missed it: {stale[:10]}"
    # The race was run: reads were in flight across commits, contexts were built and served.
    commits = done + [at for at, _ in updated]
    assert sum(1 for start, end, *_ in reads if any(start < c < end for c in commits)) >= rounds
    assert lookups["miss"] >= rounds and lookups["hit"] >= 1, lookups

    # Settled: the cached context is what a fresh build says (another interaction_limit is a
    # variant never built before), and what the profile says.
    cached = ctxs.context(name)
    assert ctxs.context(name) == cached
    fresh = ctxs.context(name, limit=rounds + 1)
    assert view(cached) == view(fresh)
    assert traits_of(cached.profile) == traits_of(api.get(name)) == {"round": rounds, "noise": updated[-1][1]}
    assert [i.interaction_id for i in cached.recent_interactions] == [f"call-{r}" for r in range(rounds, 0, -1)]


# ---- 3. the cache hit ratio ---------------------------------------------------------------------


def test_cache_hits_and_misses_are_counted(api: Apis) -> None:
    email = ("email", "counted@example.com")
    api.send(identify(email, traits={"plan": "gold"}), interaction(email, interaction_id="chat-1"))
    api.wait_applied(2)
    name = api.get(ident=email).name
    before = cache_lookups()
    first = api.context(name)
    assert counted(before) == {"hit": 0, "miss": 1}
    assert api.context(name) == first and api.context(name) == first
    assert counted(before) == {"hit": 2, "miss": 1}
    # Each interaction_limit is its own entry.
    assert len(api.context(name, limit=1).recent_interactions) == 1
    assert counted(before) == {"hit": 2, "miss": 2}
    # A change invalidates (UpdateTraits answers after it): one miss builds again, then hits.
    api.update_traits(name, {"tier": "A"}, ["traits.tier"])
    before = cache_lookups()
    changed = api.context(name)
    assert traits_of(changed.profile) == {"plan": "gold", "tier": "A"}
    assert api.context(name) == changed
    assert counted(before) == {"hit": 1, "miss": 1}
    # A profile that is not there is a miss too.
    missing = "profiles/00000000-0000-4000-8000-00000000c0de"
    assert code_of(lambda: api.context(missing)).code() == grpc.StatusCode.NOT_FOUND
    assert counted(before) == {"hit": 1, "miss": 2}


# ---- 4. identifier look-ups ---------------------------------------------------------------------


def test_a_warm_context_by_phone_needs_no_identity(
    api: Apis, profile_with: Callable[..., Apis], identity_server: RunningServer
) -> None:
    """Identity is asked only for its normalization rules; with identity gone, contexts by phone
    keep answering: from the cache, and from storage for a customer not looked up before. When the
    copy of the rules is due, identity not answering keeps it for another period, and the hot path
    stays one Redis round trip instead of a call to identity per context."""
    proxy = CuttableProxy(("127.0.0.1", identity_server.port))
    try:
        ctxs = profile_with(identity_address=f"127.0.0.1:{proxy.port}", rules_cache_seconds=1.0)
        known, other = ("phone", "+14155550221"), ("phone", "+14155550222")
        api.send(identify(known, traits={"plan": "gold"}), identify(other, traits={"plan": "tin"}))
        api.wait_applied(2)
        known_name, other_name = api.get(ident=known).name, api.get(ident=other).name
        spelled = ("phone", "(415) 555-0221")  # normalized with identity's rules
        warm = ctxs.context(ident=spelled)
        assert warm.profile.name == known_name

        proxy.cut()
        before = cache_lookups()
        assert ctxs.context(ident=spelled) == warm
        assert counted(before) == {"hit": 1, "miss": 0}
        assert traits_of(ctxs.context(ident=other).profile) == {"plan": "tin"}
        assert ctxs.context(ident=("phone", "415-555-0222")).profile.name == other_name

        # The rules copy falls due (1 s): the first context after that misses, asking identity in vain.
        before = cache_lookups()

        def fell_due() -> bool:
            assert ctxs.context(ident=spelled).profile.name == known_name
            return counted(before)["miss"] > 0

        wait_until(fell_due, 5, "the rules copy to fall due")
        before = cache_lookups()
        for _ in range(5):
            ctx = ctxs.context(ident=spelled)
            assert ctx.profile.name == known_name and traits_of(ctx.profile) == {"plan": "gold"}
        assert counted(before) == {"hit": 5, "miss": 0}
    finally:
        proxy.close()


def test_the_identifier_cache_follows_merges_and_splits(
    api: Apis, profile_with: Callable[..., Apis], stand_in: StandInMetrics, consumed: Callable[[Stream[Any]], None]
) -> None:
    """A context by phone answers the phone's owner right after identity merges it into another
    profile and after it splits it off again, though its owner and context were cached."""
    # Contexts with scores are cached for a minute, so a stale one could not expire during the test,
    # and identity's rules are kept as long, so every context by identifier may take the hit path.
    ctxs = profile_with(metrics_address=stand_in.address, metrics_deadline_ms=5000, rules_cache_seconds=60)
    email, phone = ("email", "follow@example.com"), ("phone", "+14155550231")
    api.send(identify(email, traits={"plan": "gold"}), identify(phone, traits={"nickname": "Bo"}))
    api.wait_applied(2)
    a, b = api.get(ident=email).name, api.get(ident=phone).name
    assert a != b
    before = cache_lookups()
    assert ctxs.context(ident=phone).profile.name == b
    assert ctxs.context(ident=phone).profile.name == b
    assert counted(before) == {"hit": 1, "miss": 1}

    api.merge(a, b)
    api.wait_merged(b, a)
    consumed(streams.CHANGES)
    merged = ctxs.context(a)  # the survivor's context, cached anew
    for ident in (phone, email, phone):
        ctx = ctxs.context(ident=ident)
        assert (ctx.profile.name, ctx.profile.redirected) == (a, False)
        assert traits_of(ctx.profile) == {"plan": "gold", "nickname": "Bo"}
    assert view(ctxs.context(ident=phone)) == view(merged)

    split = api.unmerge(a, phone)
    new = f"profiles/{split.absorbed_profile_id}"
    assert new not in (a, b)
    # Waited for by name: a look-up by identifier would cache the phone's owner afresh.
    wait_until(lambda: phone not in identifiers_of(api.get(a)), 20, "the split to reach the profile service")
    consumed(streams.CHANGES)
    assert identifiers_of(api.get(new)) == {phone}
    # The survivor's context is built again first: a forgotten owner entry would now serve it.
    assert ctxs.context(a).profile.name == a
    for _ in range(2):
        assert ctxs.context(ident=phone).profile.name == new
        assert ctxs.context(ident=email).profile.name == a
    assert traits_of(ctxs.context(ident=phone).profile) == {"nickname": "Bo"}
