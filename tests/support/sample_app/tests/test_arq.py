"""arq, the reason the app stays on redis-py 5: a report enqueued by the web app is built by an arq worker."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from arq.connections import create_pool
from arq.jobs import Job
from arq.worker import Worker
from fastapi.testclient import TestClient
from sample_app import worker as arq_worker
from sample_app.main import arq_settings


def test_a_report_is_built_by_an_arq_worker(
    client: TestClient, one_worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = f"sample_app:test:{uuid.uuid4().hex}"  # a queue of its own: xdist workers share the Redis
    monkeypatch.setenv(arq_worker.QUEUE_ENV, queue)
    job_id = client.post("/reports/monthly").json()["job_id"]

    async def work() -> Any:
        pool = await create_pool(arq_settings(one_worker))
        worker = Worker(
            functions=[arq_worker.build_report], redis_pool=pool, queue_name=queue, burst=True,
            handle_signals=False, poll_delay=0.05,
        )
        try:
            await asyncio.wait_for(worker.main(), timeout=30)
            return await Job(job_id, pool, _queue_name=queue).result(timeout=10)
        finally:
            await worker.close()
            await pool.aclose()

    assert asyncio.run(work()) == f"report monthly built by job {job_id}"


def test_the_scheduler_has_its_cron_job() -> None:
    names = [job.name for job in arq_worker.WorkerSettings.cron_jobs]
    assert names == ["cron:nightly_cleanup"]
