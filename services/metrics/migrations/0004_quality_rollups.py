"""Quality rollups: per local day, form, question ("" for whole evaluations), agent, team, queue
and channel, the sums of services/metrics/quality_rollup.py (QueryMetrics reads them).

Revision ID: metrics_0004
Revises: metrics_0003
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "metrics_0004"
down_revision = "metrics_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE metrics.evaluations ADD COLUMN day date;
        CREATE TABLE metrics.quality_rollup_day (
            tenant_id   text             NOT NULL,
            day         date             NOT NULL,
            form_id     text             NOT NULL,
            question_id text             NOT NULL,
            agent       text             NOT NULL,
            team        text             NOT NULL,
            queue       text             NOT NULL,
            channel     smallint         NOT NULL,
            n           bigint           NOT NULL,
            auto_failed bigint           NOT NULL,
            passed      bigint           NOT NULL,
            score_sum   bigint           NOT NULL,
            score_sq    double precision NOT NULL,
            PRIMARY KEY (tenant_id, day, form_id, question_id, agent, team, queue, channel)
        );
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE metrics.quality_rollup_day; ALTER TABLE metrics.evaluations DROP COLUMN day")
