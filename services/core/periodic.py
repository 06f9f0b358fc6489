"""Upkeep that runs every so often beside a service (partition creation, retention): a thread that
calls a job at an interval, logs a failure and tries again sooner, and stops with the service.

Given a ``leader``, the job is singleton work: it runs only while this process leads (see
:mod:`services.core.leader`), and a follower waits for leadership instead. Jobs must still be safe
to run from two replicas at once (they take their own advisory lock): two leaders may briefly
overlap, and a job already running when leadership is lost is not interrupted."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from services.core.leader import Leader

log = logging.getLogger(__name__)

#: How long a follower's job waits for leadership before it looks at its stop flag again.
FOLLOWER_WAIT_SECONDS = 0.5


class Periodic:
    def __init__(
        self,
        name: str,
        interval_seconds: float,
        job: Callable[[], object],
        *,
        retry_seconds: float = 60.0,
        leader: Leader | None = None,
    ) -> None:
        self.name = name
        self.interval_seconds = interval_seconds
        self.retry_seconds = min(retry_seconds, interval_seconds)
        self.job = job
        self.leader = leader
        self.runs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"periodic {name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        wait = 0.0
        while not self._stop.wait(wait):
            if self.leader is not None and not self.leader.is_leader():
                # A new leader runs the job at once: its predecessor's last run may be long ago.
                self.leader.wait_leading(FOLLOWER_WAIT_SECONDS)
                wait = 0.0
                continue
            try:
                result = self.job()
            except Exception:
                log.warning("%s failed; will retry", self.name, exc_info=True)
                wait = self.retry_seconds
                continue
            self.runs += 1
            if result:
                log.info("%s done", self.name, extra={"result": result})
            wait = self.interval_seconds
