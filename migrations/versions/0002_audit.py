"""migration audit table with one row: proof that this revision ran exactly once

Test hooks (environment): ``HYPERION_DEMO_MIGRATION_DELAY=<seconds>`` sleeps inside this revision's
transaction (a slow migration); ``HYPERION_DEMO_MIGRATION_FAIL=1`` makes it raise after that delay.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

logger = logging.getLogger("demo.migrations")


class DeliberateMigrationFailure(Exception):
    """Raised when HYPERION_DEMO_MIGRATION_FAIL=1 (failure-path tests)."""


def upgrade() -> None:
    audit = op.create_table(
        "migration_audit",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("revision", sa.String(50), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("applied_at", sa.Float, nullable=False),
    )
    op.bulk_insert(audit, [{"revision": revision, "pid": os.getpid(), "applied_at": time.time()}])
    delay = float(os.environ.get("HYPERION_DEMO_MIGRATION_DELAY", "0") or 0)
    if delay > 0:
        logger.warning("revision %s: pid %d sleeping %.1f s (HYPERION_DEMO_MIGRATION_DELAY)", revision,
                       os.getpid(), delay)
        time.sleep(delay)
    if os.environ.get("HYPERION_DEMO_MIGRATION_FAIL") == "1":
        raise DeliberateMigrationFailure(
            f"revision {revision} failed on purpose (HYPERION_DEMO_MIGRATION_FAIL=1) in pid {os.getpid()}"
        )


def downgrade() -> None:
    op.drop_table("migration_audit")
