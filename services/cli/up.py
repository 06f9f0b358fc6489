"""``tessera up``: everything on one machine, in one command.

With no ``TESSERA_DATABASE_URL``/``TESSERA_REDIS_URL`` it starts private PostgreSQL and Redis
under ``TESSERA_DATA_DIR`` (through the shared harness), migrates, runs each service as its own
process (restarting one that dies), creates a demo tenant, configures it through the public
APIs and loads the demo dataset through the ingest API. Ctrl-C stops everything; the next run
finds the data again.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from services.cli import registry
from services.cli.runtime import clear_runtime, write_runtime
from services.core import db, harness, tenancy
from services.core.errors import AlreadyExists
from services.core.settings import Settings

log = logging.getLogger(__name__)

DEMO_TENANT = "demo"
DATABASE = "tessera"
#: Services that answer HTTP (probed on /readyz), not gRPC health.
HTTP_SERVICES = registry.HTTP_SERVICES


def _wait_http(url: str, *, timeout: float, process: harness.ServiceProcess) -> bool:
    """True once ``url`` answers 200; False if the process exits or time runs out."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.alive():
            return False
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:  # noqa: S310 - our own http URL
                if reply.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    return False


@dataclass
class Stack:
    settings: Settings
    out: TextIO = sys.stdout
    demo: bool = True
    demo_customers: int = 2000
    children: list[harness.ServiceProcess] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)
    database_url: str = ""
    redis_url: str = ""
    api_key: str = ""
    embedded: list[str] = field(default_factory=list)
    stop_event: threading.Event = field(default_factory=threading.Event)
    _servers: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    _lock_fd: int | None = None

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
            admin = self._servers.enter_context(harness.postgres(None, data_dir))
            db.ensure_database(admin, DATABASE)
            self.database_url = db.with_database(admin, DATABASE)
            self.embedded.append("PostgreSQL")
        if self.settings.redis_url:
            self.redis_url = self.settings.redis_url
        else:
            self.say(f"starting embedded Redis in {data_dir / 'redis'} ...")
            self.redis_url = self._servers.enter_context(harness.redis_server(None, data_dir))
            self.embedded.append("Redis")

        services = registry.available()
        self.ports = {s: registry.port(s) for s in services}
        write_runtime(self.settings, self.database_url, self.redis_url, self.ports)
        engine = db.make_engine(self.database_url, application_name="up", pool_size=2, instrument=False)
        try:
            migrated = registry.migrate_all(engine)
            self.say(f"migrated schemas: {', '.join(migrated)}")
            new_tenant = self._demo_tenant(engine, data_dir)
        finally:
            engine.dispose()

        env = {
            "TESSERA_DATABASE_URL": self.database_url,
            "TESSERA_REDIS_URL": self.redis_url,
            "TESSERA_SERVICE_TOKEN": self._service_token(data_dir),
            **self._addresses(),
        }
        env.setdefault("TESSERA_BIND_HOST", os.environ.get("TESSERA_BIND_HOST", "127.0.0.1"))
        logs = data_dir / "logs"
        for n, service in enumerate(services):
            own = dict(env)
            if (
                self.settings.prometheus_port and service not in HTTP_SERVICES
            ):  # one scrape port each: the first service's, then the next ones
                own["TESSERA_PROMETHEUS_PORT"] = str(self.settings.prometheus_port + n)
            self.children.append(harness.ServiceProcess.service(service, own, logs / f"{service}.log").start())
        for child in self.children:
            target = self._target(child.name)
            if child.name in HTTP_SERVICES:
                if not _wait_http(f"http://{target}/readyz", timeout=60, process=child):
                    raise SystemExit(f"{child.name} did not become ready on {target}; see {child.log_path}")
                continue
            if not harness.wait_health(target, timeout=60, process=child):
                raise SystemExit(f"{child.name} did not become ready on {target}; see {child.log_path}")
        if new_tenant:
            self._configure_demo_tenant()
            if self.demo:
                self._load_demo()
        self._banner(data_dir)

    def _target(self, service: str) -> str:
        return f"127.0.0.1:{self.ports[service]}"

    def _shown(self, service: str) -> str:
        """How the banner names a service's address (the HTTP one as a URL)."""
        target = self._target(service)
        return f"http://{target}" if service in HTTP_SERVICES else target

    def _addresses(self) -> dict[str, str]:
        """Where profile (and the gateway) find the others (their ports here; empty for a service not in this build)."""
        return {
            f"TESSERA_PROFILE_{s.upper()}_ADDRESS": self._target(s) if s in self.ports else "none"
            for s in ("identity", "ingest", "metrics")
        } | {
            f"TESSERA_GATEWAY_{s.upper()}_ADDRESS": self._target(s)
            for s in ("ingest", "profile", "metrics")
            if s in self.ports
        }

    @staticmethod
    def _service_token(data_dir: Path) -> str:
        """The services' shared secret: the configured one, else one kept in the data dir (0600)."""
        configured = os.environ.get("TESSERA_SERVICE_TOKEN", "").strip()
        if configured:
            return configured
        path = data_dir / "service-token"
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fp:
                fp.write(secrets.token_urlsafe(32) + "\n")
        return path.read_text().strip()

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

    def _configure_demo_tenant(self) -> None:
        """The demo systems' identifier types, and its quality form, categories and alert rules,
        through the public APIs like any tenant's admin."""
        from services.cli.client import open_channel
        from services.cli.demo import configure_quality, configure_tenant

        if "identity" in self.ports:
            with open_channel(self._target("identity")) as channel:
                configure_tenant(channel, self.api_key)
        if "metrics" in self.ports:  # before the data, so the consumer evaluates it as it lands
            with open_channel(self._target("metrics")) as channel:
                configure_quality(channel, self.api_key)

    def _load_demo(self) -> None:
        from services.cli.client import StreamIngester, batches_of, open_channel
        from services.cli.demo import generate

        if "ingest" not in self.ports:
            return
        self.say("loading the demo dataset through the ingest API ...")
        started = time.monotonic()
        with open_channel(self._target("ingest")) as channel:
            ingester = StreamIngester(channel, self.api_key)
            batches = ((None, b) for b in batches_of(generate(customers=self.demo_customers), size=200))
            tally = ingester.send(batches)
        self.say(
            f"demo data: {tally.accepted} accepted, {tally.duplicate} duplicate, {tally.rejected} rejected "
            f"in {time.monotonic() - started:.1f}s"
        )

    def _banner(self, data_dir: Path) -> None:
        self.say()
        self.say("Tessera is up.")
        for child in self.children:
            scrape = child.env.get("TESSERA_PROMETHEUS_PORT", "0")
            metrics = f"   (Prometheus: http://127.0.0.1:{scrape}/metrics)" if scrape != "0" else ""
            self.say(f"  {child.name:<9} {self._shown(child.name)}{metrics}")
        embedded = " and ".join(self.embedded) or "nothing"
        self.say(f"  data      {data_dir} (embedded: {embedded})")
        self.say(f"  logs      {data_dir / 'logs'}")
        self.say()
        self.say(f"Demo tenant API key (also in {data_dir / 'demo-api-key'}):")
        self.say(f"  {self.api_key}")
        self.say()
        self.say("Try:")
        if "ingest" in self.ports:
            target = self._target("ingest")
            self.say(f"  grpcurl -plaintext {target} list")
            self.say(f"  export TESSERA_API_KEY=$(cat {data_dir / 'demo-api-key'})")
            self.say(
                f'  grpcurl -plaintext -H "authorization: Bearer $TESSERA_API_KEY" -d '
                '\'{"events":[{"message_id":"hello-1","channel":"CHANNEL_WEB",'
                '"identifiers":[{"type":"email","value":"ada@example.com"}],'
                f'"track":{{"event":"Signed Up"}}}}]}}\' {target} tessera.v1.IngestService/IngestEvents'
            )
            self.say("  tessera demo export demo.jsonl --customers 50 && tessera import demo.jsonl")
        if "identity" in self.ports:
            self.say(
                f'  grpcurl -plaintext -H "authorization: Bearer $TESSERA_API_KEY" -d '
                '\'{"identifiers":[{"type":"loyalty_id","value":"LY4401287305"}]}\' '
                f"{self._target('identity')} tessera.v1.IdentityService/ResolveIdentifiers"
            )
        if "profile" in self.ports:
            self.say("  # Who is calling? The demo customer's context, from the number on the caller id:")
            self.say(
                f'  grpcurl -plaintext -H "authorization: Bearer $TESSERA_API_KEY" -d '
                '\'{"identifier":{"type":"phone","value":"(415) 555-0142"}}\' '
                f"{self._target('profile')} tessera.v1.ProfileService/GetCustomerContext"
            )
        if "metrics" in self.ports:
            self.say("  # The last 30 days of CX figures by channel:")
            self.say(
                "  tessera metrics query --metric nps,csat,fcr,aht_seconds --granularity all --group-by channel "
                f"--target {self._target('metrics')}"
            )
            self.say("  # Every demo chat evaluated, by agent, and the alerts the demo's rules fired:")
            self.say(
                "  tessera metrics query --metric quality_score,quality_auto_fail_rate --granularity all "
                f"--group-by agent --target {self._target('metrics')}"
            )
            self.say(
                f'  grpcurl -plaintext -H "authorization: Bearer $TESSERA_API_KEY" -d \'{{"page_size": 5}}\' '
                f"{self._target('metrics')} tessera.v1.QualityService/ListAlerts"
            )
        self.say()
        self.say("Ctrl-C stops everything; the data stays for the next `tessera up`.")

    def supervise(self) -> None:
        """Restart a service that died, with backoff, until asked to stop."""
        restarts: dict[str, int] = {}
        while not self.stop_event.wait(0.5):
            for child in self.children:
                if child.proc is not None and not child.alive():
                    restarts[child.name] = restarts.get(child.name, 0) + 1
                    delay = min(2 ** min(restarts[child.name], 5) * 0.25, 10)
                    self.say(f"{child.name} exited with {child.returncode}; restarting in {delay:.1f}s")
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
        self._servers.close()
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
