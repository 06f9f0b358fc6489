"""A backend outage is not a bug: the errors PostgreSQL and Redis clients raise when their server
is gone reach callers as UNAVAILABLE naming the backend (retryable, no address, no traceback),
while any other unexpected error stays a generic INTERNAL."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis
import sqlalchemy as sa
from opentelemetry import trace

from services.core.harness import free_port
from services.core.interceptors import _Call, dependency_down
from services.core.status import GENERIC_INTERNAL_MESSAGE

pytestmark = [pytest.mark.integration]


def _raised(fn: Callable[[], object]) -> BaseException:
    with pytest.raises(Exception) as caught:
        fn()
    return caught.value


def test_lost_backends_are_unavailable_and_bugs_stay_internal() -> None:
    dead = free_port()  # nothing listens here
    redis_error = _raised(lambda: redis.Redis(host="127.0.0.1", port=dead, socket_connect_timeout=1).get("k"))
    engine = sa.create_engine(f"postgresql+psycopg2://postgres:s3cret@127.0.0.1:{dead}/x", pool_pre_ping=False)
    pg_error = _raised(engine.connect)
    assert (dependency_down(redis_error), dependency_down(pg_error)) == ("Redis", "PostgreSQL")
    assert dependency_down(ValueError("boom")) is None

    call = _Call("/tessera.v1.ProfileService/UpdateTraits", (), trace.get_tracer("test"))
    for exc, backend in ((redis_error, "Redis"), (pg_error, "PostgreSQL")):
        status = call.status_of(exc)
        assert call.code.name == "UNAVAILABLE"
        assert status.message == f"{backend} is unavailable; retry shortly"
        assert "s3cret" not in status.message and str(dead) not in status.message
    bug = call.status_of(KeyError("internal detail"))
    assert call.code.name == "INTERNAL" and "internal detail" not in bug.message
    assert bug.message.startswith(GENERIC_INTERNAL_MESSAGE.split("{")[0])
