"""The lifespan with one worker, as the app's tests always ran it: every init job runs directly, every start."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sample_app import jobs, main
from sample_app.main import app


def test_each_init_job_runs_once_at_startup(client: TestClient, markers: Path) -> None:
    assert jobs.read_runs(markers) == [(name, os.getpid()) for name in jobs.STARTUP_JOBS]


def test_every_start_runs_the_jobs_again(one_worker: Any, markers: Path) -> None:
    for _ in range(2):
        with TestClient(app):
            pass
    assert [name for name, _ in jobs.read_runs(markers)] == list(jobs.STARTUP_JOBS) * 2


def test_startup_reports_the_jobs_run_in_this_worker(client: TestClient) -> None:
    body = client.get("/startup").json()
    assert body == {"pid": os.getpid(), "ran_here": list(jobs.STARTUP_JOBS)}


def test_a_failing_init_job_fails_the_startup(one_worker: Any, markers: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(jobs.FAIL_ENV, "init_db")
    with pytest.raises(jobs.InitJobError, match="init_db failed on purpose"), TestClient(app):
        pass
    assert jobs.read_runs(markers) == [("init_db", os.getpid())]  # nothing after it ran


def test_a_failing_last_job_fails_the_startup_after_the_others(
    one_worker: Any, markers: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(jobs.FAIL_ENV, "warm_cache")
    with pytest.raises(jobs.InitJobError, match="warm_cache failed on purpose"), TestClient(app):
        pass
    assert [name for name, _ in jobs.read_runs(markers)] == list(jobs.STARTUP_JOBS)


def test_startup_without_redis(markers: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(main, "get_number_of_workers", lambda: 1)
    monkeypatch.setattr(main, "get_redis_client", lambda: None)
    with TestClient(app) as test_client:
        assert test_client.get("/redis").json() == {"redis": None}
        assert test_client.post("/reports/x").status_code == 503
    assert [name for name, _ in jobs.read_runs(markers)] == list(jobs.STARTUP_JOBS)


def test_one_worker_logs_one_line_per_job(
    one_worker: Any, markers: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="sample_app"), TestClient(app):
        pass
    lines = [r.getMessage() for r in caplog.records if r.name == "sample_app" and r.getMessage().split(":")[0]
             in jobs.STARTUP_JOBS]
    assert lines == [f"{name}: one worker: running the job directly" for name in jobs.STARTUP_JOBS]
