"""How far behind each consumer group is: the gauge ``tessera.bus.consumer_pending``.

A histogram of the age of each batch (``tessera.bus.consumer_lag``) only moves while a group
consumes; a group that is stuck or gone shows here, as entries waiting. The numbers come from
``XINFO GROUPS`` on every tenant's stream the process's consumers read, summed per stream and
group (tenant ids never become labels: their number is unbounded), and are measured at most once
per :data:`REFRESH_SECONDS` however often the exporters collect: one pipelined command per tenant
stream, on the collector's thread, never on a consumer's.

Every replica reports the same numbers (they belong to the group, not the process): aggregate
with ``max``, not ``sum``.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from opentelemetry.metrics import CallbackOptions, Observation

from services.core.telemetry import meter

if TYPE_CHECKING:
    from services.core.bus import Consumer

log = logging.getLogger(__name__)

#: The longest a measurement is reused; collections in between answer the last one.
REFRESH_SECONDS = 10.0
#: Commands per pipeline round trip (a deployment may have thousands of tenants).
CHUNK = 500
#: The ``state`` attribute: not yet delivered to any consumer of the group, or delivered and
#: not yet acknowledged (in a consumer's hands, or left by a dead one until it is reclaimed).
UNDELIVERED = "undelivered"
UNACKNOWLEDGED = "unacknowledged"

_watched: dict[int, weakref.ref[Consumer[Any]]] = {}
_lock = threading.Lock()
_last: tuple[float, list[Observation]] = (float("-inf"), [])


def watch(consumer: Consumer[Any]) -> None:
    """Count ``consumer``'s group in the gauge for as long as the consumer exists."""
    key = id(consumer)
    with _lock:
        _watched[key] = weakref.ref(consumer, lambda _ref: _watched.pop(key, None))


def measure() -> list[Observation]:
    """The entries each watched (stream, group) has not yet acknowledged, by state, now."""
    groups: dict[tuple[str, str, str], tuple[Any, set[str]]] = {}
    with _lock:
        consumers = [c for ref in list(_watched.values()) if (c := ref()) is not None]
    for c in consumers:
        found = groups.setdefault((c.bus.prefix, c.stream.name, c.group), (c.bus.redis, set()))
        found[1].update(c.bus.key(t, c.stream.name) for t in tuple(c._known))  # the tenants it reads
    out: list[Observation] = []
    for (_prefix, stream, group), (client, stream_keys) in groups.items():
        try:
            undelivered, unacknowledged = _sum(client, group, sorted(stream_keys))
        except Exception:  # Redis away: no figure rather than a wrong one
            log.debug("consumer backlog not measured", extra={"stream": stream, "group": group}, exc_info=True)
            continue
        attrs = {"stream": stream, "group": group}
        out.append(Observation(undelivered, {**attrs, "state": UNDELIVERED}))
        out.append(Observation(unacknowledged, {**attrs, "state": UNACKNOWLEDGED}))
    return out


def _sum(client: Any, group: str, keys: list[str]) -> tuple[int, int]:
    """(undelivered, unacknowledged) over ``keys``. A stream whose ``lag`` Redis cannot tell
    (after deletions in its middle, as an erasure makes) counts no undelivered entries until its
    group has read past them."""
    undelivered = unacknowledged = 0
    name = group.encode()
    for start in range(0, len(keys), CHUNK):
        pipe = client.pipeline(transaction=False)
        for key in keys[start : start + CHUNK]:
            pipe.xinfo_groups(key)
        for reply in pipe.execute(raise_on_error=False):
            if isinstance(reply, Exception):
                continue  # a stream that is gone (erased tenant): nothing waits there
            for info in reply:
                if info.get("name") in (name, group):
                    unacknowledged += int(info.get("pending") or 0)
                    undelivered += int(info.get("lag") or 0)
    return undelivered, unacknowledged


def _observe(_options: CallbackOptions) -> Iterable[Observation]:
    global _last
    now = time.monotonic()
    at, values = _last
    if now - at >= REFRESH_SECONDS:
        values = measure()
        _last = (now, values)
    return values


meter.create_observable_gauge(
    "tessera.bus.consumer_pending",
    [_observe],
    unit="{message}",
    description="entries a consumer group has not acknowledged, by stream, group and state (undelivered, "
    "unacknowledged), summed over tenants",
)
