"""``tessera bench gateway``: what the HTTP gateway costs against talking gRPC directly, same run.

1. **Ingest**: Segment-style batches of 100 messages (identify and track, userId and/or
   anonymousId, traits, context; ``bench.segment_payloads``) POSTed to the gateway's ``/v1/batch``
   over keep-alive connections by ``--clients`` clients (4, in 2 processes), against the same
   batches (the gateway's own mapping of them, pre-serialized) sent through IngestEvents to the
   same ingest process. Order: gRPC, HTTP, gRPC again; the baseline is the mean of both gRPC runs.
   Afterwards ``ingest.events`` must hold exactly the events acknowledged.
   Target: HTTP events/s at least 50% of gRPC's.
2. **Context**: ``TESSERA_BENCH_PROFILES`` customers (10,000) built through identity and profile;
   ``GET /api/v1/context?identifier=email:...`` through the gateway against GetCustomerContext by
   email over gRPC, on the same hot set of customers (contexts warmed first, so both read the
   cache), ``TESSERA_BENCH_CONTEXT_CLIENTS`` (2) serial clients each. Order: gRPC, HTTP, gRPC.
   Target: HTTP p50 at most 1.5x the gRPC p50. Skipped, and reported as awaiting the API, when the
   gateway does not serve the endpoint yet.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import logging
import multiprocessing
import os
import random
import shlex
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc

from bench.common import (
    Backends,
    backends,
    env_int,
    fmt,
    idle_machine_facts,
    percentile,
    proc_cpu,
    rounded,
    run_configured,
    spawn,
    utc_now,
)
from bench.http_client import KeepAlive
from bench.ingest import verify
from bench.loadgen import PhaseResult, PhaseSpec, run_phase
from bench.profile_stack import preloaded
from bench.segment_payloads import check_same_batch, grpc_templates, json_templates, messages
from services.core import db, tenancy
from services.core.harness import ServiceProcess, free_port, run_token, serve_argv, wait_http, wait_serving
from tessera.v1 import event_pb2, profile_pb2

log = logging.getLogger("bench.gateway")

BATCH_SIZE = 100
TARGET_HTTP_SHARE = 0.5
TARGET_CONTEXT_RATIO = 1.5
CONTEXT_METHOD = "/tessera.v1.ProfileService/GetCustomerContext"
CONTEXT_PATH = "/api/v1/context"


@dataclass(frozen=True)
class Config:
    seconds: float
    warmup: float
    clients: int
    client_procs: int
    profiles: int
    hot: int
    context_clients: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "seconds_per_phase": self.seconds,
            "warmup_seconds": self.warmup,
            "ingest_clients": self.clients,
            "client_processes": self.client_procs,
            "batch_size": BATCH_SIZE,
            "profiles": self.profiles,
            "hot_profiles": self.hot,
            "context_clients": self.context_clients,
        }


def make_config(seconds: float, extra: argparse.Namespace) -> Config:
    clients = max(1, int(getattr(extra, "clients", 4) or 4))
    return Config(
        seconds=seconds,
        warmup=min(2.0, max(0.5, seconds / 4)),
        clients=clients,
        client_procs=min(clients, env_int("TESSERA_BENCH_CLIENT_PROCS", 2)),
        profiles=env_int("TESSERA_BENCH_PROFILES", 10_000),
        hot=env_int("TESSERA_BENCH_HOT_PROFILES", 1000),
        context_clients=env_int("TESSERA_BENCH_CONTEXT_CLIENTS", 2),
    )


@contextmanager
def gateway(be: Backends, **addresses: str) -> Iterator[tuple[ServiceProcess, str]]:
    """``tessera serve gateway`` as its own process, ready; ``addresses`` as GATEWAY_<NAME>_ADDRESS."""
    port = free_port()
    env = be.env(
        TESSERA_GATEWAY_PORT=str(port),
        TESSERA_SHUTDOWN_GRACE_SECONDS="3",
        **{f"TESSERA_GATEWAY_{name.upper()}_ADDRESS": target for name, target in addresses.items()},
    )
    # TESSERA_BENCH_GATEWAY_ARGV runs it another way (under a profiler); still `... serve gateway`.
    override = os.environ.get("TESSERA_BENCH_GATEWAY_ARGV", "").strip()
    proc = spawn("gateway", shlex.split(override) if override else serve_argv("gateway"), env, be.workdir)
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", proc, timeout=60)
        yield proc, f"127.0.0.1:{port}"
    finally:
        proc.stop(10)


# ---- 1. ingest ----------------------------------------------------------------------------------


def _ingest_half(cfg: Config, token: str) -> dict[str, Any]:
    msgs = messages()
    templates = grpc_templates(msgs)
    bodies = json_templates(msgs)
    size = check_same_batch(msgs, "check", BATCH_SIZE)
    log.info("%d Segment messages; a 100-message /v1/batch body is %d bytes", len(msgs), size)
    results: dict[str, PhaseResult] = {}
    with backends("gateway") as be:
        engine = db.make_engine(be.database_url, application_name="bench", pool_size=2, instrument=False)
        try:
            tenant_id = f"bench-{token}"
            api_key = tenancy.create_tenant(engine, tenant_id)
            port = free_port()
            env = be.env(
                TESSERA_INGEST_PORT=str(port),
                TESSERA_INGEST_RATE_LIMIT="1e9",
                TESSERA_INGEST_RATE_BURST="1e9",
                TESSERA_SHUTDOWN_GRACE_SECONDS="5",
            )
            ingest = spawn("ingest", serve_argv("ingest"), env, be.workdir)
            target = f"127.0.0.1:{port}"
            try:
                wait_serving(target, ingest, timeout=60, service="tessera.v1.IngestService")
                with gateway(be, ingest=target) as (gw, gw_target):
                    basic = "Basic " + base64.b64encode(f"{api_key}:".encode()).decode()
                    plan = [
                        ("grpc", "unary", target, (("authorization", f"Bearer {api_key}"),), templates, ingest, {}),
                        ("http", "http", gw_target, (("authorization", basic),), bodies, gw, {"ingest": ingest.pid}),
                        (
                            "grpc_after",
                            "unary",
                            target,
                            (("authorization", f"Bearer {api_key}"),),
                            templates,
                            ingest,
                            {},
                        ),
                    ]
                    for name, mode, where, metadata, tpl, server, others in plan:
                        spec = PhaseSpec(
                            name=name,
                            target=where,
                            mode=mode,
                            counts_from_response=True,
                            metadata=metadata,
                            run_tag=f"{token}{name[0]}{len(results)}",
                            batch_size=BATCH_SIZE,
                            warmup=cfg.warmup,
                            seconds=cfg.seconds,
                        )
                        log.info("phase %s: %d clients in %d processes", name, cfg.clients, cfg.client_procs)
                        res = run_phase(
                            spec, tpl, clients=cfg.clients, procs=cfg.client_procs, server_pid=server.pid,
                            other_pids=others,
                        )  # fmt: skip
                        results[name] = res
                        f = res.figures()
                        log.info("phase %s: %s events/s, p50 %s ms, errors %d", name, f["events_per_s"], f["p50_ms"],
                                 f["errors"] + f["refused_batches"])  # fmt: skip
                        for proc in (ingest, gw):
                            if not proc.alive():
                                raise RuntimeError(f"{proc.name} died during {name}:\n{proc.log_tail()}")
                accepted = sum(r.tally.accepted for r in results.values())
                unknown = sum(r.tally.unknown_outcome_events for r in results.values())
                check = verify(engine, be.redis_url, be.redis_prefix, tenant_id, accepted, unknown)
                log.info("correctness: %s", check)
            finally:
                ingest.stop(15)
        finally:
            engine.dispose()
    figures = {name: r.figures() for name, r in results.items()}
    grpc_rates = [figures[n]["events_per_s"] for n in ("grpc", "grpc_after") if figures[n]["events_per_s"]]
    grpc_rate = sum(grpc_rates) / len(grpc_rates) if grpc_rates else None
    http_rate = figures["http"]["events_per_s"]
    share = http_rate / grpc_rate if http_rate is not None and grpc_rate else None
    errors = sum(f["errors"] + f["refused_batches"] for f in figures.values())
    return {
        "results": figures,
        "batch_body_bytes": size,
        "grpc_events_per_s": rounded(grpc_rate or float("nan"), 1),
        "http_events_per_s": http_rate,
        "http_share_of_grpc": rounded(share, 3) if share is not None else None,
        "target": f"HTTP events/s >= {TARGET_HTTP_SHARE:.0%} of gRPC",
        "met": share is not None and share >= TARGET_HTTP_SHARE,
        "correctness": check,
        "errors": errors,
    }


# ---- 2. context ---------------------------------------------------------------------------------


def _context_path(email: str) -> str:
    return f"{CONTEXT_PATH}?identifier={urllib.parse.quote('email:' + email, safe='')}"


def _grpc_request(email: str) -> bytes:
    ident = event_pb2.Identifier(type="email", value=email)
    return profile_pb2.GetCustomerContextRequest(identifier=ident).SerializeToString()


def context_client(
    kind: str, target: str, api_key: str, emails: list[str], clients: int, seconds: float, seed: int
) -> dict[str, Any]:
    """One process, ``clients`` threads, each calling serially for ``seconds``: gRPC with bytes in
    and out (no client-side protobuf), or HTTP GETs on one keep-alive connection; latencies in ms."""
    out: dict[str, Any] = {"latencies": [], "errors": 0, "error_samples": []}
    lock = threading.Lock()
    channel = grpc.insecure_channel(target) if kind == "grpc" else None

    def run_client(n: int) -> None:
        rng = random.Random(seed * 1000 + n)
        lat: list[float] = []
        errors, samples = 0, list[str]()
        call = channel.unary_unary(CONTEXT_METHOD) if channel is not None else None
        host, _, port = target.rpartition(":")
        conn = KeepAlive(host, int(port), timeout=10) if call is None else None
        metadata = (("authorization", f"Bearer {api_key}"),)
        headers = {"Authorization": f"Bearer {api_key}"}
        # Both sides send bytes made before the window: a serialized request, or the HTTP request.
        grpc_requests = [_grpc_request(e) for e in emails] if call is not None else []
        http_requests = [KeepAlive.build("GET", _context_path(e), headers) for e in emails] if conn else []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            i = rng.randrange(len(emails))
            t0 = time.perf_counter()
            try:
                if call is not None:
                    call(grpc_requests[i], metadata=metadata, timeout=10)
                else:
                    assert conn is not None
                    status, body = conn.request(http_requests[i])
                    if status != 200:
                        raise RuntimeError(f"HTTP {status}: {body[:200]!r}")
            except (grpc.RpcError, OSError, RuntimeError) as err:
                errors += 1
                if len(samples) < 3:
                    samples.append(repr(err)[:300])
                continue
            lat.append((time.perf_counter() - t0) * 1000)
        if conn is not None:
            conn.close()
        with lock:
            out["latencies"].extend(lat)
            out["errors"] += errors
            out["error_samples"].extend(samples)

    threads = [threading.Thread(target=run_client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if channel is not None:
        channel.close()
    return out


def _context_phase(
    cfg: Config, kind: str, target: str, api_key: str, emails: list[str], pids: dict[str, int], seconds: float
) -> dict[str, Any]:
    procs = max(1, min(cfg.context_clients, 2))
    per = [cfg.context_clients // procs + (1 if i < cfg.context_clients % procs else 0) for i in range(procs)]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(procs) as pool:
        pool.starmap(time.sleep, [(0,)] * procs)  # the pool is up before the window opens
        cpu0 = {n: proc_cpu(p) for n, p in pids.items()}
        results = pool.starmap(
            context_client, [(kind, target, api_key, emails, per[i], seconds, i) for i in range(procs)]
        )
        cores = {f"{n}_cpu_cores": rounded((proc_cpu(p) - cpu0[n]) / seconds, 2) for n, p in pids.items()}
    lat = sorted(x for r in results for x in r["latencies"])
    return {
        "method": "GetCustomerContext (gRPC)" if kind == "grpc" else f"GET {CONTEXT_PATH} (HTTP)",
        "calls": len(lat),
        "calls_per_s": rounded(len(lat) / seconds, 1),
        "p50_ms": rounded(percentile(lat, 50)) if lat else None,
        "p90_ms": rounded(percentile(lat, 90)) if lat else None,
        "p99_ms": rounded(percentile(lat, 99)) if lat else None,
        "errors": sum(r["errors"] for r in results),
        "error_samples": [s for r in results for s in r["error_samples"]][:5],
        **cores,
    }


def _probe(gw_target: str, api_key: str, email: str) -> tuple[int, Any]:
    """The gateway's answer for one customer: (status, JSON body or the raw text)."""
    host, _, port = gw_target.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", _context_path(email), headers={"Authorization": f"Bearer {api_key}"})
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(raw)
    except ValueError:
        return resp.status, raw[:200].decode("utf-8", "replace")


def _context_half(cfg: Config) -> dict[str, Any]:
    with preloaded("gatew", ["identity", "profile"], cfg.profiles) as run:
        log.info("%d customers built in %.0f s", cfg.profiles, run.build_seconds)
        emails = [p.email for p in run.people]
        random.Random(5).shuffle(emails)
        hot = emails[: cfg.hot]
        profile_target = run.stack.targets["profile"]
        with gateway(
            run.be,
            ingest=f"127.0.0.1:{free_port()}",  # not used by the reads
            profile=profile_target,
            metrics=f"127.0.0.1:{free_port()}",
        ) as (gw, gw_target):
            status, body = _probe(gw_target, run.api_key, hot[0])
            if status != 200:
                log.warning("GET %s answered %s: %s", CONTEXT_PATH, status, body)
                return {"status": "awaiting the API", "probe": {"status": status, "body": body}}
            channel = grpc.insecure_channel(profile_target)
            try:
                stub = channel.unary_unary(
                    CONTEXT_METHOD, response_deserializer=profile_pb2.GetCustomerContextResponse.FromString
                )
                direct = stub(_grpc_request(hot[0]), metadata=run.metadata, timeout=10)
            finally:
                channel.close()
            same = body.get("profile", {}).get("name") == direct.profile.name
            pids = {"profile": run.stack.processes["profile"].pid, "gateway": gw.pid}
            # Warm: every hot context fetched once through both, so every measured call reads the cache.
            _context_phase(cfg, "grpc", profile_target, run.api_key, hot, pids, min(cfg.seconds, 10))
            _context_phase(cfg, "http", gw_target, run.api_key, hot, pids, min(cfg.seconds, 10))
            phases = {}
            for name, kind, where in (
                ("grpc", "grpc", profile_target),
                ("http", "http", gw_target),
                ("grpc_after", "grpc", profile_target),
            ):
                phases[name] = _context_phase(cfg, kind, where, run.api_key, hot, pids, cfg.seconds)
                log.info("context %s: p50 %s ms, %s calls/s", name, phases[name]["p50_ms"], phases[name]["calls_per_s"])
    grpc_p50s = [phases[n]["p50_ms"] for n in ("grpc", "grpc_after") if phases[n]["p50_ms"]]
    grpc_p50 = sum(grpc_p50s) / len(grpc_p50s) if grpc_p50s else None
    http_p50 = phases["http"]["p50_ms"]
    ratio = http_p50 / grpc_p50 if http_p50 and grpc_p50 else None
    return {
        "status": "measured",
        "results": phases,
        "same_profile_both_ways": same,
        "grpc_p50_ms": rounded(grpc_p50 or float("nan")),
        "http_p50_ms": http_p50,
        "http_p50_over_grpc_p50": rounded(ratio, 2) if ratio is not None else None,
        "target": f"HTTP p50 <= {TARGET_CONTEXT_RATIO}x gRPC p50",
        "met": ratio is not None and ratio <= TARGET_CONTEXT_RATIO,
        "errors": sum(p["errors"] for p in phases.values()) + (0 if same else 1),
    }


def produce(cfg: Config) -> dict[str, Any]:
    started = time.monotonic()
    facts = idle_machine_facts()
    date = utc_now()
    token = run_token()
    halves = os.environ.get("TESSERA_BENCH_GATEWAY_HALVES", "ingest,context").split(",")
    skipped: dict[str, Any] = {"status": "skipped"}
    ingest = _ingest_half(cfg, token) if "ingest" in halves else skipped
    context = _context_half(cfg) if "context" in halves else skipped
    measured = [h for h in (ingest, context) if "met" in h]
    return {
        "scenario": "gateway",
        "date": date,
        "machine": facts,
        "config": cfg.as_dict(),
        "ingest": ingest,
        "context": context,
        "targets": {
            "http_ingest_at_least_50pct_of_grpc": ingest.get("met"),
            "http_context_p50_at_most_1_5x_grpc": context.get("met"),
        },
        "ok": bool(measured)
        and all(h["met"] and not h["errors"] for h in measured)
        and bool(ingest["correctness"]["ok"] if "correctness" in ingest else True),
        "wall_seconds": rounded(time.monotonic() - started, 1),
    }


def _verdict(met: bool | None) -> str:
    return "n/a" if met is None else ("PASS" if met else "FAIL")


def table(rep: dict[str, Any]) -> str:
    m, c = rep["machine"], rep["config"]
    lines = [
        f"tessera bench gateway  {rep['date']}",
        f"machine: {m['cpu_count']} CPUs, {m['cpu_model']}, Python {m['python']}",
        f"{c['ingest_clients']} ingest clients in {c['client_processes']} processes, "
        f"{c['batch_size']}-message batches, {c['warmup_seconds']}s warm-up + {c['seconds_per_phase']}s per phase",
        "",
        f"{'phase':<28}{'events/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'srv cores':>10}{'ingest cores':>13}{'errors':>8}",
    ]
    ing = rep["ingest"]
    for name, f in ing.get("results", {}).items():
        lines.append(
            f"{name + ' (' + f['method'] + ')':<28}{fmt(f['events_per_s'], ',.0f'):>10}{fmt(f['p50_ms'], '.1f'):>9}"
            f"{fmt(f['p99_ms'], '.1f'):>9}{fmt(f['server_cpu_cores'], '.2f'):>10}"
            f"{fmt(f.get('ingest_cpu_cores'), '.2f'):>13}{f['errors'] + f['refused_batches']:>8}"
        )
    if "met" in ing:
        chk = ing["correctness"]
        lines += [
            f"ingest: HTTP {fmt(ing['http_share_of_grpc'], '.1%')} of gRPC (target >= 50%): {_verdict(ing['met'])}; "
            f"correctness {'OK' if chk['ok'] else 'MISMATCH'} ({chk['rows_in_ingest_events']} rows, "
            f"{chk['accepted_reported']} acknowledged)",
            "",
        ]
    ctx = rep["context"]
    if ctx.get("status") == "measured":
        lines.append(f"{'context phase':<40}{'calls/s':>9}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'errors':>8}")
        for name, f in ctx["results"].items():
            lines.append(
                f"{name + ' (' + f['method'] + ')':<40}{fmt(f['calls_per_s'], ',.0f'):>9}{fmt(f['p50_ms'], '.3f'):>9}"
                f"{fmt(f['p90_ms'], '.3f'):>9}{fmt(f['p99_ms'], '.3f'):>9}{f['errors']:>8}"
            )
        lines.append(
            f"context: HTTP p50 / gRPC p50 {fmt(ctx['http_p50_over_grpc_p50'], '.2f')} (target <= 1.5): "
            f"{_verdict(ctx['met'])}"
        )
    else:
        lines.append(f"context: {ctx.get('status')}")
    return "\n".join(lines)


def run(*, seconds: float, as_json: bool, extra: argparse.Namespace) -> int:
    return run_configured(make_config, produce, table, seconds=seconds, extra=extra, as_json=as_json)


__all__ = ["context_client", "run"]
