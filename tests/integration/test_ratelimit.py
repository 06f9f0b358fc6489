"""Per-tenant token buckets on a real Redis: what a tenant sends is what it is charged."""

from __future__ import annotations

import secrets

import pytest
import redis

from services.core.ratelimit import RateLimiter

pytestmark = pytest.mark.integration


def bucket(redis_prefix: str) -> str:
    return f"{redis_prefix}:{{rl-{secrets.token_hex(4)}}}:ratelimit:ingest"


def test_a_batch_larger_than_the_burst_is_charged_in_full(redis_client: redis.Redis, redis_prefix: str) -> None:
    """It used to cost only the burst: a tenant limited to 100 events/s sent 249/s in 500-event batches."""
    limiter, key = RateLimiter(redis_client), bucket(redis_prefix)
    assert limiter.acquire(key, 500, rate=100, burst=100).allowed  # a full bucket lets it through...
    refused = limiter.acquire(key, 1, rate=100, burst=100)
    assert not refused.allowed  # ...and leaves 400 events of debt: 4 s at 100/s
    assert 3.9 <= refused.retry_after <= 4.2


def test_within_the_rate_nothing_is_refused(redis_client: redis.Redis, redis_prefix: str) -> None:
    # A slow rate, so the bucket cannot refill meanwhile on a busy machine (at 1,000/s, 50 ms of
    # scheduling delay between the calls refilled it and the over-ask got through).
    limiter, key = RateLimiter(redis_client), bucket(redis_prefix)
    assert all(limiter.acquire(key, 10, rate=10, burst=100).allowed for _ in range(10))
    over = limiter.acquire(key, 50, rate=10, burst=100)
    assert not over.allowed and 4.0 < over.retry_after <= 5.0  # 50 short at 10/s, less what refilled


def test_redis_down_fails_open() -> None:
    down = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    assert RateLimiter(down).acquire("x:{t}:ratelimit:ingest", 10, rate=1, burst=1).allowed
