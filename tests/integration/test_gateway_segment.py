"""The gateway in front of real ingest and identity (real PostgreSQL and Redis), driven by the real
Segment and RudderStack Python SDKs and by raw HTTP: dedupe across retries, stitching, and the
statuses an SDK acts on (401, 413, 400 naming the field while good events are kept, 429, 4xx for garbage)."""

from __future__ import annotations

import base64
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import requests
from google.protobuf.json_format import MessageToDict as as_dict

from services.cli import registry
from services.core import harness
from services.core.server import RunningServer, start_server
from services.core.settings import Settings
from tessera.v1 import event_pb2, identity_pb2, identity_pb2_grpc, ingest_pb2, ingest_pb2_grpc
from tests.conftest import TenantKey
from tests.support.gateway import Served, local

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gateway(settings: Settings, ingest_server: RunningServer) -> Iterator[Served]:
    served = Served(settings, local(ingest_server.port, ingest_deadline_seconds=5.0))
    yield served
    served.stop()


def basic(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


def stored(channel: grpc.Channel, tenant: TenantKey, *message_ids: str) -> list[event_pb2.Event]:
    stub = ingest_pb2_grpc.IngestServiceStub(channel)
    req = ingest_pb2.ListEventsRequest(page_size=100, message_ids=list(message_ids))
    return list(stub.ListEvents(req, metadata=tenant.metadata, timeout=5).events)


def segment_client(gateway: Served, key: str, errors: list[Any]) -> Any:
    from segment.analytics import Client

    return Client(key, host=gateway.url, sync_mode=True, max_retries=0, on_error=lambda e, _b: errors.append(e))


def test_segment_sdk_track_retried_lands_once(gateway: Served, tenant: TenantKey, ingest_channel: grpc.Channel) -> None:
    errors: list[Any] = []
    client = segment_client(gateway, tenant.api_key, errors)
    mid = f"seg-{uuid.uuid4()}"
    for _ in range(2):  # the SDK's retry of one message: same messageId
        client.track(user_id="u-42", event="Order Completed", properties={"total": 12.5}, message_id=mid)
    client.flush()
    assert not errors
    (ev,) = stored(ingest_channel, tenant, mid)
    assert ev.track.event == "Order Completed" and ev.properties["total"] == 12.5
    assert [(i.type, i.value) for i in ev.identifiers] == [("user_id", "u-42")]
    assert ev.channel == event_pb2.CHANNEL_OTHER and as_dict(ev.context)["library"]["name"] == "analytics-python"


def test_identify_then_anonymous_track_stitch_into_one_profile(
    gateway: Served, tenant: TenantKey, ingest_channel: grpc.Channel, identity_channel: grpc.Channel
) -> None:
    errors: list[Any] = []
    client = segment_client(gateway, tenant.api_key, errors)
    anon, user = f"anon-{uuid.uuid4().hex[:8]}", f"user-{uuid.uuid4().hex[:8]}"
    client.identify(user_id=user, anonymous_id=anon, traits={"email": f"{user}@example.com", "plan": "pro"})
    client.track(anonymous_id=anon, event="Viewed Pricing")
    client.flush()
    assert not errors
    identity = identity_pb2_grpc.IdentityServiceStub(identity_channel)

    def resolve(t: str, v: str) -> str:
        req = identity_pb2.ResolveIdentifiersRequest(identifiers=[event_pb2.Identifier(type=t, value=v)])
        return str(identity.ResolveIdentifiers(req, metadata=tenant.metadata, timeout=5).profile_id)

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            ids = {resolve("user_id", user), resolve("anonymous_id", anon), resolve("email", f"{user}@example.com")}
            if len(ids) == 1 and "" not in ids:
                break
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    else:
        pytest.fail("identify and the anonymous track never resolved to one profile")


def test_rudder_sdk_gzip_batch(gateway: Served, tenant: TenantKey, ingest_channel: grpc.Channel) -> None:
    rudder = pytest.importorskip("rudderstack.analytics.client")
    errors: list[Any] = []
    client = rudder.Client(
        tenant.api_key, host=gateway.url, sync_mode=True, max_retries=0, on_error=lambda e, _b: errors.append(e)
    )
    mid = f"rud-{uuid.uuid4()}"
    client.page(user_id="r-1", name="Home", properties={"url": "/"}, message_id=mid)
    client.flush()
    assert not errors
    (ev,) = stored(ingest_channel, tenant, mid)
    assert ev.track.event == "Page Viewed" and ev.properties["name"] == "Home"


def test_wrong_or_missing_key_is_401(gateway: Served) -> None:
    body = {"userId": "u", "event": "e", "messageId": "m"}
    assert requests.post(f"{gateway.url}/v1/track", json=body, headers=basic("nope"), timeout=5).status_code == 401
    missing = requests.post(f"{gateway.url}/v1/track", json=body, timeout=5)
    assert missing.status_code == 401 and missing.json()["success"] is False
    from segment.analytics.request import APIError

    with pytest.raises(APIError) as refused:  # in sync mode the SDK raises what it would retry or drop
        segment_client(gateway, "wrong-key", []).track(user_id="u", event="e")
    assert refused.value.status == 401 and refused.value.code == "unauthorized"


def test_bearer_works_too(gateway: Served, tenant: TenantKey, ingest_channel: grpc.Channel) -> None:
    mid = f"b-{uuid.uuid4()}"
    reply = requests.post(
        f"{gateway.url}/v1/identify",
        json={"userId": "b-1", "messageId": mid, "traits": {"name": "Bea"}},
        headers={"Authorization": f"Bearer {tenant.api_key}"},
        timeout=5,
    )
    assert reply.status_code == 200 and reply.json() == {"success": True}
    (ev,) = stored(ingest_channel, tenant, mid)
    assert ev.identify.traits["name"] == "Bea"


def test_too_large_is_413(gateway: Served, tenant: TenantKey) -> None:
    big: dict[str, Any] = {"userId": "u", "event": "e", "messageId": "m", "properties": {"x": "y" * 40_000}}
    assert (
        requests.post(f"{gateway.url}/v1/track", json=big, headers=basic(tenant.api_key), timeout=5).status_code == 413
    )
    batch: dict[str, Any] = {"batch": [{**big, "type": "track", "properties": {"x": "y" * 30_000}} for _ in range(20)]}
    reply = requests.post(f"{gateway.url}/v1/batch", json=batch, headers=basic(tenant.api_key), timeout=5)
    assert reply.status_code == 413


def test_bad_event_named_beside_good_ones_that_are_kept(
    gateway: Served, tenant: TenantKey, ingest_channel: grpc.Channel
) -> None:
    good = [f"g-{uuid.uuid4()}" for _ in range(2)]
    batch = {
        "batch": [
            {"type": "track", "userId": "u", "event": "ok", "messageId": good[0]},
            {"type": "track", "userId": "u", "messageId": f"bad-{uuid.uuid4()}"},  # no event name: ours
            {"type": "identify", "userId": "u", "messageId": "x" * 1000},  # too long: ingest's
            {"type": "track", "userId": "u", "event": "ok", "messageId": good[1]},
        ]
    }
    reply = requests.post(f"{gateway.url}/v1/batch", json=batch, headers=basic(tenant.api_key), timeout=5)
    assert reply.status_code == 400
    body = reply.json()
    assert body["accepted"] == 2 and body["rejected"] == 2
    named = {(v["index"], v["field"]) for v in body["violations"]}
    assert (1, "event") in named and (2, "messageId") in named
    assert all(v["index"] in (1, 2) and v["description"] for v in body["violations"])
    assert {e.message_id for e in stored(ingest_channel, tenant, *good)} == set(good)


@pytest.mark.parametrize(
    ("path", "data", "headers"),
    [
        ("/v1/track", b"\xff\xfe\x00garbage", {}),
        ("/v1/track", b"{not json", {}),
        ("/v1/track", b"[" * 20_000, {}),
        ("/v1/track", b"[1, 2]", {}),
        ("/v1/track", b'{"userId": "u", "event": "e", "messageId": "m", "wat": 1}', {}),
        ("/v1/batch", b'{"batch": "no"}', {}),
        ("/v1/batch", b'{"batch": [1, "x", null]}', {}),
        ("/v1/track", b"not gzip", {"Content-Encoding": "gzip"}),
        ("/v1/track", b'{"userId": "u", "event": "e", "messageId": "m", "properties": {"n": 1e999}}', {}),
    ],
)
def test_garbage_is_4xx_and_the_gateway_stays_up(
    gateway: Served, tenant: TenantKey, path: str, data: bytes, headers: dict[str, str]
) -> None:
    reply = requests.post(
        f"{gateway.url}{path}",
        data=data,
        headers={**basic(tenant.api_key), "Content-Type": "application/json", **headers},
        timeout=5,
    )
    assert 400 <= reply.status_code < 500, reply.text
    assert reply.json()["success"] is False
    assert requests.get(f"{gateway.url}/healthz", timeout=5).status_code == 200


def test_rate_limit_is_429_with_retry_after(settings: Settings, tenant: TenantKey) -> None:
    definition = registry.grpc_definition("ingest")
    own = definition.settings_type(rate_limit=1.0, rate_burst=1.0)
    ingest = start_server(definition, settings, port=0, service_settings=own)
    served: Served | None = None
    try:
        assert harness.wait_health(f"127.0.0.1:{ingest.port}")
        served = Served(settings, local(ingest.port, ingest_deadline_seconds=5.0))
        statuses: list[requests.Response] = []
        for n in range(5):
            body = {"userId": "u", "event": "e", "messageId": f"rl-{n}-{uuid.uuid4()}"}
            statuses.append(
                requests.post(f"{served.url}/v1/track", json=body, headers=basic(tenant.api_key), timeout=5)
            )
        limited = [r for r in statuses if r.status_code == 429]
        assert limited, [r.status_code for r in statuses]
        assert int(limited[0].headers["Retry-After"]) >= 1
    finally:
        if served is not None:
            served.stop()
        ingest.shutdown(grace=1)


def test_ingest_down_is_503(settings: Settings, tenant: TenantKey) -> None:
    served = Served(settings, local(harness_free_port(), ingest_deadline_seconds=5.0))
    try:
        body = {"userId": "u", "event": "e", "messageId": "m"}
        reply = requests.post(f"{served.url}/v1/track", json=body, headers=basic(tenant.api_key), timeout=15)
        assert reply.status_code == 503 and "Retry-After" in reply.headers
    finally:
        served.stop()


def test_readyz_is_503_while_draining(settings: Settings, ingest_server: RunningServer) -> None:
    served = Served(settings, local(ingest_server.port, ingest_deadline_seconds=5.0))
    assert requests.get(f"{served.url}/readyz", timeout=5).status_code == 200
    served.running.gateway.draining = True
    assert requests.get(f"{served.url}/readyz", timeout=5).status_code == 503
    assert requests.get(f"{served.url}/healthz", timeout=5).status_code == 200
    served.stop()


def harness_free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_gateway_drains_on_sigterm(
    backends: harness.Scratch, ingest_server: RunningServer, tenant: TenantKey, tmp_path: Path
) -> None:
    """``tessera serve gateway`` as its own process: ready, accepts, then on SIGTERM readiness
    turns 503 while it drains, and it exits cleanly."""
    port = harness_free_port()
    env = backends.env(
        TESSERA_GATEWAY_PORT=str(port),
        TESSERA_GATEWAY_INGEST_ADDRESS=f"127.0.0.1:{ingest_server.port}",
        TESSERA_SHUTDOWN_GRACE_SECONDS="3",
    )
    proc = harness.ServiceProcess.service("gateway", env, tmp_path / "gateway.log").start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert proc.alive(), proc.log_tail()
            time.sleep(0.1)
        mid = f"proc-{uuid.uuid4()}"
        body = {"userId": "p", "event": "e", "messageId": mid}
        assert requests.post(f"{url}/v1/track", json=body, headers=basic(tenant.api_key), timeout=5).status_code == 200
        proc.send_signal(signal.SIGTERM)
        ready = [requests.get(f"{url}/readyz", timeout=1).status_code for _ in range(3)]  # within the 1 s drain
        assert ready[-1] == 503, ready
        assert proc.wait(timeout=15) == 0, proc.log_tail()
    finally:
        proc.stop(grace=2)
