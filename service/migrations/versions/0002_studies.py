"""studies: the studies table; experiments gain study_id, study_position, depends_on, base_ready_at

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02

Existing experiments keep every value; the new columns are nullable (an experiment outside a study has no study,
no position and no dependency).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UTC = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "studies",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("plan", sa.JSON(), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("request_hash", sa.String(length=64), nullable=True),
        sa.Column("cancel_requested_at", UTC, nullable=True),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("updated_at", UTC, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_studies")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_studies_idempotency_key")),
    )
    with op.batch_alter_table("experiments", schema=None) as batch_op:
        batch_op.add_column(sa.Column("study_id", sa.String(length=36), nullable=True))
        batch_op.add_column(sa.Column("study_position", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("depends_on", sa.String(length=36), nullable=True))
        batch_op.add_column(sa.Column("base_ready_at", UTC, nullable=True))
        batch_op.create_index(batch_op.f("ix_experiments_study_id"), ["study_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_experiments_depends_on"), ["depends_on"], unique=False)
        batch_op.create_foreign_key(
            batch_op.f("fk_experiments_study_id_studies"), "studies", ["study_id"], ["id"])
        batch_op.create_foreign_key(
            batch_op.f("fk_experiments_depends_on_experiments"), "experiments", ["depends_on"], ["id"])


def downgrade() -> None:
    with op.batch_alter_table("experiments", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_experiments_depends_on_experiments"), type_="foreignkey")
        batch_op.drop_constraint(batch_op.f("fk_experiments_study_id_studies"), type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_experiments_depends_on"))
        batch_op.drop_index(batch_op.f("ix_experiments_study_id"))
        batch_op.drop_column("base_ready_at")
        batch_op.drop_column("depends_on")
        batch_op.drop_column("study_position")
        batch_op.drop_column("study_id")
    op.drop_table("studies")
