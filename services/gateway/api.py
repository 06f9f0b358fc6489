"""The JSON API for agent desktops and dashboards (``/api/v1``): reads of profile, metrics and
quality over gRPC, a session cookie for the browser console, server-sent event streams of
WatchProfiles and WatchAlerts, CORS by exact allowlist, and /openapi.json generated from the route
table below. The key travels to the services as ``authorization: Bearer``; the gateway holds no
state, so the tenant is only ever the key's."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web
from google.protobuf.message import Message

from services.core.channels import service_aio_channel
from services.core.settings import Settings
from services.gateway import params
from services.gateway.credentials import api_key
from services.gateway.openapi import BAD_REQUEST_TYPE, Route, document, render
from services.gateway.params import Param
from services.gateway.settings import GatewaySettings
from services.gateway.statuses import HttpError, bad_parameter, from_rpc_error
from tessera.v1 import (
    event_pb2,
    metrics_pb2,
    metrics_pb2_grpc,
    profile_pb2,
    profile_pb2_grpc,
    quality_pb2,
    quality_pb2_grpc,
)

log = logging.getLogger(__name__)

SESSION_COOKIE = "tessera_session"
#: A sign-in body is one key: anything bigger is not one.
SESSION_LIMIT = 16 * 1024
MAX_KEY = 512
KEEPALIVE_SECONDS = 15.0
#: How long a stream waits for the service's first answer before it sends its headers: a refused
#: watch (bad key, bad cursor) is then an HTTP error, not an event.
FIRST_WAIT_SECONDS = 0.5
#: How often a quiet stream looks for a gone client or a drain.
POLL_SECONDS = 0.5
ALLOW_METHODS = "GET, POST, DELETE, OPTIONS"
ALLOW_HEADERS = "Authorization, Content-Type, Last-Event-ID"

CHANNELS = tuple(v.name.removeprefix("CHANNEL_").lower() for v in event_pb2.Channel.DESCRIPTOR.values if v.number)
GRANULARITIES = ("hour", "day", "week", "month", "all")
TIMELINE_KINDS = ("identify", "track", "interaction", "survey_response", "message")
PROFILE_KINDS = tuple(
    v.name.removeprefix("PROFILE_EVENT_KIND_").lower()
    for v in profile_pb2.ProfileEventKind.DESCRIPTOR.values
    if v.number
)

PROFILE_ID = Param("profile_id", "uuid", "The profile id (a UUID).", location="path", required=True)
#: Page tokens and cursors the services issue are short base64; this bounds what the gateway forwards.
MAX_TOKEN = 1024
PAGE_TOKEN = Param("pageToken", description="From the previous page's nextPageToken.", max_length=MAX_TOKEN)
LAST_EVENT_ID = Param(
    "lastEventId", description="Resume after this cursor (the Last-Event-ID header wins).", max_length=MAX_TOKEN
)
LAST_EVENT_ID_HEADER = Param(
    "Last-Event-ID", description="What a reconnecting EventSource sends: resume after it.", location="header",
    max_length=MAX_TOKEN,
)  # fmt: skip
INCLUDE_ACK = Param("includeAcknowledged", "boolean", "Acknowledged alerts too.")
EVALUATION_PAGE = Param("pageSize", "integer", "Default 20.", minimum=1, maximum=100)
ALERT_PAGE = Param("pageSize", "integer", "At most 100; default 20.", minimum=1, maximum=100)


def _name(profile_id: str) -> str:
    return f"profiles/{profile_id}"


def error_response(err: HttpError) -> web.Response:
    """The JSON API's error shape; 5xx bodies say nothing of the cause."""
    message = err.message if err.status < 500 else ("internal error" if err.status == 500 else err.message)
    details: list[dict[str, Any]] = []
    if err.violations:
        violations = [
            {"field": v.field, "description": v.description, **({"reason": v.reason} if v.reason else {})}
            for v in err.violations
        ]
        details.append({"@type": BAD_REQUEST_TYPE, "fieldViolations": violations})
    body = {"error": {"code": err.status, "status": err.grpc_status, "message": message, "details": details}}
    headers: dict[str, str] = {}
    if err.retry_after is not None:
        headers["Retry-After"] = str(err.retry_after)
    if err.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="tessera"'  # not Basic: a browser would prompt
    return web.json_response(body, status=err.status, headers=headers)


def _is_api(path: str) -> bool:
    return path.startswith("/api/") or path == "/openapi.json"


def _usable_key(key: str | None) -> str | None:
    """A key that can ride in gRPC metadata (printable ASCII); anything else is no key."""
    if key is None or len(key) > MAX_KEY or not key.isascii() or not key.isprintable():
        return None
    return key


Handler = Callable[[web.Request, dict[str, Any], str], Awaitable[web.StreamResponse]]


@dataclass
class JsonApi:
    """The handlers and the gRPC channels to profile and metrics they share."""

    settings: Settings
    own: GatewaySettings
    draining: Callable[[], bool]
    keepalive_seconds: float = KEEPALIVE_SECONDS
    _profile_channel: grpc.aio.Channel | None = None
    _metrics_channel: grpc.aio.Channel | None = None
    _profile: profile_pb2_grpc.ProfileServiceStub | None = None
    _metrics: metrics_pb2_grpc.MetricsServiceStub | None = None
    _quality: quality_pb2_grpc.QualityServiceStub | None = None
    _openapi: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        #: The gRPC watch calls of open streams (tests see them end when a client goes).
        self.open_streams: set[Any] = set()

    # ---- the route table: handlers and /openapi.json both come from it --------------------------

    def routes(self) -> list[tuple[Route, Handler]]:
        profile = ("profiles",)
        metrics = ("metrics",)
        quality = ("quality",)
        return [
            (
                Route(
                    "POST", "/api/v1/session", "createSession", "Sign in: check the API key and set the session cookie",
                    auth=False, success=204, extra_errors=(401, 413, 415),
                    success_headers=(("Set-Cookie", "tessera_session=...; HttpOnly; SameSite=Strict; Path=/"),),
                    request_body={
                        "type": "object", "required": ["apiKey"], "additionalProperties": False,
                        "properties": {"apiKey": {"type": "string", "minLength": 1, "maxLength": MAX_KEY}},
                    },
                    tags=("session",),
                ),
                self._sign_in,
            ),
            (
                Route("DELETE", "/api/v1/session", "deleteSession", "Sign out: clear the session cookie",
                      auth=False, success=204, tags=("session",),
                      success_headers=(("Set-Cookie", "tessera_session=\"\"; Max-Age=0 (cleared)"),)),
                self._sign_out,
            ),
            (
                Route(
                    "GET", "/api/v1/session", "getSession", "Whether the credentials or the session cookie are valid",
                    json_response={
                        "type": "object", "required": ["signedIn"], "additionalProperties": False,
                        "properties": {"signedIn": {"const": True}},
                    },
                    tags=("session",),
                ),
                self._session,
            ),
            (
                Route(
                    "GET", "/api/v1/context", "getCustomerContext", "Everything an agent needs about a customer",
                    params=(
                        Param("identifier", description="<type>:<value>, such as phone:+14155550100.",
                              max_length=MAX_KEY),
                        Param("q", description="Raw text: an email (has @), a phone (+ or digits) or a user id.",
                              max_length=MAX_KEY),
                        Param("interactions", "integer", "Recent interactions; default 10.", minimum=1, maximum=50),
                    ),
                    response=profile_pb2.GetCustomerContextResponse.DESCRIPTOR, tags=profile,
                ),
                self._context,
            ),
            (
                Route("GET", "/api/v1/profiles/{profile_id}", "getProfile", "A profile",
                      params=(PROFILE_ID,), response=profile_pb2.GetProfileResponse.DESCRIPTOR, tags=profile),
                self._get_profile,
            ),
            (
                Route(
                    "GET", "/api/v1/profiles/{profile_id}/timeline", "listTimelineEvents",
                    "The profile's events across channels, newest first",
                    params=(
                        PROFILE_ID,
                        Param("pageSize", "integer", "Default 50.", minimum=1, maximum=1000),
                        PAGE_TOKEN,
                        Param("channel", "enum", "Only these channels.", repeated=True, enum=CHANNELS),
                        Param("kind", "enum", "Only these kinds.", repeated=True, enum=TIMELINE_KINDS),
                        Param("startTime", "date-time", "Events at or after it."),
                        Param("endTime", "date-time", "Events before it."),
                    ),
                    response=profile_pb2.ListTimelineEventsResponse.DESCRIPTOR, tags=profile,
                ),
                self._timeline,
            ),
            (
                Route("GET", "/api/v1/profiles/{profile_id}/metrics", "getCustomerMetrics", "The customer's CX scores",
                      params=(PROFILE_ID,), response=metrics_pb2.GetCustomerMetricsResponse.DESCRIPTOR, tags=metrics),
                self._customer_metrics,
            ),
            (
                Route(
                    "GET", "/api/v1/profiles/{profile_id}/evaluations", "listProfileEvaluations",
                    "The customer's interactions' evaluations",
                    params=(PROFILE_ID, EVALUATION_PAGE, PAGE_TOKEN),
                    response=quality_pb2.ListEvaluationsResponse.DESCRIPTOR, tags=quality,
                ),
                self._profile_evaluations,
            ),
            (
                Route("GET", "/api/v1/profiles/{profile_id}/alerts", "listProfileAlerts", "The customer's alerts",
                      params=(PROFILE_ID, INCLUDE_ACK, ALERT_PAGE),
                      response=quality_pb2.ListAlertsResponse.DESCRIPTOR, tags=quality),
                self._profile_alerts,
            ),
            (
                Route(
                    "GET", "/api/v1/evaluations", "listEvaluations", "An interaction's evaluations",
                    params=(
                        Param("interactionId", required=True, max_length=256),
                        EVALUATION_PAGE,
                        PAGE_TOKEN,
                    ),
                    response=quality_pb2.ListEvaluationsResponse.DESCRIPTOR, tags=quality,
                ),
                self._evaluations,
            ),
            (
                Route("GET", "/api/v1/alerts", "listAlerts", "The tenant's alerts", params=(INCLUDE_ACK, ALERT_PAGE),
                      response=quality_pb2.ListAlertsResponse.DESCRIPTOR, tags=quality),
                self._alerts,
            ),
            (
                Route("GET", "/api/v1/metrics/definitions", "listMetricDefinitions",
                      "The metrics and the dimensions to group or filter by",
                      response=metrics_pb2.ListMetricDefinitionsResponse.DESCRIPTOR, tags=metrics),
                self._definitions,
            ),
            (
                Route(
                    "GET", "/api/v1/metrics/query", "queryMetrics", "Metric series over time, grouped and filtered",
                    params=(
                        Param("metric", description="nps, csat, ... (see definitions).", repeated=True, max_length=64),
                        Param("startTime", "date-time"),
                        Param("endTime", "date-time"),
                        Param("granularity", "enum", enum=GRANULARITIES),
                        Param("groupBy", description="A dimension.", repeated=True, max_length=64),
                        Param("filter", description="<dimension>:<value>, such as channel:voice.", repeated=True,
                              max_length=128),
                    ),
                    response=metrics_pb2.QueryMetricsResponse.DESCRIPTOR, tags=metrics,
                ),
                self._query,
            ),
            (
                Route(
                    "GET", "/api/v1/streams/profiles", "watchProfiles",
                    "Profile changes as server-sent events (event: created, updated, merged, split, erased)",
                    params=(
                        Param("profile", "uuid", "Only changes of this profile id."),
                        Param("kind", "enum", "Only these kinds.", repeated=True, enum=PROFILE_KINDS),
                        LAST_EVENT_ID,
                        LAST_EVENT_ID_HEADER,
                    ),
                    stream=profile_pb2.WatchProfilesResponse.DESCRIPTOR, tags=("streams",),
                ),
                self._watch_profiles,
            ),
            (
                Route(
                    "GET", "/api/v1/streams/alerts", "watchAlerts", "Alerts as they fire, as server-sent events",
                    params=(
                        Param("queue", repeated=True, max_length=128),
                        Param("agentId", repeated=True, max_length=128),
                        LAST_EVENT_ID,
                        LAST_EVENT_ID_HEADER,
                    ),
                    stream=quality_pb2.Alert.DESCRIPTOR, tags=("streams",),
                ),
                self._watch_alerts,
            ),
        ]  # fmt: skip

    def openapi(self) -> dict[str, Any]:
        if self._openapi is None:
            self._openapi = document([route for route, _ in self.routes()])
        return self._openapi

    # ---- wiring -------------------------------------------------------------------------------

    def install(self, app: web.Application) -> None:
        """Routes, the JSON API's error and CORS handling, and the channels' lifetime."""
        app.middlewares.append(self._middleware)
        app.on_response_prepare.append(self._cors)
        app.on_startup.append(self._open)
        app.on_cleanup.append(self._close)
        for route, handler in self.routes():
            app.router.add_route(route.method, route.path, self._endpoint(route, handler))
        app.router.add_get("/openapi.json", self._document)

    async def _open(self, _app: web.Application) -> None:
        self._profile_channel = service_aio_channel(self.own.profile_address, self.settings)
        self._metrics_channel = service_aio_channel(self.own.metrics_address, self.settings)
        self._profile = profile_pb2_grpc.ProfileServiceStub(self._profile_channel)
        self._metrics = metrics_pb2_grpc.MetricsServiceStub(self._metrics_channel)
        self._quality = quality_pb2_grpc.QualityServiceStub(self._metrics_channel)

    async def _close(self, _app: web.Application) -> None:
        for call in list(self.open_streams):
            call.cancel()
        for channel in (self._profile_channel, self._metrics_channel):
            if channel is not None:
                await channel.close()

    def _endpoint(self, route: Route, handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            args = params.parse(route.params, request.query.items(), request.match_info, request.headers)
            key = self._key(request) if route.auth else ""
            return await handler(request, args, key)

        return handle

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """The JSON API's errors in its own shape (the Segment routes keep theirs), and preflights."""
        if not _is_api(request.path):
            return await handler(request)
        if request.method == "OPTIONS":
            return web.Response(status=204)  # a preflight: _cors adds the headers for allowed origins
        try:
            return await handler(request)
        except HttpError as err:
            return error_response(err)
        except web.HTTPRequestEntityTooLarge:
            return error_response(HttpError(413, "the body is too large"))
        except web.HTTPException as err:
            if err.status < 400:
                raise
            out = error_response(HttpError(err.status, err.reason))
            if "Allow" in err.headers:
                out.headers["Allow"] = err.headers["Allow"]
            return out
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
            return error_response(HttpError(500, "internal error"))

    async def _cors(self, request: web.Request, response: web.StreamResponse) -> None:
        """Only an exact allowlisted origin may read responses from a browser; others get no CORS headers."""
        if not _is_api(request.path):
            return
        vary = response.headers.get("Vary")
        response.headers["Vary"] = f"{vary}, Origin" if vary and "origin" not in vary.lower() else (vary or "Origin")
        origin = request.headers.get("Origin")
        if origin is None or origin not in self.own.cors_origins:
            return
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Allow-Credentials"] = "true"
        if request.method == "OPTIONS":
            response.headers["Access-Control-Allow-Methods"] = ALLOW_METHODS
            response.headers["Access-Control-Allow-Headers"] = ALLOW_HEADERS
            response.headers["Access-Control-Max-Age"] = "600"
        else:
            response.headers["Access-Control-Expose-Headers"] = "Retry-After"

    def _key(self, request: web.Request) -> str:
        header = request.headers.get("Authorization")
        key = api_key(header) if header is not None else request.cookies.get(SESSION_COOKIE)
        usable = _usable_key(key)
        if usable is None:
            raise HttpError(401, "missing or unknown API key: send Authorization: Bearer <key> or sign in")
        return usable

    async def _call(self, method: Any, request: Message, key: str, service: str) -> Any:
        try:
            return await method(
                request, metadata=(("authorization", f"Bearer {key}"),), timeout=self.own.read_deadline_seconds
            )
        except grpc.aio.AioRpcError as err:
            raise self._mapped(err, service) from None

    def _mapped(self, err: grpc.aio.AioRpcError, service: str) -> HttpError:
        mapped = from_rpc_error(err, service, "API key")
        if mapped.status == 500:  # the service's own words stay in the log (they never carry the key)
            log.error("%s answered %s: %s", service, err.code().name, err.details())
        elif mapped.status == 503:
            log.warning("%s did not answer in time or is down: %s", service, err.code().name)
        return mapped

    @staticmethod
    def _json(message: Message) -> web.Response:
        return web.json_response(render(message))

    async def _document(self, _request: web.Request) -> web.Response:
        return web.json_response(self.openapi())

    # ---- session -----------------------------------------------------------------------------

    async def _check(self, key: str) -> None:
        """The cheapest call that needs a valid key."""
        assert self._metrics is not None
        request = metrics_pb2.ListMetricDefinitionsRequest()
        await self._call(self._metrics.ListMetricDefinitions, request, key, "metrics")

    async def _sign_in(self, request: web.Request, _args: dict[str, Any], _key: str) -> web.StreamResponse:
        if request.content_type != "application/json":
            raise HttpError(415, "the body must be application/json")
        if request.headers.get("Content-Encoding", "identity").strip().lower() not in ("", "identity"):
            raise HttpError(415, "the body must not be encoded")
        if request.content_length is not None and request.content_length > SESSION_LIMIT:
            raise HttpError(413, f"the body is larger than {SESSION_LIMIT} bytes")
        raw = bytearray()
        async for chunk in request.content.iter_chunked(4096):
            raw += chunk
            if len(raw) > SESSION_LIMIT:
                raise HttpError(413, f"the body is larger than {SESSION_LIMIT} bytes")
        try:
            body = json.loads(bytes(raw).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise bad_parameter("body", "must be a JSON object") from None
        if not isinstance(body, dict):
            raise bad_parameter("body", "must be a JSON object")
        for extra in body.keys() - {"apiKey"}:
            raise bad_parameter(str(extra)[:64], "is not a field of a sign-in")
        key = body.get("apiKey")
        if not isinstance(key, str) or not key:
            raise bad_parameter("apiKey", "required: the API key")
        usable = _usable_key(key)
        if usable is None:
            raise HttpError(401, "missing or unknown API key")
        await self._check(usable)
        response = web.Response(status=204)
        response.set_cookie(
            SESSION_COOKIE, usable, path="/", httponly=True, samesite="Strict", secure=self._https(request)
        )
        return response

    async def _sign_out(self, request: web.Request, _args: dict[str, Any], _key: str) -> web.StreamResponse:
        response = web.Response(status=204)
        response.del_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="Strict", secure=self._https(request))
        return response

    @staticmethod
    def _https(request: web.Request) -> bool:
        return request.secure or request.headers.get("X-Forwarded-Proto", "").strip().lower() == "https"

    async def _session(self, _request: web.Request, _args: dict[str, Any], key: str) -> web.StreamResponse:
        await self._check(key)
        return web.json_response({"signedIn": True})

    # ---- reads -------------------------------------------------------------------------------

    async def _context(self, _request: web.Request, args: dict[str, Any], key: str) -> web.StreamResponse:
        kind, value = params.lookup(args["identifier"], args["q"])
        req = profile_pb2.GetCustomerContextRequest(
            identifier=event_pb2.Identifier(type=kind, value=value), interaction_limit=args["interactions"] or 0
        )
        assert self._profile is not None
        return self._json(await self._call(self._profile.GetCustomerContext, req, key, "profile"))

    async def _get_profile(self, _request: web.Request, args: dict[str, Any], key: str) -> web.StreamResponse:
        assert self._profile is not None
        req = profile_pb2.GetProfileRequest(name=_name(args["profile_id"]))
        return self._json(await self._call(self._profile.GetProfile, req, key, "profile"))

    async def _timeline(self, _request: web.Request, args: dict[str, Any], key: str) -> web.StreamResponse:
        req = profile_pb2.ListTimelineEventsRequest(
            parent=_name(args["profile_id"]),
            page_size=args["pageSize"] or 0,
            page_token=args["pageToken"] or "",
            channels=[event_pb2.Channel.Value("CHANNEL_" + c.upper()) for c in args["channel"]],
            kinds=args["kind"],
        )
        if args["startTime"] is not None:
            req.start_time.FromDatetime(args["startTime"])
        if args["endTime"] is not None:
            req.end_time.FromDatetime(args["endTime"])
        assert self._profile is not None
        return self._json(await self._call(self._profile.ListTimelineEvents, req, key, "profile"))

    async def _customer_metrics(self, _request: web.Request, args: dict[str, Any], key: str) -> web.StreamResponse:
        assert self._metrics is not None
        req = metrics_pb2.GetCustomerMetricsRequest(profile=_name(args["profile_id"]))
        return self._json(await self._call(self._metrics.GetCustomerMetrics, req, key, "metrics"))

    async def _list_evaluations(self, key: str, **fields: Any) -> web.StreamResponse:
        assert self._quality is not None
        req = quality_pb2.ListEvaluationsRequest(**fields)
        return self._json(await self._call(self._quality.ListEvaluations, req, key, "metrics"))

    async def _profile_evaluations(self, _request: web.Request, args: dict[str, Any], key: str) -> web.StreamResponse:
        return await self._list_evaluations(
            key, profile=_name(args["profile_id"]), page_size=args["pageSize"] or 0, page_token=args["pageToken"] or ""
        )

    async def _evaluations(self, _request: web.Request, args: dict[str, Any], key: str) -> web.StreamResponse:
        page = {"page_size": args["pageSize"] or 0, "page_token": args["pageToken"] or ""}
        return await self._list_evaluations(key, interaction_id=args["interactionId"], **page)

    async def _list_alerts(self, key: str, args: dict[str, Any], profile: str = "") -> web.StreamResponse:
        assert self._quality is not None
        req = quality_pb2.ListAlertsRequest(
            profile=profile, include_acknowledged=bool(args["includeAcknowledged"]), page_size=args["pageSize"] or 0
        )
        return self._json(await self._call(self._quality.ListAlerts, req, key, "metrics"))

    async def _profile_alerts(self, _request: web.Request, args: dict[str, Any], key: str) -> web.StreamResponse:
        return await self._list_alerts(key, args, _name(args["profile_id"]))

    async def _alerts(self, _request: web.Request, args: dict[str, Any], key: str) -> web.StreamResponse:
        return await self._list_alerts(key, args)

    async def _definitions(self, _request: web.Request, _args: dict[str, Any], key: str) -> web.StreamResponse:
        assert self._metrics is not None
        req = metrics_pb2.ListMetricDefinitionsRequest()
        return self._json(await self._call(self._metrics.ListMetricDefinitions, req, key, "metrics"))

    async def _query(self, _request: web.Request, args: dict[str, Any], key: str) -> web.StreamResponse:
        granularity = args["granularity"]
        req = metrics_pb2.QueryMetricsRequest(
            metrics=args["metric"],
            granularity=metrics_pb2.Granularity.Value("GRANULARITY_" + (granularity or "unspecified").upper()),
            group_by=args["groupBy"],
            filters=[metrics_pb2.MetricFilter(dimension=d, values=v) for d, v in params.metric_filters(args["filter"])],
        )
        if args["startTime"] is not None:
            req.start_time.FromDatetime(args["startTime"])
        if args["endTime"] is not None:
            req.end_time.FromDatetime(args["endTime"])
        assert self._metrics is not None
        return self._json(await self._call(self._metrics.QueryMetrics, req, key, "metrics"))

    # ---- streams -----------------------------------------------------------------------------

    @staticmethod
    def _cursor(args: dict[str, Any]) -> str:
        """Where to resume: the browser's Last-Event-ID on a reconnect, else ?lastEventId=."""
        return str(args["Last-Event-ID"] or args["lastEventId"] or "")

    async def _watch_profiles(self, request: web.Request, args: dict[str, Any], key: str) -> web.StreamResponse:
        only = _name(args["profile"]) if args["profile"] else None
        kinds = [profile_pb2.ProfileEventKind.Value("PROFILE_EVENT_KIND_" + k.upper()) for k in args["kind"]]
        req = profile_pb2.WatchProfilesRequest(cursor=self._cursor(args), kinds=kinds)
        assert self._profile is not None
        call = self._profile.WatchProfiles(req, metadata=(("authorization", f"Bearer {key}"),))

        def event(item: profile_pb2.WatchProfilesResponse) -> tuple[str, str, Message] | None:
            if only is not None and only not in (item.profile, item.other_profile):
                return None
            kind = profile_pb2.ProfileEventKind.Name(item.kind).removeprefix("PROFILE_EVENT_KIND_").lower()
            return item.cursor, kind, item

        return await self._sse(request, call, event, "profile")

    async def _watch_alerts(self, request: web.Request, args: dict[str, Any], key: str) -> web.StreamResponse:
        req = quality_pb2.WatchAlertsRequest(cursor=self._cursor(args), queues=args["queue"], agent_ids=args["agentId"])
        assert self._quality is not None
        call = self._quality.WatchAlerts(req, metadata=(("authorization", f"Bearer {key}"),))

        def event(item: quality_pb2.WatchAlertsResponse) -> tuple[str, str, Message] | None:
            return item.cursor, "alert", item.alert

        return await self._sse(request, call, event, "metrics")

    async def _sse(
        self,
        request: web.Request,
        call: Any,
        event: Callable[[Any], tuple[str, str, Message] | None],
        service: str,
    ) -> web.StreamResponse:
        """Relay a gRPC server stream as server-sent events until the client goes, the service ends
        it, or the gateway drains; the gRPC call is cancelled on every way out."""
        self.open_streams.add(call)
        first: asyncio.Future[Any] = asyncio.ensure_future(call.read())
        pending: asyncio.Future[Any] | None = first
        response: web.StreamResponse | None = None
        try:
            done, _ = await asyncio.wait({first}, timeout=FIRST_WAIT_SECONDS)
            if done:
                try:
                    first.result()
                except grpc.aio.AioRpcError as err:
                    raise self._mapped(err, service) from None
            response = web.StreamResponse(
                headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            )
            await response.prepare(request)
            await response.write(b"retry: 2000\n: connected\n\n")
            last_write = time.monotonic()
            while True:
                waiting = pending if pending is not None else asyncio.ensure_future(call.read())
                pending = waiting
                done, _ = await asyncio.wait({waiting}, timeout=POLL_SECONDS)
                if not done:
                    transport = request.transport
                    if self.draining() or transport is None or transport.is_closing():
                        break
                    if time.monotonic() - last_write >= self.keepalive_seconds:
                        await response.write(b": keepalive\n\n")
                        last_write = time.monotonic()
                    continue
                pending = None
                try:
                    item = waiting.result()
                except grpc.aio.AioRpcError as err:
                    body = json.loads(error_response(self._mapped(err, service)).text or "{}")
                    await response.write(f"event: error\ndata: {json.dumps(body, separators=(',', ':'))}\n\n".encode())
                    break
                if item is grpc.aio.EOF:
                    break
                found = event(item)
                if found is None:
                    continue
                cursor, name, message = found
                data = json.dumps(render(message), separators=(",", ":"))
                lines = f"id: {cursor}\n" if cursor.isprintable() else ""
                await response.write(f"{lines}event: {name}\ndata: {data}\n\n".encode())
                last_write = time.monotonic()
            return response
        except ConnectionError:  # the client went while we wrote
            assert response is not None  # nothing is written before the headers
            return response
        except Exception:
            if response is None:  # before the headers: the middleware answers (an HttpError, or a 500)
                raise
            log.exception("stream on %s failed after it started", request.path)
            return response
        finally:
            call.cancel()
            if pending is not None:
                pending.cancel()
            self.open_streams.discard(call)


def install(app: web.Application, settings: Settings, own: GatewaySettings, draining: Callable[[], bool]) -> JsonApi:
    """The JSON API on ``app`` (the gateway's one call into this module)."""
    api = JsonApi(settings, own, draining)
    api.install(app)
    return api


__all__: Sequence[str] = ("JsonApi", "install")
