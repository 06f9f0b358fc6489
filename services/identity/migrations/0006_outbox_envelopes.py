"""The changes outbox holds encoded stream envelopes (the typed contract of stream.proto).

Rows still waiting in the old shape (JSON fields) are converted, so an upgrade with unpublished
changes loses none of them.

Revision ID: identity_0006
Revises: identity_0005
Create Date: 2026-12-01
"""

from __future__ import annotations

import json

from alembic import op

revision = "identity_0006"
down_revision = "identity_0005"
branch_labels = None
depends_on = None

_KINDS = {"created": 1, "merged": 2, "split": 3, "erased": 4}


def _envelope(tenant_id: str, fields: dict[str, str]) -> bytes:
    from services.core import streams

    def ids(name: str) -> list[str]:
        return [i for i in fields.get(name, "").split(",") if i]

    change = streams.change(
        _KINDS.get(fields.get("kind", ""), 0),
        fields.get("profile_id", ""),
        absorbed_profile_id=fields.get("absorbed_profile_id", ""),
        merge_id=int(fields.get("merge_id") or 0),
        event_id=fields.get("event_id", ""),
        new_profile_id=fields.get("new_profile_id", ""),
        moved_event_ids=ids("moved_event_ids"),
        erased_profile_ids=ids("erased_profile_ids"),
    )
    return streams.change_envelope(tenant_id, fields.get("traceparent", ""), change)


def upgrade() -> None:
    op.execute("ALTER TABLE identity.outbox ADD COLUMN envelope bytea")
    conn = op.get_bind()
    rows = conn.exec_driver_sql("SELECT tenant_id, seq, fields FROM identity.outbox").fetchall()
    for tenant_id, seq, fields in rows:
        data = json.loads(fields) if isinstance(fields, str) else dict(fields)
        conn.exec_driver_sql(
            "UPDATE identity.outbox SET envelope = %(e)s WHERE tenant_id = %(t)s AND seq = %(s)s",
            {"e": _envelope(tenant_id, data), "t": tenant_id, "s": seq},
        )
    op.execute("ALTER TABLE identity.outbox DROP COLUMN fields, ALTER COLUMN envelope SET NOT NULL")


def downgrade() -> None:
    op.execute("DELETE FROM identity.outbox")
    op.execute("ALTER TABLE identity.outbox DROP COLUMN envelope, ADD COLUMN fields jsonb NOT NULL")
