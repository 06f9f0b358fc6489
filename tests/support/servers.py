"""Real PostgreSQL and Redis for tests: the machine's when TESSERA_TEST_*_URL are set,
embedded ones otherwise. Each run gets its own database and Redis key prefix."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.core import db
from services.core.embedded import EmbeddedPostgres, EmbeddedRedis

ROOT = Path(__file__).resolve().parents[2]


def run_token() -> str:
    return f"{os.getpid()}_{secrets.token_hex(3)}"


@contextmanager
def postgres_admin_url() -> Iterator[str]:
    url = os.environ.get("TESSERA_TEST_DATABASE_URL")
    if url:
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="tessera-pg-") as tmp:
        pg = EmbeddedPostgres(Path(tmp))
        pg.start()
        try:
            yield db.with_database(pg.url, "postgres")
        finally:
            pg.stop()


@contextmanager
def redis_url() -> Iterator[str]:
    url = os.environ.get("TESSERA_TEST_REDIS_URL")
    if url:
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="tr-", dir="/tmp") as tmp:
        server = EmbeddedRedis(Path(tmp))
        server.start()
        try:
            yield server.url
        finally:
            server.stop()


def delete_prefix(client: redis.Redis, prefix: str) -> None:
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        client.delete(key)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_health(
    target: str, want: int = health_pb2.HealthCheckResponse.SERVING, timeout: float = 20.0, service: str = ""
) -> bool:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1).status == want:
                    return True
            except grpc.RpcError:
                pass
            time.sleep(0.05)
    return False


def spawn_service(service: str, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """A service as its own process, the way production runs it."""
    full_env = {**os.environ, **env}
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "services.cli", "serve", service],
            env=full_env,
            stdout=log,
            stderr=log,
            cwd=ROOT,
        )
