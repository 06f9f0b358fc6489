"""Redis Streams between services: per-tenant streams, consumer groups, dead consumers'
messages reclaimed with XAUTOCLAIM, and a dead-letter stream after N failed attempts.

Every key carries a ``{tenant}`` hash tag, so all of one tenant's keys live in one Redis
Cluster slot. Entries are the typed envelopes of :mod:`services.core.streams` (one field,
``m``), which carry their tenant and the W3C ``traceparent`` of their producer, so one trace
runs from ingest to the last consumer.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import redis
from google.protobuf.message import Message
from redis.cluster import RedisCluster

from services.core import backlog, streams
from services.core.streams import ENTRY_FIELD, Stream, UndecodableEntry
from services.core.telemetry import consume_span, extract_context, meter
from tessera.v1 import stream_pb2


def consumer_name() -> str:
    """This process's name in a consumer group: unique per host and process."""
    return f"{socket.gethostname()}-{os.getpid()}"


log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

_dead_lettered = meter.create_counter("tessera.bus.dead_lettered", description="messages moved to dead letters")
_lag = meter.create_histogram(
    "tessera.bus.consumer_lag", unit="s", description="age of the oldest message of each batch when it is handled"
)


# KEYS[1] the stream. ARGV: maxlen, the comma-separated byte lengths of the entries, and the
# entries concatenated. One blob keeps the client's cost per entry near zero; one key per call
# keeps it valid on Redis Cluster.
_XADD_BLOB = """
local blob, pos, ids = ARGV[3], 1, {}
for len in string.gmatch(ARGV[2], '%d+') do
  local n = tonumber(len)
  ids[#ids + 1] = redis.call('XADD', KEYS[1], '*', 'm', string.sub(blob, pos, pos + n - 1))
  pos = pos + n
end
redis.call('XTRIM', KEYS[1], 'MAXLEN', '~', ARGV[1])
return ids
"""
assert ENTRY_FIELD == b"m"  # the field name the script writes


#: A single node or a cluster: both take the same commands for keys of one slot, which is all
#: Tessera sends (every key of a command shares its tenant's hash tag).
RedisClient = redis.Redis | RedisCluster


def is_cluster(client: RedisClient) -> bool:
    """Whether commands go to a Redis Cluster: there a command (and a pipeline's command) may
    name keys of one slot only, and the client does not split multi-key commands in a pipeline."""
    return isinstance(client, RedisCluster)


def connect(url: str, *, cluster: bool = False) -> RedisClient:
    """A client that returns bytes (payloads are protobuf) and fails fast when Redis is gone.
    With ``cluster``, ``url`` names any one node; the client finds the others and follows
    failovers (a command that meets a dead master fails, and the next one finds the new one)."""
    if cluster:
        return RedisCluster.from_url(
            url,
            decode_responses=False,
            socket_timeout=5,
            socket_connect_timeout=2,
            health_check_interval=15,
            retry_on_timeout=False,
        )
    return redis.Redis.from_url(
        url,
        decode_responses=False,
        socket_timeout=5,
        socket_connect_timeout=2,
        health_check_interval=15,
        retry_on_timeout=False,
    )


def tenant_key(prefix: str, tenant_id: str, *parts: str) -> str:
    """``prefix:{tenant}:part...``; the braces make the tenant the Redis Cluster hash tag."""
    return ":".join((prefix, "{" + tenant_id + "}", *parts))


#: How long a publish waits for its replicas (TESSERA_REDIS_WAIT_REPLICAS) before it gives up.
WAIT_REPLICAS_MS = 2000


def dead_letter_name(stream: str) -> str:
    return f"{stream}:dead"


@dataclass
class Delivery(Generic[M]):
    """One entry as a consumer gets it: decoded, its tenant checked against its stream's."""

    tenant_id: str
    key: str
    id: str
    raw: bytes
    envelope: M
    deliveries: int = 1
    #: The traceparent that what this message causes downstream carries instead of its own: the
    #: span handling it, set by :func:`~services.core.telemetry.consume_span` only while tracing
    #: records ("" otherwise: keep :attr:`traceparent`, of the same trace).
    relay: str = ""

    @property
    def traceparent(self) -> str:
        return str(getattr(self.envelope, "traceparent", ""))

    def context(self) -> Any:
        return extract_context(self.traceparent)


@dataclass
class Publication:
    """An encoded envelope to append to a tenant's stream."""

    tenant_id: str
    stream: str
    envelope: bytes


class Bus:
    """Publishing and the stream naming every service shares."""

    def __init__(self, client: RedisClient, prefix: str, maxlen: int = 1_000_000, *, wait_replicas: int = 0) -> None:
        self.redis = client
        self.clustered = is_cluster(client)
        self.wait_replicas = wait_replicas
        self.prefix = prefix
        self.maxlen = maxlen
        self._xadd_blob = client.register_script(_XADD_BLOB)

    def key(self, tenant_id: str, stream: str) -> str:
        return tenant_key(self.prefix, tenant_id, stream)

    def publish(self, items: Sequence[Publication]) -> list[str]:
        """Append everything, one command per tenant and stream; raises if Redis is unreachable.
        Returns the entry ids in the order of ``items``."""
        groups: dict[tuple[str, str], list[int]] = {}
        for n, item in enumerate(items):
            groups.setdefault((item.tenant_id, item.stream), []).append(n)
        ids: list[str] = [""] * len(items)
        for (tenant_id, stream), members in groups.items():
            appended = self.append(tenant_id, stream, [items[n].envelope for n in members])
            for n, stream_id in zip(members, appended, strict=True):
                ids[n] = stream_id
        return ids

    def append(self, tenant_id: str, stream: str, envelopes: Sequence[bytes]) -> list[str]:
        """Add one entry per envelope to one stream, in a single command.

        The client-side cost of a command, not Redis, is what limits a Python publisher;
        sending the entries as one blob makes 100 entries cost about as much as one.
        """
        if not envelopes:
            return []
        args: list[bytes | str | int] = [self.maxlen, ",".join(str(len(e)) for e in envelopes), b"".join(envelopes)]
        key = self.key(tenant_id, stream)
        result = self._xadd_blob(keys=[key], args=args)
        if self.wait_replicas:
            self._wait_replicated(key)
        return [i.decode() if isinstance(i, bytes) else str(i) for i in result]  # type: ignore[union-attr]

    def _wait_replicated(self, key: str) -> None:
        """Redis replicates asynchronously: an entry its master acknowledged and then lost in a
        failover would be gone, though the outbox had let go of it. WAIT holds the publish until
        the replicas have it; short of that it raises, so the outbox keeps the rows and retries."""
        command: tuple[object, ...] = ("WAIT", self.wait_replicas, WAIT_REPLICAS_MS)
        if isinstance(self.redis, RedisCluster):
            node = self.redis.get_node_from_key(key)  # type: ignore[no-untyped-call]
            acked = self.redis.execute_command(*command, target_nodes=node)  # type: ignore[no-untyped-call]
        else:
            acked = self.redis.execute_command(*command)  # type: ignore[no-untyped-call]
        if int(acked) < self.wait_replicas:
            raise redis.ConnectionError(f"stream entries reached {acked} of {self.wait_replicas} Redis replicas")

    def ensure_group(self, tenant_id: str, stream: str, group: str) -> None:
        try:
            self.redis.xgroup_create(self.key(tenant_id, stream), group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def dead_letters(self, tenant_id: str, stream: str, count: int = 100) -> list[tuple[str, stream_pb2.DeadLetter]]:
        """(dead-letter entry id, what was given up and why), oldest first."""
        key = self.key(tenant_id, dead_letter_name(stream))
        rows: list[Any] = self.redis.xrange(key, count=count)  # type: ignore[assignment]
        out = []
        for mid, fields in rows:
            letter = stream_pb2.DeadLetter()
            try:
                letter.ParseFromString(fields.get(ENTRY_FIELD, b""))
            except Exception:  # an unreadable dead letter is listed, not fatal
                letter.reason = "unreadable dead letter"
            out.append((_id(mid), letter))
        return out

    def replay_dead_letters(self, tenant_id: str, stream: str, ids: Iterable[str] | None = None) -> int:
        """Put dead letters back on their stream (after a fix) and remove them from the dead letters."""
        wanted = set(ids) if ids is not None else None
        moved = 0
        dead_key = self.key(tenant_id, dead_letter_name(stream))
        for dead_id, letter in self.dead_letters(tenant_id, stream, count=10_000):
            if wanted is not None and dead_id not in wanted:
                continue
            pipe = self.redis.pipeline(transaction=True)
            pipe.xadd(self.key(tenant_id, stream), {ENTRY_FIELD: letter.envelope})
            pipe.xdel(dead_key, dead_id)
            pipe.execute()
            moved += 1
        return moved

    # -- what the right to erasure needs of the streams ----------------------------------------

    def last_id(self, tenant_id: str, stream: str) -> str:
        """The id of the newest entry, "0-0" for an empty or missing stream."""
        rows: list[Any] = self.redis.xrevrange(self.key(tenant_id, stream), count=1)  # type: ignore[assignment]
        return _id(rows[0][0]) if rows else "0-0"

    def caught_up(self, tenant_id: str, stream: str, group: str, mark: str) -> bool:
        """Whether ``group`` has read and acknowledged every entry up to ``mark``."""
        if mark == "0-0":
            return True
        key = self.key(tenant_id, stream)
        try:
            groups: list[dict[Any, Any]] = self.redis.xinfo_groups(key)  # type: ignore[assignment]
        except redis.ResponseError:
            return False
        found = next((g for g in groups if _id(g.get("name", b"")) == group), None)
        if found is None or _stream_id(_id(found["last-delivered-id"])) < _stream_id(mark):
            return False
        pending: dict[Any, Any] = self.redis.xpending(key, group)  # type: ignore[assignment]
        if not pending or not pending.get("pending"):
            return True
        return _stream_id(_id(pending["min"])) > _stream_id(mark)

    def scrub(self, tenant_id: str, stream: str, doomed: Callable[[bytes], bool], chunk: int = 1000) -> int:
        """Delete every entry of the stream (and of its dead letters) whose envelope ``doomed``
        says must go; returns how many. For erasure: a stream holds up to ``maxlen`` entries."""
        deleted = 0
        for key, inner in ((self.key(tenant_id, stream), False), (self.key(tenant_id, dead_letter_name(stream)), True)):
            start = "-"
            while True:
                rows: list[Any] = self.redis.xrange(key, min=start, count=chunk)  # type: ignore[assignment]
                if not rows:
                    break
                hits = []
                for mid, fields in rows:
                    raw = fields.get(ENTRY_FIELD, b"")
                    if inner:
                        letter = stream_pb2.DeadLetter()
                        try:
                            letter.ParseFromString(raw)
                        except Exception:  # noqa: S112 - an unreadable dead letter names no one we can tell
                            continue
                        raw = letter.envelope
                    if doomed(raw):
                        hits.append(mid)
                if hits:
                    deleted += int(self.redis.xdel(key, *hits))  # type: ignore[arg-type]
                if len(rows) < chunk:
                    break
                start = "(" + _id(rows[-1][0])
        return deleted


def _stream_id(text: str) -> tuple[int, int]:
    ms, _, seq = text.partition("-")
    return (int(ms), int(seq or 0))


def _id(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


Handler = Callable[[list[Delivery[M]]], None]


@dataclass
class Consumer(Generic[M]):
    """A consumer-group member that reads every tenant's stream in batches.

    Entries are decoded with the stream's envelope type and checked to belong to the tenant of
    the stream they were read from; one that is not (garbage, or another tenant's) goes to the
    dead letters at once, since no retry could make it valid. The handler gets a batch and must
    apply it idempotently (record message ids in the same transaction as the effect). A failed
    batch is retried message by message, so one poison message cannot hold back its neighbours;
    a message that keeps failing is moved to the dead letters after ``max_attempts`` deliveries.
    """

    bus: Bus
    stream: Stream[M]
    group: str
    name: str
    handler: Handler[M]
    tenants: Callable[[], Iterable[str]]
    batch_size: int = 500
    block_ms: int = 1000
    claim_idle_ms: int = 30_000
    max_attempts: int = 5
    tenant_refresh_seconds: float = 5.0
    _known: set[str] = field(default_factory=set)
    _refreshed: float = 0.0
    _errors: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        backlog.watch(self)  # its group's backlog in tessera.bus.consumer_pending

    def _streams(self) -> dict[str, str]:
        now = time.monotonic()
        if now - self._refreshed > self.tenant_refresh_seconds:
            for tenant in self.tenants():
                if tenant not in self._known:
                    self.bus.ensure_group(tenant, self.stream.name, self.group)
                    self._known.add(tenant)
            self._refreshed = now
        return {self.bus.key(t, self.stream.name): t for t in sorted(self._known)}

    def poll(self) -> int:
        """One cycle: reclaim stale messages, read new ones, handle, ack. Returns messages handled."""
        keys = self._streams()
        if not keys:
            time.sleep(self.block_ms / 1000)
            return 0
        batch = self._reclaim(keys)
        if len(batch) < self.batch_size:
            for key, rows in self._read(keys, block=not batch):
                skey = _id(key)
                for mid, fields in rows:
                    found = self._delivery(keys[skey], skey, _id(mid), fields, 1)
                    if found is not None:
                        batch.append(found)
        if batch:
            self._handle(batch)
        return len(batch)

    def _read(self, keys: dict[str, str], *, block: bool) -> list[Any]:
        """New entries of every stream: one XREADGROUP over all of them on one Redis. On a
        cluster the streams live in different slots, which one command cannot span: each is read
        without blocking in one pipeline (the client sends each node its part), and when none
        had anything the consumer waits a tenth of ``block_ms`` before the next poll."""
        if not self.bus.clustered:
            resp: Any = self.bus.redis.xreadgroup(
                self.group,
                self.name,
                dict.fromkeys(keys, ">"),  # type: ignore[arg-type]
                count=self.batch_size,
                block=self.block_ms if block else None,
            )
            return list(resp or [])
        pipe = self.bus.redis.pipeline(transaction=False)
        share = max(10, self.batch_size // len(keys))
        for key in keys:
            pipe.xreadgroup(self.group, self.name, {key: ">"}, count=share)
        found = [entry for resp in pipe.execute() for entry in resp or [] if entry[1]]
        if not found and block:
            time.sleep(self.block_ms / 10_000)
        return found

    def _delivery(self, tenant: str, key: str, mid: str, fields: dict[bytes, bytes], n: int) -> Delivery[M] | None:
        """The decoded entry, or None after dead-lettering one that can never be applied."""
        raw = fields.get(ENTRY_FIELD, b"")
        try:
            envelope = streams.decode(self.stream, raw, tenant)
        except UndecodableEntry as exc:
            self._errors[mid] = f"UndecodableEntry: {exc}"
            self._dead_letter(tenant, key, mid, raw, n)
            return None
        return Delivery(tenant, key, mid, raw, envelope, n)

    def _reclaim(self, keys: dict[str, str]) -> list[Delivery[M]]:
        out: list[Delivery[M]] = []
        for skey, tenant in keys.items():
            claimed: Any = self.bus.redis.xautoclaim(
                skey, self.group, self.name, self.claim_idle_ms, start_id="0-0", count=self.batch_size
            )
            rows = claimed[1]
            if not rows:
                continue
            ids = [_id(mid) for mid, _ in rows]
            # One XPENDING per id, pipelined: a range query would also return other consumers'
            # in-flight messages between these ids and could leave some of ours uncounted.
            pipe = self.bus.redis.pipeline(transaction=False)
            for mid in ids:
                pipe.xpending_range(skey, self.group, min=mid, max=mid, count=1)
            counts = {
                _id(entry["message_id"]): int(entry["times_delivered"]) for found in pipe.execute() for entry in found
            }
            for mid, fields in rows:
                if fields is None:  # deleted from the stream while pending
                    self.bus.redis.xack(skey, self.group, mid)
                    continue
                n = counts.get(_id(mid), 1)
                if n > self.max_attempts:
                    self._dead_letter(tenant, skey, _id(mid), fields.get(ENTRY_FIELD, b""), n)
                    continue
                found = self._delivery(tenant, skey, _id(mid), fields, n)
                if found is not None:
                    out.append(found)
        return out

    def _handle(self, batch: list[Delivery[M]]) -> None:
        oldest_ms = min(int(m.id.split("-", 1)[0]) for m in batch)
        _lag.record(max(0.0, time.time() - oldest_ms / 1000), {"stream": self.stream.name, "group": self.group})
        with consume_span(self.stream.name, self.group, batch):
            try:
                self.handler(batch)
            except Exception as exc:
                if len(batch) == 1:
                    self._errors[batch[0].id] = f"{type(exc).__name__}: {exc}"[:500]
                    log.warning("message failed", extra={"stream_id": batch[0].id}, exc_info=True)
                    return
                log.warning("batch failed; retrying its messages one by one", exc_info=True)
                for msg in batch:
                    try:
                        self.handler([msg])
                    except Exception as exc:
                        self._errors[msg.id] = f"{type(exc).__name__}: {exc}"[:500]
                        log.warning("message failed", extra={"stream_id": msg.id, "deliveries": msg.deliveries})
                    else:
                        self._ack([msg])
                return
            self._ack(batch)

    def _ack(self, msgs: list[Delivery[M]]) -> None:
        by_key: dict[str, list[str]] = {}
        for m in msgs:
            by_key.setdefault(m.key, []).append(m.id)
            self._errors.pop(m.id, None)
        pipe = self.bus.redis.pipeline(transaction=False)
        for key, ids in by_key.items():
            pipe.xack(key, self.group, *ids)
        pipe.execute()

    def _dead_letter(self, tenant_id: str, key: str, mid: str, raw: bytes, deliveries: int) -> None:
        reason = self._errors.pop(mid, "exceeded max delivery attempts")
        # A reclaim that finds it over the limit is itself a delivery: it does not count as a try.
        attempts = deliveries if reason.startswith("UndecodableEntry") else deliveries - 1
        letter = streams.dead_letter(self.stream.name, self.group, mid, attempts, reason, raw)
        pipe = self.bus.redis.pipeline(transaction=True)
        dead_key = self.bus.key(tenant_id, dead_letter_name(self.stream.name))
        pipe.xadd(dead_key, {ENTRY_FIELD: letter.SerializeToString()})
        pipe.xack(key, self.group, mid)
        pipe.execute()
        _dead_lettered.add(1, {"stream": self.stream.name, "group": self.group})
        log.error("dead-lettered message", extra={"stream_id": mid, "tenant": tenant_id, "reason": reason[:200]})

    def run(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set; Redis outages and unexpected errors are waited out, not fatal
        (what was not acknowledged is redelivered)."""
        backoff = 0.1
        while not stop.is_set():
            try:
                self.poll()
                backoff = 0.1
            except Exception as exc:
                if isinstance(exc, redis.ConnectionError):
                    log.warning("redis unavailable; consumer waiting", extra={"group": self.group})
                else:
                    log.exception("consumer cycle failed; retrying", extra={"group": self.group})
                stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)


class ConsumerWorker:
    """A :class:`Consumer` on its own thread, as a service's background worker: on stop it
    finishes the batch in hand (unacknowledged messages would be redelivered anyway)."""

    def __init__(self, consumer: Consumer[Any]) -> None:
        self.consumer = consumer
        self._stop = threading.Event()
        self._thread = threading.Thread(target=consumer.run, args=(self._stop,), name=f"consumer-{consumer.name}")
        self._thread.daemon = True

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self._stop.set()
        self._thread.join(timeout)
