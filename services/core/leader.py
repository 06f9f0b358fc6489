"""Leader election for the work that must run once per cluster (partitions, retention, FCR window
upkeep, pending erasures): one :class:`Leadership` per service process campaigns for its service's
lock, and singleton workers ask :meth:`Leadership.is_leader` before each run.

Two backends, one state machine (:class:`Term`):

- **Kubernetes Lease** (``KUBERNETES_SERVICE_HOST`` set, unless ``TESSERA_LEADER_BACKEND`` says
  otherwise): a ``coordination.k8s.io/v1`` Lease named
  ``tessera-<service>`` in the pod's namespace, written by the ``kubernetes`` client's own
  election step (``LeaderElection.try_acquire_or_renew`` over its ``LeaseLock``). Tessera drives
  that step from its own loop instead of calling ``LeaderElection.run()``, because ``run()``
  cannot be stopped (its follower and renew loops sleep with ``time.sleep`` and never look at a
  flag), returns for good once leadership is lost instead of campaigning again, never releases
  the Lease on shutdown (a successor waits a whole lease), lets any error other than
  ``ApiException`` (a refused connection) end the thread, and never counts ``leaseTransitions``.
  :class:`LeaseCampaign` adds what client-go does there: the transitions count, a release on
  shutdown (holder cleared, duration 1 s), and request timeouts. No API server can run on CI
  machines, so ``tests/unit/test_leader_lease.py`` runs this path against a loopback HTTP server
  that answers with the API's recorded Lease and Status shapes (``tests/fixtures/k8s/``).
- **PostgreSQL advisory lock** (otherwise): a dedicated connection holds a session-level
  ``pg_try_advisory_lock``. A killed leader's socket is closed by its kernel, so PostgreSQL ends
  the session and frees the lock at once; followers try again every renew interval. For a leader
  cut off by the network, the session has ``idle_session_timeout`` = the lease (and keepalives),
  so the server frees the lock at most a lease after the leader's last renew, while the leader
  stops calling itself leader ``lease - renew`` after its last confirmed renew: the two never
  overlap unless a clock jumps.

A leader that cannot confirm its lock within ``lease - renew`` seconds steps down (the same rule
as client-go's renew deadline). Work that has already started is not interrupted, so two leaders
may briefly overlap after a pause or a partition: every singleton job is idempotent and takes its
own transaction lock, so an overlap costs a repeated run, never a wrong result.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import hashlib
import logging
import math
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import psycopg2
from opentelemetry.metrics import CallbackOptions, Observation

from services.core.db import sa_url
from services.core.settings import Settings
from services.core.telemetry import meter

log = logging.getLogger(__name__)

NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class Outcome(enum.Enum):
    """What one attempt learned about the lock."""

    HELD = "held"  # confirmed ours, now
    NOT_HELD = "not held"  # someone else has it, or ours is certainly gone
    UNKNOWN = "unknown"  # could not tell (the API or the database did not answer)


class Campaign(Protocol):
    """One backend's way to take and keep a lock; called from the Leadership's thread only."""

    backend: str

    def attempt(self) -> Outcome:
        """Acquire the lock, or renew it when held."""
        ...

    def step_down(self) -> None:
        """Forget a lock that could not be confirmed in time (it may already be someone else's)."""
        ...

    def release(self) -> None:
        """Give the lock up on shutdown, so a successor need not wait for it to expire."""
        ...


class Leader(Protocol):
    """What singleton work asks before it runs."""

    def is_leader(self) -> bool: ...

    def wait_leading(self, timeout: float) -> bool: ...


@dataclass(frozen=True)
class Term:
    """The leadership state: whether this process leads, and when (monotonic seconds) an attempt
    that confirmed the lock started. Pure, so the transitions are tested without I/O."""

    leading: bool = False
    confirmed_at: float = -math.inf

    def after(self, outcome: Outcome, started: float, deadline: float) -> Term:
        """The state after an attempt that started at ``started``. An unknown outcome keeps a
        leader leading until ``deadline`` seconds have passed since its last confirmation."""
        if outcome is Outcome.HELD:
            return Term(True, started)
        if outcome is Outcome.UNKNOWN and self.holds(started, deadline):
            return self
        return Term()

    def holds(self, now: float, deadline: float) -> bool:
        return self.leading and now - self.confirmed_at < deadline


def identity(environ: Mapping[str, str] | None = None) -> str:
    """This candidate's name: the pod's (``POD_NAME``, from the downward API), else host-pid."""
    env = os.environ if environ is None else environ
    return env.get("POD_NAME", "").strip() or f"{socket.gethostname()}-{os.getpid()}"


def lock_name(service: str) -> str:
    return f"tessera-{service}-leader"


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory lock key for ``name`` (the same in every process and version)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


_LEADERSHIPS: weakref.WeakSet[Leadership] = weakref.WeakSet()


class Leadership:
    """A background campaign for one service's lock (the ``Background`` protocol: start, stop).

    One attempt every ``renew_seconds``; leadership is lost at once when the lock is known gone,
    or when ``lease_seconds - renew_seconds`` pass with no confirmation. Transitions are logged
    (``leader acquired`` / ``leader lost`` / ``leader released``, with the identity) and exported as
    the gauge ``tessera.leader.status`` (1 while leading)."""

    def __init__(
        self,
        service: str,
        campaign: Campaign,
        *,
        lease_seconds: float,
        renew_seconds: float,
        identity: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < renew_seconds < lease_seconds:
            raise ValueError(f"renew interval ({renew_seconds}s) must be shorter than the lease ({lease_seconds}s)")
        self.service = service
        self.campaign = campaign
        self.identity = identity
        self.lease_seconds = lease_seconds
        self.renew_seconds = renew_seconds
        self.deadline = lease_seconds - renew_seconds
        self._clock = clock
        self._term = Term()
        self._failing = False
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"leader {service}", daemon=True)
        _LEADERSHIPS.add(self)

    # -- what the singleton workers ask

    def is_leader(self) -> bool:
        """Whether this process leads now (false as soon as the lock could not be confirmed in
        time, even while an attempt is still hanging)."""
        return self._term.holds(self._clock(), self.deadline)

    def wait_leading(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for leadership; whether this process leads."""
        with self._changed:
            return self._changed.wait_for(self.is_leader, timeout)

    # -- Background

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Stop campaigning and release the lock (after the workers it gates have stopped)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            while True:
                self.tick()
                if self._stop.wait(self.renew_seconds):
                    return
        finally:
            leading = self._term.leading
            self._set(Term())
            try:
                self.campaign.release()
            except Exception:
                log.warning("could not release the leader lock; it expires on its own", exc_info=True)
            if leading:
                log.info("leader released", extra=self._log_fields())

    def tick(self) -> None:
        """One attempt and its transition (the thread's body; tests call it directly)."""
        started = self._clock()
        try:
            outcome = self.campaign.attempt()
            self._failing = False
        except Exception:
            # The first failure of a streak is a warning with its traceback; the rest, while the
            # API stays unreachable, are not repeated every renew interval.
            level = logging.DEBUG if self._failing else logging.WARNING
            log.log(level, "leader election attempt failed", exc_info=True, extra=self._log_fields())
            self._failing = True
            outcome = Outcome.UNKNOWN
        before = self._term
        after = before.after(outcome, started, self.deadline)
        self._set(after)
        if after.leading and not before.leading:
            log.info("leader acquired", extra=self._log_fields())
        elif before.leading and not after.leading:
            reason = "lock lost" if outcome is Outcome.NOT_HELD else "lock not confirmed within the lease"
            log.warning("leader lost", extra={**self._log_fields(), "reason": reason})
            self.campaign.step_down()

    def _set(self, term: Term) -> None:
        with self._changed:
            self._term = term
            self._changed.notify_all()

    def _log_fields(self) -> dict[str, Any]:
        return {"leader_service": self.service, "identity": self.identity, "backend": self.campaign.backend}


def _observe(_options: CallbackOptions) -> Iterable[Observation]:
    by_service: dict[str, int] = {}
    for leadership in list(_LEADERSHIPS):
        by_service[leadership.service] = max(by_service.get(leadership.service, 0), int(leadership.is_leader()))
    return [Observation(value, {"service": service}) for service, value in sorted(by_service.items())]


meter.create_observable_gauge(
    "tessera.leader.status",
    callbacks=[_observe],
    unit="1",
    description="1 while this process leads its service's singleton work (partitions, retention, upkeep), else 0",
)


# ---- PostgreSQL advisory lock ------------------------------------------------------------------


def libpq_url(database_url: str) -> str:
    """The URL as libpq (psycopg2.connect) reads it: without SQLAlchemy's ``+psycopg2``."""
    return sa_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


_HOLDS_LOCK = (
    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted "
    "AND classid = ((%(k)s >> 32) & 4294967295)::bigint::oid AND objid = (%(k)s & 4294967295)::bigint::oid "
    "AND objsubid = 1"
)


class AdvisoryLockCampaign:
    """A session-level advisory lock on a connection of its own (not from a pool: the lock lives
    exactly as long as this session). Every renew checks in ``pg_locks`` that the session still
    holds it; any error means the session, and so the lock, is gone."""

    backend = "postgres"

    def __init__(
        self, database_url: str, name: str, *, lease_seconds: float, renew_seconds: float, application_name: str
    ) -> None:
        self.name = name
        self.key = lock_key(name)
        self.lease_seconds = lease_seconds
        self.renew_seconds = renew_seconds
        self.application_name = application_name
        self._dsn = libpq_url(database_url)
        self._conn: Any = None
        self._holding = False

    def _connect(self) -> Any:
        if self._conn is not None:
            return self._conn
        step_down_ms = int((self.lease_seconds - self.renew_seconds) * 1000)
        idle = max(1, math.floor(self.renew_seconds))
        count = max(1, math.ceil(self.lease_seconds - self.renew_seconds))
        conn = psycopg2.connect(
            self._dsn,
            application_name=self.application_name,
            connect_timeout=max(2, math.ceil(self.renew_seconds)),
            # Our side: a query to a vanished server fails by the time we step down anyway.
            keepalives=1,
            keepalives_idle=idle,
            keepalives_interval=1,
            keepalives_count=count,
            tcp_user_timeout=max(1000, step_down_ms),
        )
        conn.autocommit = True
        lease_ms = int(self.lease_seconds * 1000)
        statement_ms = int(max(1.0, self.renew_seconds) * 1000)
        wanted = {
            # The server's side: a session that says nothing for a lease ends, and frees the lock.
            "idle_session_timeout": lease_ms,  # PostgreSQL 14+; skipped on older servers
            "tcp_keepalives_idle": idle,
            "tcp_keepalives_interval": 1,
            "tcp_keepalives_count": count,
            "tcp_user_timeout": lease_ms,
            "statement_timeout": statement_ms,
            "lock_timeout": statement_ms,
        }
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT set_config(s.name, s.value, false) FROM unnest(%s::text[], %s::text[]) AS s(name, value) "
                    "WHERE s.name IN (SELECT name FROM pg_settings)",
                    (list(wanted), [str(v) for v in wanted.values()]),
                )
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def attempt(self) -> Outcome:
        try:
            conn = self._connect()
            with conn.cursor() as cur:
                if self._holding:
                    cur.execute(_HOLDS_LOCK, {"k": self.key})
                    self._holding = bool(cur.fetchone()[0])
                else:
                    cur.execute("SELECT pg_try_advisory_lock(%s)", (self.key,))
                    self._holding = bool(cur.fetchone()[0])
        except psycopg2.Error as exc:
            if self._holding:
                log.warning("leader lock session failed", extra={"lock": self.name, "error": str(exc).strip()})
            self._drop()
            return Outcome.NOT_HELD
        return Outcome.HELD if self._holding else Outcome.NOT_HELD

    def step_down(self) -> None:
        self._drop()

    def release(self) -> None:
        if self._conn is not None and self._holding:
            # Closing the session below frees it all the same, if this fails.
            with contextlib.suppress(psycopg2.Error), self._conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_unlock(%s)", (self.key,))
        self._drop()

    def _drop(self) -> None:
        self._holding = False
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg2.Error):
                conn.close()


# ---- Kubernetes Lease --------------------------------------------------------------------------


def pod_namespace(environ: Mapping[str, str] | None = None, namespace_file: Path = NAMESPACE_FILE) -> str:
    """``POD_NAMESPACE`` (downward API), else the service account's namespace file, else ``default``."""
    env = os.environ if environ is None else environ
    found = env.get("POD_NAMESPACE", "").strip()
    if found:
        return found
    try:
        return namespace_file.read_text().strip() or "default"
    except OSError:
        return "default"


@dataclass
class _ElectionConfig:
    """What ``LeaderElection.try_acquire_or_renew`` reads of its config. The client's own
    ``electionconfig.Config`` is not used: it exits the process (``sys.exit``) for intervals under
    one second and wants callbacks Tessera's loop replaces."""

    lock: Any
    lease_duration: int


class LeaseCampaign:
    """A ``coordination.k8s.io/v1`` Lease, through the kubernetes client's election step."""

    backend = "kubernetes"

    def __init__(
        self, api_client: Any, *, namespace: str, name: str, identity: str, lease_seconds: float, timeout: float
    ) -> None:
        from kubernetes.leaderelection.leaderelection import LeaderElection

        # The client logs every attempt at INFO ("yet to finish lease_duration..."); Tessera logs
        # the transitions itself.
        logging.getLogger("leaderelection").setLevel(logging.WARNING)
        self.identity = identity
        self.lock = _lease_lock(name, namespace, identity, _timed_coordination(api_client, timeout))
        self.election = LeaderElection(_ElectionConfig(self.lock, max(1, math.ceil(lease_seconds))))  # type: ignore[no-untyped-call]

    @classmethod
    def in_cluster(cls, service: str, settings: Settings, identity: str) -> LeaseCampaign:
        """The pod's service account, from inside the cluster."""
        from kubernetes import client, config

        configuration = client.Configuration()
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        return cls(
            client.ApiClient(configuration),
            namespace=pod_namespace(),
            name=f"tessera-{service}",
            identity=identity,
            lease_seconds=settings.leader_lease_seconds,
            timeout=max(1.0, settings.leader_renew_seconds),
        )

    def attempt(self) -> Outcome:
        if self.election.try_acquire_or_renew():  # type: ignore[no-untyped-call]
            return Outcome.HELD
        observed = self.election.observed_record
        holder = getattr(observed, "holder_identity", None)
        if holder and holder != self.identity:
            return Outcome.NOT_HELD
        return Outcome.UNKNOWN  # the API did not answer, or a write conflicted: try again

    def step_down(self) -> None:
        """Nothing to undo: a Lease not renewed expires for the others on its own."""

    def release(self) -> None:
        """As client-go's ReleaseOnCancel: if we still hold the Lease, clear its holder and shorten
        it to one second, so a follower takes it on its next attempt."""
        from kubernetes.leaderelection.leaderelectionrecord import LeaderElectionRecord

        found, record = self.lock.get(self.lock.name, self.lock.namespace)
        if not found or getattr(record, "holder_identity", None) != self.identity:
            return
        now = str(dt.datetime.now())
        self.lock.update(self.lock.name, self.lock.namespace, LeaderElectionRecord("", "1", now, now))  # type: ignore[no-untyped-call]


class _TimedCoordination:
    """The three CoordinationV1Api calls LeaseLock makes, each with a timeout (LeaseLock passes
    none, so a silent API server would hang the campaign)."""

    def __init__(self, api: Any, timeout: float) -> None:
        self._api = api
        self._timeout = timeout

    def read_namespaced_lease(self, name: str, namespace: str, **kw: Any) -> Any:
        return self._api.read_namespaced_lease(name, namespace, **{"_request_timeout": self._timeout, **kw})

    def create_namespaced_lease(self, namespace: str, body: Any, **kw: Any) -> Any:
        return self._api.create_namespaced_lease(namespace, body, **{"_request_timeout": self._timeout, **kw})

    def replace_namespaced_lease(self, name: str, namespace: str, body: Any, **kw: Any) -> Any:
        return self._api.replace_namespaced_lease(name, namespace, body, **{"_request_timeout": self._timeout, **kw})


def _timed_coordination(api_client: Any, timeout: float) -> _TimedCoordination:
    from kubernetes import client

    return _TimedCoordination(client.CoordinationV1Api(api_client), timeout)


def _lease_lock(name: str, namespace: str, identity: str, api: Any) -> Any:
    """The client's LeaseLock on ``api``, counting ``leaseTransitions`` as client-go does: 0 when
    created, one more whenever a candidate takes it, unchanged by a renew or a release."""
    from kubernetes.leaderelection.resourcelock.leaselock import LeaseLock

    class CountingLeaseLock(LeaseLock):  # type: ignore[misc]
        def get_lease_spec(self, record: Any, current_spec: Any = None) -> Any:
            before = getattr(current_spec, "holder_identity", None)
            transitions = getattr(current_spec, "lease_transitions", None) or 0
            spec = super().get_lease_spec(record, current_spec)  # type: ignore[no-untyped-call]
            if current_spec is None:
                spec.lease_transitions = 0  # created
            elif record.holder_identity and record.holder_identity != before:
                spec.lease_transitions = transitions + 1  # taken (from a holder, or after a release)
            else:
                spec.lease_transitions = transitions  # renewed, or released
            # MicroTime needs its six digits, and the client writes datetimes with isoformat(),
            # which leaves them out when they are all zero.
            for attr in ("acquire_time", "renew_time"):
                value = getattr(spec, attr, None)
                if isinstance(value, dt.datetime) and value.microsecond == 0:
                    setattr(spec, attr, value.replace(microsecond=1))
            return spec

    lock = CountingLeaseLock(name, namespace, identity)  # type: ignore[no-untyped-call]
    lock.api_instance = api
    return lock


# ---- one way to build it -----------------------------------------------------------------------


def build_leadership(settings: Settings, service: str, environ: Mapping[str, str] | None = None) -> Leadership:
    """The service's Leadership (not started): ``TESSERA_LEADER_BACKEND``, where ``auto`` is a Lease
    inside Kubernetes (``KUBERNETES_SERVICE_HOST`` set) and an advisory lock elsewhere."""
    env = os.environ if environ is None else environ
    me = identity(env)
    backend = settings.leader_backend
    if backend == "auto":
        backend = "kubernetes" if env.get("KUBERNETES_SERVICE_HOST") else "postgres"
    campaign: Campaign
    if backend == "kubernetes":
        campaign = LeaseCampaign.in_cluster(service, settings, me)
    else:
        campaign = AdvisoryLockCampaign(
            settings.require_database_url(),
            lock_name(service),
            lease_seconds=settings.leader_lease_seconds,
            renew_seconds=settings.leader_renew_seconds,
            application_name=f"tessera-{service}-leader",
        )
    return Leadership(
        service,
        campaign,
        lease_seconds=settings.leader_lease_seconds,
        renew_seconds=settings.leader_renew_seconds,
        identity=me,
    )
