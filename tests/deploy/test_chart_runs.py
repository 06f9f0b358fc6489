"""What the chart renders, run: the migration Job's command and a service Deployment's command,
with exactly the environment the chart gives the pod (the Secrets' URLs pointing at this run's
PostgreSQL and Redis), starts, passes the chart's own probes and ``helm test`` command, and stops
within the pod's termination grace period on SIGTERM. No cluster runs here, so the pod is a
process; the image's HOME/TMPDIR are a temporary directory, as /tmp is in the pod."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trustme

from services.core import harness
from services.core.server import LIVENESS_HEALTH
from tests.deploy.conftest import FULLNAME_PREFIX, NAMESPACE, Manifest, Render, by_name, of_kind

pytestmark = [pytest.mark.deploy, pytest.mark.integration, pytest.mark.slow]

TESSERA = str(Path(sys.executable).with_name("tessera"))


def pod_env(c: dict[str, Any], secrets: dict[str, str], home: Path, **overrides: str) -> dict[str, str]:
    """The container's environment as kubelet would build it (downward API and $(VAR) expanded)."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "TMPDIR": str(home), "PYTHONDONTWRITEBYTECODE": "1"}
    downward = {"metadata.name": "tessera-ingest-7d9f-abcde", "metadata.namespace": NAMESPACE}
    for e in c.get("env", []):
        if "value" in e:
            value = e["value"]
            for name, known in env.items():
                value = value.replace(f"$({name})", known)
            env[e["name"]] = value
        elif "fieldRef" in e["valueFrom"]:
            env[e["name"]] = downward[e["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            env[e["name"]] = secrets[e["name"]]
    env["TESSERA_DATA_DIR"] = str(home / "tessera")
    env.update(overrides)
    return env


@pytest.fixture
def secrets(database_url: str, redis_server_url: str) -> dict[str, str]:
    return {"TESSERA_DATABASE_URL": database_url, "TESSERA_REDIS_URL": redis_server_url}


def test_the_migration_job_command_runs_again_without_harm(
    default_objects: list[Manifest], secrets: dict[str, str], tmp_path: Path
) -> None:
    """The session's database is already migrated: the hook's `tessera migrate` is a no-op that succeeds."""
    (job,) = of_kind(default_objects, "Job")
    c = job["spec"]["template"]["spec"]["containers"][0]
    done = subprocess.run(
        [TESSERA, *c["args"]], env=pod_env(c, secrets, tmp_path), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "migrated:" in done.stdout


def test_a_deployment_as_rendered_starts_passes_its_probes_and_stops_in_time(
    default_objects: list[Manifest], secrets: dict[str, str], redis_prefix: str, tmp_path: Path
) -> None:
    deployment = by_name(default_objects, "Deployment")[f"{FULLNAME_PREFIX}-ingest"]
    spec = deployment["spec"]["template"]["spec"]
    c = spec["containers"][0]
    port, metrics_port = harness.free_port(), harness.free_port()
    env = pod_env(
        c,
        secrets,
        tmp_path,
        # Only what a shared test machine needs changed: free ports, this run's Redis prefix.
        TESSERA_INGEST_PORT=str(port),
        TESSERA_PROMETHEUS_PORT=str(metrics_port),
        TESSERA_REDIS_PREFIX=redis_prefix,
    )
    process = harness.ServiceProcess("ingest", [TESSERA, *c["args"]], env, tmp_path / "ingest.log").start()
    try:
        harness.wait_serving(f"127.0.0.1:{port}", process, timeout=60)
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            grpc_probe = c[probe]["grpc"]
            check = [TESSERA, "health", f"localhost:{port}", "--service", grpc_probe["service"]]
            done = subprocess.run(check, env=env, capture_output=True, text=True, timeout=30)
            assert done.returncode == 0, f"{probe}: {done.stderr}"
        assert c["livenessProbe"]["grpc"]["service"] == LIVENESS_HEALTH
        (test_pod,) = (p for p in of_kind(default_objects, "Pod") if p["metadata"]["name"].endswith("-ingest-test"))
        args = list(test_pod["spec"]["containers"][0]["args"])
        args[1] = f"localhost:{port}"  # the Service's name, which only cluster DNS knows
        done = subprocess.run([TESSERA, *args], env=env, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        grace = spec["terminationGracePeriodSeconds"]
        assert process.wait(timeout=grace) == 0, process.log_tail()
        assert time.monotonic() - started < grace
    finally:
        process.stop(grace=5)


def test_with_tls_the_exec_probes_pass_against_the_service(
    render: Render, secrets: dict[str, str], redis_prefix: str, tmp_path: Path
) -> None:
    """kubelet's gRPC probes speak no TLS, so under TLS the chart's probes are `tessera health`
    commands: run them as rendered (paths moved to where this test keeps the Secret's files)."""
    objects = render("--set", "tls.enabled=true", "--set", "tls.existingSecret=tessera-tls")
    deployment = by_name(objects, "Deployment")[f"{FULLNAME_PREFIX}-ingest"]
    c = deployment["spec"]["template"]["spec"]["containers"][0]
    tls_dir = next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "tls")
    ca = trustme.CA()
    cert = ca.issue_cert(f"{FULLNAME_PREFIX}-ingest.{NAMESPACE}.svc")
    secret = tmp_path / "tls"
    secret.mkdir()
    (secret / "tls.crt").write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    (secret / "tls.key").write_bytes(cert.private_key_pem.bytes())
    (secret / "ca.crt").write_bytes(ca.cert_pem.bytes())

    def moved(value: str) -> str:
        return value.replace(tls_dir, str(secret))

    port = harness.free_port()
    env = {
        k: moved(v)
        for k, v in pod_env(
            c,
            secrets,
            tmp_path,
            TESSERA_INGEST_PORT=str(port),
            TESSERA_PROMETHEUS_PORT="0",
            TESSERA_REDIS_PREFIX=redis_prefix,
        ).items()
    }
    process = harness.ServiceProcess("ingest-tls", [TESSERA, *c["args"]], env, tmp_path / "ingest.log").start()
    try:
        rendered_port = c["ports"][0]["containerPort"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            command = [
                moved(a).replace(f"localhost:{rendered_port}", f"localhost:{port}") for a in c[probe]["exec"]["command"]
            ]
            deadline = time.monotonic() + 60
            while True:
                done = subprocess.run([TESSERA, *command[1:]], env=env, capture_output=True, text=True, timeout=30)
                if done.returncode == 0 or time.monotonic() > deadline or not process.alive():
                    break
                time.sleep(0.2)
            assert done.returncode == 0, f"{probe}: {done.stderr}\n{process.log_tail()}"
        # And a plaintext check, what a native grpc probe would do, gets no answer.
        plain = subprocess.run(
            [TESSERA, "health", f"localhost:{port}", "--timeout", "2"], env=env, capture_output=True, timeout=30
        )
        assert plain.returncode == 2
    finally:
        process.stop(grace=5)


def test_the_gateway_as_rendered_starts_passes_its_http_probes_and_stops_in_time(
    default_objects: list[Manifest], secrets: dict[str, str], redis_prefix: str, tmp_path: Path
) -> None:
    """The gateway's probes are HTTP: the paths the chart asks answer 200 from the command it runs,
    the helm test's Python one-liner passes, and SIGTERM ends it within the grace period."""
    deployment = by_name(default_objects, "Deployment")[f"{FULLNAME_PREFIX}-gateway"]
    spec = deployment["spec"]["template"]["spec"]
    c = spec["containers"][0]
    port = harness.free_port()
    env = pod_env(
        c,
        secrets,
        tmp_path,
        TESSERA_GATEWAY_PORT=str(port),
        TESSERA_PROMETHEUS_PORT="0",
        TESSERA_REDIS_PREFIX=redis_prefix,
    )
    process = harness.ServiceProcess("gateway", [TESSERA, *c["args"]], env, tmp_path / "gateway.log").start()
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert process.poll() is None, process.log_tail()
            assert time.monotonic() < deadline, "the gateway never answered /healthz"
            time.sleep(0.1)
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            get = c[probe]["httpGet"]
            assert get["port"] == "http"
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{get['path']}", timeout=5) as r:
                assert r.status == 200, probe
        (test_pod,) = (p for p in of_kind(default_objects, "Pod") if p["metadata"]["name"].endswith("-gateway-test"))
        command = list(test_pod["spec"]["containers"][0]["command"])
        command[2] = re.sub(r"http://[^/']+/", f"http://127.0.0.1:{port}/", command[2])
        python = str(Path(TESSERA).with_name("python"))
        done = subprocess.run([python, *command[1:]], env=env, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        grace = spec["terminationGracePeriodSeconds"]
        assert process.wait(timeout=grace) == 0, process.log_tail()
        assert time.monotonic() - started < grace
    finally:
        process.stop(grace=5)
