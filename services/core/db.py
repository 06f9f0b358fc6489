"""SQLAlchemy engines on psycopg2, and the helpers every service's storage uses.

Each service owns one PostgreSQL schema; nothing here knows their tables.
"""

from __future__ import annotations

import datetime as dt
import io
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
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


@contextmanager
def raw_transaction(engine: Engine, span: str, rows: int = 0) -> Iterator[tuple[Any, dict[Any, Any]]]:
    """A pooled psycopg2 cursor for hot-path statements, and the connection's ``info`` dict.

    SQLAlchemy's per-statement machinery costs as much CPU as a whole ingest batch, so the
    hot paths talk to the driver directly, but through the same pool, with a span of their
    own, committing on success (a no-op on an autocommit engine) and rolling back on error.
    Driver errors come out as SQLAlchemy's ``DBAPIError``, with a dead connection invalidated
    so :func:`retry_on_disconnect` works here too.
    """
    fairy = engine.raw_connection()
    try:
        with sql_span(span, rows):
            cursor = fairy.cursor()
            try:
                yield cursor, fairy.info
                fairy.commit()
            except psycopg2.Error as exc:
                disconnected = engine.dialect.is_disconnect(exc, fairy.dbapi_connection, cursor)  # type: ignore[arg-type]
                if disconnected:
                    fairy.invalidate(exc)
                else:
                    with suppress(psycopg2.Error):
                        fairy.rollback()
                err = sa.exc.DBAPIError.instance(None, None, exc, psycopg2.Error, connection_invalidated=disconnected)
                raise err from exc
            except BaseException:
                with suppress(psycopg2.Error):
                    fairy.rollback()
                raise
            finally:
                if not cursor.closed:
                    cursor.close()
    finally:
        fairy.close()


@contextmanager
def sql_span(name: str, rows: int = 0) -> Iterator[None]:
    """A client span for a statement run on the raw cursor, like the SQLAlchemy instrumentation's."""
    from services.core.telemetry import tracer

    with tracer.start_as_current_span(
        name, kind=SpanKind.CLIENT, attributes={"db.system": "postgresql", "db.operation.batch.size": rows}
    ):
        yield


def array_literal(values: Sequence[object]) -> str:
    """A PostgreSQL array literal of values whose text needs no quoting (numbers, uuids, hex),
    to pass as one parameter: adapting a list element by element costs the driver ~1 us each."""
    return "{" + ",".join(map(str, values)) + "}"


def text_array_literal(values: Sequence[str]) -> str:
    """A PostgreSQL array literal of arbitrary text (each element quoted, backslash and quote escaped)."""
    return "{" + ",".join('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values) + "}"


def ping(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")


class StaleStatistics:
    """ANALYZE the schema's tables changed by more than ``fraction`` of their rows (and at least
    ``min_rows``) since this keeper's or anyone's last full analyze; each call returns which.

    Autovacuum does this when it is on and keeping up; when it is off, or behind a bulk load, the
    planner takes a fast-growing table for the empty one it last saw and answers each batch's key
    lookups by scanning the tenant's every row (measured: a metrics batch's fact lookups 23 ms at
    120,000 facts instead of well under one). Only the indexed columns are sampled, what lookups
    filter on (a wide rollup row's every column took a second per table); such an ANALYZE does
    not reset PostgreSQL's count of changes since, so the keeper remembers where it stood."""

    def __init__(self, engine: Engine, schema: str, min_rows: int = 1000, fraction: float = 0.1) -> None:
        self.engine = engine
        self.schema = schema
        self.min_rows = min_rows
        self.fraction = fraction
        #: table -> its count of changes since the last full analyze, when this keeper analyzed it
        self._seen: dict[str, int] = {}

    def __call__(self) -> list[str]:
        with raw_transaction(self.engine, "db.stale_statistics") as (cur, _):
            cur.execute(
                "SELECT format('%%I.%%I', s.schemaname, s.relname), s.n_mod_since_analyze, s.n_live_tup, "
                "(SELECT string_agg(DISTINCT quote_ident(a.attname), ', ') FROM pg_index i JOIN pg_attribute a "
                "ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) WHERE i.indrelid = s.relid) "
                "FROM pg_stat_user_tables s WHERE s.schemaname = %s ORDER BY 1",
                (self.schema,),
            )
            analyzed = []
            for table, changed, live, columns in cur.fetchall():
                seen = self._seen.get(table, 0)
                if changed < seen:  # a full analyze (autovacuum's, say) reset the count since
                    seen = self._seen[table] = 0
                if changed - seen <= max(self.min_rows, self.fraction * live):
                    continue
                cur.execute(f"ANALYZE {table}" + (f" ({columns})" if columns else ""))
                self._seen[table] = changed
                analyzed.append(table)
        return analyzed


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


def with_tenants_of(table: str, query: str, where: str = "true") -> str:
    """``query`` after ``WITH RECURSIVE tenants(tenant_id)``: the distinct tenants with rows in
    ``table`` matching ``where``, one index probe each (a loose index scan: PostgreSQL 15 has no
    skip scan), then a NULL row to filter out. For sweeps that go tenant by tenant over an index
    leading with tenant_id: it costs as many probes as tenants with rows, not as tenants there
    are, and finds rows whose tenant is gone. ``where`` must imply the predicate of the index it
    should use. All three arguments are code, never input."""
    return (
        f"WITH RECURSIVE tenants(tenant_id) AS (SELECT min(tenant_id) FROM {table} WHERE {where} "  # noqa: S608
        f"UNION ALL SELECT (SELECT min(tenant_id) FROM {table} WHERE {where} AND tenant_id > tenants.tenant_id) "
        f"FROM tenants WHERE tenants.tenant_id IS NOT NULL) {query}"
    )


class Statements:
    """Statements whose results are not needed, sent to PostgreSQL together in one round trip."""

    def __init__(self, cur: Any) -> None:
        self.cur = cur
        self.parts: list[bytes] = []

    def add(self, sql: str, params: Any = None) -> None:
        self.parts.append(self.cur.mogrify(sql, params))

    def __bool__(self) -> bool:
        return bool(self.parts)

    def run(self, last: str | None = None, params: Any = None) -> list[tuple[Any, ...]]:
        """Send what was added, then ``last``; returns the rows of ``last`` (psycopg2 keeps the
        result of the final statement)."""
        parts = [*self.parts, *([self.cur.mogrify(last, params)] if last else [])]
        self.parts.clear()
        if parts:
            self.cur.execute(b";\n".join(parts))
        return list(self.cur.fetchall()) if last else []


_NAMED = re.compile(r"%\((\w+)\)s")


class Prepared:
    """A hot read planned once per connection: PostgreSQL spends more CPU planning a many-part
    statement than running it (a customer context: 0.7 ms planned each time, 0.23 ms prepared).

    ``sql`` uses ``%(name)s`` parameters; they become ``$n`` in a server-side ``PREPARE`` made on
    first use on each pooled connection (remembered in the connection's ``info``, which SQLAlchemy
    clears when it replaces a connection), and every later call is one ``EXECUTE``."""

    def __init__(self, name: str, sql: str) -> None:
        self.name = name
        order: list[str] = []
        for param in _NAMED.findall(sql):
            if param not in order:
                order.append(param)
        self.params = tuple(order)
        self._prepare = f"PREPARE {name} AS " + _NAMED.sub(lambda m: f"${order.index(m.group(1)) + 1}", sql)
        args = ", ".join(f"%({p})s" for p in order)
        self._execute = f"EXECUTE {name}({args})" if order else f"EXECUTE {name}"

    def execute(self, cur: Any, info: dict[Any, Any], params: dict[str, Any]) -> None:
        prepared: set[str] = info.setdefault("tessera_prepared", set())
        if self.name not in prepared:
            cur.execute(self._prepare)
            prepared.add(self.name)
        cur.execute(self._execute, params)


# ---- bulk merges through COPY ----------------------------------------------------------------------

#: NULL in COPY's text format.
COPY_NULL = "\\N"
COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def copy_value(value: object) -> str:
    """One value in COPY's text format."""
    if value is None:
        return COPY_NULL
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, str):
        return value.translate(COPY_ESCAPES)
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray)):
        return "\\\\x" + value.hex()
    if isinstance(value, list):
        return "{" + ",".join(map(str, value)) + "}"
    return repr(value) if isinstance(value, float) else str(value)


def copy_merge(cur: Any, table: str, text: str, merge: str, columns: str = "") -> None:
    """Stage rows (COPY text, one line each) in ``pg_temp.<name>_delta``, a copy of ``table``'s
    columns that empties at commit, then run ``merge`` (an INSERT ... SELECT from it). Far cheaper
    than VALUES lists for thousands of rows or kilobyte values: no per-value quoting by the driver."""
    if not text:
        return
    delta = table.rsplit(".", 1)[-1] + "_delta"
    cur.execute(f"CREATE TEMP TABLE IF NOT EXISTS {delta} (LIKE {table} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS")
    cur.copy_expert(f"COPY pg_temp.{delta} {f'({columns}) ' if columns else ''}FROM STDIN", io.StringIO(text))
    cur.execute(f"{merge}; TRUNCATE pg_temp.{delta}")
