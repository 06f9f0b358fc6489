"""``tessera health``: what the chart's ``helm test`` Pod and TLS probes rely on. Exit 0 only
when the named health service is SERVING; 1 when the server says anything else; 2 when nothing
answers."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import trustme
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.cli.main import main
from services.core.server import LIVENESS_HEALTH, RunningServer

pytestmark = pytest.mark.integration


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def health_only_server() -> Iterator[tuple[int, health.HealthServicer]]:
    """A bare server with only the health service, so a test sets any status it wants."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port, servicer
    server.stop(0)


def test_serving_service_exits_0_through_the_installed_command(ingest_server: RunningServer) -> None:
    address = f"127.0.0.1:{ingest_server.port}"
    # As the chart runs it: the console script, in its own process.
    done = subprocess.run(
        [str(Path(sys.executable).with_name("tessera")), "health", address, "--timeout", "5"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "SERVING" in done.stdout
    for name in ("", "tessera.v1.IngestService", LIVENESS_HEALTH):
        assert main(["health", address, "--service", name]) == 0, name


def test_unknown_health_service_name_exits_1(ingest_server: RunningServer) -> None:
    assert main(["health", f"127.0.0.1:{ingest_server.port}", "--service", "tessera.v1.NoSuchService"]) == 1


def test_not_serving_exits_1(health_only_server: tuple[int, health.HealthServicer]) -> None:
    port, servicer = health_only_server
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert main(["health", f"127.0.0.1:{port}"]) == 1
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert main(["health", f"127.0.0.1:{port}"]) == 0


def test_closed_port_exits_2() -> None:
    assert main(["health", f"127.0.0.1:{_closed_port()}", "--timeout", "2"]) == 2


def test_tls_probe_of_localhost_with_the_services_certificate(tmp_path: Path) -> None:
    """In a pod the probe dials localhost while the certificate names the Service: --server-name
    checks the name the certificate carries, --ca-file the issuer. Plaintext gets no answer."""
    ca = trustme.CA()
    cert = ca.issue_cert("tessera-ingest.tessera.svc")
    ca_file = tmp_path / "ca.crt"
    ca_file.write_bytes(ca.cert_pem.bytes())
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    creds = grpc.ssl_server_credentials(
        [(cert.private_key_pem.bytes(), b"".join(blob.bytes() for blob in cert.cert_chain_pems))]
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        address = f"localhost:{port}"
        ok = ["health", address, "--ca-file", str(ca_file), "--server-name", "tessera-ingest.tessera.svc"]
        assert main(ok) == 0
        # Without the override the name check fails: no answer, not a false SERVING.
        assert main(["health", address, "--ca-file", str(ca_file), "--timeout", "2"]) == 2
        assert main(["health", address, "--timeout", "2"]) == 2
    finally:
        server.stop(0)
