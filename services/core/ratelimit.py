"""Per-tenant token buckets in Redis, shared by all replicas.

Each process takes tokens from Redis a slice at a time (up to 50 ms of the tenant's rate)
and spends them locally, so most requests cost no Redis round trip; a slice not spent
within a second is dropped, so a replica never sits on another's share for long.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import redis

from services.core.bus import RedisClient

log = logging.getLogger(__name__)

# KEYS[1] bucket; ARGV rate/s, burst, need (at least), want (at most), charge (what the request
# really costs). Grants between need and want tokens, or none; when the charge is more than the
# bucket can hold (a batch larger than the burst), a full bucket grants it and goes into debt, so
# the tenant's long-run rate is what it sent. Uses the server clock so replicas agree.
_BUCKET_SCRIPT = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local need = tonumber(ARGV[3])
local want = tonumber(ARGV[4])
local charge = tonumber(ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil then tokens = burst; ts = now end
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local granted = 0
local wait = 0
if tokens >= need then
  granted = math.max(math.min(tokens, want), charge)
  tokens = tokens - granted
else
  wait = (need - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'ts', now)
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 60)
return {tostring(granted), tostring(wait)}
"""

SLICE_SECONDS = 0.05
SLICE_TTL_SECONDS = 1.0


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after: float = 0.0


class RateLimiter:
    """Fails open when Redis is unreachable: ingest must keep accepting during an outage."""

    def __init__(self, client: RedisClient) -> None:
        self._script = client.register_script(_BUCKET_SCRIPT)
        self._local: dict[str, tuple[float, float]] = {}  # key -> (tokens, expires at)
        self._lock = threading.Lock()

    def acquire(self, key: str, cost: float, rate: float, burst: float) -> Decision:
        """Take ``cost`` tokens. A request larger than the bucket waits for a full bucket and then
        costs what it is (the bucket goes into debt): it could otherwise never pass, and charging
        only the burst let a tenant send far more than its rate in large batches."""
        now = time.monotonic()
        with self._lock:
            tokens, expires = self._local.get(key, (0.0, 0.0))
            if expires > now and tokens >= cost:
                self._local[key] = (tokens - cost, expires)
                return Decision(True)
        want = max(cost, min(rate * SLICE_SECONDS, burst / 4))
        need = min(cost, burst)
        try:
            granted_raw, wait = self._script(keys=[key], args=[rate, burst, need, want, cost])
        except (redis.ConnectionError, redis.TimeoutError):
            log.warning("rate limiter unavailable; allowing", extra={"bucket": key})
            return Decision(True)
        granted = float(granted_raw)
        if granted < cost:
            return Decision(False, float(wait))
        with self._lock:
            left, expires = self._local.get(key, (0.0, 0.0))
            self._local[key] = ((left if expires > now else 0.0) + granted - cost, now + SLICE_TTL_SECONDS)
        return Decision(True)
