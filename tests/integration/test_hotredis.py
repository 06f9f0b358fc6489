"""The hot Redis connection (``services.core.hotredis``) against a real Redis: answers in order
under concurrency, runs scripts even after they are flushed, and turns a dead or silent Redis
into ``RedisUnavailable`` within its timeout, then reconnects once Redis is back."""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

import pytest
import redis

from services.core.hotredis import HotRedis, RedisReplyError, RedisUnavailable
from tests.support.proxy import CuttableProxy

pytestmark = [pytest.mark.integration]

SCRIPT = "return {ARGV[1], redis.call('GET', ARGV[2])}"


def _target(url: str) -> tuple[str, int] | str:
    parts = urlsplit(url)
    return parts.path if parts.scheme == "unix" else (parts.hostname or "127.0.0.1", parts.port or 6379)


def test_many_concurrent_calls_each_get_their_own_answer(
    redis_server_url: str, redis_client: redis.Redis, redis_prefix: str
) -> None:
    keys = [f"{redis_prefix}:hot:{i}" for i in range(300)]
    redis_client.mset({k: f"v{i}" for i, k in enumerate(keys)})

    async def run() -> list[bytes]:
        hot = HotRedis(redis_server_url)
        try:
            return list(await asyncio.gather(*(hot.call("GET", k) for k in keys)))
        finally:
            hot.close()

    try:
        assert asyncio.run(run()) == [f"v{i}".encode() for i in range(300)]
    finally:
        redis_client.delete(*keys)


def test_scripts_run_by_digest_and_survive_a_script_flush(
    redis_server_url: str, redis_client: redis.Redis, redis_prefix: str
) -> None:
    key = f"{redis_prefix}:hot:script"
    redis_client.set(key, b"there")

    async def run() -> tuple[object, object, object]:
        hot = HotRedis(redis_server_url)
        try:
            first = await hot.evalsha(SCRIPT, args=("hello", key))
            redis_client.script_flush()  # as a Redis restart without losing the connection would
            again = await hot.evalsha(SCRIPT, args=("again", key))
            try:
                await hot.call("HGET", key, "field")  # a string, not a hash
                wrong: object = None
            except RedisReplyError as err:
                wrong = err.code
            return first, again, wrong
        finally:
            hot.close()

    try:
        assert asyncio.run(run()) == ([b"hello", b"there"], [b"again", b"there"], "WRONGTYPE")
    finally:
        redis_client.delete(key)


def test_a_dead_redis_is_unavailable_at_once_and_the_connection_comes_back(redis_server_url: str) -> None:
    proxy = CuttableProxy(_target(redis_server_url))

    async def run() -> tuple[object, float, object]:
        hot = HotRedis(f"redis://127.0.0.1:{proxy.port}/0", timeout=0.5, connect_timeout=0.5)
        try:
            before = await hot.call("PING")
            proxy.cut()
            await asyncio.sleep(0.05)
            t0 = time.monotonic()
            with pytest.raises(RedisUnavailable):
                await hot.call("PING")
            with pytest.raises(RedisUnavailable):
                await hot.call("PING")  # no connection can be made while it is cut
            took = time.monotonic() - t0
            proxy.restore()
            return before, took, await hot.call("PING")
        finally:
            hot.close()

    try:
        before, took, after = asyncio.run(run())
    finally:
        proxy.close()
    assert before == after == b"PONG"
    assert took < 1.5


def test_a_silent_redis_times_out_and_later_answers_are_not_misattributed(
    redis_server_url: str, redis_client: redis.Redis, redis_prefix: str
) -> None:
    key = f"{redis_prefix}:hot:slow"
    redis_client.set(key, b"mine")

    async def run() -> tuple[float, object]:
        hot = HotRedis(redis_server_url, timeout=0.2)
        other = redis.Redis.from_url(redis_server_url)
        try:
            await hot.call("PING")
            # CLIENT PAUSE stalls every client's commands: this one cannot be answered in time.
            other.client_pause(600, all=True)
            t0 = time.monotonic()
            with pytest.raises(RedisUnavailable):
                await hot.call("GET", key)
            took = time.monotonic() - t0
            await asyncio.sleep(0.6)  # the paused reply arrives on a connection that was closed
            return took, await hot.call("GET", key)
        finally:
            hot.close()
            other.close()

    try:
        took, value = asyncio.run(run())
    finally:
        redis_client.delete(key)
    assert 0.15 < took < 0.6
    assert value == b"mine"


def test_the_password_is_never_in_its_repr() -> None:
    hot = HotRedis("redis://user:s3cret-pass@127.0.0.1:6390/2")
    assert "s3cret" not in repr(hot) and (hot.username, hot.password, hot.db) == ("user", "s3cret-pass", 2)
    sock = HotRedis("unix:///tmp/r.sock?db=3&password=pw")
    assert (sock.socket_path, sock.db, sock.password) == ("/tmp/r.sock", 3, "pw")
