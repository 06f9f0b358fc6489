"""A customer's stored contribution is kept in parts (services/metrics/derive.py ``part_of``): their
legs in one, each survey in its own, each conversation's messages in one. A batch of messages or
surveys then re-derives only what it touched, not the customer's every fact.

Rows stored before this revision are whole contributions, kept under the empty part; the
consumer derives such a customer in full on its next change (it replaces the row by parts).
Going down sums each customer's parts into one row again.

Revision ID: metrics_0009
Revises: metrics_0008
Create Date: 2026-12-07
"""

from __future__ import annotations

import json
from typing import Any

from alembic import op

revision = "metrics_0009"
down_revision = "metrics_0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE metrics.contributions ADD COLUMN part text NOT NULL DEFAULT '';
        ALTER TABLE metrics.contributions DROP CONSTRAINT contributions_pkey,
            ADD PRIMARY KEY (tenant_id, profile_id, part);
        """
    )


def _sum(bodies: list[list[list[Any]]]) -> list[list[Any]]:
    """The bodies' rows added key by key (the JSON form of services/metrics/codec.py)."""
    keyed: dict[tuple[Any, ...], list[dict[int, int]]] = {}
    for body in bodies:
        for hour, channel, queue, agent, reason, source, *groups in body:
            found = keyed.setdefault((hour, channel, queue, agent, reason, source), [{}, {}, {}])
            for into, pairs in zip(found, groups, strict=True):
                for i, v in pairs:
                    into[i] = into.get(i, 0) + v
    return [
        [*key, *([[i, v] for i, v in sorted(g.items()) if v] for g in groups)] for key, groups in sorted(keyed.items())
    ]


def downgrade() -> None:
    conn = op.get_bind().connection
    cur = conn.cursor()
    try:
        cur.execute("SELECT tenant_id, profile_id, anonymous, body FROM metrics.contributions WHERE part <> ''")
        grouped: dict[tuple[str, str, bool], list[list[list[Any]]]] = {}
        for tenant_id, profile_id, anonymous, body in cur.fetchall():
            grouped.setdefault((tenant_id, profile_id, anonymous), []).append(json.loads(body))
        cur.execute("SELECT tenant_id, profile_id, anonymous, body FROM metrics.contributions WHERE part = ''")
        for tenant_id, profile_id, anonymous, body in cur.fetchall():
            grouped.setdefault((tenant_id, profile_id, anonymous), []).append(json.loads(body))
        cur.execute("DELETE FROM metrics.contributions")
        cur.executemany(
            "INSERT INTO metrics.contributions (tenant_id, profile_id, anonymous, body) VALUES (%s, %s, %s, %s)",
            [(t, p, a, json.dumps(_sum(bodies))) for (t, p, a), bodies in grouped.items()],
        )
    finally:
        cur.close()
    op.execute(
        """
        ALTER TABLE metrics.contributions DROP CONSTRAINT contributions_pkey, DROP COLUMN part,
            ADD PRIMARY KEY (tenant_id, profile_id);
        """
    )
