"""The app's init jobs, run once per deployment through ``use_lock_for_workers`` in the lifespan.

Every run appends one line ``<job> <pid>`` to the file named by ``SAMPLE_APP_MARKER_FILE`` (when set), so a test
can count runs across processes; ``SAMPLE_APP_FAIL_JOB=<job>`` makes that job raise right after its line.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import redis

MARKER_ENV = "SAMPLE_APP_MARKER_FILE"
FAIL_ENV = "SAMPLE_APP_FAIL_JOB"

#: The lifespan's jobs, in the order it runs them (the first one is awaited by every worker: unlock_key).
STARTUP_JOBS = ("init_db", "seed_admin", "sync_permissions", "register_cron_jobs", "warm_cache")

#: Jobs run by this process since the last app start (the lifespan clears it).
RAN: list[str] = []


class InitJobError(RuntimeError):
    """What a job raises when ``SAMPLE_APP_FAIL_JOB`` names it."""


def _run(name: str) -> None:
    RAN.append(name)
    path = os.environ.get(MARKER_ENV)
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)  # one write per line: no interleaving
        try:
            os.write(fd, f"{name} {os.getpid()}\n".encode())
        finally:
            os.close(fd)
    if os.environ.get(FAIL_ENV) == name:
        raise InitJobError(f"{name} failed on purpose ({FAIL_ENV}={name})")


def read_runs(path: str | os.PathLike[str]) -> list[tuple[str, int]]:
    """The ``(job, pid)`` runs recorded in a marker file, in order (none when it does not exist)."""
    file = Path(path)
    if not file.exists():
        return []
    rows = [line.split() for line in file.read_text().splitlines() if line.strip()]
    return [(name, int(pid)) for name, pid in rows]


def init_db() -> None:
    """Create the schema and apply migrations (sync, like SQLAlchemy's ``create_all``)."""
    _run("init_db")


def drop_db() -> None:
    """Drop every table (the app's tests reset the database with it)."""
    _run("drop_db")


async def seed_admin() -> None:
    await asyncio.sleep(0)
    _run("seed_admin")


def sync_permissions() -> None:
    _run("sync_permissions")


async def register_cron_jobs() -> None:
    await asyncio.sleep(0)
    _run("register_cron_jobs")


def warm_cache(client: redis.Redis | None) -> None:
    """Takes the app's Redis client as an extra argument (passed through ``use_lock_for_workers``)."""
    _run("warm_cache")
    if client is not None:
        client.set(f"sample_app:cache:warmed_by:{os.getpid()}", os.getpid(), ex=60)
