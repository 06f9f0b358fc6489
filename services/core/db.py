"""SQLAlchemy engines on psycopg2, and the helpers every service's storage uses.

Each service owns one PostgreSQL schema; nothing here knows their tables.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg2
import sqlalchemy as sa
from opentelemetry.trace import SpanKind
from sqlalchemy.engine import Connection, Engine

T = TypeVar("T")


def sa_url(url: str) -> sa.engine.URL:
    """Pin the psycopg2 driver: SQLAlchemy 2.1 would pick psycopg 3 for a bare postgresql:// URL."""
    parsed = sa.engine.make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg2")
    return parsed


def make_engine(
    url: str, *, application_name: str, pool_size: int = 10, instrument: bool = True, autocommit: bool = False
) -> Engine:
    """An engine with a pool sized for one process.

    No pre-ping: it would cost a round trip per checkout on the hot path. A connection that
    died with a server restart fails once, SQLAlchemy then drops the whole pool, and
    :func:`retry_on_disconnect` lets idempotent work try again on a fresh connection.
    """
    engine = sa.create_engine(
        sa_url(url),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=False,
        pool_recycle=1800,
        connect_args={"application_name": f"tessera-{application_name}", "connect_timeout": 5},
        # A pool of autocommit connections serves single-statement writes in one round trip.
        **({"isolation_level": "AUTOCOMMIT"} if autocommit else {}),
    )
    if instrument:
        from services.core.telemetry import instrument_engine

        instrument_engine(engine)
    return engine


@contextmanager
def transaction(engine: Engine, *, timeout_seconds: float | None = None) -> Iterator[Connection]:
    """One transaction; ``timeout_seconds`` caps every statement in it (from the RPC deadline)."""
    with engine.begin() as conn:
        if timeout_seconds is not None:
            ms = max(int(timeout_seconds * 1000), 1)
            conn.exec_driver_sql(f"SET LOCAL statement_timeout = {ms}")
        yield conn


def retry_on_disconnect(fn: Callable[[], T], attempts: int = 2) -> T:
    """Run idempotent database work again if its pooled connection turned out to be dead."""
    for attempt in range(attempts):
        try:
            return fn()
        except sa.exc.DBAPIError as exc:
            if not exc.connection_invalidated or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def statement_timeout_sql(timeout_seconds: float | None) -> str:
    """A prefix that sets this session's statement timeout in the same round trip as the
    statement after it (``RESET`` restores the server's default when there is no deadline)."""
    if timeout_seconds is None:
        return "RESET statement_timeout; "
    return f"SET statement_timeout = {max(int(timeout_seconds * 1000), 1)}; "


DBAPI_ERRORS = (psycopg2.Error,)


def wrap_dbapi_error(conn: Connection, exc: Exception) -> sa.exc.DBAPIError:
    """The SQLAlchemy error SQLAlchemy itself would raise for a raw-cursor failure, with the
    pool invalidated when the connection is gone, so callers handle one kind of error."""
    is_disconnect = conn.dialect.is_disconnect(exc, conn.connection.dbapi_connection, None)  # type: ignore[arg-type]
    if is_disconnect:
        conn.invalidate(exc)
    err = sa.exc.DBAPIError.instance(None, None, exc, psycopg2.Error, connection_invalidated=is_disconnect)
    assert isinstance(err, sa.exc.DBAPIError)
    return err


@contextmanager
def sql_span(name: str, rows: int = 0) -> Iterator[None]:
    """A client span for a statement run on the raw cursor, like the SQLAlchemy instrumentation's."""
    from services.core.telemetry import tracer

    with tracer.start_as_current_span(
        name, kind=SpanKind.CLIENT, attributes={"db.system": "postgresql", "db.operation.batch.size": rows}
    ):
        yield


def ping(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")


def raw_cursor(conn: Connection) -> Any:
    """The psycopg2 cursor under a connection, for array-parameter bulk statements."""
    return conn.connection.driver_connection.cursor()  # type: ignore[union-attr]


def ensure_database(admin_url: str, name: str) -> None:
    """Create a database if it is missing (embedded mode and test runs)."""
    engine = sa.create_engine(sa_url(admin_url), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            exists = conn.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).scalar()
            if not exists:
                conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    finally:
        engine.dispose()


def drop_database(admin_url: str, name: str) -> None:
    engine = sa.create_engine(sa_url(admin_url), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        engine.dispose()


def with_database(url: str, name: str) -> str:
    """The same server URL pointing at another database."""
    return sa_url(url).set(database=name).render_as_string(hide_password=False)
