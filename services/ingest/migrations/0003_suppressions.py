"""The suppression list: erased people's identifiers, as keyed hashes, never the values.

- ``ingest.suppressions``: one row per (tenant, 16-byte hash of type and canonical value; see
  services/ingest/suppression.py), with the type, the erasure request that put it there, and the
  version of the tenant's list that added it, so a replica loads only what a list gained.
- ``ingest.suppression_normalizers``: per (tenant, type), the normalizer and default region an
  incoming identifier is made canonical with before it is hashed; the latest erasure's rules win.
- ``ingest.suppression_versions``: one row per tenant with a list, its version bumped by every
  change (in the same transaction, which also serializes a tenant's changes), so every replica
  learns what changed with one small query.

Revision ID: ingest_0003
Revises: ingest_0002
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "ingest_0003"
down_revision = "ingest_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE ingest.suppression_versions (
            tenant_id    text        NOT NULL,
            version      bigint      NOT NULL,
            updated_at   timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant_id)
        );

        CREATE TABLE ingest.suppressions (
            tenant_id        text        NOT NULL,
            id_hash          bytea       NOT NULL CHECK (octet_length(id_hash) = 16),
            id_type          text        NOT NULL,
            erasure_request  text        NOT NULL DEFAULT '',
            version          bigint      NOT NULL,
            created_at       timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant_id, id_hash)
        );
        CREATE INDEX suppressions_version ON ingest.suppressions (tenant_id, version);

        CREATE TABLE ingest.suppression_normalizers (
            tenant_id       text        NOT NULL,
            id_type         text        NOT NULL,
            normalizer      text        NOT NULL,
            default_region  text        NOT NULL DEFAULT '',
            updated_at      timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant_id, id_type)
        );
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP TABLE ingest.suppression_normalizers;
        DROP TABLE ingest.suppressions;
        DROP TABLE ingest.suppression_versions;
        """
    )
