"""``tessera up``: everything on one machine, in one command.

With no ``TESSERA_DATABASE_URL``/``TESSERA_REDIS_URL`` it starts private PostgreSQL and Redis
under ``TESSERA_DATA_DIR``, migrates, runs each service as its own process (restarting
one that dies), creates a demo tenant and loads the demo dataset through the public
ingest API. Ctrl-C stops everything; the next run finds the data again.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.core import db, tenancy
from services.core.embedded import EmbeddedPostgres, EmbeddedRedis
from services.core.errors import AlreadyExists
from services.core.migrate import migrate
from services.core.runtime import clear_runtime, write_runtime
from services.core.settings import SERVICES, Settings

log = logging.getLogger(__name__)

DEMO_TENANT = "demo"


def available_services() -> list[str]:
    """Services that exist in this build; later ones are skipped until they are written."""
    return [
        s
        for s in SERVICES
        if importlib.util.find_spec(f"services.{s}") is not None
        and importlib.util.find_spec(f"services.{s}.app") is not None
    ]


def wait_serving(target: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    return False


@dataclass
class Child:
    service: str
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    log_path: Path | None = None
    _log: Any = None

    def start(self) -> None:
        if self.log_path is not None:
            self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.core.cli", "serve", self.service],
            env=self.env,
            stdout=self._log or None,
            stderr=self._log or None,
            start_new_session=True,
        )

    def stop(self, grace: float) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace + 5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log:
            self._log.close()


@dataclass
class Stack:
    settings: Settings
    out: TextIO = sys.stdout
    demo: bool = True
    demo_customers: int = 2000
    children: list[Child] = field(default_factory=list)
    pg: EmbeddedPostgres | None = None
    redis: EmbeddedRedis | None = None
    database_url: str = ""
    redis_url: str = ""
    api_key: str = ""
    _lock_fd: int | None = None
    stop_event: threading.Event = field(default_factory=threading.Event)

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def start(self) -> None:
        data_dir = self.settings.data_dir.expanduser().resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(data_dir / "up.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"another `tessera up` is already running on {data_dir}") from None

        if self.settings.database_url:
            self.database_url = self.settings.database_url
        else:
            self.say(f"starting embedded PostgreSQL in {data_dir / 'postgres'} ...")
            self.pg = EmbeddedPostgres(data_dir)
            self.database_url = self.pg.start()
        if self.settings.redis_url:
            self.redis_url = self.settings.redis_url
        else:
            self.say(f"starting embedded Redis in {data_dir / 'redis'} ...")
            self.redis = EmbeddedRedis(data_dir)
            self.redis_url = self.redis.start()
        write_runtime(self.settings, self.database_url, self.redis_url)

        engine = db.make_engine(self.database_url, application_name="up", pool_size=2, instrument=False)
        try:
            migrated = migrate(engine)
            self.say(f"migrated schemas: {', '.join(migrated)}")
            new_tenant = self._demo_tenant(engine, data_dir)
            if new_tenant and "identity" in available_services():
                from services.identity.storage import IdentityStore
                from services.ingest.demo_data import IDENTITY_RULES

                IdentityStore(engine).save_rules(DEMO_TENANT, IDENTITY_RULES, {})
        finally:
            engine.dispose()

        env = dict(os.environ)
        env.update({"TESSERA_DATABASE_URL": self.database_url, "TESSERA_REDIS_URL": self.redis_url})
        env.setdefault("TESSERA_BIND_HOST", "127.0.0.1")
        logs = data_dir / "logs"
        logs.mkdir(exist_ok=True)
        for service in available_services():
            child = Child(service, env, log_path=logs / f"{service}.log")
            child.start()
            self.children.append(child)
        for child in self.children:
            target = f"127.0.0.1:{self.settings.port_for(child.service)}"
            if not wait_serving(target, timeout=60):
                raise SystemExit(f"{child.service} did not become ready on {target}; see {logs / child.service}.log")
        if self.demo and new_tenant:
            self._load_demo()
        self._banner(data_dir)

    def _demo_tenant(self, engine: Any, data_dir: Path) -> bool:
        """The demo tenant's key is shown once like any key; the data dir keeps a copy (0600)
        so every later ``tessera up`` can print it again."""
        key_file = data_dir / "demo-api-key"
        try:
            self.api_key = tenancy.create_tenant(engine, DEMO_TENANT, "Demo tenant")
            created = True
        except AlreadyExists:
            created = False
            if key_file.exists():
                self.api_key = key_file.read_text().strip()
            else:
                self.api_key = tenancy.create_api_key(engine, DEMO_TENANT, "tessera up")
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fp:
            fp.write(self.api_key + "\n")
        return created

    def _load_demo(self) -> None:
        from services.ingest.client import StreamIngester, batches_of, open_channel
        from services.ingest.demo_data import generate

        if "ingest" not in [c.service for c in self.children]:
            return
        self.say("loading the demo dataset through the ingest API ...")
        started = time.monotonic()
        with open_channel(f"127.0.0.1:{self.settings.ingest_port}") as channel:
            ingester = StreamIngester(channel, self.api_key)
            batches = ((None, b) for b in batches_of(generate(customers=self.demo_customers), size=200))
            tally = ingester.send(batches)
        self.say(
            f"demo data: {tally.accepted} accepted, {tally.duplicate} duplicate, {tally.rejected} rejected "
            f"in {time.monotonic() - started:.1f}s"
        )

    def _banner(self, data_dir: Path) -> None:
        port = self.settings.ingest_port
        self.say()
        self.say("Tessera is up.")
        for child in self.children:
            self.say(f"  {child.service:<9} 127.0.0.1:{self.settings.port_for(child.service)}")
        mode = "embedded" if self.pg else "external"
        self.say(f"  data      {data_dir} ({mode} PostgreSQL, {'embedded' if self.redis else 'external'} Redis)")
        self.say(f"  logs      {data_dir / 'logs'}")
        self.say()
        self.say(f"Demo tenant API key (also in {data_dir / 'demo-api-key'}):")
        self.say(f"  {self.api_key}")
        self.say()
        self.say("Try:")
        self.say(f"  grpcurl -plaintext 127.0.0.1:{port} list")
        self.say(f"  export TESSERA_API_KEY=$(cat {data_dir / 'demo-api-key'})")
        self.say(
            f'  grpcurl -plaintext -H "authorization: Bearer $TESSERA_API_KEY" -d '
            '\'{"events":[{"message_id":"hello-1","channel":"CHANNEL_WEB",'
            '"identifiers":[{"type":"email","value":"ada@example.com"}],'
            f'"track":{{"event":"Signed Up"}}}}]}}\' 127.0.0.1:{port} tessera.v1.IngestService/IngestEvents'
        )
        self.say("  tessera demo export demo.jsonl --customers 50 && tessera import demo.jsonl")
        if any(c.service == "identity" for c in self.children):
            iport = self.settings.port_for("identity")
            self.say(
                f'  grpcurl -plaintext -H "authorization: Bearer $TESSERA_API_KEY" -d '
                '\'{"identifiers":[{"type":"loyalty_id","value":"LY4401287305"}]}\' '
                f"127.0.0.1:{iport} tessera.v1.IdentityService/ResolveIdentifiers"
            )
        self.say()
        self.say("Ctrl-C stops everything; the data stays for the next `tessera up`.")

    def supervise(self) -> None:
        """Restart a service that died, with backoff, until asked to stop."""
        while not self.stop_event.wait(0.5):
            for child in self.children:
                if child.proc is not None and child.proc.poll() is not None:
                    code = child.proc.returncode
                    child.restarts += 1
                    delay = min(2 ** min(child.restarts, 5) * 0.25, 10)
                    self.say(f"{child.service} exited with {code}; restarting in {delay:.1f}s")
                    if self.stop_event.wait(delay):
                        return
                    child.start()

    def stop(self) -> None:
        self.say("stopping ...")
        grace = self.settings.shutdown_grace_seconds
        threads = [threading.Thread(target=c.stop, args=(grace,)) for c in self.children]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if self.redis:
            self.redis.stop()
        if self.pg:
            self.pg.stop()
        clear_runtime(self.settings)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
        self.say("stopped.")


def up(settings: Settings, *, demo: bool = True, demo_customers: int = 2000) -> int:
    stack = Stack(settings, demo=demo, demo_customers=demo_customers)

    def on_signal(_signum: int, _frame: Any) -> None:
        stack.stop_event.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        stack.start()
        stack.supervise()
    finally:
        stack.stop()
    return 0
