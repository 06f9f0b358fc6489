"""``tessera bench ingest``: durable events/s through one ingest process, against the same durable
work done by a bare PostgreSQL writer on the same machine, in the same run.

1. PostgreSQL and Redis: the servers named by ``TESSERA_DATABASE_URL``/``TESSERA_REDIS_URL`` (or
   ``TESSERA_TEST_*``), else embedded ones; a fresh migrated database and Redis prefix either way,
   dropped at the end.
2. Transport only (information): ``bench.transport_server`` (bare gRPC, parse, empty answer).
3. **Bare PostgreSQL** (the baseline): the same 100-event batches written by a minimal psycopg2
   writer (``bench.pg_writer``): same tables, same dedupe key and window probe, the server's
   ``synchronous_commit``, the same number of clients; no gRPC, no outbox, no Redis.
4. Ingest: ``tessera serve ingest`` as its own process (rate limit lifted); the same clients send
   the same kind of batches, each event with a message id never used before.
5. With ``--existing-keys N``: N dedupe keys are added for the bench tenant, spread over the six
   days before today (inside the 7-day window, so every probe consults them), and steps 3 and 4
   run again.
6. Correctness: after the outbox drains, ``ingest.events`` holds exactly the accepted events.

Durable events/s counts ACCEPTED events in answers received within the window (an answer means
committed). Server CPU is user+system time of the server process over the window (psutil).
Targets: Tessera at least 85% of the bare writer; at N existing keys at least 90% of Tessera at 0.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import shlex
import time
from dataclasses import dataclass
from typing import Any

import redis
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from bench.common import (
    Backends,
    backends,
    env_int,
    fmt,
    idle_machine_facts,
    python_argv,
    python_env,
    rounded,
    run_configured,
    spawn,
    utc_now,
)
from bench.loadgen import PhaseResult, PhaseSpec, run_phase
from bench.payloads import demo_templates
from bench.pg_writer import prefill_keys
from services.core import db, streams, tenancy
from services.core.bus import connect, tenant_key
from services.core.harness import ServiceProcess, free_port, run_token, serve_argv, wait_serving

log = logging.getLogger("bench.ingest")

BATCH_SIZE = 100
TARGET_EVENTS_PER_S = 20_000
TARGET_SHARE_OF_POSTGRES = 0.85
TARGET_WITH_KEYS = 0.90
INGEST_SERVICE = "tessera.v1.IngestService"


@dataclass(frozen=True)
class Config:
    seconds: float
    warmup: float
    clients: int
    client_procs: int
    batch_size: int
    stream_window: int
    modes: tuple[str, ...]
    grpc_workers: int
    existing_keys: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "seconds": self.seconds,
            "warmup_seconds": self.warmup,
            "clients": self.clients,
            "client_processes": self.client_procs,
            "batch_size": self.batch_size,
            "stream_window": self.stream_window,
            "modes": list(self.modes),
            "server_grpc_workers": self.grpc_workers,
            "existing_keys": self.existing_keys,
        }


def make_config(seconds: float, extra: argparse.Namespace) -> Config:
    """``--seconds`` and ``--clients`` come from the CLI; a few knobs for experiments from
    ``TESSERA_BENCH_*`` (client processes, batch size, stream window, modes)."""
    clients = max(1, int(getattr(extra, "clients", 4) or 4))
    cpus = len(os.sched_getaffinity(0))
    # Clients spread over up to one process per core. Measured on 2 cores with 4 clients: 1, 2 and
    # 4 processes give the same figures within run-to-run noise; in every case the server process
    # (~0.9 core, its GIL) is the bottleneck, not the clients. Two keep one client GIL out of the way.
    procs = env_int("TESSERA_BENCH_CLIENT_PROCS", min(clients, max(2, cpus)))
    modes = tuple(m.strip() for m in os.environ.get("TESSERA_BENCH_MODES", "unary,stream").split(",") if m.strip())
    bad = [m for m in modes if m not in ("unary", "stream")]
    if bad or not modes:
        raise ValueError(f"TESSERA_BENCH_MODES: unary and/or stream, got {bad or 'nothing'}")
    return Config(
        seconds=seconds,
        warmup=min(2.0, max(0.5, seconds / 4)),
        clients=clients,
        client_procs=max(1, min(procs, clients)),
        batch_size=env_int("TESSERA_BENCH_BATCH_SIZE", BATCH_SIZE),
        stream_window=env_int("TESSERA_BENCH_STREAM_WINDOW", 4),
        modes=modes,
        grpc_workers=env_int("TESSERA_GRPC_WORKERS", 16),
        existing_keys=_existing_keys(extra),
    )


def _existing_keys(extra: argparse.Namespace) -> int:
    n = int(getattr(extra, "existing_keys", 0) or 0)
    if n < 0:
        raise ValueError("--existing-keys must be >= 0")
    return n


def postgres_facts(engine: Engine) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with engine.connect() as conn:
        for name in ("server_version", "synchronous_commit", "fsync", "wal_level", "shared_buffers"):
            out[name] = conn.exec_driver_sql(f"SHOW {name}").scalar()
    return out


def _phase(
    cfg: Config,
    name: str,
    target: str,
    mode: str,
    ingest: bool,
    metadata: tuple[tuple[str, str], ...],
    run_tag: str,
    templates: list[bytes],
    server: ServiceProcess | None,
    tenant_id: str = "",
) -> PhaseResult:
    spec = PhaseSpec(
        name=name,
        target=target,
        mode=mode,
        counts_from_response=ingest,
        metadata=metadata,
        run_tag=run_tag,
        batch_size=cfg.batch_size,
        warmup=cfg.warmup,
        seconds=cfg.seconds,
        window=cfg.stream_window,
        tenant_id=tenant_id,
    )
    log.info(
        "phase %s: %d clients in %d processes, %.1fs warm-up + %.1fs",
        name,
        cfg.clients,
        cfg.client_procs,
        cfg.warmup,
        cfg.seconds,
    )
    pid = server.pid if server else None
    result = run_phase(spec, templates, clients=cfg.clients, procs=cfg.client_procs, server_pid=pid)
    f = result.figures()
    log.info(
        "phase %s: %s events/s, p50 %s ms, p99 %s ms, server %s CPU s/1k events, errors %d",
        name,
        f["events_per_s"],
        f["p50_ms"],
        f["p99_ms"],
        f["server_cpu_s_per_1k_events"],
        f["errors"],
    )
    if server is not None and not server.alive():
        raise RuntimeError(f"{server.name} died during {name}:\n{server.log_tail()}")
    return result


def verify(
    engine: Engine, redis_url: str, prefix: str, tenant_id: str, accepted: int, unknown: int, bare: int = 0
) -> dict[str, Any]:
    """Rows in ingest.events for the tenant == the events ingest accepted plus those the bare writer
    stored (after the outbox drains); the stream holds exactly ingest's."""
    deadline = time.monotonic() + 20
    outbox = -1
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            outbox = int(
                conn.execute(
                    sa.text("SELECT count(*) FROM ingest.outbox WHERE tenant_id = :t"), {"t": tenant_id}
                ).scalar_one()
            )
        if outbox == 0:
            break
        time.sleep(0.25)
    with engine.connect() as conn:
        rows = int(
            conn.execute(
                sa.text("SELECT count(*) FROM ingest.events WHERE tenant_id = :t"), {"t": tenant_id}
            ).scalar_one()
        )
        keys = int(
            conn.execute(
                sa.text("SELECT count(*) FROM ingest.dedupe_keys WHERE tenant_id = :t"), {"t": tenant_id}
            ).scalar_one()
        )
    client = connect(redis_url)
    try:
        stream_len = int(client.xlen(tenant_key(prefix, tenant_id, streams.EVENTS.name)))
    except redis.RedisError:
        stream_len = -1
    finally:
        client.close()
    stored = rows - bare
    ok = stored == accepted if unknown == 0 else accepted <= stored <= accepted + unknown
    ok = ok and stream_len in (-1, stored)
    return {
        "accepted_reported": accepted,
        "bare_writer_rows": bare,
        "unknown_outcome_events": unknown,
        "rows_in_ingest_events": rows,
        "dedupe_keys": keys,
        "outbox_left": outbox,
        "redis_stream_length": stream_len,
        "ok": ok,
    }


def _run(cfg: Config) -> dict[str, Any]:
    started = time.monotonic()
    facts = idle_machine_facts()
    date = utc_now()
    templates = demo_templates()
    log.info(
        "%d demo event templates, %.0f bytes on average", len(templates), sum(map(len, templates)) / len(templates)
    )
    token = run_token()
    results: dict[str, PhaseResult] = {}
    with backends("ingest") as be:
        engine = db.make_engine(be.database_url, application_name="bench", pool_size=2, instrument=False)
        try:
            pg_facts = postgres_facts(engine)
            tenant_id = f"bench-{token}"
            # The bare writer writes as the same tenant, into the same tables and the same window of
            # keys: both probe the same pre-filled keys.
            base_tenant = tenant_id
            api_key = tenancy.create_tenant(engine, tenant_id)
            metadata = (("authorization", f"Bearer {api_key}"),)

            # 1. transport only, for information
            port = free_port()
            transport = spawn(
                "transport",
                python_argv("bench.transport_server", str(port), str(cfg.grpc_workers)),
                python_env({}),
                be.workdir,
            )
            try:
                wait_serving(f"127.0.0.1:{port}", transport, timeout=30)
                for mode in cfg.modes:
                    results[f"transport_{mode}"] = _phase(
                        cfg,
                        f"transport_{mode}",
                        f"127.0.0.1:{port}",
                        mode,
                        False,
                        metadata,
                        f"{token}t{mode[0]}",
                        templates,
                        transport,
                    )
            finally:
                transport.stop(5)

            ingest, target = start_ingest(be, cfg)
            try:
                wait_serving(target, ingest, timeout=60, service=INGEST_SERVICE)
                rounds = ["0"] + ([str(cfg.existing_keys)] if cfg.existing_keys else [])
                for keys in rounds:
                    suffix = "" if keys == "0" else "_keys"
                    if keys != "0":
                        log.info("pre-filling %d dedupe keys over the 6 days before today", cfg.existing_keys)
                        took = prefill_keys(be.database_url, tenant_id, cfg.existing_keys)
                        log.info("pre-filled in %.0fs", took)

                    # 2. the bare PostgreSQL writer, 3. ingest, then the bare writer again: every phase
                    # makes the tables bigger for the next, so the baseline is the mean of one run on
                    # each side of ingest's. (TESSERA_BENCH_SKIP_POSTGRES=1 leaves it out, for A/B
                    # runs of ingest alone.)
                    def baseline(name: str, tag: str, keys: str = keys) -> None:
                        if os.environ.get("TESSERA_BENCH_SKIP_POSTGRES") == "1":
                            return
                        results[name] = _phase(
                            cfg,
                            name,
                            be.database_url,
                            "postgres",
                            True,
                            (),
                            f"{token}{tag}{keys}",
                            templates,
                            None,
                            tenant_id=base_tenant,
                        )

                    baseline(f"postgres{suffix}", "p")
                    modes = cfg.modes if keys == "0" else ("unary",)
                    for mode in modes:
                        results[f"ingest_{mode}{suffix}"] = _phase(
                            cfg,
                            f"ingest_{mode}{suffix}",
                            target,
                            mode,
                            True,
                            metadata,
                            f"{token}i{mode[0]}{keys}",
                            templates,
                            ingest,
                        )
                    baseline(f"postgres{suffix}_after", "q")
                # Both writers' events are the tenant's rows (the bare writer's are never published).
                accepted = sum(r.tally.accepted for k, r in results.items() if k.startswith("ingest_"))
                unknown = sum(r.tally.unknown_outcome_events for k, r in results.items() if k.startswith("ingest_"))
                bare = sum(r.tally.accepted for k, r in results.items() if k.startswith("postgres"))
                check = verify(engine, be.redis_url, be.redis_prefix, tenant_id, accepted, unknown, bare)
                log.info("correctness: %s", check)
            finally:
                code = ingest.stop(15)
                check_exit = code
        finally:
            engine.dispose()
    if dt.datetime.now(dt.UTC).date() != dt.datetime.fromisoformat(date.replace("Z", "+00:00")).date():
        log.warning("the run crossed midnight UTC: the baseline writer skips the midnight shadow write")
    return report(cfg, facts, date, be, pg_facts, results, check, check_exit, time.monotonic() - started)


def start_ingest(be: Backends, cfg: Config) -> tuple[ServiceProcess, str]:
    port = free_port()
    env = be.env(
        TESSERA_INGEST_PORT=str(port),
        TESSERA_INGEST_RATE_LIMIT="1e9",
        TESSERA_INGEST_RATE_BURST="1e9",
        TESSERA_GRPC_WORKERS=str(cfg.grpc_workers),
        TESSERA_SHUTDOWN_GRACE_SECONDS="5",
    )
    # TESSERA_BENCH_INGEST_ARGV runs the server another way (under a profiler, a timing harness);
    # it must still be `... serve ingest` reading the same environment.
    override = os.environ.get("TESSERA_BENCH_INGEST_ARGV", "").strip()
    argv = shlex.split(override) if override else serve_argv("ingest")
    child = spawn("ingest", argv, env, be.workdir)
    return child, f"127.0.0.1:{port}"


def _share(num: float | None, den: float | None) -> float | None:
    return rounded(num / den, 3) if num is not None and den else None


def report(
    cfg: Config,
    facts: dict[str, Any],
    date: str,
    be: Backends,
    pg_facts: dict[str, Any],
    results: dict[str, PhaseResult],
    check: dict[str, Any],
    ingest_exit: int | None,
    wall: float,
) -> dict[str, Any]:
    figures = {name: r.figures() for name, r in results.items()}

    def rate(name: str) -> float | None:
        """Events/s of a phase; for the bare writer, the mean of its runs before and after ingest's."""
        found: float | None = figures.get(name, {}).get("events_per_s")
        after: float | None = figures.get(name + "_after", {}).get("events_per_s")
        if found is not None and after is not None:
            return (found + after) / 2
        return found

    shares = {
        "ingest_unary_of_postgres": _share(rate("ingest_unary"), rate("postgres")),
        "ingest_stream_of_postgres": _share(rate("ingest_stream"), rate("postgres")),
        "ingest_unary_of_transport": _share(rate("ingest_unary"), rate("transport_unary")),
    }
    if cfg.existing_keys:
        shares |= {
            "ingest_unary_keys_of_postgres_keys": _share(rate("ingest_unary_keys"), rate("postgres_keys")),
            "ingest_unary_keys_of_ingest_unary": _share(rate("ingest_unary_keys"), rate("ingest_unary")),
            "postgres_keys_of_postgres": _share(rate("postgres_keys"), rate("postgres")),
        }
    for name, f in figures.items():
        if name.startswith("ingest_"):
            base = rate("postgres" + ("_keys" if "_keys" in name else ""))
            f["share_of_postgres"] = _share(f["events_per_s"], base)
    best = max((rate(f"ingest_{m}") or 0.0 for m in cfg.modes), default=0.0)
    unary = rate("ingest_unary")
    errors = sum(f["errors"] + f["refused_batches"] for f in figures.values())
    targets: dict[str, Any] = {
        "durable_events_per_s": TARGET_EVENTS_PER_S,
        "unary_meets_events_per_s": bool(unary is not None and unary >= TARGET_EVENTS_PER_S),
        "best_meets_events_per_s": best >= TARGET_EVENTS_PER_S,
        "share_of_postgres": TARGET_SHARE_OF_POSTGRES,
        "unary_meets_share_of_postgres": (shares["ingest_unary_of_postgres"] or 0.0) >= TARGET_SHARE_OF_POSTGRES,
    }
    if cfg.existing_keys:
        targets["with_keys_of_empty"] = TARGET_WITH_KEYS
        targets["unary_meets_with_keys"] = (shares["ingest_unary_keys_of_ingest_unary"] or 0.0) >= TARGET_WITH_KEYS
    return {
        "scenario": "ingest",
        "date": date,
        "machine": facts,
        "servers": {"mode": be.mode, "postgres": pg_facts},
        "config": cfg.as_dict(),
        "results": figures,
        "baselines_events_per_s": {
            "postgres": rounded(rate("postgres") or float("nan"), 1),
            "postgres_keys": rounded(rate("postgres_keys") or float("nan"), 1),
        },
        "shares": shares,
        "targets": targets,
        "correctness": {**check, "ingest_exit_code": ingest_exit},
        "errors": errors,
        "ok": bool(check.get("ok")) and errors == 0,
        "wall_seconds": rounded(wall, 1),
    }


def table(rep: dict[str, Any]) -> str:
    m, c = rep["machine"], rep["config"]
    lines = [
        f"tessera bench ingest  {rep['date']}",
        f"machine: {m['cpu_count']} CPUs, {m['cpu_model']}, Python {m['python']}, grpcio {m['grpcio']}, "
        f"protobuf {m['protobuf']} ({m['protobuf_backend']})",
        f"servers: {rep['servers']['mode']}, PostgreSQL {rep['servers']['postgres'].get('server_version')} "
        f"(synchronous_commit={rep['servers']['postgres'].get('synchronous_commit')})",
        f"load: {c['clients']} clients in {c['client_processes']} processes, "
        f"{c['batch_size']}-event batches, {c['warmup_seconds']}s warm-up + {c['seconds']}s measured, "
        f"per row; stream window {c['stream_window']}; existing dedupe keys {c['existing_keys']:,}",
        "",
    ]
    head = ("scenario", "events/s", "p50 ms", "p99 ms", "srv CPU ms/1k", "pg CPU ms/1k", "of bare pg", "errors")
    rows = [head]
    order = ["postgres"] + [f"ingest_{m}" for m in c["modes"]] + ["postgres_after"]
    order += ["postgres_keys", "ingest_unary_keys", "postgres_keys_after"]
    order += [f"transport_{m}" for m in c["modes"]]
    for name in order:
        f = rep["results"].get(name)
        if f is None:
            continue
        label = name.replace("_keys", f" @{c['existing_keys']:,} keys").replace("_", " ") + f" ({f['method']})"
        label = label.replace(" after (", ", after ingest (")
        srv = f["server_cpu_s_per_1k_events"] if name.startswith("ingest") else None
        rows.append(
            (
                label,
                fmt(f["events_per_s"], ",.0f"),
                fmt(f["p50_ms"], ".1f"),
                fmt(f["p99_ms"], ".1f"),
                fmt(srv * 1000 if srv is not None else None, ".1f"),
                fmt((f["postgres_cpu_s_per_1k_events"] or 0) * 1000, ".1f")
                if not name.startswith("transport")
                else "-",
                fmt(f.get("share_of_postgres"), ".1%") if name.startswith("ingest") else "-",
                str(f["errors"] + f["refused_batches"]),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for i, r in enumerate(rows):
        cells = (cell.ljust(widths[j]) if j == 0 else cell.rjust(widths[j]) for j, cell in enumerate(r))
        lines.append("  ".join(cells))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    chk, t, sh = rep["correctness"], rep["targets"], rep["shares"]
    lines += [
        "",
        f"correctness: {chk['rows_in_ingest_events']} rows in ingest.events for {chk['accepted_reported']} "
        f"accepted through ingest + {chk.get('bare_writer_rows', 0)} written by the bare writer "
        f"-> {'OK' if chk['ok'] else 'MISMATCH'} (outbox left {chk['outbox_left']}, "
        f"stream length {chk['redis_stream_length']})",
        f"targets: >= {t['share_of_postgres']:.0%} of bare PostgreSQL: "
        f"{'met' if t['unary_meets_share_of_postgres'] else 'NOT met'} "
        f"(unary {fmt(sh['ingest_unary_of_postgres'], '.1%')}); "
        f">= {t['durable_events_per_s']:,} events/s: {'met' if t['unary_meets_events_per_s'] else 'NOT met'} (unary)",
    ]
    if "with_keys_of_empty" in t:
        lines.append(
            f"         at {c['existing_keys']:,} existing keys >= {t['with_keys_of_empty']:.0%} of empty: "
            f"{'met' if t['unary_meets_with_keys'] else 'NOT met'} "
            f"({fmt(sh['ingest_unary_keys_of_ingest_unary'], '.1%')}; bare PostgreSQL "
            f"{fmt(sh['postgres_keys_of_postgres'], '.1%')})"
        )
    return "\n".join(lines)


def run(*, seconds: float, as_json: bool, extra: argparse.Namespace) -> int:
    return run_configured(make_config, _run, table, seconds=seconds, extra=extra, as_json=as_json)
