"""The gateway's JSON API in front of real ingest, identity, profile and metrics (real PostgreSQL
and Redis): a demo-like customer looked up by phone, email and raw text, the profile, timeline
pages, scores, evaluations and alerts; the session cookie; 401/404/400 in the JSON error shape with
the services' field violations; CORS by allowlist; and the SSE streams resumed with Last-Event-ID."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import jsonschema
import pytest
import requests
from sqlalchemy.engine import Engine

from services.core.server import RunningServer
from services.core.settings import Settings
from services.gateway.settings import GatewaySettings
from tessera.v1 import event_pb2, profile_pb2, profile_pb2_grpc, quality_pb2, quality_pb2_grpc
from tests.conftest import TenantKey, make_tenant
from tests.integration.test_quality_api import Quality, chat, ended_chat
from tests.support.events import uid
from tests.support.gateway import Served, local
from tests.support.profile import Apis, apis, identify, interaction, survey, wait_until

pytestmark = pytest.mark.integration

ALLOWED = "https://console.example.com"
ANGRY = "This is terrible, I am furious and nobody helps me"


@pytest.fixture(scope="module")
def gateway(
    settings: Settings, ingest_server: RunningServer, profile_server: RunningServer, metrics_server: RunningServer
) -> Iterator[Served]:
    served = Served(settings, _own(ingest_server, profile_server, metrics_server), keepalive_seconds=1.0)
    yield served
    served.stop()


def _own(ingest: RunningServer, profile: RunningServer, metrics: RunningServer) -> GatewaySettings:
    return local(ingest.port, profile.port, metrics.port, cors_origins=(ALLOWED,), read_deadline_seconds=5.0)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass(frozen=True)
class Demo:
    tenant: TenantKey
    phone: str
    email: str
    user: str
    profile_id: str
    chat_id: str
    open_chat: str
    events: int


@pytest.fixture(scope="module")
def demo(
    engine: Engine,
    ingest_channel: grpc.Channel,
    identity_channel: grpc.Channel,
    profile_channel: grpc.Channel,
    metrics_channel: grpc.Channel,
    metrics_server: RunningServer,
) -> Demo:
    """One customer as the demo data has them: identified on the web, three calls, an NPS survey,
    and an evaluated chat that went badly (an open alert)."""
    tenant = make_tenant(engine, "gw")
    api = apis(ingest_channel, identity_channel, profile_channel, engine, tenant.tenant_id, tenant.metadata)
    qa = Quality(metrics_channel, tenant.metadata)
    qa.setup()
    qa.call(
        "CreateAlertRule",
        quality_pb2.CreateAlertRuleRequest(
            rule_id="angry",
            rule=quality_pb2.AlertRule(
                display_name="angry", sentiment_below=quality_pb2.SentimentBelow(threshold=-0.3, min_messages=2)
            ),
        ),
    )
    phone, email, user = "+14155550142", f"ada-{uuid.uuid4().hex[:8]}@example.com", f"u-{uuid.uuid4().hex[:8]}"
    t0 = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(days=1)
    events = [
        identify(("user_id", user), ("email", email), ("phone", phone), traits={"name": "Ada Lovelace"}, at=t0),
        *[
            interaction(("phone", phone), interaction_id=uid("call"), at=t0 + dt.timedelta(hours=n + 1))
            for n in range(3)
        ],
        survey(("phone", phone), kind=event_pb2.SURVEY_TYPE_NPS, score=9, at=t0 + dt.timedelta(hours=4)),
    ]
    for ev in events:
        api.send(ev)
    chat_id, open_chat = uid("chat"), uid("chat")
    at, now = t0 + dt.timedelta(hours=5), dt.datetime.now(dt.UTC).replace(microsecond=0)
    chats = [
        chat(phone, chat_id, event_pb2.AUTHOR_AGENT, "Hello, this is Sam. How can I help?", at),
        ended_chat(phone, chat_id, at),
        # A chat going wrong right now: the sentiment alert fires while it is open.
        chat(phone, open_chat, event_pb2.AUTHOR_CUSTOMER, ANGRY, now),
        chat(phone, open_chat, event_pb2.AUTHOR_CUSTOMER, "Terrible. Awful. I hate this.", now),
    ]
    for ev in chats:
        api.send(ev)
    profile = wait_until(lambda: _try_get(api, phone), 30, "the profile")
    qa.wait(chat_id, what="the chat's evaluation")
    stub = quality_pb2_grpc.QualityServiceStub(metrics_channel)
    wait_until(
        lambda: stub.ListAlerts(quality_pb2.ListAlertsRequest(), metadata=tenant.metadata, timeout=5).alerts,
        30,
        "the alert",
    )
    api.wait_applied(len(events) + len(chats), 30)
    return Demo(tenant, phone, email, user, profile.profile_id, chat_id, open_chat, len(events) + len(chats))


def _try_get(api: Apis, phone: str) -> profile_pb2.Profile | None:
    try:
        return api.get(ident=("phone", phone))
    except grpc.RpcError:
        return None


def get(gateway: Served, path: str, key: str | None, **kw: Any) -> requests.Response:
    headers = {**(bearer(key) if key is not None else {}), **kw.pop("headers", {})}
    return requests.get(f"{gateway.url}{path}", headers=headers, timeout=10, **kw)


def conforms(gateway: Served, name: str, body: Any) -> Any:
    """``body`` is valid against ``name`` in the gateway's own /openapi.json (the real data, not examples)."""
    doc = requests.get(f"{gateway.url}/openapi.json", timeout=5).json()
    root = {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
    jsonschema.Draft202012Validator(root, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER).validate(body)
    return body


def violations(reply: requests.Response) -> set[str]:
    body = reply.json()
    assert set(body) == {"error"} and body["error"]["code"] == reply.status_code, body
    return {v["field"] for d in body["error"]["details"] for v in d["fieldViolations"]}


# ---- reads -----------------------------------------------------------------------------------


def test_context_by_phone_email_and_raw_text_is_the_one_customer(gateway: Served, demo: Demo) -> None:
    key = demo.tenant.api_key
    by_phone = get(gateway, "/api/v1/context", key, params={"identifier": f"phone:{demo.phone}"})
    assert by_phone.status_code == 200, by_phone.text
    body = conforms(gateway, "GetCustomerContextResponse", by_phone.json())
    assert body["profile"]["profileId"] == demo.profile_id
    assert len(body["recentInteractions"]) >= 4  # three calls and the chats
    assert int(body["contacts"]["last7Days"]) >= 3  # int64: a string in the proto3 JSON mapping
    assert isinstance(body["contacts"]["last7Days"], str)
    by_email = get(gateway, "/api/v1/context", key, params={"identifier": f"email:{demo.email}"}).json()
    assert by_email["profile"]["profileId"] == demo.profile_id
    for q in (demo.email, demo.phone, "(415) 555-0142", demo.user):
        reply = get(gateway, "/api/v1/context", key, params={"q": q, "interactions": "2"})
        assert reply.status_code == 200, (q, reply.text)
        assert reply.json()["profile"]["profileId"] == demo.profile_id, q
        assert len(reply.json()["recentInteractions"]) == 2


def test_profile_and_timeline_pages(gateway: Served, demo: Demo) -> None:
    key = demo.tenant.api_key
    profile = conforms(gateway, "GetProfileResponse", get(gateway, f"/api/v1/profiles/{demo.profile_id}", key).json())[
        "profile"
    ]
    assert profile["profileId"] == demo.profile_id and profile["eventCount"] == str(demo.events)
    assert {t["key"]: t["value"] for t in profile["traits"]}["name"] == "Ada Lovelace"
    seen: list[str] = []
    token = ""
    for _ in range(10):
        page = get(
            gateway, f"/api/v1/profiles/{demo.profile_id}/timeline", key, params={"pageSize": 3, "pageToken": token}
        ).json()
        assert len(conforms(gateway, "ListTimelineEventsResponse", page)["events"]) <= 3
        seen += [e["eventId"] for e in page["events"]]
        token = page["nextPageToken"]
        if not token:
            break
    assert len(seen) == len(set(seen)) == demo.events
    voice = get(gateway, f"/api/v1/profiles/{demo.profile_id}/timeline", key, params={"channel": "voice"}).json()
    assert len(voice["events"]) == 3 and {e["channel"] for e in voice["events"]} == {"CHANNEL_VOICE"}
    both = get(
        gateway, f"/api/v1/profiles/{demo.profile_id}/timeline", key, params={"channel": ["voice", "chat"]}
    ).json()
    assert len(both["events"]) == demo.events - 2  # all but the web identify and the survey
    surveys = get(gateway, f"/api/v1/profiles/{demo.profile_id}/timeline", key, params={"kind": "survey_response"})
    assert [e["kind"] for e in surveys.json()["events"]] == ["survey_response"]
    future = get(
        gateway,
        f"/api/v1/profiles/{demo.profile_id}/timeline",
        key,
        params={"startTime": (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).isoformat()},
    )
    assert future.status_code == 200 and future.json()["events"] == []


def test_scores_evaluations_and_alerts(gateway: Served, demo: Demo) -> None:
    key = demo.tenant.api_key
    metrics = get(gateway, f"/api/v1/profiles/{demo.profile_id}/metrics", key)
    assert metrics.status_code == 200, metrics.text
    assert conforms(gateway, "GetCustomerMetricsResponse", metrics.json())["metrics"]["nps"]["sampleSize"] == "1"
    evals = get(gateway, f"/api/v1/profiles/{demo.profile_id}/evaluations", key).json()
    evals = conforms(gateway, "ListEvaluationsResponse", evals)["evaluations"]
    assert [e["name"] for e in evals] == [f"evaluations/{demo.chat_id}/forms/chat"]
    by_interaction = get(gateway, "/api/v1/evaluations", key, params={"interactionId": demo.chat_id}).json()
    assert [e["name"] for e in by_interaction["evaluations"]] == [evals[0]["name"]]
    alerts = conforms(
        gateway, "ListAlertsResponse", get(gateway, f"/api/v1/profiles/{demo.profile_id}/alerts", key).json()
    )["alerts"]
    assert [a["interactionId"] for a in alerts] == [demo.open_chat] and alerts[0]["state"] == "ALERT_STATE_OPEN"
    tenant_alerts = get(gateway, "/api/v1/alerts", key, params={"includeAcknowledged": "true"}).json()["alerts"]
    assert [a["name"] for a in tenant_alerts] == [alerts[0]["name"]]


def test_metric_definitions_and_a_query(gateway: Served, demo: Demo) -> None:
    key = demo.tenant.api_key
    defs = conforms(gateway, "ListMetricDefinitionsResponse", get(gateway, "/api/v1/metrics/definitions", key).json())
    assert {"nps", "csat"} <= {d["name"] for d in defs["definitions"]} and "channel" in defs["dimensions"]
    now = dt.datetime.now(dt.UTC)
    window = {
        "startTime": (now - dt.timedelta(days=3)).isoformat(),
        "endTime": (now + dt.timedelta(hours=1)).isoformat(),
    }
    reply = wait_until(
        lambda: (
            r
            if (
                r := get(
                    gateway,
                    "/api/v1/metrics/query",
                    key,
                    params={"metric": ["nps", "aht_seconds"], "granularity": "day", "groupBy": "channel", **window},
                )
            ).status_code
            == 200
            and any(s["metric"] == "aht_seconds" and s["points"] for s in r.json()["series"])
            else None
        ),
        30,
        "the rollups",
    )
    series = conforms(gateway, "QueryMetricsResponse", reply.json())["series"]
    assert {s["metric"] for s in series} >= {"aht_seconds"} and all("channel" in s["group"] for s in series)
    filtered = get(
        gateway,
        "/api/v1/metrics/query",
        key,
        params={"metric": "aht_seconds", "granularity": "all", "filter": "channel:voice", **window},
    )
    assert filtered.status_code == 200 and all(
        s["group"].get("channel", "voice") == "voice" for s in filtered.json()["series"]
    )
    bad = get(gateway, "/api/v1/metrics/query", key, params={"metric": "nope", "granularity": "day", **window})
    assert bad.status_code == 400 and violations(bad) == {"metrics[0]"}
    assert bad.json()["error"]["status"] == "INVALID_ARGUMENT"
    assert bad.json()["error"]["details"][0]["@type"] == "type.googleapis.com/google.rpc.BadRequest"
    none = get(gateway, "/api/v1/metrics/query", key, params={"granularity": "day", **window})
    assert none.status_code == 400 and "metrics" in violations(none)


# ---- errors ----------------------------------------------------------------------------------


def test_wrong_or_missing_key_is_401_and_another_tenants_profile_is_404(
    gateway: Served, demo: Demo, engine: Engine
) -> None:
    path = f"/api/v1/profiles/{demo.profile_id}"
    wrong = get(gateway, path, "nope-not-a-key")
    assert wrong.status_code == 401 and wrong.json()["error"]["status"] == "UNAUTHENTICATED"
    assert "Basic" not in wrong.headers.get("WWW-Authenticate", "")  # a browser must not prompt
    assert get(gateway, path, None).status_code == 401
    assert get(gateway, path, None, headers={"Authorization": "Digest x"}).status_code == 401
    other = make_tenant(engine, "gw-other")
    elsewhere = get(gateway, path, other.api_key)
    assert elsewhere.status_code == 404 and elsewhere.json()["error"]["status"] == "NOT_FOUND"
    assert get(gateway, f"/api/v1/profiles/{demo.profile_id}/timeline", other.api_key).status_code == 404
    assert get(gateway, f"/api/v1/profiles/{uuid.uuid4()}", demo.tenant.api_key).status_code == 404
    basic = requests.auth.HTTPBasicAuth(demo.tenant.api_key, "")
    assert requests.get(f"{gateway.url}{path}", auth=basic, timeout=5).status_code == 200


@pytest.mark.parametrize(
    ("path", "query", "field"),
    [
        ("/api/v1/context", {}, "identifier"),
        ("/api/v1/context", {"identifier": "no-colon"}, "identifier"),
        ("/api/v1/context", {"q": "x", "interactions": "500"}, "interactions"),
        ("/api/v1/profiles/not-a-uuid", {}, "profile_id"),
        ("/api/v1/profiles/{pid}/timeline", {"pageSize": "abc"}, "pageSize"),
        ("/api/v1/profiles/{pid}/timeline", {"channel": "pigeon"}, "channel"),
        ("/api/v1/profiles/{pid}/timeline", {"startTime": "yesterday"}, "startTime"),
        ("/api/v1/profiles/{pid}/timeline", {"pageSize": ["1", "2"]}, "pageSize"),
        ("/api/v1/profiles/{pid}/alerts", {"includeAcknowledged": "yes"}, "includeAcknowledged"),
        ("/api/v1/evaluations", {}, "interactionId"),
        ("/api/v1/metrics/query", {"metric": "nps", "filter": "channel"}, "filter"),
        ("/api/v1/metrics/query", {"metric": "nps", "granularity": "fortnight"}, "granularity"),
    ],
)
def test_bad_parameters_are_400_naming_the_parameter(
    gateway: Served, demo: Demo, path: str, query: dict[str, Any], field: str
) -> None:
    reply = get(gateway, path.format(pid=demo.profile_id), demo.tenant.api_key, params=query)
    assert reply.status_code == 400, reply.text
    assert violations(reply) == {field}


def test_a_service_down_is_a_generic_503_with_retry_after(
    settings: Settings, ingest_server: RunningServer, tenant: TenantKey
) -> None:
    served = Served(settings, local(ingest_server.port, free_port(), free_port(), read_deadline_seconds=5.0))
    try:
        reply = get(served, f"/api/v1/profiles/{uuid.uuid4()}", tenant.api_key)
        assert reply.status_code == 503 and reply.headers["Retry-After"] == "5"
        assert reply.json()["error"] == {
            "code": 503, "status": "UNAVAILABLE", "message": "profile is unavailable; retry later", "details": []
        }  # fmt: skip
        signing_in = requests.post(f"{served.url}/api/v1/session", json={"apiKey": tenant.api_key}, timeout=15)
        assert signing_in.status_code == 503
    finally:
        served.stop()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unknown_api_path_is_a_json_404(gateway: Served, demo: Demo) -> None:
    reply = get(gateway, "/api/v1/nothing-here", demo.tenant.api_key)
    assert reply.status_code == 404 and reply.json()["error"]["status"] == "NOT_FOUND"


# ---- session ---------------------------------------------------------------------------------


def test_session_cookie_sign_in_use_and_sign_out(gateway: Served, demo: Demo) -> None:
    url = f"{gateway.url}/api/v1/session"
    assert requests.post(url, json={"apiKey": "wrong"}, timeout=5).status_code == 401
    assert requests.get(url, timeout=5).status_code == 401
    signed = requests.post(url, json={"apiKey": demo.tenant.api_key}, timeout=5)
    assert signed.status_code == 204, signed.text
    cookie = signed.headers["Set-Cookie"]
    assert cookie.startswith("tessera_session=") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert "Path=/" in cookie and "Secure" not in cookie
    assert demo.tenant.api_key not in signed.url
    session = signed.cookies.get("tessera_session")
    assert session is not None
    jar = {"tessera_session": session}
    assert requests.get(url, cookies=jar, timeout=5).json() == {"signedIn": True}
    profile = requests.get(f"{gateway.url}/api/v1/profiles/{demo.profile_id}", cookies=jar, timeout=5)
    assert profile.status_code == 200 and profile.json()["profile"]["profileId"] == demo.profile_id
    behind_tls = requests.post(
        url, json={"apiKey": demo.tenant.api_key}, headers={"X-Forwarded-Proto": "https"}, timeout=5
    )
    assert "Secure" in behind_tls.headers["Set-Cookie"]
    out = requests.delete(url, cookies=jar, timeout=5)
    assert out.status_code == 204 and "tessera_session=" in out.headers["Set-Cookie"]
    assert "Max-Age=0" in out.headers["Set-Cookie"] or "expires" in out.headers["Set-Cookie"].lower()
    assert requests.get(url, cookies={"tessera_session": "forged"}, timeout=5).status_code == 401


def test_session_body_limits(gateway: Served) -> None:
    url = f"{gateway.url}/api/v1/session"
    big = requests.post(url, json={"apiKey": "k" * 20_000}, timeout=5)
    assert big.status_code == 413 and big.json()["error"]["code"] == 413
    assert requests.post(url, data="apiKey=x", timeout=5).status_code == 415
    garbage = requests.post(url, data=b"{nope", headers={"Content-Type": "application/json"}, timeout=5)
    assert garbage.status_code == 400
    extra = requests.post(url, json={"apiKey": "x", "admin": True}, timeout=5)
    assert extra.status_code == 400 and violations(extra) == {"admin"}


# ---- CORS ------------------------------------------------------------------------------------


def test_cors_only_for_the_allowlisted_origin(gateway: Served, demo: Demo) -> None:
    key = demo.tenant.api_key
    ok = get(gateway, "/api/v1/metrics/definitions", key, headers={"Origin": ALLOWED})
    assert ok.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert ok.headers["Access-Control-Allow-Credentials"] == "true" and "Origin" in ok.headers["Vary"]
    evil = get(gateway, "/api/v1/metrics/definitions", key, headers={"Origin": "https://evil.example.com"})
    assert evil.status_code == 200 and "Access-Control-Allow-Origin" not in evil.headers
    assert "Origin" in evil.headers["Vary"]
    lookalike = get(gateway, "/api/v1/metrics/definitions", key, headers={"Origin": ALLOWED + ".evil.com"})
    assert "Access-Control-Allow-Origin" not in lookalike.headers
    preflight = {"Origin": ALLOWED, "Access-Control-Request-Method": "GET",
                 "Access-Control-Request-Headers": "authorization, last-event-id"}  # fmt: skip
    pre = requests.options(f"{gateway.url}/api/v1/streams/profiles", headers=preflight, timeout=5)
    assert pre.status_code == 204 and pre.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert "GET" in pre.headers["Access-Control-Allow-Methods"]
    allowed_headers = {h.strip().lower() for h in pre.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type", "last-event-id"} <= allowed_headers
    denied = requests.options(
        f"{gateway.url}/api/v1/session", headers={**preflight, "Origin": "https://evil.example.com"}, timeout=5
    )
    assert "Access-Control-Allow-Origin" not in denied.headers
    segment = requests.options(f"{gateway.url}/v1/track", headers=preflight, timeout=5)
    assert "Access-Control-Allow-Origin" not in segment.headers


# ---- server-sent events ----------------------------------------------------------------------


class Sse:
    """A server-sent event stream read on a thread; close() is the client going away."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self.response = requests.get(url, headers=headers, stream=True, timeout=(5, 60))
        self.events: list[dict[str, str]] = []
        self.comments: list[str] = []
        self.ended = threading.Event()
        self.thread = threading.Thread(target=self._pump, daemon=True)
        if self.response.status_code == 200:
            self.thread.start()

    def _pump(self) -> None:
        current: dict[str, str] = {}
        try:
            for raw in self.response.iter_lines(chunk_size=1):
                line = raw.decode()
                if not line:
                    if "data" in current:  # a block without data (retry:) is no event
                        self.events.append(current)
                    current = {}
                elif line.startswith(":"):
                    self.comments.append(line[1:].strip())
                else:
                    name, _, value = line.partition(":")
                    current[name] = value.removeprefix(" ")
        except Exception:  # the stream closed under the reader
            pass
        finally:
            self.ended.set()

    def data(self) -> list[dict[str, Any]]:
        return [json.loads(e["data"]) for e in self.events if "data" in e]

    def close(self) -> None:
        self.response.close()
        self.ended.wait(5)


def watch_cursors(profile_channel: grpc.Channel, tenant: TenantKey, cursor: str, quiet: float = 1.5) -> list[str]:
    """What WatchProfiles itself answers after ``cursor``, until it is quiet."""
    stub = profile_pb2_grpc.ProfileServiceStub(profile_channel)
    call = stub.WatchProfiles(profile_pb2.WatchProfilesRequest(cursor=cursor), metadata=tenant.metadata)
    got: list[str] = []

    def pump() -> None:
        try:
            for item in call:
                got.append(item.cursor)
        except grpc.RpcError:
            pass

    threading.Thread(target=pump, daemon=True).start()
    last = -1
    while last != len(got):
        last = len(got)
        time.sleep(quiet)
    call.cancel()
    return got


def settle(stream: Sse, quiet: float = 1.5, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    last = -1
    while last != len(stream.events) and time.monotonic() < deadline:
        last = len(stream.events)
        time.sleep(quiet)


def test_profile_stream_resumes_with_last_event_id_exactly_after_what_it_saw(
    gateway: Served, api: Apis, tenant: TenantKey, profile_channel: grpc.Channel
) -> None:
    url = f"{gateway.url}/api/v1/streams/profiles"
    first = Sse(url, bearer(tenant.api_key))
    assert first.response.status_code == 200 and first.response.headers["Content-Type"].startswith("text/event-stream")
    wait_until(lambda: "connected" in first.comments, 10, "the stream to open")
    time.sleep(0.3)
    api.send(identify(("email", f"a-{uuid.uuid4().hex[:6]}@example.com"), traits={"name": "A"}))
    wait_until(lambda: first.events, 20, "the first change on the stream")
    settle(first)
    seen = list(first.events)
    assert {e["event"] for e in seen} <= {"created", "updated", "merged", "split", "erased"}
    assert seen[0]["event"] == "created" and json.loads(seen[0]["data"])["kind"] == "PROFILE_EVENT_KIND_CREATED"
    for e in seen:
        conforms(gateway, "WatchProfilesResponse", json.loads(e["data"]))
    first.close()
    wait_until(lambda: gateway.open_streams == 0, 10, "the gateway to cancel the watch of a gone client")

    for who in ("b", "c"):
        api.send(identify(("email", f"{who}-{uuid.uuid4().hex[:6]}@example.com"), traits={"name": who}))
    api.wait_applied(3)
    last_id = seen[-1]["id"]
    expected = watch_cursors(profile_channel, tenant, last_id)
    assert len(expected) >= 2  # at least the two creations

    again = Sse(url, {**bearer(tenant.api_key), "Last-Event-ID": last_id})
    wait_until(lambda: len(again.events) >= len(expected), 20, "the missed changes")
    settle(again)
    again.close()
    assert [e["id"] for e in again.events] == expected  # no gap, no duplicate
    assert not {e["id"] for e in seen} & {e["id"] for e in again.events}
    created = [json.loads(e["data"])["profile"] for e in again.events if e["event"] == "created"]
    assert len(created) == 2

    by_query = Sse(f"{url}?lastEventId={last_id}", bearer(tenant.api_key))
    wait_until(lambda: len(by_query.events) >= len(expected), 20, "the missed changes (query parameter)")
    by_query.close()
    assert [e["id"] for e in by_query.events][: len(expected)] == expected

    only = created[0].removeprefix("profiles/")
    filtered = Sse(f"{url}?profile={only}&lastEventId={last_id}", bearer(tenant.api_key))
    wait_until(lambda: filtered.events, 20, "the one profile's changes")
    settle(filtered, quiet=1.0)
    filtered.close()
    assert {json.loads(e["data"])["profile"] for e in filtered.events} == {created[0]}


def test_stream_refusals_are_http_errors(gateway: Served, tenant: TenantKey) -> None:
    url = f"{gateway.url}/api/v1/streams/profiles"
    assert requests.get(url, timeout=5).status_code == 401
    wrong = requests.get(url, headers=bearer("nope"), timeout=5)
    assert wrong.status_code == 401 and wrong.json()["error"]["status"] == "UNAUTHENTICATED"
    forged = requests.get(url, headers={**bearer(tenant.api_key), "Last-Event-ID": "forged"}, timeout=5)
    assert forged.status_code == 400 and violations(forged) == {"cursor"}
    wait_until(lambda: gateway.open_streams == 0, 5, "no watch left open")


def test_alert_stream_resumes_with_last_event_id(
    gateway: Served, api: Apis, tenant: TenantKey, metrics_channel: grpc.Channel
) -> None:
    quality = quality_pb2_grpc.QualityServiceStub(metrics_channel)
    quality.CreateAlertRule(
        quality_pb2.CreateAlertRuleRequest(
            rule_id="angry",
            rule=quality_pb2.AlertRule(
                display_name="angry", sentiment_below=quality_pb2.SentimentBelow(threshold=-0.3, min_messages=2)
            ),
        ),
        metadata=tenant.metadata,
        timeout=10,
    )
    url = f"{gateway.url}/api/v1/streams/alerts"
    t0 = dt.datetime.now(dt.UTC).replace(microsecond=0)

    def angry_chat(phone: str) -> str:
        iid = uid("chat")
        api.send(chat(phone, iid, event_pb2.AUTHOR_CUSTOMER, ANGRY, t0))
        api.send(chat(phone, iid, event_pb2.AUTHOR_CUSTOMER, "Terrible. Awful. I hate this.", t0))
        return iid

    first = Sse(url, bearer(tenant.api_key))
    wait_until(lambda: "connected" in first.comments, 10, "the stream to open")
    time.sleep(0.5)
    one = angry_chat("+14155550151")
    wait_until(lambda: first.events, 30, "the first alert")
    first.close()
    assert first.events[0]["event"] == "alert" and first.data()[0]["interactionId"] == one
    conforms(gateway, "Alert", first.data()[0])
    wait_until(lambda: gateway.open_streams == 0, 10, "the watch to end with its client")

    two = angry_chat("+14155550152")

    def listed() -> bool:
        resp = quality.ListAlerts(quality_pb2.ListAlertsRequest(), metadata=tenant.metadata, timeout=5)
        return len(resp.alerts) == 2

    wait_until(listed, 30, "the second alert")
    again = Sse(url, {**bearer(tenant.api_key), "Last-Event-ID": first.events[0]["id"]})
    wait_until(lambda: again.events, 20, "the missed alert")
    time.sleep(1.0)
    again.close()
    assert [a["interactionId"] for a in again.data()] == [two]


def test_keepalive_comments_and_drain_end_streams(
    settings: Settings,
    ingest_server: RunningServer,
    profile_server: RunningServer,
    metrics_server: RunningServer,
    tenant: TenantKey,
) -> None:
    served = Served(settings, _own(ingest_server, profile_server, metrics_server))
    try:
        api = served.running.gateway.json_api
        assert api is not None
        api.keepalive_seconds = 0.5
        stream = Sse(f"{served.url}/api/v1/streams/alerts", bearer(tenant.api_key))
        wait_until(lambda: "keepalive" in stream.comments, 10, "a keepalive comment")
        assert served.open_streams == 1
        served.running.gateway.draining = True
        assert stream.ended.wait(5), "the drain must end open streams"
        wait_until(lambda: served.open_streams == 0, 5, "the watch cancelled")
    finally:
        served.stop()
