"""Per-tenant token buckets in Redis: one atomic Lua call per request, shared by all replicas."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis

log = logging.getLogger(__name__)

# KEYS[1] bucket; ARGV rate/s, burst, cost. Uses the server clock so replicas agree.
_BUCKET_SCRIPT = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil then tokens = burst; ts = now end
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local allowed = 0
local wait = 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
else
  wait = (cost - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'ts', now)
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 60)
return {allowed, tostring(wait)}
"""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after: float = 0.0


class RateLimiter:
    """Fails open when Redis is unreachable: ingest must keep accepting during an outage."""

    def __init__(self, client: redis.Redis) -> None:
        self._script = client.register_script(_BUCKET_SCRIPT)

    def acquire(self, key: str, cost: float, rate: float, burst: float) -> Decision:
        # A request larger than the bucket could never pass; it costs the whole bucket instead.
        cost = min(cost, burst)
        try:
            allowed, wait = self._script(keys=[key], args=[rate, burst, cost])
        except (redis.ConnectionError, redis.TimeoutError):
            log.warning("rate limiter unavailable; allowing", extra={"bucket": key})
            return Decision(True)
        return Decision(bool(int(allowed)), float(wait))
