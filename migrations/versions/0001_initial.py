"""initial schema: items, job fences, seed runs

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "items",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(100), nullable=False, unique=True),
        sa.Column("seeded_with_token", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "job_fences",
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("fencing_token", sa.BigInteger, nullable=False),
        sa.Column("generation", sa.String(200), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("written_at", sa.Float, nullable=False),
    )
    op.create_table(
        "seed_runs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("fencing_token", sa.BigInteger, nullable=False),
        sa.Column("generation", sa.String(200), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("ran_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("seed_runs")
    op.drop_table("job_fences")
    op.drop_table("items")
