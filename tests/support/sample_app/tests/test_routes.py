"""The app's routes, served after a one-worker start with the test's Redis."""

from __future__ import annotations

import os
from typing import Any

import redis
from fastapi.testclient import TestClient
from sample_app import jobs


def test_health_names_this_worker(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok", "pid": os.getpid()}


def test_redis_route_uses_the_app_client(client: TestClient) -> None:
    assert client.get("/redis").json() == {"redis": True}


def test_warm_cache_wrote_through_the_client_it_was_given(client: TestClient, one_worker: Any) -> None:
    # Per process: the xdist workers share one Redis.
    assert int(one_worker.get(f"sample_app:cache:warmed_by:{os.getpid()}")) == os.getpid()


def test_unknown_route(client: TestClient) -> None:
    assert client.get("/nope").status_code == 404


def test_the_app_runs_on_the_pinned_redis_client() -> None:
    # arq 0.26.3 needs redis < 6: installing hyperion_lock must not have moved it.
    assert redis.__version__ == "5.0.8"
    assert len(jobs.STARTUP_JOBS) == 5
