"""Several workers in one test process (what ``--workers 4`` does across processes), through Redis.

These tests coordinate for real, so each needs its own generation and key prefix: every test of one xdist
worker shares that worker's default generation, and the xdist workers share one too (their parent, the xdist
controller). ``hyperion_lock_isolated`` (hyperion_lock's test plugin) gives each test fresh ones.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from sample_app import jobs, main
from sample_app.main import app

from hyperion_lock import JobFailedError, use_lock_for_workers

pytestmark = pytest.mark.usefixtures("hyperion_lock_isolated")

WORKERS = 4
logger = logging.getLogger("sample_app.tests")


async def start_workers(job: Callable[..., Any], key: str, client: Any, unlock_key: str | None) -> list[Any]:
    calls = [use_lock_for_workers(job, key, client, WORKERS, logger, unlock_key) for _ in range(WORKERS)]
    return await asyncio.gather(*calls, return_exceptions=True)


def test_init_db_runs_once_for_four_workers(redis_client: Any, markers: Path) -> None:
    results = asyncio.run(start_workers(jobs.init_db, "init_db", redis_client, "init_db_done"))
    assert results == [None] * WORKERS
    assert jobs.read_runs(markers) == [("init_db", os.getpid())]


def test_drop_db_runs_in_this_test(redis_client: Any, markers: Path) -> None:
    asyncio.run(start_workers(jobs.drop_db, "drop_db", redis_client, None))
    assert jobs.read_runs(markers) == [("drop_db", os.getpid())]


def test_drop_db_runs_in_another_test_too(redis_client: Any, markers: Path) -> None:
    # Without isolation this test would find drop_db done by the one above (same generation and prefix).
    asyncio.run(start_workers(jobs.drop_db, "drop_db", redis_client, None))
    assert jobs.read_runs(markers) == [("drop_db", os.getpid())]


def test_a_failing_job_fails_every_worker(redis_client: Any, markers: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(jobs.FAIL_ENV, "init_db")
    results = asyncio.run(start_workers(jobs.init_db, "init_db", redis_client, "init_db_done"))
    assert sorted(type(r).__name__ for r in results) == ["InitJobError"] + ["JobFailedError"] * (WORKERS - 1)
    assert all("init_db failed on purpose" in str(r) for r in results)
    assert jobs.read_runs(markers) == [("init_db", os.getpid())]


def test_a_recorded_failure_is_final_for_the_generation(
    redis_client: Any, markers: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(jobs.FAIL_ENV, "init_db")
    asyncio.run(start_workers(jobs.init_db, "init_db", redis_client, "init_db_done"))
    monkeypatch.delenv(jobs.FAIL_ENV)  # a respawned worker of the same deployment
    with pytest.raises(JobFailedError) as failed:
        asyncio.run(use_lock_for_workers(jobs.init_db, "init_db", redis_client, WORKERS, logger, "init_db_done"))
    assert failed.value.error_type == "InitJobError"
    assert jobs.read_runs(markers) == [("init_db", os.getpid())]  # it did not run again


def test_four_app_starts_run_each_job_once(redis_url: str, markers: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(main, "get_number_of_workers", lambda: WORKERS)
    monkeypatch.setattr(main, "get_redis_client", lambda: redis.Redis.from_url(redis_url))  # one per worker

    async def worker() -> None:
        async with app.router.lifespan_context(app):
            pass

    async def all_workers() -> None:
        await asyncio.gather(*(worker() for _ in range(WORKERS)))

    asyncio.run(all_workers())
    assert sorted(name for name, _ in jobs.read_runs(markers)) == sorted(jobs.STARTUP_JOBS)
