"""Fixtures of the sample app's own suite (run from this directory: ``pytest -n 4``).

The Redis comes from hyperion_lock's plugin (``redis_url``; enabled in ``pytest.ini``): ``HYPERION_LOCK_TEST_REDIS_URL``
when set, else a ``redis-server`` it starts. Only pytest and the standard library are imported at the top, and
:func:`pytest_ignore_collect` keeps hyperion_lock's own test run (which walks its ``tests/``, where this sample
lives) out of this project: it has its own requirements and runs in its own venv
(``tests/integration/test_adoption.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    inipath = config.inipath
    if inipath is None or inipath.resolve().parent != HERE:
        return True  # not this project's own run
    return None


@pytest.fixture
def markers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The file the init jobs record their runs in (see ``sample_app.jobs``); no job set to fail."""
    path = tmp_path / "runs.txt"
    monkeypatch.setenv("SAMPLE_APP_MARKER_FILE", str(path))
    monkeypatch.delenv("SAMPLE_APP_FAIL_JOB", raising=False)
    return path


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[Any]:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def one_worker(monkeypatch: pytest.MonkeyPatch, redis_client: Any) -> Any:
    """What the app's tests always did: one worker, and the test's Redis client."""
    from sample_app import main

    monkeypatch.setattr(main, "get_number_of_workers", lambda: 1)
    monkeypatch.setattr(main, "get_redis_client", lambda: redis_client)
    return redis_client


@pytest.fixture
def client(one_worker: Any, markers: Path) -> Iterator[Any]:
    """The app, started (lifespan run) with one worker and the test's Redis."""
    from fastapi.testclient import TestClient
    from sample_app.main import app

    with TestClient(app) as test_client:
        yield test_client
