"""Schemathesis fuzzes the running gateway from its own /openapi.json, with a valid key, in front
of the real services: no 5xx, and every status, content type, header and body is what the document
says. The streams never end, so they are left to test_gateway_api."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi import checks as openapi_checks

from services.core.server import RunningServer
from services.core.settings import Settings
from tests.conftest import TenantKey, make_tenant
from tests.support.gateway import Served, local

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHECKS = [
    schemathesis.checks.not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_headers_conformance,
    openapi_checks.response_schema_conformance,
    openapi_checks.negative_data_rejection,
]


@pytest.fixture(scope="module")
def fuzzed(
    settings: Settings, ingest_server: RunningServer, profile_server: RunningServer, metrics_server: RunningServer
) -> Iterator[Served]:
    served = Served(settings, local(ingest_server.port, profile_server.port, metrics_server.port))
    yield served
    served.stop()


@pytest.fixture(scope="module")
def fuzz_tenant(engine: Any) -> TenantKey:
    return make_tenant(engine, "fuzz")


#: Examples per operation and generation mode: about 30 s for the whole API on a small machine.
MAX_EXAMPLES = 20


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"])
def test_every_operation_conforms(fuzzed: Served, fuzz_tenant: TenantKey, mode: GenerationMode) -> None:
    """Schemathesis' Python API, not its pytest plugin (whose lazy fixtures do not load on pytest 9)."""
    schema = schemathesis.openapi.from_url(f"{fuzzed.url}/openapi.json")
    headers = {"Authorization": f"Bearer {fuzz_tenant.api_key}"}
    results: list[Any] = list(schema.get_all_operations())
    operations = [result.ok() for result in results]
    assert len(operations) >= 13
    unnegatable: list[str] = []
    for operation in operations:
        if operation.path.startswith("/api/v1/streams/"):
            continue

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case: Any) -> None:
            case.call_and_validate(base_url=fuzzed.url, headers=headers, checks=CHECKS, timeout=15)

        try:
            run()
        except Unsatisfiable:
            # Nothing to negate: no parameters and no body (DELETE /api/v1/session, the definitions).
            assert mode is GenerationMode.NEGATIVE, operation.label
            unnegatable.append(operation.label)
    assert len(unnegatable) <= 3, unnegatable
