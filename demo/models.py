"""SQLAlchemy 2 models of the reference app (the schema itself is created by the Alembic revisions)."""

from __future__ import annotations

from sqlalchemy import BigInteger, Float, Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Item(Base):
    """Seed data: a handful of named rows the seed job makes sure exist."""

    __tablename__ = "items"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    seeded_with_token: Mapped[int] = mapped_column(BigInteger)


class JobFence(Base):
    """Highest fencing token that wrote on behalf of a job: writers with a lower token are refused."""

    __tablename__ = "job_fences"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    fencing_token: Mapped[int] = mapped_column(BigInteger)
    generation: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    written_at: Mapped[float] = mapped_column(Float)


class SeedRun(Base):
    """One row per actual run of the seed job (tests count them: one per deploy generation)."""

    __tablename__ = "seed_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    fencing_token: Mapped[int] = mapped_column(BigInteger)
    generation: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    ran_at: Mapped[float] = mapped_column(Float)


class MigrationAudit(Base):
    """Created by revision 0002, which inserts exactly one row: proof that the revision ran once."""

    __tablename__ = "migration_audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    revision: Mapped[str] = mapped_column(String(50))
    pid: Mapped[int] = mapped_column(Integer)
    applied_at: Mapped[float] = mapped_column(Float)


class UpstreamCall(Base):
    """Created by revision 0003: one row per simulated upstream call of ``GET /quotes/{symbol}`` (inserted when
    the call starts), so tests and benchmarks count the calls of every worker."""

    __tablename__ = "upstream_calls"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    symbol: Mapped[str] = mapped_column(String(100))
    range: Mapped[str] = mapped_column(String(20))
    interval: Mapped[str] = mapped_column(String(20))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[float] = mapped_column(Float)
