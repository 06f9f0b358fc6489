"""The load generator: client processes, each running one or more client threads, each thread
with its own gRPC connection, sending pre-serialized 100-event batches for a fixed window.

Processes rather than threads, because one Python process cannot drive gRPC fast enough on its
own (the GIL): on a 2-core machine the clients would otherwise be the bottleneck of the
transport-only baseline. All processes start together at an instant the parent picks, warm up,
measure, and stop by themselves at the end of the window.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.synchronize
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from bench.common import CpuGroup, machine_busy, percentile, proc_cpu, rounded
from bench.http_client import KeepAlive
from bench.payloads import BatchMaker, check_batch_bytes
from bench.pg_writer import BaselineWriter, templates_of
from bench.segment_payloads import SegmentBatchMaker
from tessera.v1 import ingest_pb2

log = logging.getLogger("bench.loadgen")

SERVICE = "/tessera.v1.IngestService/"
CALL_TIMEOUT = 30.0
MAX_ERRORS = 50


@dataclass(frozen=True)
class PhaseSpec:
    """One measured phase: which server, which method, how long."""

    name: str
    target: str
    # "unary" (IngestEvents), "stream" (StreamEvents), "postgres" (the bare baseline writer) or "http"
    # (the gateway's POST /v1/batch; templates are then bench.segment_payloads.json_templates)
    mode: str
    counts_from_response: bool  # True for ingest (accepted_count); False for the bare transport server
    metadata: tuple[tuple[str, str], ...]
    run_tag: str
    batch_size: int
    warmup: float
    seconds: float
    window: int = 4  # stream: batches in flight per client
    tenant_id: str = ""  # postgres: whose rows the baseline writes


@dataclass
class ClientTally:
    latencies: list[float] = field(default_factory=list)  # seconds, measured window only
    measured_events: int = 0
    measured_batches: int = 0
    sent_batches: int = 0
    accepted: int = 0  # every acknowledged ACCEPTED event, warm-up and tail included
    duplicate: int = 0
    rejected: int = 0
    refused_batches: int = 0
    errors: int = 0
    unknown_outcome_events: int = 0  # sent but never answered (an error mid-flight)
    error_samples: list[str] = field(default_factory=list)
    build_seconds: float = 0.0

    def merge(self, other: ClientTally) -> None:
        self.latencies += other.latencies
        for name in (
            "measured_events",
            "measured_batches",
            "sent_batches",
            "accepted",
            "duplicate",
            "rejected",
            "refused_batches",
            "errors",
            "unknown_outcome_events",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.error_samples += other.error_samples[: max(0, 5 - len(self.error_samples))]
        self.build_seconds += other.build_seconds

    def error(self, exc: BaseException) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            if isinstance(exc, grpc.RpcError):
                self.error_samples.append(f"{exc.code()}: {exc.details()}")  # type: ignore[attr-defined]
            else:
                self.error_samples.append(repr(exc))


@dataclass(frozen=True)
class Window:
    t0: float
    start: float
    end: float


def _channel(target: str) -> grpc.Channel:
    # A private subchannel pool: every client has its own TCP connection, as separate producers would.
    return grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


def _count(spec: PhaseSpec, raw: bytes, tally: ClientTally) -> int:
    """Accepted events of one answer (the bare server answers nothing: the whole batch counts)."""
    if not spec.counts_from_response:
        tally.accepted += spec.batch_size
        return spec.batch_size
    resp: ingest_pb2.IngestEventsResponse | ingest_pb2.StreamEventsResponse
    if spec.mode == "unary":
        resp = ingest_pb2.IngestEventsResponse.FromString(raw)
    else:
        resp = ingest_pb2.StreamEventsResponse.FromString(raw)
        if resp.HasField("error") and resp.error.code:
            tally.refused_batches += 1
            if len(tally.error_samples) < 5:
                tally.error_samples.append(f"refused: {resp.error.message}")
            return 0
    tally.accepted += resp.accepted_count
    tally.duplicate += resp.duplicate_count
    tally.rejected += resp.rejected_count
    return int(resp.accepted_count)


def run_unary(spec: PhaseSpec, channel: grpc.Channel, maker: BatchMaker, win: Window) -> ClientTally:
    tally = ClientTally()
    call = channel.unary_unary(SERVICE + "IngestEvents", request_serializer=None, response_deserializer=None)
    seq = 0
    while True:
        b0 = time.monotonic()
        if b0 >= win.end or tally.errors >= MAX_ERRORS:
            break
        req = maker.make(seq)
        seq += 1
        sent = time.monotonic()
        tally.build_seconds += sent - b0
        tally.sent_batches += 1
        try:
            raw = call(req, metadata=spec.metadata, timeout=CALL_TIMEOUT)
        except grpc.RpcError as exc:
            tally.error(exc)
            if exc.code() in (
                grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.UNAVAILABLE,  # type: ignore[attr-defined]
                grpc.StatusCode.CANCELLED,
                grpc.StatusCode.UNKNOWN,
            ):
                tally.unknown_outcome_events += maker.size
            time.sleep(0.05)
            continue
        done = time.monotonic()
        accepted = _count(spec, raw, tally)
        if win.start <= done <= win.end:
            tally.latencies.append(done - sent)
            tally.measured_events += accepted
            tally.measured_batches += 1
    return tally


def run_http(spec: PhaseSpec, conn: KeepAlive, maker: SegmentBatchMaker, win: Window) -> ClientTally:
    """Serial POST /v1/batch on one keep-alive connection; HTTP 200 means every event was taken."""
    tally = ClientTally()
    headers = {"Content-Type": "application/json", **dict(spec.metadata)}
    seq = 0
    while True:
        b0 = time.monotonic()
        if b0 >= win.end or tally.errors >= MAX_ERRORS:
            break
        raw = KeepAlive.build("POST", "/v1/batch", headers, maker.make(seq))
        seq += 1
        sent = time.monotonic()
        tally.build_seconds += sent - b0
        tally.sent_batches += 1
        try:
            status, answer = conn.request(raw)
        except OSError as exc:
            tally.error(exc)
            tally.unknown_outcome_events += maker.size
            time.sleep(0.05)
            continue
        done = time.monotonic()
        if status != 200:
            tally.refused_batches += 1
            if status >= 500 or status == 429:
                tally.unknown_outcome_events += maker.size
            if len(tally.error_samples) < 5:
                tally.error_samples.append(f"HTTP {status}: {answer[:200]!r}")
            continue
        tally.accepted += maker.size
        if win.start <= done <= win.end:
            tally.latencies.append(done - sent)
            tally.measured_events += maker.size
            tally.measured_batches += 1
    return tally


def run_stream(spec: PhaseSpec, channel: grpc.Channel, maker: BatchMaker, win: Window) -> ClientTally:
    """A pipelined StreamEvents: up to ``window`` batches unanswered; each answer frees a slot.
    Latency is from handing the batch to gRPC to reading its answer (queueing included)."""
    tally = ClientTally()
    call = channel.stream_stream(SERVICE + "StreamEvents", request_serializer=None, response_deserializer=None)
    while time.monotonic() < win.end and tally.errors < MAX_ERRORS:
        slots = threading.Semaphore(spec.window)
        sent_at: dict[int, float] = {}
        state: dict[str, Any] = {"seq": 0, "build": 0.0}
        start_seq = tally.sent_batches

        def requests(
            slots: threading.Semaphore = slots,
            sent_at: dict[int, float] = sent_at,
            state: dict[str, Any] = state,
            start_seq: int = start_seq,
        ) -> Any:
            while True:
                if not slots.acquire(timeout=0.1):
                    if time.monotonic() >= win.end:
                        return
                    continue
                b0 = time.monotonic()
                if b0 >= win.end:
                    return
                seq = start_seq + state["seq"]
                req = maker.make(seq)
                state["seq"] += 1
                now = time.monotonic()
                state["build"] += now - b0
                sent_at[seq] = now
                yield req

        timeout = win.end - time.monotonic() + CALL_TIMEOUT
        responses = call(requests(), metadata=spec.metadata, timeout=timeout)
        try:
            for raw in responses:
                done = time.monotonic()
                resp_bid = ingest_pb2.StreamEventsResponse.FromString(raw).batch_id
                sent = sent_at.pop(int(resp_bid), done)
                accepted = _count(spec, raw, tally)
                if win.start <= done <= win.end:
                    tally.latencies.append(done - sent)
                    tally.measured_events += accepted
                    tally.measured_batches += 1
                slots.release()
        except grpc.RpcError as exc:
            tally.error(exc)
            time.sleep(0.05)
        finally:
            tally.sent_batches += int(state["seq"])
            tally.build_seconds += float(state["build"])
            # sent but never answered: committed or not, nobody knows
            tally.unknown_outcome_events += len(sent_at) * maker.size
    return tally


def run_postgres(spec: PhaseSpec, writer: BaselineWriter, win: Window) -> ClientTally:
    """The baseline: one autocommitted statement per batch on this client's own connection."""
    tally = ClientTally()
    seq = 0
    while True:
        sent = time.monotonic()
        if sent >= win.end or tally.errors >= MAX_ERRORS:
            break
        tally.sent_batches += 1
        try:
            stored = writer.write(seq)
        except Exception as exc:
            tally.error(exc)
            time.sleep(0.05)
            continue
        seq += 1
        done = time.monotonic()
        tally.accepted += stored
        if win.start <= done <= win.end:
            tally.latencies.append(done - sent)
            tally.measured_events += stored
            tally.measured_batches += 1
    return tally


def _worker(
    spec: PhaseSpec,
    templates: list[bytes],
    proc_index: int,
    threads: int,
    ready: Any,
    go: multiprocessing.synchronize.Event,
    t0_value: Any,
    results: Any,
) -> None:
    """Entry point of one client process."""
    try:
        channels: list[grpc.Channel] = []
        makers: list[BatchMaker] = []
        writers: list[BaselineWriter] = []
        conns: list[tuple[KeepAlive, SegmentBatchMaker]] = []
        for t in range(threads):
            tag = f"{spec.run_tag}-{proc_index:02d}{t:02d}"
            offset = (proc_index * 7 + t) * 997
            if spec.mode == "http":
                host, _, port = spec.target.rpartition(":")
                conn = KeepAlive(host, int(port), timeout=CALL_TIMEOUT)
                conns.append((conn, SegmentBatchMaker(templates, tag, spec.batch_size, offset=offset)))
                continue
            if spec.mode == "postgres":
                kinds = templates_of(templates)
                writers.append(BaselineWriter(spec.target, spec.tenant_id, tag, spec.batch_size, kinds, offset))
                continue
            maker = BatchMaker(templates, tag, spec.batch_size, spec.mode, offset=offset)
            check_batch_bytes(maker, 0)
            makers.append(maker)
            channels.append(_channel(spec.target))
        for ch in channels:
            grpc.channel_ready_future(ch).result(timeout=20)
        ready.put(("ready", proc_index, None))
        if not go.wait(timeout=120):
            raise RuntimeError("never told to start")
        t0 = float(t0_value.value)
        win = Window(t0, t0 + spec.warmup, t0 + spec.warmup + spec.seconds)
        delay = t0 - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        run: Callable[[PhaseSpec, grpc.Channel, BatchMaker, Window], ClientTally] = (
            run_unary if spec.mode == "unary" else run_stream
        )
        out: list[ClientTally] = [ClientTally() for _ in range(threads)]

        def client(i: int) -> None:
            try:
                if writers:
                    out[i] = run_postgres(spec, writers[i], win)
                elif conns:
                    out[i] = run_http(spec, conns[i][0], conns[i][1], win)
                else:
                    out[i] = run(spec, channels[i], makers[i], win)
            except Exception as exc:  # reported, never silent
                out[i].error(exc)

        workers = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=spec.warmup + spec.seconds + 2 * CALL_TIMEOUT)
        total = ClientTally()
        for tally in out:
            total.merge(tally)
        for ch in channels:
            ch.close()
        for writer in writers:
            writer.close()
        for conn, _maker in conns:
            conn.close()
        results.put(("done", proc_index, total))
    except BaseException as exc:
        ready.put(("failed", proc_index, repr(exc)))
        results.put(("failed", proc_index, repr(exc)))


@dataclass
class PhaseResult:
    name: str
    mode: str
    clients: int
    client_procs: int
    tally: ClientTally
    seconds: float
    server_cpu_s: float
    server_cpu_s_inactive: float | None = None
    machine_busy_s: float = 0.0
    machine_total_s: float = 0.0
    client_cpu_s: float = 0.0
    postgres_cpu_s: float = 0.0
    redis_cpu_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def figures(self) -> dict[str, Any]:
        t = self.tally
        lat = sorted(t.latencies)
        events = t.measured_events
        per_k = (lambda cpu: cpu / events * 1000) if events else (lambda cpu: float("nan"))
        cores = len(os.sched_getaffinity(0))
        return {
            "method": {"unary": "IngestEvents", "stream": "StreamEvents", "http": "POST /v1/batch"}.get(
                self.mode, "bare psycopg2 writer"
            ),
            "clients": self.clients,
            "client_processes": self.client_procs,
            "measured_seconds": rounded(self.seconds, 2),
            "events_per_s": rounded(events / self.seconds, 1),
            "batches_per_s": rounded(t.measured_batches / self.seconds, 1),
            "p50_ms": rounded(percentile(lat, 50) * 1000, 2),
            "p99_ms": rounded(percentile(lat, 99) * 1000, 2),
            "max_ms": rounded(lat[-1] * 1000, 2) if lat else None,
            "server_cpu_s_per_1k_events": rounded(per_k(self.server_cpu_s), 4),
            "server_cpu_cores": rounded(self.server_cpu_s / self.seconds, 2),
            "server_cpu_ms_per_batch": rounded(
                self.server_cpu_s / t.measured_batches * 1000 if t.measured_batches else float("nan"), 3
            ),
            "postgres_cpu_s_per_1k_events": rounded(per_k(self.postgres_cpu_s), 4),
            "redis_cpu_s_per_1k_events": rounded(per_k(self.redis_cpu_s), 4),
            "client_cpu_s_per_1k_events": rounded(per_k(self.client_cpu_s), 4),
            "client_cpu_cores": rounded(self.client_cpu_s / self.seconds, 2),
            "machine_cpu_busy_pct": rounded(
                100 * self.machine_busy_s / self.machine_total_s if self.machine_total_s else float("nan"), 1
            ),
            "machine_cores": cores,
            # busy CPU not spent by the server, the clients, postgres or redis: kernel work for them,
            # the benchmark itself, or anything else running on the machine (a contaminated run)
            "other_cpu_cores": rounded(
                (self.machine_busy_s * cores / self.machine_total_s if self.machine_total_s else 0.0)
                - (self.server_cpu_s + self.client_cpu_s + self.postgres_cpu_s + self.redis_cpu_s) / self.seconds,
                2,
            ),
            "client_build_ms_per_batch": rounded(
                t.build_seconds / t.sent_batches * 1000 if t.sent_batches else float("nan"), 4
            ),
            "measured_batches": t.measured_batches,
            "accepted_total": t.accepted,
            "duplicate_total": t.duplicate,
            "rejected_total": t.rejected,
            "refused_batches": t.refused_batches,
            "errors": t.errors,
            "error_samples": t.error_samples,
            **self.extra,
        }


def run_phase(
    spec: PhaseSpec,
    templates: list[bytes],
    *,
    clients: int,
    procs: int,
    server_pid: int | None,
    other_pids: Mapping[str, int] | None = None,
) -> PhaseResult:
    """Start the client processes, let them warm up, measure the window, collect their tallies.
    ``other_pids``: more server processes whose CPU cores over the window are reported by name."""
    others = dict(other_pids or {})
    procs = max(1, min(procs, clients))
    threads = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    ctx = multiprocessing.get_context("spawn")
    ready: Any = ctx.Queue()
    results: Any = ctx.Queue()
    go = ctx.Event()
    t0_value: Any = ctx.Value("d", 0.0)
    workers = [
        ctx.Process(
            target=_worker,
            args=(spec, templates, i, threads[i], ready, go, t0_value, results),
            name=f"bench-client-{i}",
            daemon=True,
        )
        for i in range(procs)
    ]
    try:
        for w in workers:
            w.start()
        deadline = time.monotonic() + 90
        pending = set(range(procs))
        while pending:
            try:
                kind, idx, info = ready.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"client processes {sorted(pending)} never became ready") from None
            if kind == "failed":
                raise RuntimeError(f"client process {idx} failed: {info}")
            pending.discard(idx)
        pg_cpu, redis_cpu = CpuGroup(["postgres"]), CpuGroup(["redis-server"])
        t0 = time.monotonic() + 0.3
        t0_value.value = t0
        go.set()
        m_start = t0 + spec.warmup
        m_end = m_start + spec.seconds
        time.sleep(max(0.0, m_start - time.monotonic()))
        s_cpu0 = proc_cpu(server_pid) if server_pid else 0.0
        o_cpu0 = {name: proc_cpu(pid) for name, pid in others.items()}
        c_cpu0 = sum(proc_cpu(w.pid) for w in workers if w.pid)
        busy0, total0 = machine_busy()
        pg_cpu.start()
        redis_cpu.start()
        time.sleep(max(0.0, m_end - time.monotonic()))
        s_cpu1 = proc_cpu(server_pid) if server_pid else 0.0
        o_cores = {
            f"{name}_cpu_cores": rounded((proc_cpu(pid) - o_cpu0[name]) / spec.seconds, 2)
            for name, pid in others.items()
        }
        c_cpu1 = sum(proc_cpu(w.pid) for w in workers if w.pid)
        busy1, total1 = machine_busy()
        pg_s = pg_cpu.stop()
        redis_s = redis_cpu.stop()
        total = ClientTally()
        got = 0
        collect_deadline = time.monotonic() + 2 * CALL_TIMEOUT + 10
        while got < procs:
            try:
                kind, idx, info = results.get(timeout=max(0.1, collect_deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError("client processes did not report") from None
            if kind == "failed":
                raise RuntimeError(f"client process {idx} failed: {info}")
            total.merge(info)
            got += 1
        for w in workers:
            w.join(timeout=10)
        return PhaseResult(
            name=spec.name,
            mode=spec.mode,
            clients=clients,
            client_procs=procs,
            tally=total,
            seconds=spec.seconds,
            server_cpu_s=s_cpu1 - s_cpu0,
            machine_busy_s=busy1 - busy0,
            machine_total_s=total1 - total0,
            client_cpu_s=c_cpu1 - c_cpu0,
            postgres_cpu_s=pg_s,
            redis_cpu_s=redis_s,
            extra=({"stream_window": spec.window} if spec.mode == "stream" else {}) | o_cores,
        )
    finally:
        for w in workers:
            if w.is_alive():
                w.terminate()
        for w in workers:
            with contextlib.suppress(Exception):
                w.join(timeout=5)
            if w.is_alive():
                w.kill()
        for q in (ready, results):
            q.close()
            q.cancel_join_thread()
