"""Singleton work under the PostgreSQL advisory-lock leader, with real processes on a real server:
one of three candidates leads; kill -9 it and another takes over within the lease; a graceful
stop hands over at once; the job keeps running and never runs in two places at once. A leader cut
off by a partition steps down before PostgreSQL frees its lock. And a real ``tessera serve
ingest`` runs its partition upkeep only while it leads."""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from services.core import harness
from services.core.harness import ServiceProcess, free_port, wait_serving
from services.core.leader import AdvisoryLockCampaign, Leadership, Outcome, Term, libpq_url
from services.core.migrate import TENANCY
from services.ingest.app import MIGRATIONS as INGEST_MIGRATIONS
from tests.support.profile import wait_until
from tests.support.proxy import Target, connect, postgres_target, through

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LEASE = 3.0
RENEW = 1.0
#: Beyond the lease: process start-up jitter and one polling step of the test.
SLACK = 1.0
REPO = Path(__file__).resolve().parents[2]


# ---- in-process: the backend's own guarantees ----------------------------------------------------


def campaign(database_url: str, name: str) -> AdvisoryLockCampaign:
    return AdvisoryLockCampaign(database_url, name, lease_seconds=LEASE, renew_seconds=RENEW, application_name="t")


def test_one_session_holds_the_lock_and_loses_it_with_its_session(database_url: str, engine: Engine) -> None:
    name = f"tessera-test-{harness.run_token()}"
    a, b = campaign(database_url, name), campaign(database_url, name)
    try:
        assert a.attempt() is Outcome.HELD
        assert b.attempt() is Outcome.NOT_HELD
        assert a.attempt() is Outcome.HELD, "a renew confirms the lock in pg_locks"
        with a._conn.cursor() as cur:
            cur.execute("SHOW idle_session_timeout")
            assert cur.fetchone()[0] == "3s", "a silent leader's session ends within the lease"
            cur.execute("SELECT pg_backend_pid()")
            (pid,) = cur.fetchone()
        # The server ends the leader's session (as idle_session_timeout or an admin would): the
        # leader learns it on its next renew, and the follower can take the lock at once.
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        assert a.attempt() is Outcome.NOT_HELD
        assert wait_until(lambda: b.attempt() is Outcome.HELD, 5, "the follower to take the lock")
        a_again = a.attempt()
        assert a_again is Outcome.NOT_HELD, "the old leader reconnects as a follower"
        b.release()
        assert a.attempt() is Outcome.HELD, "a released lock is free at once"
    finally:
        a.release()
        b.release()


def test_a_leadership_that_stops_hands_over_on_the_followers_next_attempt(database_url: str) -> None:
    name = f"tessera-test-{harness.run_token()}"
    first = Leadership("t", campaign(database_url, name), lease_seconds=LEASE, renew_seconds=0.2, identity="first")
    second = Leadership("t", campaign(database_url, name), lease_seconds=LEASE, renew_seconds=0.2, identity="second")
    first.start()
    try:
        assert first.wait_leading(5)
        second.start()
        second.tick()
        assert not second.is_leader()
        first.stop(5)
        assert not first.is_leader()
        assert second.wait_leading(2), "released, not left to expire"
    finally:
        first.stop(5)
        second.stop(5)


class Blackhole:
    """A TCP proxy to PostgreSQL that can fall silent as a network partition does: nothing gets
    through either way, and neither end is told (no FIN, no RST). :meth:`heal` ends the partition
    and, as the first packets after one would, resets the connections whose far end is gone."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.silent = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._clients: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = connect(self.target)
            self._clients.append(client)
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, from_server: bool) -> None:
        try:
            while data := src.recv(65536):
                if not self.silent:
                    dst.sendall(data)
        except OSError:
            pass
        if self.silent and from_server:
            return  # the server ended the session; behind the partition, the client cannot know
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def heal(self) -> None:
        self.silent = False
        for sock in self._clients:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._listener.close()
        self.heal()


def test_a_leader_cut_off_by_the_network_steps_down_before_the_server_frees_its_lock(database_url: str) -> None:
    """Nothing tells either side of a partition: the leader stops leading lease - renew after its
    last confirmed renew, and PostgreSQL ends the silent session (idle_session_timeout, the lease)
    and frees the lock; only then can the follower take it. Never two leaders."""
    lease, renew = 2.0, 0.5
    name = f"tessera-test-{harness.run_token()}"
    proxy = Blackhole(postgres_target(database_url))  # the embedded server has only a unix socket
    via_proxy = through(database_url, proxy.port)

    def leadership(via: str, who: str) -> Leadership:
        return Leadership(
            "t",
            AdvisoryLockCampaign(via, name, lease_seconds=lease, renew_seconds=renew, application_name=who),
            lease_seconds=lease,
            renew_seconds=renew,
            identity=who,
        )

    cut_off, other = leadership(via_proxy, "cut-off"), leadership(database_url, "other")
    both = 0
    watching = threading.Event()

    def watch() -> None:
        nonlocal both
        while not watching.wait(0.005):
            both += cut_off.is_leader() and other.is_leader()

    watcher = threading.Thread(target=watch, daemon=True)
    try:
        cut_off.start()
        assert cut_off.wait_leading(5)
        other.start()
        watcher.start()
        assert not other.wait_leading(2 * renew), "a follower while the leader renews"
        proxy.silent = True
        partitioned = time.monotonic()
        wait_until(lambda: not cut_off.is_leader(), lease, "the cut-off leader to step down")
        stepped_down = time.monotonic() - partitioned
        assert other.wait_leading(lease + renew + SLACK), "the follower takes over once the server frees the lock"
        took_over = time.monotonic() - partitioned
        print(f"partition: leader stepped down after {stepped_down:.2f}s, follower took over after {took_over:.2f}s")
        assert stepped_down <= lease - renew + 0.1
        assert took_over > stepped_down
        proxy.heal()
        wait_until(lambda: cut_off._term == Term() and other.is_leader(), 5, "the old leader back as a follower")
    finally:
        watching.set()
        proxy.close()
        cut_off.stop(5)
        other.stop(5)
    assert both == 0, "never two leaders at once"


# ---- real processes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    holder: str
    started_at: dt.datetime
    ended_at: dt.datetime | None


@pytest.fixture
def runs_table(engine: Engine) -> Iterator[str]:
    table = f"leader_runs_{harness.run_token()}"
    with engine.begin() as conn:
        conn.exec_driver_sql(
            f"CREATE TABLE {table} (id bigserial PRIMARY KEY, holder text NOT NULL, "
            "started_at timestamptz NOT NULL, ended_at timestamptz)"
        )
    yield table
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")


def runs(engine: Engine, table: str) -> list[Run]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(f"SELECT holder, started_at, ended_at FROM {table} ORDER BY started_at").all()
    return [Run(*r) for r in rows]


def db_now(engine: Engine) -> dt.datetime:
    with engine.connect() as conn:
        now: dt.datetime = conn.exec_driver_sql("SELECT clock_timestamp()").scalar_one()
    return now


def test_kill_9_the_leader_and_another_takes_over_within_the_lease(
    database_url: str, engine: Engine, runs_table: str, tmp_path: Path
) -> None:
    lock = f"tessera-test-{harness.run_token()}"
    argv = [sys.executable, "-m", "tests.support.leader_worker", database_url, lock, runs_table]
    argv += ["--lease", str(LEASE), "--renew", str(RENEW)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [ServiceProcess(f"worker-{n}", argv, env, tmp_path / f"worker-{n}.log", cwd=REPO) for n in range(3)]
    by_holder: dict[str, ServiceProcess] = {}
    try:
        for p in procs:
            p.start()
        by_holder = {f"{socket.gethostname()}-{p.pid}": p for p in procs}

        def leaders_so_far() -> set[str]:
            return {r.holder for r in runs(engine, runs_table)}

        wait_until(lambda: len(runs(engine, runs_table)) >= 5, 30, "the first leader's runs")
        (first,) = leaders_so_far()
        assert all(p.alive() for p in procs), "all three candidates are up: only one of them works"

        # kill -9: the kernel closes its socket, PostgreSQL ends its session and frees the lock.
        killed_at = db_now(engine)
        by_holder[first].kill()
        second_run = wait_until(
            lambda: next((r for r in runs(engine, runs_table) if r.holder != first), None),
            LEASE + SLACK + 2,
            "another candidate to take over",
        )
        takeover = (second_run.started_at - killed_at).total_seconds()
        print(f"takeover after kill -9: {takeover:.2f}s (lease {LEASE}s, renew {RENEW}s)")
        assert takeover <= LEASE + SLACK, f"took {takeover:.2f}s"
        second = second_run.holder
        wait_until(lambda: sum(r.holder == second for r in runs(engine, runs_table)) >= 5, 10, "the new leader's runs")

        # A graceful stop (SIGTERM) releases the lock: the last candidate takes over on its next attempt.
        stopped_at = db_now(engine)
        by_holder[second].send_signal(signal.SIGTERM)
        third_run = wait_until(
            lambda: next((r for r in runs(engine, runs_table) if r.holder not in (first, second)), None),
            LEASE + SLACK + 2,
            "the last candidate to take over",
        )
        handover = (third_run.started_at - stopped_at).total_seconds()
        print(f"handover after SIGTERM: {handover:.2f}s")
        assert handover <= RENEW + SLACK, f"took {handover:.2f}s"
        assert by_holder[second].wait(10) == 0
        third = third_run.holder
        wait_until(lambda: sum(r.holder == third for r in runs(engine, runs_table)) >= 3, 10, "the third leader's runs")
    finally:
        for p in procs:
            p.stop(grace=5)

    history = runs(engine, runs_table)
    assert [h for h in dict.fromkeys(r.holder for r in history)] == [first, second, third], "one leader at a time"
    # Never twice at once: every run starts after the one before it ended (the run the kill -9
    # interrupted never ended; it stopped at the kill).
    for before, after in itertools.pairwise(history):
        end = before.ended_at or killed_at
        assert before.ended_at is not None or before.holder == first
        assert after.started_at >= end, f"{after} started while {before} was running"
    # The work kept going: the gaps between runs stay within the takeover time.
    gaps = [(b.started_at - a.started_at).total_seconds() for a, b in itertools.pairwise(history)]
    assert max(gaps) <= LEASE + SLACK


# ---- a real service ----------------------------------------------------------------------------


def log_lines(path: Path) -> list[dict[str, object]]:
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            found = json.loads(line)
        except ValueError:
            continue
        if isinstance(found, dict):
            out.append(found)
    return out


def said(path: Path, msg: str) -> list[dict[str, object]]:
    return [line for line in log_lines(path) if line.get("msg") == msg]


def test_ingest_runs_its_partition_upkeep_only_on_the_leader(tmp_path: Path) -> None:
    with harness.scratch(
        "leader",
        [TENANCY, INGEST_MIGRATIONS],
        database_url=harness.configured("TESSERA_TEST_DATABASE_URL"),
        redis_url=harness.configured("TESSERA_TEST_REDIS_URL"),
    ) as found:
        ports = [free_port(), free_port()]
        procs = [
            ServiceProcess.service(
                "ingest",
                found.env(
                    TESSERA_INGEST_PORT=str(port),
                    TESSERA_LEADER_LEASE_SECONDS=str(LEASE),
                    TESSERA_LEADER_RENEW_SECONDS=str(RENEW),
                ),
                tmp_path / f"ingest-{n}.log",
            )
            for n, port in enumerate(ports)
        ]
        try:
            for p, port in zip(procs, ports, strict=True):
                p.start()
                wait_serving(f"127.0.0.1:{port}", p)
            leader = wait_until(
                lambda: next((p for p in procs if said(p.log_path, "partition upkeep done")), None),
                30,
                "partition upkeep on one of them",
            )
            (follower,) = [p for p in procs if p is not leader]
            assert said(leader.log_path, "leader acquired"), leader.log_tail()
            # The follower campaigned (its attempts every second answered "held by another") and
            # ran no upkeep, while the leader's first run is already done.
            assert not said(follower.log_path, "leader acquired")
            assert not said(follower.log_path, "partition upkeep done")

            killed = time.monotonic()
            leader.kill()
            wait_until(lambda: said(follower.log_path, "partition upkeep done"), LEASE + SLACK + 5, "the takeover")
            took = time.monotonic() - killed
            print(f"ingest upkeep on the new leader {took:.2f}s after kill -9")
            assert took <= LEASE + SLACK
            (acquired,) = said(follower.log_path, "leader acquired")
            assert acquired["identity"] == f"{socket.gethostname()}-{follower.pid}"
            assert acquired["backend"] == "postgres"
        finally:
            for p in procs:
                p.stop(grace=5)
        with psycopg2.connect(libpq_url(found.database_url)) as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_inherits WHERE inhparent = 'ingest.events'::regclass")
            assert cur.fetchone()[0] >= 3, "the partitions ahead exist"
        conn.close()
