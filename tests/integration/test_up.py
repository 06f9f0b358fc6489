"""A newcomer's first session: ``tessera up`` with nothing configured, then the README tour."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import typing
from pathlib import Path

import grpc
import psutil
import pytest
import requests

from services.cli.demo import PERSONA
from services.core.harness import TESSERA, free_port, wait_health
from tessera.v1 import (
    event_pb2,
    identity_pb2,
    identity_pb2_grpc,
    ingest_pb2,
    ingest_pb2_grpc,
    metrics_pb2,
    metrics_pb2_grpc,
    profile_pb2,
    profile_pb2_grpc,
    quality_pb2,
    quality_pb2_grpc,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
IDENTITY_PORT = free_port()
PROFILE_PORT = free_port()
METRICS_PORT = free_port()
GATEWAY_PORT = free_port()
PERSONA_IDENTIFIERS = {("email", PERSONA.email), ("phone", PERSONA.phone), ("loyalty_id", PERSONA.loyalty_id)}


def _env(data_dir: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
    env.update(
        {
            "TESSERA_DATA_DIR": str(data_dir),
            "TESSERA_INGEST_PORT": str(port),
            "TESSERA_IDENTITY_PORT": str(IDENTITY_PORT),
            "TESSERA_PROFILE_PORT": str(PROFILE_PORT),
            "TESSERA_METRICS_PORT": str(METRICS_PORT),
            "TESSERA_GATEWAY_PORT": str(GATEWAY_PORT),
            "XDG_STATE_HOME": str(data_dir.parent / f"{data_dir.name}-state"),
        }
    )
    return env


def _start_up(data_dir: Path, port: int, log: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*TESSERA, "up", "--demo-customers", "100"],
        env=_env(data_dir, port),
        cwd=ROOT,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _wait_banner(proc: subprocess.Popen[str], log: Path, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text()
        if "Tessera is up." in text and "Ctrl-C stops everything" in text:
            return text
        if proc.poll() is not None:
            raise AssertionError(f"tessera up exited early:\n{text}")
        time.sleep(0.2)
    raise AssertionError(f"no banner in {timeout}s:\n{log.read_text()}")


def _cli(data_dir: Path, port: int, *args: str, api_key: str | None = None) -> subprocess.CompletedProcess[str]:
    env = _env(data_dir, port)
    if api_key:
        env["TESSERA_API_KEY"] = api_key
    return subprocess.run([*TESSERA, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)


def _stop(proc: subprocess.Popen[str]) -> int:
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    return proc.wait(60)


def _wait_one_profile(api_key: str, identifiers: list[tuple[str, str]], timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    found: set[str] = set()
    with grpc.insecure_channel(f"127.0.0.1:{IDENTITY_PORT}") as channel:
        stub = identity_pb2_grpc.IdentityServiceStub(channel)
        while time.monotonic() < deadline:
            found = set()
            for t, v in identifiers:
                req = identity_pb2.ResolveIdentifiersRequest(identifiers=[event_pb2.Identifier(type=t, value=v)])
                try:
                    found.add(
                        stub.ResolveIdentifiers(req, metadata=(("authorization", f"Bearer {api_key}"),)).profile_id
                    )
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.NOT_FOUND, err
                    found.add("")
            if len(found) == 1 and "" not in found:
                return found.pop()
            time.sleep(0.5)
    raise AssertionError(f"the persona did not resolve to one profile: {found}")


def _wait_metrics(api_key: str, profile_id: str, timeout: float = 120) -> None:
    """Until the metrics consumer, busy evaluating the demo chats too, has her calls."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{METRICS_PORT}") as channel:
        stub = metrics_pb2_grpc.MetricsServiceStub(channel)
        while time.monotonic() < deadline:
            try:
                got = stub.GetCustomerMetrics(
                    metrics_pb2.GetCustomerMetricsRequest(profile=f"profiles/{profile_id}"),
                    metadata=(("authorization", f"Bearer {api_key}"),),
                    timeout=10,
                )
                if got.metrics.aht_seconds.sample_size > 0:
                    return
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.NOT_FOUND, err
            time.sleep(0.5)
    raise AssertionError("the metrics service never had the demo customer's calls")


def _wait_context(api_key: str, profile_id: str, timeout: float = 90) -> profile_pb2.GetCustomerContextResponse:
    """The demo customer's context by the caller id an agent desktop sees, once profile caught up."""
    deadline = time.monotonic() + timeout
    last = None
    with grpc.insecure_channel(f"127.0.0.1:{PROFILE_PORT}") as channel:
        stub = profile_pb2_grpc.ProfileServiceStub(channel)
        while time.monotonic() < deadline:
            try:
                last = stub.GetCustomerContext(
                    profile_pb2.GetCustomerContextRequest(
                        identifier=event_pb2.Identifier(type="phone", value=PERSONA.phone_national)
                    ),
                    metadata=(("authorization", f"Bearer {api_key}"),),
                    timeout=10,
                )
                traits = {t.key: t.value.string_value for t in last.profile.traits}
                # Profile applies her events after identity resolved them: wait for all of them
                # (every channel's identifier, her calls and chat), not only the first few.
                if (
                    last.profile.profile_id == profile_id
                    and traits.get("first_name") == PERSONA.first_name
                    and len(last.recent_interactions) >= 3
                    and {(i.type, i.value) for i in last.profile.identifiers} >= PERSONA_IDENTIFIERS
                    # The scores come from metrics within the context's 150 ms budget; on a busy
                    # machine one call can miss it and say so (missing_reason), the next one not.
                    and not last.scores.missing_reason
                ):
                    return typing.cast(profile_pb2.GetCustomerContextResponse, last)
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.NOT_FOUND, err
            time.sleep(0.5)
    raise AssertionError(f"the demo customer's context never showed her story: {last}")


def test_newcomer_session_from_nothing_to_a_query(tmp_path: Path) -> None:
    data_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"tup-{os.getpid()}"
    shutil.rmtree(data_dir, ignore_errors=True)
    port = free_port()
    log = tmp_path / "up.log"
    proc = _start_up(data_dir, port, log)
    try:
        banner = _wait_banner(proc, log)
        assert f"ingest    127.0.0.1:{port}" in banner
        assert "demo data:" in banner and " 0 rejected" in banner
        demo_key = (data_dir / "demo-api-key").read_text().strip()
        assert demo_key in banner
        assert oct((data_dir / "demo-api-key").stat().st_mode & 0o777) == "0o600"
        assert f"identity  127.0.0.1:{IDENTITY_PORT}" in banner

        assert f"profile   127.0.0.1:{PROFILE_PORT}" in banner
        assert "ProfileService/GetCustomerContext" in banner
        assert f"metrics   127.0.0.1:{METRICS_PORT}" in banner and "tessera metrics query" in banner

        # The demo persona's four channels resolve to one customer once identity has caught up.
        profile_id = _wait_one_profile(
            demo_key,
            [
                ("email", PERSONA.email),
                ("phone", PERSONA.phone_national),
                ("chat_id", PERSONA.chat_id),
                ("loyalty_id", PERSONA.loyalty_id),
            ],
        )
        # "Who is calling?": her context from the caller id, with her calls and chat, her open
        # case, and her CX scores from the metrics service.
        _wait_metrics(demo_key, profile_id)  # first, so her context is first built with her scores
        context = _wait_context(demo_key, profile_id)
        assert {(i.type, i.value) for i in context.profile.identifiers} >= PERSONA_IDENTIFIERS
        assert "CS-0999001" in {c.case_id for c in context.open_cases} | {
            i.case_id for i in context.recent_interactions
        }
        assert context.contacts.last_30_days >= 3
        assert context.scores.missing_reason == ""
        assert context.scores.metrics.profile == f"profiles/{profile_id}"
        assert context.scores.metrics.aht_seconds.sample_size > 0

        # The agent console the banner points to: the page, and her context through the gateway's JSON API
        # (so `tessera up` told the gateway where profile is).
        console = f"http://127.0.0.1:{GATEWAY_PORT}"
        assert f"Agent console: {console}/" in banner
        assert requests.get(f"{console}/", timeout=10).headers["Content-Type"].startswith("text/html")
        found = requests.get(
            f"{console}/api/v1/context",
            params={"q": PERSONA.phone_national},
            headers={"Authorization": f"Bearer {demo_key}"},
            timeout=10,
        )
        assert found.status_code == 200 and found.json()["profile"]["profileId"] == profile_id, found.text

        # The CX analyst's view: a month of the demo tenant's figures by channel, as a table.
        month = _cli(
            data_dir,
            port,
            "metrics",
            "query",
            "--metric",
            "contact_volume,csat,aht_seconds",
            "--from",
            "30d",
            "--granularity",
            "all",
            "--group-by",
            "channel",
            "--target",
            f"127.0.0.1:{METRICS_PORT}",
            api_key=demo_key,
        )
        assert month.returncode == 0, month.stderr
        volume = [line for line in month.stdout.splitlines() if line.startswith("contact_volume")]
        assert len(volume) >= 3, month.stdout  # calls, chats, emails...

        # The quality lead's view: every demo chat evaluated under the demo form, scored by agent.
        quality = _cli(
            data_dir,
            port,
            "metrics",
            "query",
            "--metric",
            "quality_score",
            "--from",
            "30d",
            "--granularity",
            "all",
            "--group-by",
            "agent",
            "--target",
            f"127.0.0.1:{METRICS_PORT}",
            api_key=demo_key,
        )
        assert quality.returncode == 0, quality.stderr
        by_agent = [line for line in quality.stdout.splitlines() if line.startswith("quality_score")]
        assert len(by_agent) >= 3, quality.stdout
        # ... and the alerts the demo's rules fired on its conversations.
        with grpc.insecure_channel(f"127.0.0.1:{METRICS_PORT}") as channel:
            fired = quality_pb2_grpc.QualityServiceStub(channel).ListAlerts(
                quality_pb2.ListAlertsRequest(page_size=100),
                metadata=(("authorization", f"Bearer {demo_key}"),),
                timeout=10,
            )
        assert fired.alerts and all(a.description for a in fired.alerts), fired

        # Another terminal: a tenant of one's own, and an import, with no configuration at all.
        created = _cli(data_dir, port, "tenant", "create", "acme", "--json")
        assert created.returncode == 0, created.stderr
        key = json.loads(created.stdout)["api_key"]
        events = tmp_path / "events.jsonl"
        exported = _cli(data_dir, port, "demo", "export", str(events), "--customers", "5")
        assert exported.returncode == 0, exported.stderr
        imported = _cli(data_dir, port, "import", str(events), "--json", api_key=key)
        assert imported.returncode == 0, imported.stderr
        first = json.loads(imported.stdout)
        assert first["accepted"] > 0 and first["rejected"] == 0
        again = json.loads(_cli(data_dir, port, "import", str(events), "--json", api_key=key).stdout)
        assert (again["accepted"], again["duplicate"]) == (0, first["accepted"])

        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            page = stub.ListEvents(
                ingest_pb2.ListEventsRequest(page_size=5), metadata=(("authorization", f"Bearer {key}"),)
            )
            assert len(page.events) == 5 and page.next_page_token

        # A service that dies is restarted by `tessera up`, and nothing it acknowledged is lost.
        [child] = [
            c
            for c in psutil.Process(proc.pid).children(recursive=True)
            if "serve" in c.cmdline() and "ingest" in c.cmdline()
        ]
        child.kill()
        child.wait(10)
        assert wait_health(f"127.0.0.1:{port}", timeout=60), "ingest was not restarted"
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            again_page = stub.ListEvents(
                ingest_pb2.ListEventsRequest(page_size=5), metadata=(("authorization", f"Bearer {key}"),)
            )
            assert [e.event_id for e in again_page.events] == [e.event_id for e in page.events]
        assert "ingest exited with" in log.read_text()
    finally:
        code = _stop(proc)
    assert code == 0, log.read_text()
    assert "stopped." in log.read_text()
    assert not (data_dir / "runtime.json").exists()

    # The next `tessera up` finds the data again and does not reload the demo.
    proc = _start_up(data_dir, port, tmp_path / "up2.log")
    try:
        banner = _wait_banner(proc, tmp_path / "up2.log")
        assert "loading the demo dataset" not in banner
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            page = stub.ListEvents(
                ingest_pb2.ListEventsRequest(page_size=1), metadata=(("authorization", f"Bearer {demo_key}"),)
            )
            assert page.events[0].message_id.startswith("demo-")
    finally:
        assert _stop(proc) == 0
        shutil.rmtree(data_dir, ignore_errors=True)
        shutil.rmtree(data_dir.parent / f"{data_dir.name}-state", ignore_errors=True)
