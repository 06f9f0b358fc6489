"""Quality alerts: the tenant's rules, the alerts they fired (once per rule and interaction; the
table is also the feed WatchAlerts reads, by ``seq``), and the outbox that publishes each alert
to the tenant's ``alerts`` stream.

Revision ID: metrics_0003
Revises: metrics_0002
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "metrics_0003"
down_revision = "metrics_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE metrics.alert_rules (
            tenant_id  text        NOT NULL,
            rule_id    text        NOT NULL,
            spec       bytea       NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant_id, rule_id)
        );
        CREATE TABLE metrics.alerts (
            tenant_id       text        NOT NULL,
            seq             bigint      GENERATED ALWAYS AS IDENTITY,
            alert_id        text        NOT NULL,
            rule_id         text        NOT NULL,
            interaction_id  text        NOT NULL,
            profile_id      text        NOT NULL,
            queue           text        NOT NULL,
            agent           text        NOT NULL,
            body            bytea       NOT NULL,
            acknowledged_by text,
            fired_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
            PRIMARY KEY (tenant_id, seq),
            UNIQUE (tenant_id, rule_id, interaction_id),
            UNIQUE (tenant_id, alert_id)
        );
        CREATE INDEX alerts_by_profile ON metrics.alerts (tenant_id, profile_id, seq DESC);
        CREATE INDEX alerts_by_interaction ON metrics.alerts (tenant_id, interaction_id);
        CREATE TABLE metrics.outbox (
            tenant_id  text        NOT NULL,
            seq        bigint      GENERATED ALWAYS AS IDENTITY,
            stream     text        NOT NULL,
            envelope   bytea       NOT NULL,
            created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
            PRIMARY KEY (tenant_id, seq)
        );
        CREATE INDEX outbox_created ON metrics.outbox (created_at);
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE metrics.outbox, metrics.alerts, metrics.alert_rules")
