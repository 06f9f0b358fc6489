"""``db.Prepared`` on a real PostgreSQL: a named-parameter statement prepared once per pooled
connection answers like the plain statement, reuses repeated parameters, takes arrays, and
survives its connection being replaced."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy.engine import Engine

from services.core import db

pytestmark = [pytest.mark.integration]

STATEMENT = db.Prepared(
    "test_prepared_echo",
    "SELECT %(a)s::text || '/' || %(a)s::text, cardinality(%(xs)s::text[]), %(at)s::timestamptz + interval '1 day'",
)


def _run(engine: Engine, a: str, xs: list[str]) -> tuple[object, ...]:
    at = dt.datetime(2026, 1, 31, tzinfo=dt.UTC)
    with db.raw_transaction(engine, "test prepared") as (cur, info):
        STATEMENT.execute(cur, info, {"a": a, "xs": xs, "at": at})
        row = cur.fetchone()
        cur.execute("SELECT count(*) FROM pg_prepared_statements WHERE name = 'test_prepared_echo'")
        prepared = cur.fetchone()[0]
    return (*row, prepared)


def test_a_prepared_statement_answers_as_the_plain_one_on_every_connection(engine: Engine) -> None:
    day = dt.datetime(2026, 2, 1, tzinfo=dt.UTC)
    assert STATEMENT.params == ("a", "xs", "at")
    for n in range(6):  # more calls than one connection: the pool hands out others too
        assert _run(engine, f"x{n}'; --", ["a", "b"] * n) == (f"x{n}'; --/x{n}'; --", 2 * n, day, 1)
    engine.dispose()  # every connection replaced: each new one prepares again
    assert _run(engine, "again", []) == ("again/again", 0, day, 1)
