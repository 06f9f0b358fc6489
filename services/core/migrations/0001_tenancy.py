"""Tenants and their API keys.

Revision ID: tenancy_0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

from alembic import op

revision = "tenancy_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE tenancy.tenants (
            tenant_id          text PRIMARY KEY,
            display_name       text NOT NULL,
            created_at         timestamptz NOT NULL DEFAULT now(),
            disabled           boolean NOT NULL DEFAULT false,
            ingest_rate_limit  double precision,
            ingest_rate_burst  double precision
        );
        -- A small reference table: the key hash is looked up before the tenant is known.
        CREATE TABLE tenancy.api_keys (
            tenant_id   text NOT NULL REFERENCES tenancy.tenants (tenant_id) ON DELETE CASCADE,
            key_id      text NOT NULL,
            key_hash    bytea NOT NULL,
            description text NOT NULL DEFAULT '',
            created_at  timestamptz NOT NULL DEFAULT now(),
            revoked_at  timestamptz,
            PRIMARY KEY (tenant_id, key_id)
        );
        CREATE UNIQUE INDEX api_keys_hash ON tenancy.api_keys (key_hash);
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE tenancy.api_keys; DROP TABLE tenancy.tenants;")
