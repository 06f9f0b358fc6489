"""A lean asyncio Redis connection for hot read paths served on the event loop.

``redis.asyncio`` costs about 100 µs of CPU per command in this Python (connection pool,
retry wrapper, tracing hooks, stream reader), which is most of a cached read's budget.
This is one pipelined connection per process: commands are packed by ``hiredis``, written
without waiting, and answered in order from a ``hiredis.Reader`` fed by an ``asyncio.Protocol``.
No pool, no retries, no spans: a caller that gets ``RedisUnavailable`` falls back to its slow,
authoritative path. Commands that write or block belong on the ordinary client.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import ssl
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import hiredis


class RedisUnavailable(Exception):
    """The hot connection could not answer (down, timed out, or an error reply)."""


class RedisReplyError(RedisUnavailable):
    """Redis answered with an error; ``code`` is its first word (``NOSCRIPT``, ``WRONGTYPE``…)."""

    def __init__(self, code: str) -> None:
        super().__init__(f"Redis error: {code}")
        self.code = code


class _Protocol(asyncio.Protocol):
    """Replies come in request order: each one answers the oldest waiting future. One timer per
    connection (not per command) watches the oldest: past the timeout, the connection is done."""

    def __init__(self, owner: HotRedis) -> None:
        self.owner = owner
        self.reader = hiredis.Reader()
        self.waiting: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        # Commands of one loop iteration (concurrent requests) go out in one write.
        self.outgoing: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send(self, packed: bytes, fut: asyncio.Future[Any], loop: asyncio.AbstractEventLoop) -> None:
        self.waiting.append((fut, loop.time()))
        if self.timer is None:
            self.timer = loop.call_later(self.owner.timeout, self._check, loop)
        if not self.outgoing:
            loop.call_soon(self._flush)
        self.outgoing.append(packed)

    def _flush(self) -> None:
        out, self.outgoing = self.outgoing, []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _check(self, loop: asyncio.AbstractEventLoop) -> None:
        self.timer = None
        if not self.waiting:
            return
        age = loop.time() - self.waiting[0][1]
        if age < self.owner.timeout:
            self.timer = loop.call_later(self.owner.timeout - age, self._check, loop)
            return
        # The replies are now out of step with the futures: this connection is done.
        self._fail(RedisUnavailable(f"Redis did not answer within {self.owner.timeout * 1000:.0f} ms"))
        if self.transport is not None:
            self.transport.close()
        self.owner._lost(self)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while self.waiting:
            reply = self.reader.gets()
            if reply is False:
                return
            fut, _ = self.waiting.popleft()
            if not fut.done():
                fut.set_result(reply)

    def _fail(self, exc: Exception) -> None:
        while self.waiting:
            fut, _ = self.waiting.popleft()
            if not fut.done():
                fut.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._lost(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._fail(RedisUnavailable("connection to Redis lost"))


class HotRedis:
    """``await call(...)`` and ``await evalsha(script, ...)`` on one shared connection."""

    def __init__(self, url: str, *, timeout: float = 0.5, connect_timeout: float = 1.0) -> None:
        parts = urlparse(url)
        query = parse_qs(parts.query)
        self.socket_path = parts.path if parts.scheme == "unix" else None  # unix:///path?db=0
        self.host = parts.hostname or "localhost"
        self.port = parts.port or 6379
        db = query["db"][0] if "db" in query else ("0" if self.socket_path else parts.path.lstrip("/") or "0")
        self.db = int(db)
        self.username = unquote(parts.username) if parts.username else None
        password = parts.password or (query["password"][0] if "password" in query else None)
        self.password = unquote(password) if password else None
        self.tls = parts.scheme == "rediss"
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None
        self._loaded: set[str] = set()
        self._digests: dict[str, str] = {}

    def __repr__(self) -> str:  # never the password
        return f"HotRedis({self.socket_path or f'{self.host}:{self.port}'}/{self.db})"

    async def _connection(self) -> _Protocol:
        if self._proto is not None:
            return self._proto
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._proto is not None:
                return self._proto
            loop = asyncio.get_running_loop()
            context = ssl.create_default_context() if self.tls else None
            if self.socket_path is not None:
                connecting = loop.create_unix_connection(lambda: _Protocol(self), self.socket_path)
            else:
                connecting = loop.create_connection(lambda: _Protocol(self), self.host, self.port, ssl=context)
            try:
                _, proto = await asyncio.wait_for(connecting, self.connect_timeout)
            except (OSError, TimeoutError) as exc:
                raise RedisUnavailable(f"cannot connect to Redis: {type(exc).__name__}") from None
            setup: list[tuple[Any, ...]] = []
            if self.password is not None:
                setup.append(
                    ("AUTH", self.password) if self.username is None else ("AUTH", self.username, self.password)
                )
            if self.db:
                setup.append(("SELECT", self.db))
            self._proto = proto
            self._loaded.clear()
            for args in setup:
                try:
                    await self._send(proto, args)
                except RedisUnavailable:
                    self.close()
                    raise
            return proto

    def _lost(self, proto: _Protocol) -> None:
        if self._proto is proto:
            self._proto = None

    async def _send(self, proto: _Protocol, args: tuple[Any, ...]) -> Any:
        if proto.transport is None or proto.transport.is_closing():
            self._lost(proto)
            raise RedisUnavailable("connection to Redis closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        proto.send(hiredis.pack_command(args), fut, loop)
        reply = await fut
        if isinstance(reply, hiredis.ReplyError):
            raise RedisReplyError(str(reply).split(" ", 1)[0])
        return reply

    async def call(self, *args: Any) -> Any:
        return await self._send(await self._connection(), args)

    async def evalsha(self, script: str, keys: tuple[Any, ...] = (), args: tuple[Any, ...] = ()) -> Any:
        """Run a Lua script by its digest, loading it once per connection if Redis lacks it."""
        sha = self._digests.get(script)
        if sha is None:
            sha = self._digests[script] = hashlib.sha1(script.encode()).hexdigest()  # noqa: S324 - Redis's name
        proto = await self._connection()
        for _ in range(2):
            if sha not in self._loaded:
                await self._send(proto, ("SCRIPT", "LOAD", script))
                self._loaded.add(sha)
            try:
                return await self._send(proto, ("EVALSHA", sha, len(keys), *keys, *args))
            except RedisReplyError as err:
                if err.code != "NOSCRIPT":
                    raise
                self._loaded.discard(sha)  # the scripts were flushed: load it again, once
        raise RedisReplyError("NOSCRIPT")

    def close(self) -> None:
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()
        self._proto = None
