"""Redis caches of customer contexts and identifier owners, correct across commits and races.

- **Contexts** are stored tagged with the profile's *cache version* as it was read before the
  context was built. The consumer bumps the version after every commit that touches the profile
  (and again on a redelivery), so a context built from data older than a commit never matches
  again: a read after a commit never sees the old context, even if a slow builder stores its
  stale context after the bump.
- **Identifier owners** (normalized identifier -> profile id) are stored only if the tenant's
  *identifier epoch* is still the one read before the database look-up. Every merge, split and
  erasure bumps the epoch and deletes the identifiers it moved, so an owner read before a move
  is never written after it.

The window between a commit and that bump is closed by a *hold*: inside the transaction, just
before it commits, the touched profiles' versions (and, when identifiers move, the epoch) are set
to a pending value (``p…``, expiring after ``hold_seconds``). While a value is pending, look-ups
answer no context and nothing is stored, so reads go to the database, which is right on either
side of the commit. After the commit the bump replaces the pending value; if the writer died in
between, the pending value expires and the keys start afresh.

A version key that is missing (Redis restarted, or never set) is created with a random value,
never a small counter, so a context left over from before the restart cannot match by luck.
All keys of a tenant carry its ``{tenant}`` hash tag; a hit is one round trip (a Lua script).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import redis
from opentelemetry import metrics

from services.core.bus import RedisClient, is_cluster, tenant_key
from services.core.hotredis import HotRedis, RedisUnavailable

SEP: Final = "\x1f"
PENDING: Final = "p"
_meter = metrics.get_meter("tessera.profile")
_lookups = {"hit": 0, "miss": 0}  # counted in-process, read by the metric's callback (no cost per read)


def _observe_lookups(_options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
    return [metrics.Observation(n, {"result": result}) for result, n in _lookups.items()]


_meter.create_observable_counter(
    "tessera.profile.context.cache", [_observe_lookups], description="context look-ups by result (hit, miss)"
)

_LOOKUP = """
local base = ARGV[1]
local pid = ARGV[2]
if pid == '' then
  pid = redis.call('GET', base .. 'idx:' .. ARGV[3])
  if not pid then return {false, false, false, redis.call('GET', base .. 'epoch')} end
end
local ver = redis.call('GET', base .. 'ver:' .. pid)
local ctx = false
if ver and string.sub(ver, 1, 1) ~= 'p' then ctx = redis.call('HGET', base .. 'ctx:' .. pid, ARGV[4]) end
return {pid, ver, ctx, false}
"""

_ENSURE_VERSION = """
local v = redis.call('GET', KEYS[1])
if v then return v end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
"""

_STORE_CONTEXT = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""

_OWN_AND_VERSION = """
local epoch = redis.call('GET', KEYS[2])
if (epoch or '') == ARGV[1] and string.sub(ARGV[1], 1, 1) ~= 'p' then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
end
local v = redis.call('GET', KEYS[3])
if v then return v end
redis.call('SET', KEYS[3], ARGV[4])
return ARGV[4]
"""


def _nonce() -> str:
    return str(secrets.randbelow(2**62) + 2**40)


def pending(value: str | None) -> bool:
    """A version or epoch held by a commit in progress."""
    return value is not None and value.startswith(PENDING)


@dataclass(frozen=True)
class Lookup:
    """What one round trip found: the profile id (when the identifier's owner was cached), its
    cache version, the cached context if it is current, and the identifier epoch on a miss."""

    profile_id: str | None
    version: str | None
    context: bytes | None
    epoch: str | None


class ContextCache:
    """The profile service's keys under ``<prefix>:{tenant}:profile:``."""

    def __init__(
        self,
        client: RedisClient,
        hot: HotRedis | None,
        prefix: str,
        *,
        context_seconds: float = 60.0,
        owner_seconds: float = 600.0,
        hold_seconds: float = 30.0,
    ) -> None:
        self.client = client
        self.clustered = is_cluster(client)
        self.hot = hot
        self.prefix = prefix
        self.context_seconds = context_seconds
        self.owner_seconds = owner_seconds
        self.hold_seconds = hold_seconds
        self._lookup = client.register_script(_LOOKUP)
        self._ensure = client.register_script(_ENSURE_VERSION)
        self._store = client.register_script(_STORE_CONTEXT)
        self._own_and_version = client.register_script(_OWN_AND_VERSION)

    def base(self, tenant_id: str) -> str:
        return tenant_key(self.prefix, tenant_id, "profile") + ":"

    @staticmethod
    def identifier(id_type: str, value: str) -> str:
        return f"{id_type}{SEP}{value}"

    # -- reads ---------------------------------------------------------------------------------

    def _parse(self, raw: Sequence[Any]) -> Lookup:
        pid, ver, ctx, epoch = (None if x is None else x for x in raw)
        context = None
        if ctx is not None and ver is not None:
            tag, _, payload = bytes(ctx).partition(b"|")
            if tag == bytes(ver):
                context = payload
        return Lookup(
            pid.decode() if isinstance(pid, bytes) else pid,
            ver.decode() if isinstance(ver, bytes) else ver,
            context,
            epoch.decode() if isinstance(epoch, bytes) else ("" if epoch is None else str(epoch)),
        )

    def lookup(self, tenant_id: str, variant: str, *, profile_id: str = "", identifier: str = "") -> Lookup:
        base = self.base(tenant_id)
        # The script finds its keys as it goes (an identifier's owner, then its version), all in the
        # tenant's slot; the one named here is what routes the call to that slot's node on a cluster.
        raw = self._lookup(keys=[base + "epoch"], args=[base, profile_id, identifier, variant])
        return self._parse(raw)

    async def alookup(
        self, tenant_id: str, variant: str, *, profile_id: str = "", identifier: str = ""
    ) -> Lookup | None:
        """``lookup`` on the event loop's hot connection; None when it cannot answer (the caller
        takes the database path, which does not need the cache). Without one (a Redis Cluster,
        whose slots live on several nodes) the ordinary client answers, on a worker thread."""
        if self.hot is None:
            try:
                return await asyncio.to_thread(
                    self.lookup, tenant_id, variant, profile_id=profile_id, identifier=identifier
                )
            except redis.RedisError:
                return None
        try:
            raw = await self.hot.evalsha(_LOOKUP, args=(self.base(tenant_id), profile_id, identifier, variant))
        except RedisUnavailable:
            return None
        return self._parse(raw)

    def record(self, hit: bool) -> None:
        _lookups["hit" if hit else "miss"] += 1

    # -- writes by readers ---------------------------------------------------------------------

    def version(self, tenant_id: str, profile_id: str) -> str:
        """The profile's cache version, created at random if it has none."""
        raw = self._ensure(keys=[self.base(tenant_id) + "ver:" + profile_id], args=[_nonce()])
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    def epoch(self, tenant_id: str) -> str:
        raw = self.client.get(self.base(tenant_id) + "epoch")
        return raw.decode() if isinstance(raw, bytes) else ""

    def store_context(
        self, tenant_id: str, profile_id: str, variant: str, version: str, payload: bytes, seconds: float
    ) -> None:
        if pending(version):
            return  # built while a commit was in progress: it may predate it
        self._store(
            keys=[self.base(tenant_id) + "ctx:" + profile_id], args=self._stored(variant, version, payload, seconds)
        )

    @staticmethod
    def _stored(variant: str, version: str, payload: bytes, seconds: float) -> list[Any]:
        """``_STORE_CONTEXT``'s arguments: the variant, the version-tagged context, its lifetime."""
        return [variant, version.encode() + b"|" + payload, max(int(seconds), 1)]

    async def astore_context(
        self, tenant_id: str, profile_id: str, variant: str, version: str, payload: bytes, seconds: float
    ) -> None:
        """``store_context`` on the event loop's hot connection; skipped when it cannot answer
        (the next read is a miss, nothing worse)."""
        if pending(version):
            return
        if self.hot is None:
            with contextlib.suppress(redis.RedisError):
                await asyncio.to_thread(self.store_context, tenant_id, profile_id, variant, version, payload, seconds)
            return
        try:
            await self.hot.evalsha(
                _STORE_CONTEXT,
                keys=(self.base(tenant_id) + "ctx:" + profile_id,),
                args=tuple(self._stored(variant, version, payload, seconds)),
            )
        except RedisUnavailable:
            return

    def own_and_version(self, tenant_id: str, identifier: str, profile_id: str, epoch: str) -> str:
        """Caches ``identifier``'s owner if the epoch is still ``epoch`` (read before the database
        look-up, and no move pending), and returns the owner's cache version (made if missing)."""
        base = self.base(tenant_id)
        raw = self._own_and_version(
            keys=[base + "idx:" + identifier, base + "epoch", base + "ver:" + profile_id],
            args=[epoch, profile_id, int(self.owner_seconds), _nonce()],
        )
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    # -- writes by the consumer (around its commit) ----------------------------------------

    def hold(self, tenant_id: str, profile_ids: Sequence[str], moved: Sequence[tuple[str, str]] = ()) -> None:
        """Before a commit: the profiles' versions (and the epoch, if identifiers move) are pending,
        so until ``invalidate`` runs nothing cached is answered for them and nothing is stored."""
        base = self.base(tenant_id)
        ttl = max(int(self.hold_seconds), 1)
        pipe = self.client.pipeline(transaction=False)
        for p in sorted(set(profile_ids)):
            pipe.set(base + "ver:" + p, PENDING + _nonce(), ex=ttl)
        if moved:
            pipe.set(base + "epoch", PENDING + _nonce(), ex=ttl)
            self._delete(pipe, [base + "idx:" + self.identifier(t, v) for t, v in moved])
        pipe.execute()

    def invalidate(
        self, tenant_id: str, profile_ids: Iterable[str], moved: Iterable[tuple[str, str]] = (), *, forget: bool = False
    ) -> None:
        """After a commit: every touched profile's version moves on (to a fresh random value, ending
        any hold); moved identifiers are forgotten and the epoch moves on. ``forget`` (an erasure)
        also deletes the profiles' keys."""
        base = self.base(tenant_id)
        ids = sorted(set(profile_ids))
        moved = list(moved)
        if not ids and not moved:
            return
        pipe = self.client.pipeline(transaction=False)
        if ids and self.clustered:
            for p in ids:
                pipe.set(base + "ver:" + p, _nonce())
        elif ids:
            pipe.mset({base + "ver:" + p: _nonce() for p in ids})
        if moved:
            pipe.set(base + "epoch", _nonce())
            self._delete(pipe, [base + "idx:" + self.identifier(t, v) for t, v in moved])
        if forget and ids:
            self._delete(pipe, [base + "ctx:" + p for p in ids])
        pipe.execute()

    def _delete(self, pipe: Any, keys: list[str]) -> None:
        """One DEL for all the keys; a cluster pipeline takes one key per command (they share a
        slot, but the client does not split multi-key commands inside a pipeline)."""
        if self.clustered:
            for key in keys:
                pipe.delete(key)
        else:
            pipe.delete(*keys)
