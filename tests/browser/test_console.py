"""The agent console in a real chromium (Playwright) against the real gateway and real ingest, identity,
profile and metrics with the demo data loaded: sign in, look the demo customer up by the number on the
caller id, see her four channels, watch a new event appear without a reload, and a wrong key refused.

Chromium is Debian's (``apt-get install chromium``); Playwright never downloads a browser here. When it
is missing the tests fail and say so: CI installs it, so a skip would only hide a broken setup."""

from __future__ import annotations

import datetime as dt
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import requests

from services.cli.client import StreamIngester, batches_of
from services.cli.demo import PERSONA, configure_quality, configure_tenant, generate
from services.core.server import RunningServer
from services.core.settings import Settings
from services.gateway.settings import GatewaySettings
from tessera.v1 import (
    event_pb2,
    identity_pb2,
    identity_pb2_grpc,
    ingest_pb2,
    ingest_pb2_grpc,
    profile_pb2,
    profile_pb2_grpc,
)
from tests.conftest import TenantKey, _serve, make_tenant
from tests.integration.test_quality_api import chat
from tests.support.gateway import Served

pytestmark = [pytest.mark.browser, pytest.mark.integration, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
#: The persona's touchpoints land on these (and email, SMS, other); the console must show each.
FOUR_CHANNELS = ("CHANNEL_WEB", "CHANNEL_VOICE", "CHANNEL_CHAT", "CHANNEL_IN_STORE")
#: Her contacts with the contact center: two calls, a chat, an SMS exchange and an email ticket.
INTERACTION_CHANNELS = ("CHANNEL_VOICE", "CHANNEL_CHAT", "CHANNEL_SMS", "CHANNEL_EMAIL")
TIMEOUT_MS = 20_000


def chromium_path() -> str:
    """Debian's chromium, or a failure that says how to get it (never a skip)."""
    found = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    if not found:
        pytest.fail(
            f"the console's browser tests need Debian's chromium at {CHROMIUM}: apt-get install -y chromium "
            "(.ci/run installs it; `playwright install` is not used)",
            pytrace=False,
        )
    return found


@pytest.fixture(scope="module")
def console_profile_server(
    settings: Settings, ingest_server: RunningServer, identity_server: RunningServer, metrics_server: RunningServer
) -> Iterator[RunningServer]:
    """Profile with metrics wired in, so the context carries scores, evaluations and alerts."""
    yield from _serve(
        "profile",
        settings,
        identity_address=f"127.0.0.1:{identity_server.port}",
        ingest_address=f"127.0.0.1:{ingest_server.port}",
        metrics_address=f"127.0.0.1:{metrics_server.port}",
    )


@pytest.fixture(scope="module")
def demo(
    engine: Any,
    ingest_channel: grpc.Channel,
    identity_channel: grpc.Channel,
    metrics_channel: grpc.Channel,
    console_profile_server: RunningServer,
) -> TenantKey:
    """A tenant configured like `tessera up`'s demo tenant, with a small demo dataset loaded through
    ingest and processed: the persona's profile holds her touchpoints on every channel."""
    tenant = make_tenant(engine, "console")
    configure_tenant(identity_channel, tenant.api_key)
    configure_quality(metrics_channel, tenant.api_key)
    tally = StreamIngester(ingest_channel, tenant.api_key).send(
        (None, b) for b in batches_of(generate(customers=30), size=200)
    )
    assert tally.rejected == 0, tally
    with grpc.insecure_channel(f"127.0.0.1:{console_profile_server.port}") as channel:
        profiles = profile_pb2_grpc.ProfileServiceStub(channel)
        identity = identity_pb2_grpc.IdentityServiceStub(identity_channel)
        phone = event_pb2.Identifier(type="phone", value=PERSONA.phone)
        seen: set[int] = set()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                resolved = identity.ResolveIdentifiers(
                    identity_pb2.ResolveIdentifiersRequest(identifiers=[phone]), metadata=tenant.metadata, timeout=5
                )
                page = profiles.ListTimelineEvents(
                    profile_pb2.ListTimelineEventsRequest(parent=resolved.profile, page_size=1000),
                    metadata=tenant.metadata,
                    timeout=5,
                )
                seen = {ev.channel for ev in page.events}
                if {event_pb2.Channel.Value(c) for c in FOUR_CHANNELS} <= seen:
                    return tenant
            except grpc.RpcError:
                pass
            time.sleep(0.3)
    pytest.fail(f"the demo persona's profile never held her four channels (saw {sorted(seen)})")


@pytest.fixture(scope="module")
def gateway(
    settings: Settings,
    ingest_server: RunningServer,
    metrics_server: RunningServer,
    console_profile_server: RunningServer,
) -> Iterator[Served]:
    own = GatewaySettings(
        ingest_address=f"127.0.0.1:{ingest_server.port}",
        profile_address=f"127.0.0.1:{console_profile_server.port}",
        metrics_address=f"127.0.0.1:{metrics_server.port}",
        ingest_deadline_seconds=5.0,
    )
    served = Served(settings, own)
    yield served
    served.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    path = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install -e '.[dev]'", pytrace=False)
    with sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=path, args=["--disable-gpu", "--disable-dev-shm-usage"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh browser context (no cookies) at the laptop width the console is built for."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda err: errors.append(str(err)))

    # A Content-Security-Policy violation is only reported on the console: make it fail the test too.
    def on_console(msg: Any) -> None:
        if "Content Security Policy" in msg.text:
            errors.append(msg.text)

    opened.on("console", on_console)
    yield opened
    context.close()
    assert not errors, f"the page threw or broke its CSP: {errors}"


def sign_in(page: Any, url: str, key: str) -> Any:
    response = page.goto(url)
    page.fill("#api-key", key)
    page.click("#sign-in button[type=submit]")
    return response


def test_agent_signs_in_looks_up_by_phone_and_sees_a_new_event_live(
    page: Any, gateway: Served, demo: TenantKey, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    response = sign_in(page, f"{gateway.url}/", demo.api_key)
    headers = response.headers
    assert "default-src 'self'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff" and headers["referrer-policy"] == "no-referrer"
    expect(page.locator("#app")).to_be_visible()
    expect(page.locator("#sign-in")).to_be_hidden()

    # The key is only in the HttpOnly, SameSite=Strict cookie: not readable by script, not in the URL
    # or in any storage, and not left in the form.
    assert page.evaluate("document.cookie") == ""
    (cookie,) = [c for c in page.context.cookies() if c["name"] == "tessera_session"]
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    assert demo.api_key not in page.url
    assert page.evaluate("localStorage.length + sessionStorage.length") == 0
    assert page.input_value("#api-key") == ""

    # The caller id as a phone system formats it.
    page.fill("#q", PERSONA.phone_national)
    page.press("#q", "Enter")
    expect(page.locator("#customer-name")).to_have_text(PERSONA.name)
    for channel in FOUR_CHANNELS:
        expect(page.locator(f'#channels .chip[data-channel="{channel}"]')).to_be_visible()
        expect(page.locator(f'#activity tbody tr[data-channel="{channel}"]').first).to_be_visible()
    for channel in INTERACTION_CHANNELS:
        expect(page.locator(f'#interactions tbody tr[data-channel="{channel}"]').first).to_be_visible()
    expect(page.locator('#interactions tbody tr[data-channel="CHANNEL_CHAT"]').first).to_contain_text("delivery delay")
    expect(page.locator('#interactions tbody tr[data-channel="CHANNEL_EMAIL"]').first).to_contain_text(
        "product question"
    )
    expect(page.locator("#identifiers")).to_contain_text(PERSONA.loyalty_id)
    # Her delivery case was resolved on the second call: the open-cases list says there are none.
    expect(page.locator("#cases li").first).to_be_attached()
    expect(page.locator('#scores [data-score="nps"]')).to_contain_text("n=")
    expect(page.locator("#live")).to_contain_text("Live")

    # A new touchpoint through the gateway's Segment API shows up without a reload (the screen pop).
    page.evaluate("window.__notReloaded = true")
    name = f"Console Check {uuid.uuid4().hex[:8]}"
    sent = requests.post(
        f"{gateway.url}/v1/track",
        json={
            "userId": PERSONA.user_id,
            "event": name,
            "messageId": f"console-{uuid.uuid4()}",
            "context": {"channel": "web"},
        },
        auth=(demo.api_key, ""),
        timeout=10,
    )
    assert sent.status_code == 200, sent.text
    expect(page.locator("#activity tbody")).to_contain_text(name)
    assert page.evaluate("window.__notReloaded === true")
    page.screenshot(path=str(tmp_path / "customer.png"), full_page=True)  # kept under --basetemp, to look at

    # On a phone the page reflows: nothing wider than the screen but the tables, which scroll inside.
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    expect(page.locator("#customer-name")).to_be_in_viewport()
    page.set_viewport_size({"width": 1280, "height": 900})

    # Signing out forgets the cookie; the lookup is gone.
    page.click('[data-action="sign-out"]')
    expect(page.locator("#sign-in")).to_be_visible()
    assert not [c for c in page.context.cookies() if c["name"] == "tessera_session" and c["value"]]


def test_wrong_key_is_refused(page: Any, gateway: Served, demo: TenantKey) -> None:
    from playwright.sync_api import expect

    sign_in(page, f"{gateway.url}/", "not-" + demo.api_key)
    expect(page.locator("#sign-in .form-error")).to_have_text("That API key was refused.")
    expect(page.locator("#app")).to_be_hidden()
    assert not [c for c in page.context.cookies() if c["name"] == "tessera_session" and c["value"]]
    assert page.evaluate("fetch('/api/v1/session').then(r => r.status)") == 401


def test_dashboard_charts_by_channel_and_a_new_alert_arrives_live(
    page: Any, gateway: Served, demo: TenantKey, ingest_channel: grpc.Channel, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    sign_in(page, f"{gateway.url}/dashboard", demo.api_key)
    for metric in ("nps", "csat", "aht_seconds", "fcr"):
        expect(page.locator(f'#charts [data-metric="{metric}"] figcaption')).to_be_visible()
    # The demo's calls and chats of the last 30 days: points on the handle-time chart, one series per channel.
    expect(page.locator('#charts [data-metric="aht_seconds"] svg circle').first).to_be_attached()
    expect(page.locator('#charts [data-metric="aht_seconds"] .legend')).to_contain_text("Voice")
    expect(page.locator("#feed-state")).to_contain_text("Live")
    expect(page.locator("#feed li").first).to_be_attached()

    # A customer gets angry in a new chat: the supervisor's feed shows it at the top, no reload.
    iid = f"zd-live-{uuid.uuid4().hex[:8]}"
    said = chat(
        PERSONA.phone,
        iid,
        event_pb2.AUTHOR_CUSTOMER,
        "Nobody got back to me, this is ridiculous.",
        dt.datetime.now(dt.UTC),
    )
    answer = ingest_pb2_grpc.IngestServiceStub(ingest_channel).IngestEvents(
        ingest_pb2.IngestEventsRequest(events=[said]), metadata=demo.metadata, timeout=10
    )
    assert answer.accepted_count == 1
    alert = page.locator(f'#feed li[data-interaction="{iid}"]')
    expect(alert).to_be_visible(timeout=TIMEOUT_MS)
    expect(alert).to_contain_text("Customer frustration detected")
    expect(alert).to_contain_text("customer said 'nobody got back'")
    assert page.locator("#feed li").first.get_attribute("data-interaction") == iid
    page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)


def test_console_files_only_and_with_their_types(gateway: Served) -> None:
    """Only the folder's files are served, with their content types and the security headers."""
    js = requests.get(f"{gateway.url}/console/index.js", timeout=5)
    assert js.status_code == 200 and js.headers["Content-Type"].startswith("text/javascript")
    assert (
        js.headers["Cache-Control"]
        and js.headers["ETag"]
        and "default-src 'self'" in js.headers["Content-Security-Policy"]
    )
    again = requests.get(f"{gateway.url}/console/index.js", headers={"If-None-Match": js.headers["ETag"]}, timeout=5)
    assert again.status_code == 304
    assert requests.get(f"{gateway.url}/console/console.css", timeout=5).headers["Content-Type"].startswith("text/css")
    for bad in ("../app.py", "..%2fapp.py", "%2e%2e/console.py", "nope.js", ".hidden", "..%5capp.py"):
        assert requests.get(f"{gateway.url}/console/{bad}", timeout=5).status_code == 404, bad
    dashboard = requests.get(f"{gateway.url}/dashboard", timeout=5)
    assert dashboard.status_code == 200 and dashboard.headers["Content-Type"].startswith("text/html")
