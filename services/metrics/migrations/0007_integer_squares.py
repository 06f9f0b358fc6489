"""Sums of squares become exact integers, the squares of the units their sums are counted in
(services/metrics/stats.py SQUARE_UNITS): handle time in milliseconds, scores as they are,
sentiment in 1/10,000. Float sums of float squares depended on the order events were added in,
so two replicas' or a replay's intervals differed in the last bits; integer sums do not.
``numeric`` because an hour-long leg adds 1.3e13 ms², beyond what a double adds exactly.

The rollups' and the stored contributions' squares are rescaled to the new units and rounded.
Rows derived before this revision keep intervals within rounding of what they were; each
customer's next recomputation (a new event, a merge, a settings change that rebuilds the
tenant) derives its contribution in the exact new form.

Revision ID: metrics_0007
Revises: metrics_0006
Create Date: 2026-12-03
"""

from __future__ import annotations

import json

from alembic import op

revision = "metrics_0007"
down_revision = "metrics_0006"
branch_labels = None
depends_on = None

#: (column, its index in a contribution's squares, the factor from the old unit to the new).
_SQUARES = (("handle_sq", 0, 1e6), ("csat_sq", 1, 1.0), ("ces_sq", 2, 1.0), ("sentiment_sq", 3, 1e8))


def _rescale(up: bool) -> None:
    to = "numeric USING round({c} * {f!r})::numeric" if up else "double precision USING {c}::double precision / {f!r}"
    alter = ", ".join(f"ALTER {c} TYPE " + to.format(c=c, f=f) for c, _, f in _SQUARES)
    for table in ("rollup_hour", "rollup_day"):
        op.execute(f"ALTER TABLE metrics.{table} {alter}")
    factor = {i: f for _, i, f in _SQUARES}
    conn = op.get_bind().connection
    read, write = conn.cursor(), conn.cursor()
    try:
        read.execute("SELECT tenant_id, profile_id, body FROM metrics.contributions")
        while rows := read.fetchmany(1000):
            changed = []
            for tenant_id, profile_id, body in rows:
                parsed = json.loads(body)
                for row in parsed:
                    row[7] = [[i, round(v * factor[i]) if up else v / factor[i]] for i, v in row[7]]
                changed.append((json.dumps(parsed), tenant_id, profile_id))
            write.executemany(
                "UPDATE metrics.contributions SET body = %s WHERE tenant_id = %s AND profile_id = %s", changed
            )
    finally:
        read.close()
        write.close()


def upgrade() -> None:
    _rescale(up=True)


def downgrade() -> None:
    _rescale(up=False)
