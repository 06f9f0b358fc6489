"""SQLAlchemy engines on psycopg2, and the helpers every service's storage uses.

Each service owns one PostgreSQL schema; nothing here knows their tables.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine


def sa_url(url: str) -> sa.engine.URL:
    """Pin the psycopg2 driver: SQLAlchemy 2.1 would pick psycopg 3 for a bare postgresql:// URL."""
    parsed = sa.engine.make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg2")
    return parsed


def make_engine(url: str, *, application_name: str, pool_size: int = 10, instrument: bool = True) -> Engine:
    """An engine with a pool sized for one process; ``pool_pre_ping`` heals after a restart."""
    engine = sa.create_engine(
        sa_url(url),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_recycle=1800,
        connect_args={"application_name": f"tessera-{application_name}", "connect_timeout": 5},
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
