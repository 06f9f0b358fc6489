"""Optional TLS: with a certificate and key configured, the server speaks only TLS."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.core.server import start_server
from services.core.settings import Settings
from services.ingest.app import definition

pytestmark = pytest.mark.integration


def test_tls_server_serves_tls_clients_only(settings: Settings, tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    key_file.write_bytes(cert.private_key_pem.bytes())
    running = start_server(
        definition(), settings.with_overrides(tls_cert_file=cert_file, tls_key_file=key_file), port=0
    )
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes())
        with grpc.secure_channel(f"localhost:{running.port}", creds) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 15
            status = None
            while time.monotonic() < deadline and status != health_pb2.HealthCheckResponse.SERVING:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=5, wait_for_ready=True).status
                time.sleep(0.05)
            assert status == health_pb2.HealthCheckResponse.SERVING
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as plain:
            with pytest.raises(grpc.RpcError) as err:
                health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=2)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        running.shutdown(grace=1)
