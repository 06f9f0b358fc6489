"""Upkeep that runs every so often beside a service (partition creation, retention): a thread that
calls a job at an interval, logs a failure and tries again sooner, and stops with the service.

Jobs must be safe to run from every replica at once (they take their own advisory lock)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Periodic:
    def __init__(
        self, name: str, interval_seconds: float, job: Callable[[], object], *, retry_seconds: float = 60.0
    ) -> None:
        self.name = name
        self.interval_seconds = interval_seconds
        self.retry_seconds = min(retry_seconds, interval_seconds)
        self.job = job
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
