"""A gateway served in the test process: on its own event loop in a thread, on a free port, in
front of real services (the tests that need it as a process use ``tessera serve gateway``)."""

from __future__ import annotations

import asyncio
import threading

from services.core.settings import Settings
from services.gateway.app import Running, start
from services.gateway.settings import GatewaySettings


class Served:
    def __init__(self, settings: Settings, own: GatewaySettings, keepalive_seconds: float | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.running: Running = asyncio.run_coroutine_threadsafe(start(settings, own, port=0), self.loop).result(10)
        self.url = f"http://127.0.0.1:{self.running.port}"
        if keepalive_seconds is not None:
            # A stream notices a gone client when it next writes; tests need not wait 15 s for it.
            api = self.running.gateway.json_api
            assert api is not None
            api.keepalive_seconds = keepalive_seconds

    @property
    def open_streams(self) -> int:
        api = self.running.gateway.json_api
        assert api is not None
        return len(api.open_streams)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.running.drain(0.0), self.loop).result(15)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def local(ingest: int, profile: int | None = None, metrics: int | None = None, **extra: object) -> GatewaySettings:
    """The gateway's settings for services on these local ports."""
    addresses = {"ingest_address": f"127.0.0.1:{ingest}"}
    if profile is not None:
        addresses["profile_address"] = f"127.0.0.1:{profile}"
    if metrics is not None:
        addresses["metrics_address"] = f"127.0.0.1:{metrics}"
    return GatewaySettings(**addresses, **extra)  # type: ignore[arg-type]
