"""The whole system under failure: every service as separate processes on real PostgreSQL and Redis,
two replicas of each, the demo dataset pumped through ingest (a share of its track events through
the gateway's Segment API, the same share in every run) while one replica of every service
is killed with SIGKILL and Redis restarts (or, on a Redis Cluster, a master fails over); the
outcome must be identical to a clean single-replica run of the same data.

Identical means, in the user's names (profile ids and event ids are assigned by the servers, so
they are replaced by a profile's identifiers and an event's message id): every acknowledged event
stored exactly once, the same partition of identifiers into profiles in identity and in the profile
service, the same traits, the same CX facts and rollups, the same evaluations and alerts; and no
dead letters anywhere.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.cli import registry
from services.cli.client import open_channel
from services.cli.demo import configure_quality, configure_tenant, generate
from services.core import db, harness, tenancy
from services.core.bus import connect, tenant_key
from services.core.embedded import EmbeddedRedis, EmbeddedRedisCluster
from tessera.v1 import event_pb2
from tests.support.system import Deployment, Pump, Snapshot, duplicates, settle, via_gateway

pytestmark = [pytest.mark.system, pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(900)]

CUSTOMERS = int(os.environ.get("TESSERA_SYSTEM_CUSTOMERS", "120"))
TENANT = "acme"
TWO_EACH = {"ingest": 2, "identity": 2, "profile": 2, "metrics": 2}
#: Time windows of the metrics (FCR's 7 days, the 30 and 90 day figures): no event of the data
#: may reach the end of one while the runs are in progress, or they would rightly differ.
WINDOWS = (timedelta(days=7), timedelta(days=30), timedelta(days=90))


@pytest.fixture(scope="module")
def dataset() -> list[event_pb2.Event]:
    """The demo data (60 days of it), placed so that no window closes during the test."""
    wall = datetime.now(UTC)
    hour = wall.replace(minute=0, second=0, microsecond=0)
    for shift in range(48):
        events = list(generate(customers=CUSTOMERS, days=60, now=hour - timedelta(hours=shift)))
        ends = (e.timestamp.ToDatetime(tzinfo=UTC) + w for e in events for w in WINDOWS)
        if not any(wall - timedelta(minutes=5) < end < wall + timedelta(minutes=60) for end in ends):
            return events
    raise AssertionError("no placement of the data keeps every window open or closed during the test")


def _run(
    tmp: Path,
    events: list[event_pb2.Event],
    tenants: list[str],
    *,
    redis_url: str,
    redis_cluster: bool = False,
    replicas: dict[str, int] | None = None,
    env: dict[str, str] | None = None,
    chaos: ChaosPlan | None = None,
) -> dict[str, tuple[Snapshot, set[str]]]:
    """One deployment on a fresh database: each tenant configured like the demo and sent the data;
    returns, per tenant, the settled outcome and the message ids ingest acknowledged."""
    out: dict[str, tuple[Snapshot, set[str]]] = {}
    with harness.scratch(
        "sys",
        registry.migration_sets(),
        database_url=harness.configured("TESSERA_TEST_DATABASE_URL"),
        redis_url=redis_url,
        redis_cluster=redis_cluster,
        workdir=tmp / "servers",
    ) as scratch:
        engine = db.make_engine(scratch.database_url, application_name="system-test", pool_size=1, instrument=False)
        keys = {t: tenancy.create_tenant(engine, t) for t in tenants}
        engine.dispose()
        deployment = Deployment(scratch, tmp / "logs", replicas or {}, env or {}, gateway=True).start()
        client = connect(scratch.redis_url, cluster=redis_cluster)
        try:
            for key in keys.values():
                with open_channel(deployment.targets("identity")[0]) as channel:
                    configure_tenant(channel, key)
                with open_channel(deployment.targets("metrics")[0]) as channel:
                    configure_quality(channel, key)
            gateway = deployment.targets("gateway")[0]
            pumps = {t: Pump(deployment.targets("ingest"), k, gateway=gateway) for t, k in keys.items()}
            for n, pump in enumerate(pumps.values()):
                hook = chaos.hook(deployment) if chaos and n == 0 else _nothing
                pump.send(events, between=hook)
                pump.close()
            if chaos:
                chaos.finish(deployment)
            for tenant, pump in pumps.items():
                assert not pump.rejected, f"the demo data must be valid: {pump.rejected[:5]}"
                assert pump.sent_via_gateway == sum(map(via_gateway, events)) > len(events) // 10
                found = settle(client, scratch, tenant, what=f"tenant {tenant}")
                out[tenant] = (found, pump.acknowledged)
        except BaseException:
            print(deployment.logs_tail())
            raise
        finally:
            client.close()
            deployment.stop()
    return out


def _nothing(_n: int) -> None:
    pass


class ChaosPlan:
    """What goes wrong while the data is pumped: after ``kill_at`` batches one replica of every
    service dies (ingest's while a batch is in flight); after ``redis_at`` Redis goes down and
    comes back; after ``revive_at`` the killed replicas start again, as their Deployment would."""

    def __init__(
        self, redis_restart: Callable[[], None], kill_at: int = 4, redis_at: int = 10, revive_at: int = 16
    ) -> None:
        self.redis_restart = redis_restart
        self.kill_at, self.redis_at, self.revive_at = kill_at, redis_at, revive_at
        self.done: list[str] = []
        self.revived = False

    def hook(self, deployment: Deployment) -> Callable[[int], None]:
        def between(n: int) -> None:
            if n == self.kill_at:
                for service in ("identity", "profile", "metrics"):
                    deployment.kill(service, 0)
                # The next batch goes to ingest 0 (the pump alternates): it dies under it.
                threading.Timer(0.02, deployment.kill, ("ingest", 0)).start()
                self.done.append("killed one replica of each service")
            elif n == self.redis_at:
                self.redis_restart()
                self.done.append("redis restarted")
            elif n == self.revive_at:
                self._revive(deployment)

        return between

    def finish(self, deployment: Deployment) -> None:
        if not self.revived:
            self._revive(deployment)
        assert len(self.done) == 3, f"the data was too short for the plan: {self.done}"

    def _revive(self, deployment: Deployment) -> None:
        for service in ("ingest", "identity", "profile", "metrics"):
            deployment.restart(service, 0)
        self.revived = True
        self.done.append("replicas restarted")


@pytest.fixture(scope="module")
def clean(dataset: list[event_pb2.Event], tmp_path_factory: pytest.TempPathFactory) -> Snapshot:
    """The reference: one replica of each service, nothing goes wrong."""
    tmp = tmp_path_factory.mktemp("clean")
    redis_server = EmbeddedRedis(Path(_short_dir()))
    url = redis_server.start()
    try:
        found, acknowledged = _run(tmp, dataset, [TENANT], redis_url=url)[TENANT]
    finally:
        redis_server.stop()
    assert acknowledged == {e.message_id for e in dataset}
    _check_complete(found, acknowledged)
    return found


def _short_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="tsys-", dir="/tmp")  # a unix socket path must be short


def _check_complete(found: Snapshot, acknowledged: set[str]) -> None:
    stored = {m for m, _ in found.events}
    assert acknowledged <= stored, f"acknowledged but not stored: {sorted(acknowledged - stored)[:5]}"
    assert not duplicates(found.events), f"stored more than once: {duplicates(found.events).most_common(5)}"
    assert found.partition == found.profile_partition, "profile and identity disagree about who is who"
    counts = found.counts()
    for part in ("profiles", "traits", "facts", "rollup rows", "evaluations"):
        assert counts[part] > 0, f"the run produced no {part}: {counts}"


def _same(found: Snapshot, clean: Snapshot, what: str = "") -> None:
    differences = found.differences(clean)
    assert not differences, f"{what} differs from the clean run:\n" + "\n".join(
        f"  {part}: {text}" for part, text in differences.items()
    )
    assert found == clean


def test_replicas_killed_and_redis_restarted_change_nothing(
    dataset: list[event_pb2.Event], clean: Snapshot, tmp_path: Path
) -> None:
    redis_server = EmbeddedRedis(Path(_short_dir()))
    url = redis_server.start()

    def restart_redis() -> None:
        redis_server.stop()  # SIGTERM: the append-only file is flushed
        time.sleep(1.0)  # long enough for every service to notice
        assert redis_server.start() == url

    chaos = ChaosPlan(restart_redis)
    try:
        found, acknowledged = _run(tmp_path, dataset, [TENANT], redis_url=url, replicas=TWO_EACH, chaos=chaos)[TENANT]
    finally:
        redis_server.stop()
    assert acknowledged == {e.message_id for e in dataset}
    _check_complete(found, acknowledged)
    _same(found, clean)


def test_on_a_redis_cluster_with_a_master_failover_change_nothing(
    dataset: list[event_pb2.Event], clean: Snapshot, tmp_path: Path
) -> None:
    cluster = EmbeddedRedisCluster(Path(_short_dir()))
    url = cluster.start()
    try:
        # Two tenants whose keys live on different masters, so the services really talk to
        # several nodes; the first one's master is the one that fails.
        prefix_probe = "probe"
        chosen: dict[int, str] = {}
        for n in range(200):
            tenant = f"{TENANT}{n}"
            chosen.setdefault(cluster.master_of(tenant_key(prefix_probe, tenant, "events")), tenant)
            if len(chosen) == 2:
                break
        tenants = list(chosen.values())
        assert len(tenants) == 2

        def fail_over() -> None:
            master = cluster.master_of(tenant_key(prefix_probe, tenants[0], "events"))
            cluster.kill(master)
            deadline = time.monotonic() + 30
            while cluster.master_of(tenant_key(prefix_probe, tenants[0], "events")) == master:
                assert time.monotonic() < deadline, "no replica took over"
                time.sleep(0.2)
            cluster.restart(master)  # it rejoins as a replica, so publishes can be replicated again

        chaos = ChaosPlan(fail_over)
        results = _run(
            tmp_path,
            dataset,
            tenants,
            redis_url=url,
            redis_cluster=True,
            replicas=TWO_EACH,
            env={"TESSERA_REDIS_WAIT_REPLICAS": "1"},
            chaos=chaos,
        )
        homes = {cluster.master_of(tenant_key(prefix_probe, t, "events")) for t in tenants}
    finally:
        cluster.stop()
    assert len(homes) == 2, "the tenants' keys must live on different masters"
    for tenant in tenants:
        found, acknowledged = results[tenant]
        assert acknowledged == {e.message_id for e in dataset}
        _check_complete(found, acknowledged)
        _same(found, clean, tenant)
