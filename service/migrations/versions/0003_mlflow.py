"""mlflow: experiments and studies gain mlflow_run_id and tracked_at (service.tracking)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03

Both columns are nullable: an experiment that was never logged to MLflow has neither.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UTC = sa.DateTime(timezone=True)
TABLES = ("experiments", "studies")


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("mlflow_run_id", sa.String(length=64), nullable=True))
            batch_op.add_column(sa.Column("tracked_at", UTC, nullable=True))


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("tracked_at")
            batch_op.drop_column("mlflow_run_id")
