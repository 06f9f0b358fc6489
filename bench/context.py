"""``tessera bench context``: GetCustomerContext by phone under concurrent load, on cache hits and
on misses, against a bare gRPC echo server measured in the same run.

1. Scratch PostgreSQL and Redis (as every bench); identity and profile as processes.
2. ``TESSERA_BENCH_PROFILES`` customers (100,000) preloaded through the real pipeline: each an
   Identify (email, phone, traits) and a call (one in ten with an open case) appended to the
   events stream, resolved by identity and built by profile.
3. Phases, each with the same clients (``TESSERA_BENCH_CLIENTS``, 4, in 2 processes), each
   client calling serially for ``--seconds``:
   - **echo**: ``bench.echo_server`` answering the bytes it got (what a gRPC round trip costs);
   - **hit**: contexts of a hot set of customers whose contexts were fetched once before;
   - **miss**: contexts of customers never asked for before (each call a different customer).
4. Targets: hit p50 at most 2x echo p50; miss p50 at most 10 ms.
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import threading
import time
from dataclasses import dataclass
from typing import Any

import grpc

from bench.common import (
    CpuGroup,
    env_int,
    fmt,
    idle_machine_facts,
    machine_busy,
    percentile,
    proc_cpu,
    python_argv,
    rounded,
    run_configured,
    spawn,
    utc_now,
)
from bench.profile_stack import customer, preloaded
from services.core.harness import free_port, wait_health
from tessera.v1 import event_pb2, profile_pb2

CONTEXT_METHOD = "/tessera.v1.ProfileService/GetCustomerContext"
ECHO_METHOD = "/bench.Echo/Echo"


@dataclass(frozen=True)
class Config:
    seconds: float
    profiles: int
    clients: int
    client_procs: int
    hot: int


def make_config(seconds: float, _extra: argparse.Namespace) -> Config:
    clients = env_int("TESSERA_BENCH_CLIENTS", 4)
    return Config(
        seconds=seconds,
        profiles=env_int("TESSERA_BENCH_PROFILES", 100_000),
        clients=clients,
        client_procs=min(clients, env_int("TESSERA_BENCH_CLIENT_PROCS", 2)),
        hot=env_int("TESSERA_BENCH_HOT_PROFILES", 1000),
    )


# ---- client processes ---------------------------------------------------------------------------


def _request(phone: str) -> bytes:
    ident = event_pb2.Identifier(type="phone", value=phone)
    return profile_pb2.GetCustomerContextRequest(identifier=ident).SerializeToString()


def client_process(
    target: str, method: str, api_key: str, phones: list[list[str]], mode: str, seconds: float, seed: int
) -> dict[str, Any]:
    """One process, one thread per client: serial calls for ``seconds``; latencies in ms."""
    channel = grpc.insecure_channel(target)
    call = channel.unary_unary(method)  # bytes in and out: no client-side (de)serialization cost
    metadata = (("authorization", f"Bearer {api_key}"),)
    out: dict[str, Any] = {"latencies": [], "errors": 0, "error_samples": [], "exhausted": 0}
    lock = threading.Lock()

    def run_client(mine: list[str], n: int) -> None:
        rng = random.Random(seed * 1000 + n)
        lat: list[float] = []
        errors = 0
        samples: list[str] = []
        requests = [_request(p) for p in mine]
        deadline = time.monotonic() + seconds
        i = 0
        while time.monotonic() < deadline:
            if mode == "miss":
                if i >= len(requests):
                    with lock:
                        out["exhausted"] += 1
                    break
                req = requests[i]
                i += 1
            else:
                req = requests[rng.randrange(len(requests))]
            t0 = time.perf_counter()
            try:
                call(req, metadata=metadata, timeout=10)
            except grpc.RpcError as err:
                errors += 1
                if len(samples) < 3:
                    samples.append(f"{err.code().name}: {err.details()}")
                continue
            lat.append((time.perf_counter() - t0) * 1000)
        with lock:
            out["latencies"].extend(lat)
            out["errors"] += errors
            out["error_samples"].extend(samples)

    threads = [threading.Thread(target=run_client, args=(mine, n)) for n, mine in enumerate(phones)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    channel.close()
    return out


def run_phase(
    cfg: Config, name: str, target: str, method: str, api_key: str, slices: list[list[str]], server_pid: int = 0
) -> dict[str, Any]:
    """``slices``: one list of phones per client. With ``server_pid``, where the CPU went (per call)."""
    per_proc: list[list[list[str]]] = [[] for _ in range(cfg.client_procs)]
    for n, s in enumerate(slices):
        per_proc[n % cfg.client_procs].append(s)
    ctx = multiprocessing.get_context("spawn")
    pg, rd = CpuGroup(["postgres"]), CpuGroup(["redis-server"])
    with ctx.Pool(cfg.client_procs) as pool:
        pool.starmap(time.sleep, [(0,)] * cfg.client_procs)  # the pool is up before the window opens
        pg.start()
        rd.start()
        server0 = proc_cpu(server_pid) if server_pid else 0.0
        busy0 = machine_busy()[0]
        results = pool.starmap(
            client_process,
            [(target, method, api_key, group, name, cfg.seconds, i) for i, group in enumerate(per_proc)],
        )
        server_s = proc_cpu(server_pid) - server0 if server_pid else 0.0
        busy_s = machine_busy()[0] - busy0
        pg_s, rd_s = pg.stop(), rd.stop()
    lat = sorted(x for r in results for x in r["latencies"])
    errors = sum(r["errors"] for r in results)
    figures = {
        "calls": len(lat),
        "calls_per_s": rounded(len(lat) / cfg.seconds, 1),
        "p50_ms": rounded(percentile(lat, 50)) if lat else None,
        "p90_ms": rounded(percentile(lat, 90)) if lat else None,
        "p99_ms": rounded(percentile(lat, 99)) if lat else None,
        "max_ms": rounded(lat[-1]) if lat else None,
        "errors": errors,
        "error_samples": [s for r in results for s in r["error_samples"]][:5],
        "clients_out_of_new_customers": sum(r["exhausted"] for r in results),
    }
    if lat:
        per_call = 1000 / len(lat)  # CPU ms per call
        figures["cpu_ms_per_call"] = {
            "server": rounded(server_s * per_call) if server_pid else None,
            "postgres": rounded(pg_s * per_call),
            "redis": rounded(rd_s * per_call),
            "machine": rounded(busy_s * per_call),
        }
    return figures


# ---- the run ------------------------------------------------------------------------------------


def produce(cfg: Config) -> dict[str, Any]:
    started = time.monotonic()
    facts = idle_machine_facts()
    date = utc_now()
    with preloaded("context", ["identity", "profile"], cfg.profiles) as run:
        be, stack, api_key = run.be, run.stack, run.api_key
        build_s = run.build_seconds
        phones = [p.phone for p in run.people]
        rng = random.Random(5)
        rng.shuffle(phones)
        hot, cold = phones[: cfg.hot], phones[cfg.hot :]
        echo_port = free_port()
        echo = spawn("echo", python_argv("bench.echo_server", str(echo_port)), be.env(), be.workdir)
        try:
            if not wait_health(f"127.0.0.1:{echo_port}", timeout=30, process=echo):
                raise RuntimeError("the echo server did not start")
            target = stack.targets["profile"]
            per = len(cold) // cfg.clients
            echo_target = f"127.0.0.1:{echo_port}"
            echo_figures = run_phase(cfg, "echo", echo_target, ECHO_METHOD, api_key, [hot] * cfg.clients, echo.pid)
            # Warm: every hot context fetched once, so the hit phase only hits (contexts
            # stay cached for TESSERA_PROFILE_CONTEXT_CACHE_SECONDS, 60 s by default).
            run_phase(
                Config(min(cfg.seconds, 30), cfg.profiles, 1, 1, cfg.hot),
                "miss",
                target,
                CONTEXT_METHOD,
                api_key,
                [hot],
            )
            pid = stack.processes["profile"].pid
            hit = run_phase(cfg, "hit", target, CONTEXT_METHOD, api_key, [hot] * cfg.clients, pid)
            cold_slices = [cold[i * per : (i + 1) * per] for i in range(cfg.clients)]
            miss = run_phase(cfg, "miss", target, CONTEXT_METHOD, api_key, cold_slices, pid)
            echo_again = run_phase(cfg, "echo", echo_target, ECHO_METHOD, api_key, [hot] * cfg.clients, echo.pid)
        finally:
            echo.stop(5)
    echo_p50 = (echo_figures["p50_ms"] + echo_again["p50_ms"]) / 2
    hit_ratio = hit["p50_ms"] / echo_p50 if hit["p50_ms"] and echo_p50 else None
    targets = {
        "hit_p50_at_most_2x_echo": hit_ratio is not None and hit_ratio <= 2.0,
        "miss_p50_at_most_10_ms": miss["p50_ms"] is not None and miss["p50_ms"] <= 10.0,
    }
    errors = echo_figures["errors"] + hit["errors"] + miss["errors"] + echo_again["errors"]
    return {
        "scenario": "context",
        "date": date,
        "machine": facts,
        "config": {
            "profiles": cfg.profiles,
            "hot_profiles": cfg.hot,
            "clients": cfg.clients,
            "client_processes": cfg.client_procs,
            "seconds_per_phase": cfg.seconds,
            "lookup": "GetCustomerContext by phone (E.164), 10 recent interactions",
            "servers": be.mode,
        },
        "preload": {"events": 2 * cfg.profiles, "seconds": rounded(build_s, 1)},
        "results": {"echo_before": echo_figures, "hit": hit, "miss": miss, "echo_after": echo_again},
        "echo_p50_ms": rounded(echo_p50),
        "hit_p50_over_echo_p50": rounded(hit_ratio, 2) if hit_ratio else None,
        "targets": targets,
        "errors": errors,
        "ok": errors == 0 and all(targets.values()),
        "wall_seconds": rounded(time.monotonic() - started, 1),
    }


def table(rep: dict[str, Any]) -> str:
    cfg = rep["config"]
    lines = [
        f"tessera bench context  {rep['date']}",
        f"machine: {rep['machine'].get('cpu_count')} CPUs, {rep['machine'].get('cpu_model', '')}",
        f"{cfg['profiles']:,} profiles (built in {rep['preload']['seconds']} s), {cfg['clients']} clients in "
        f"{cfg['client_processes']} processes, {cfg['seconds_per_phase']:g} s per phase; {cfg['lookup']}",
        "",
        f"{'phase':<12}{'calls/s':>10}{'p50 ms':>10}{'p90 ms':>10}{'p99 ms':>10}{'errors':>8}"
        f"   CPU ms/call: server  postgres  redis  machine",
    ]
    for name, r in rep["results"].items():
        cpu = r.get("cpu_ms_per_call") or {}
        lines.append(
            f"{name:<12}{fmt(r['calls_per_s'], ',.0f'):>10}{fmt(r['p50_ms'], '.3f'):>10}"
            f"{fmt(r['p90_ms'], '.3f'):>10}{fmt(r['p99_ms'], '.3f'):>10}{r['errors']:>8}"
            f"{fmt(cpu.get('server'), '.3f'):>22}{fmt(cpu.get('postgres'), '.3f'):>10}"
            f"{fmt(cpu.get('redis'), '.3f'):>7}{fmt(cpu.get('machine'), '.3f'):>9}"
        )
    lines += [
        "",
        f"hit p50 / echo p50: {fmt(rep['hit_p50_over_echo_p50'], '.2f')} (target <= 2)",
        f"targets: {rep['targets']}",
    ]
    return "\n".join(lines)


def run(*, seconds: float, as_json: bool, extra: argparse.Namespace) -> int:
    return run_configured(make_config, produce, table, seconds=seconds, extra=extra, as_json=as_json)


__all__ = ["client_process", "customer", "run"]
