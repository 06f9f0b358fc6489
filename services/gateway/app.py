"""The gateway as ``tessera serve gateway`` runs it: an aiohttp server for the Segment tracking API
and the JSON API (:mod:`services.gateway.api`), stateless, talking to the services over gRPC like
any other client.

It is HTTP, not a gRPC :class:`~services.core.server.ServiceDefinition`, so its definition carries
``http = True`` and its own :meth:`GatewayDefinition.serve`; the composition root asks for that."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import signal
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from aiohttp import web

from services.core.channels import service_aio_channel
from services.core.settings import Settings
from services.core.telemetry import configure_logging
from services.gateway import api, segment
from services.gateway.credentials import api_key
from services.gateway.settings import GatewaySettings
from services.gateway.statuses import HttpError, from_rpc_error
from tessera.v1 import ingest_pb2, ingest_pb2_grpc

log = logging.getLogger(__name__)

#: Segment's documented limits: 32 KB a call, 500 KB a batch.
SINGLE_LIMIT = 32 * 1024
BATCH_LIMIT = 500 * 1024
KINDS = ("track", "identify", "page", "screen", "group", "alias")


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(body, status=status, headers=headers)


#: Segment's SDKs log an error body's ``code`` and ``message``.
_CODES = {400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 413: "payload_too_large",
          415: "unsupported_encoding", 429: "rate_limited", 500: "internal", 503: "unavailable"}  # fmt: skip


def _error(err: HttpError) -> web.Response:
    headers = {"Retry-After": str(err.retry_after)} if err.retry_after is not None else None
    if err.status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": 'Basic realm="tessera"'}
    code = _CODES.get(err.status, "error")
    return _json(err.status, {"success": False, "code": code, "message": err.message, "error": err.message}, headers)


def _inflate(raw: bytes, limit: int) -> bytes:
    """A gzip body (rudder-sdk-python sends one), never inflated past ``limit``."""
    inflater = zlib.decompressobj(wbits=47)
    try:
        out = inflater.decompress(raw, limit + 1)
    except zlib.error:
        raise HttpError(400, "the body is not valid gzip") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise HttpError(413, f"the body is larger than {limit} bytes")
    return out


def decode(raw: bytes, limit: int, encoding: str) -> Any:
    """The request's JSON, or an :class:`HttpError` saying what is wrong with it."""
    if encoding.strip().lower() == "gzip":
        raw = _inflate(raw, limit)
    elif encoding.strip() not in ("", "identity"):
        raise HttpError(415, f"unsupported Content-Encoding {encoding!r}")
    if len(raw) > limit:
        raise HttpError(413, f"the body is larger than {limit} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise HttpError(400, f"the body is not valid UTF-8 (byte {err.start})") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise HttpError(400, f"the JSON nests deeper than {segment.MAX_DEPTH} levels") from None
    except ValueError as err:
        raise HttpError(400, f"the body is not valid JSON: {err}") from None


@dataclass
class Gateway:
    """The HTTP handlers and the one gRPC channel to ingest they share."""

    settings: Settings
    own: GatewaySettings
    draining: bool = False
    _channel: grpc.aio.Channel | None = None
    _ingest: ingest_pb2_grpc.IngestServiceStub | None = field(default=None, repr=False)
    json_api: api.JsonApi | None = field(default=None, repr=False)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=BATCH_LIMIT + 1, middlewares=[self._faults])
        for kind in KINDS:
            app.router.add_post(f"/v1/{kind}", self._single(kind))
        app.router.add_post("/v1/batch", self._batch)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self.json_api = api.install(app, self.settings, self.own, lambda: self.draining)
        app.on_startup.append(self._open)
        app.on_cleanup.append(self._close)
        return app

    async def _open(self, _app: web.Application) -> None:
        self._channel = service_aio_channel(self.own.ingest_address, self.settings)
        self._ingest = ingest_pb2_grpc.IngestServiceStub(self._channel)

    async def _close(self, _app: web.Application) -> None:
        if self._channel is not None:
            await self._channel.close()

    @web.middleware
    async def _faults(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Every domain error becomes its status here; anything unexpected a generic 500, logged."""
        try:
            return await handler(request)
        except HttpError as err:
            return _error(err)
        except web.HTTPRequestEntityTooLarge:
            return _error(HttpError(413, f"the body is larger than {BATCH_LIMIT} bytes"))
        except web.HTTPException:
            raise
        except Exception:
            log.exception("unhandled error on %s", request.path)
            return _error(HttpError(500, "internal error"))

    async def _healthz(self, _request: web.Request) -> web.Response:
        return _json(200, {"status": "alive"})

    async def _readyz(self, _request: web.Request) -> web.Response:
        if self.draining:
            return _json(503, {"status": "draining"})
        return _json(200, {"status": "serving"})

    def _single(self, kind: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            key, body = await self._read(request, SINGLE_LIMIT)
            if not isinstance(body, dict):
                raise HttpError(400, "the body must be a JSON object")
            received = dt.datetime.now(dt.UTC)
            return await self._ingest_mapped(key, segment.map_messages([body], kind, received))

        return handle

    async def _batch(self, request: web.Request) -> web.Response:
        key, body = await self._read(request, BATCH_LIMIT)
        if not isinstance(body, dict) or not isinstance(body.get("batch"), list):
            raise HttpError(400, 'the body must be a JSON object with a "batch" array')
        context = body.get("context")
        if context is not None and not isinstance(context, dict):
            raise HttpError(400, "context must be an object")
        received = dt.datetime.now(dt.UTC)
        try:
            sent_at = segment.parse_time(body.get("sentAt"), "sentAt")
        except segment.BadField as bad:
            raise HttpError(400, f"{bad.field} {bad.description}") from None
        return await self._ingest_mapped(key, segment.map_messages(body["batch"], None, received, sent_at, context))

    async def _read(self, request: web.Request, limit: int) -> tuple[str, Any]:
        if request.content_length is not None and request.content_length > limit:
            raise HttpError(413, f"the body is larger than {limit} bytes")
        key = api_key(request.headers.get("Authorization"))
        if key is None:
            raise HttpError(401, "missing write key: use HTTP Basic auth with the write key as user name")
        raw = await request.read()
        return key, decode(raw, limit, request.headers.get("Content-Encoding", ""))

    async def _ingest_mapped(self, key: str, mapped: segment.Mapped) -> web.Response:
        violations = list(mapped.violations)
        accepted = 0
        if mapped.events:
            assert self._ingest is not None
            request = ingest_pb2.IngestEventsRequest(events=[ev for _, ev in mapped.events])
            try:
                response = await self._ingest.IngestEvents(
                    request,
                    metadata=(("authorization", f"Bearer {key}"),),
                    timeout=self.own.ingest_deadline_seconds,
                )
            except grpc.aio.AioRpcError as err:
                raise from_rpc_error(err) from None
            for result in response.results:
                index = mapped.events[result.index][0]
                if result.status == ingest_pb2.EVENT_STATUS_REJECTED:
                    for v in result.violations or [None]:
                        where = segment.ingest_field(v.field) if v is not None else ""
                        why = v.description if v is not None else "rejected by ingest"
                        violations.append(segment.Violation(index, where, why))
                else:  # accepted, duplicate (a retry) and suppressed (erased person) are all done
                    accepted += 1
        if not violations:
            return _json(200, {"success": True})
        violations.sort(key=lambda v: v.index)
        return _json(
            400,
            {
                "success": False,
                "code": "invalid_request",
                "message": "some events were refused; the others were accepted",
                "error": "some events were refused; the others were accepted",
                "accepted": accepted,
                "rejected": len({v.index for v in violations}),
                "violations": [{"index": v.index, "field": v.field, "description": v.description} for v in violations],
            },
        )


@dataclass
class Running:
    """A started gateway (tests run one in-process on a free port)."""

    gateway: Gateway
    runner: web.AppRunner
    port: int

    async def drain(self, grace: float) -> None:
        """Readiness flips to 503 first, then in-flight requests finish, then the sockets close."""
        self.gateway.draining = True
        await asyncio.sleep(min(1.0, grace))
        await self.runner.cleanup()


async def start(settings: Settings, own: GatewaySettings, port: int | None = None) -> Running:
    gateway = Gateway(settings, own)
    # Bodies stay compressed until decode() inflates them within the size limit (no gzip bombs).
    runner = web.AppRunner(
        gateway.app(), shutdown_timeout=settings.shutdown_grace_seconds, access_log=None, auto_decompress=False
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.bind_host, own.port if port is None else port)
    await site.start()
    server = site._server  # the only way aiohttp tells the bound port
    bound = server.sockets[0].getsockname()[1] if server is not None and server.sockets else own.port  # type: ignore[attr-defined]
    log.info(
        "gateway serving on %s:%s, ingest at %s, profile at %s, metrics at %s",
        settings.bind_host, bound, own.ingest_address, own.profile_address, own.metrics_address,
    )  # fmt: skip
    return Running(gateway, runner, int(bound))


async def _serve(settings: Settings, own: GatewaySettings) -> None:
    running = await start(settings, own)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining")
    await running.drain(settings.shutdown_grace_seconds)


@dataclass(frozen=True)
class GatewayDefinition:
    """What the composition root needs of the gateway (the counterpart of ``ServiceDefinition``)."""

    name: str = "gateway"
    settings_type: type[GatewaySettings] = GatewaySettings
    migrations: None = None
    http: bool = True

    def serve(self, settings: Settings) -> None:
        configure_logging(self.name, settings.log_level)
        asyncio.run(_serve(settings, GatewaySettings.from_env()))


def definition() -> GatewayDefinition:
    return GatewayDefinition()
