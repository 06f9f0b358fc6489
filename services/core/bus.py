"""Redis Streams between services: per-tenant streams, consumer groups, dead consumers'
messages reclaimed with XAUTOCLAIM, and a dead-letter stream after N failed attempts.

Every key carries a ``{tenant}`` hash tag, so all of one tenant's keys live in one Redis
Cluster slot. Every message carries the W3C ``traceparent`` of its producer, so one trace
runs from ingest to the last consumer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
from opentelemetry import trace

from services.core.telemetry import extract_context, inject_traceparent, meter, tracer

log = logging.getLogger(__name__)

EVENTS = "events"
RESOLVED = "resolved"
CHANGES = "changes"

_dead_lettered = meter.create_counter("tessera.bus.dead_lettered", description="messages moved to dead letters")
_lag = meter.create_histogram(
    "tessera.bus.consumer_lag", unit="s", description="age of the oldest message of each batch when it is handled"
)


# KEYS[1] the stream. ARGV: maxlen, row count, then per field: its name, the comma-separated
# byte lengths of its values, and the values concatenated. Columns as blobs keep the client's
# cost per entry near zero; one key per call keeps it valid on Redis Cluster.
_XADD_COLUMNS = """
local maxlen = ARGV[1]
local rows = tonumber(ARGV[2])
local names, values = {}, {}
local f = 0
for i = 3, #ARGV, 3 do
  f = f + 1
  names[f] = ARGV[i]
  local blob, pos, col = ARGV[i + 2], 1, {}
  for len in string.gmatch(ARGV[i + 1], '%d+') do
    local n = tonumber(len)
    col[#col + 1] = string.sub(blob, pos, pos + n - 1)
    pos = pos + n
  end
  values[f] = col
end
local ids = {}
for r = 1, rows do
  local entry = {}
  for k = 1, f do
    entry[#entry + 1] = names[k]
    entry[#entry + 1] = values[k][r]
  end
  ids[r] = redis.call('XADD', KEYS[1], '*', unpack(entry))
end
redis.call('XTRIM', KEYS[1], 'MAXLEN', '~', maxlen)
return ids
"""


def connect(url: str) -> redis.Redis:
    """A client that returns bytes (payloads are protobuf) and fails fast when Redis is gone."""
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


def dead_letter_name(stream: str) -> str:
    return f"{stream}:dead"


@dataclass
class StreamMessage:
    tenant_id: str
    stream: str
    key: str
    id: str
    fields: dict[bytes, bytes]
    deliveries: int = 1

    @property
    def traceparent(self) -> str:
        return self.fields.get(b"traceparent", b"").decode()

    def context(self) -> Any:
        return extract_context(self.traceparent)


@dataclass
class Publication:
    tenant_id: str
    stream: str
    fields: dict[str, bytes | str]
    traceparent: str = ""


class Bus:
    """Publishing and the stream naming every service shares."""

    def __init__(self, client: redis.Redis, prefix: str, maxlen: int = 1_000_000) -> None:
        self.redis = client
        self.prefix = prefix
        self.maxlen = maxlen
        self._xadd_columns = client.register_script(_XADD_COLUMNS)

    def key(self, tenant_id: str, stream: str) -> str:
        return tenant_key(self.prefix, tenant_id, stream)

    def publish(self, items: Sequence[Publication]) -> list[str]:
        """XADD everything; raises if Redis is unreachable. Returns ids in the order of ``items``."""
        if not items:
            return []
        default_tp = inject_traceparent()
        groups: dict[tuple[str, str, tuple[str, ...]], list[int]] = {}
        for n, item in enumerate(items):
            groups.setdefault((item.tenant_id, item.stream, tuple(item.fields)), []).append(n)
        ids: list[str] = [""] * len(items)
        for (tenant_id, stream, names), members in groups.items():
            rows = [(*items[n].fields.values(), items[n].traceparent or default_tp) for n in members]
            for n, stream_id in zip(
                members, self.append(tenant_id, stream, (*names, "traceparent"), rows), strict=True
            ):
                ids[n] = stream_id
        return ids

    def append(
        self, tenant_id: str, stream: str, names: Sequence[str], rows: Sequence[Sequence[bytes | str]]
    ) -> list[str]:
        """Add many entries with the same field names to one stream; see :meth:`append_columns`."""
        columns = [[_as_bytes(row[k]) for row in rows] for k in range(len(names))]
        return self.append_columns(tenant_id, stream, dict(zip(names, columns, strict=True)))

    def append_columns(self, tenant_id: str, stream: str, columns: dict[str, Sequence[bytes]]) -> list[str]:
        """Add one entry per row, given column by column, in a single command.

        The client-side cost of a command, not Redis, is what limits a Python publisher;
        sending each column as one blob makes 100 entries cost about as much as one.
        """
        count = len(next(iter(columns.values()), ()))
        if not count:
            return []
        args: list[Any] = [self.maxlen, count]
        for name, values in columns.items():
            if len(values) != count:
                raise ValueError(f"column {name!r} has {len(values)} values, expected {count}")
            args.extend((name, ",".join(map(str, map(len, values))), b"".join(values)))
        result = self._xadd_columns(keys=[self.key(tenant_id, stream)], args=args)
        return [i.decode() if isinstance(i, bytes) else str(i) for i in result]  # type: ignore[union-attr]

    def ensure_group(self, tenant_id: str, stream: str, group: str) -> None:
        try:
            self.redis.xgroup_create(self.key(tenant_id, stream), group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def dead_letters(self, tenant_id: str, stream: str, count: int = 100) -> list[StreamMessage]:
        key = self.key(tenant_id, dead_letter_name(stream))
        rows: list[Any] = self.redis.xrange(key, count=count)  # type: ignore[assignment]
        return [StreamMessage(tenant_id, dead_letter_name(stream), key, _id(mid), dict(fields)) for mid, fields in rows]

    def replay_dead_letters(self, tenant_id: str, stream: str, ids: Iterable[str] | None = None) -> int:
        """Put dead letters back on their stream (after a fix) and remove them from the dead letters."""
        wanted = set(ids) if ids is not None else None
        moved = 0
        for msg in self.dead_letters(tenant_id, stream, count=10_000):
            if wanted is not None and msg.id not in wanted:
                continue
            fields = {k.decode(): v for k, v in msg.fields.items() if not k.startswith(b"dead_")}
            self.redis.xadd(self.key(tenant_id, stream), fields)  # type: ignore[arg-type]
            self.redis.xdel(msg.key, msg.id)
            moved += 1
        return moved


def _as_bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def _id(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


Handler = Callable[[list[StreamMessage]], None]


@dataclass
class Consumer:
    """A consumer-group member that reads every tenant's stream in batches.

    The handler gets a batch and must apply it idempotently (record message ids in the
    same transaction as the effect). A failed batch is retried message by message, so
    one poison message cannot hold back its neighbours; a message that keeps failing is
    moved to the dead-letter stream after ``max_attempts`` deliveries.
    """

    bus: Bus
    stream: str
    group: str
    name: str
    handler: Handler
    tenants: Callable[[], Iterable[str]]
    batch_size: int = 500
    block_ms: int = 1000
    claim_idle_ms: int = 30_000
    max_attempts: int = 5
    tenant_refresh_seconds: float = 5.0
    _known: set[str] = field(default_factory=set)
    _refreshed: float = 0.0
    _errors: dict[str, str] = field(default_factory=dict)

    def _streams(self) -> dict[str, str]:
        now = time.monotonic()
        if now - self._refreshed > self.tenant_refresh_seconds:
            for tenant in self.tenants():
                if tenant not in self._known:
                    self.bus.ensure_group(tenant, self.stream, self.group)
                    self._known.add(tenant)
            self._refreshed = now
        return {self.bus.key(t, self.stream): t for t in sorted(self._known)}

    def poll(self) -> int:
        """One cycle: reclaim stale messages, read new ones, handle, ack. Returns messages handled."""
        streams = self._streams()
        if not streams:
            time.sleep(self.block_ms / 1000)
            return 0
        batch = self._reclaim(streams)
        if len(batch) < self.batch_size:
            resp: Any = self.bus.redis.xreadgroup(
                self.group,
                self.name,
                dict.fromkeys(streams, ">"),  # type: ignore[arg-type]
                count=self.batch_size,
                block=None if batch else self.block_ms,
            )
            for key, rows in resp or []:
                skey = _id(key)
                for mid, fields in rows:
                    batch.append(StreamMessage(streams[skey], self.stream, skey, _id(mid), dict(fields)))
        if batch:
            self._handle(batch)
        return len(batch)

    def _reclaim(self, streams: dict[str, str]) -> list[StreamMessage]:
        out: list[StreamMessage] = []
        for skey, tenant in streams.items():
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
                msg = StreamMessage(tenant, self.stream, skey, _id(mid), dict(fields), counts.get(_id(mid), 1))
                if msg.deliveries > self.max_attempts:
                    self._dead_letter(msg)
                else:
                    out.append(msg)
        return out

    def _handle(self, batch: list[StreamMessage]) -> None:
        oldest_ms = min(int(m.id.split("-", 1)[0]) for m in batch)
        _lag.record(max(0.0, time.time() - oldest_ms / 1000), {"stream": self.stream, "group": self.group})
        links = [trace.Link(trace.get_current_span(m.context()).get_span_context()) for m in batch[:64]]
        with tracer.start_as_current_span(f"consume {self.stream}", links=links) as span:
            span.set_attribute("messaging.batch.message_count", len(batch))
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
                        log.warning("message failed", extra={"message_id": msg.id, "deliveries": msg.deliveries})
                    else:
                        self._ack([msg])
                return
            self._ack(batch)

    def _ack(self, msgs: list[StreamMessage]) -> None:
        by_key: dict[str, list[str]] = {}
        for m in msgs:
            by_key.setdefault(m.key, []).append(m.id)
            self._errors.pop(m.id, None)
        pipe = self.bus.redis.pipeline(transaction=False)
        for key, ids in by_key.items():
            pipe.xack(key, self.group, *ids)
        pipe.execute()

    def _dead_letter(self, msg: StreamMessage) -> None:
        fields: dict[Any, Any] = dict(msg.fields)
        fields[b"dead_from_id"] = msg.id
        fields[b"dead_group"] = self.group
        fields[b"dead_attempts"] = str(msg.deliveries - 1)  # the claim that found it spent counts as one
        fields[b"dead_reason"] = self._errors.pop(msg.id, "exceeded max delivery attempts")
        pipe = self.bus.redis.pipeline(transaction=True)
        pipe.xadd(self.bus.key(msg.tenant_id, dead_letter_name(self.stream)), fields)
        pipe.xack(msg.key, self.group, msg.id)
        pipe.execute()
        _dead_lettered.add(1, {"stream": self.stream, "group": self.group})
        log.error("dead-lettered message", extra={"stream_id": msg.id, "tenant": msg.tenant_id})

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

    def __init__(self, consumer: Consumer) -> None:
        self.consumer = consumer
        self._stop = threading.Event()
        self._thread = threading.Thread(target=consumer.run, args=(self._stop,), name=f"consumer-{consumer.name}")
        self._thread.daemon = True

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self._stop.set()
        self._thread.join(timeout)
