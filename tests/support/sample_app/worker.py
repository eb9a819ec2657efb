"""The arq side of the app: the queue the web workers enqueue into, and the scheduler's cron job
(``arq sample_app.worker.WorkerSettings``)."""

from __future__ import annotations

import os
from typing import Any, ClassVar

from arq import cron
from arq.connections import RedisSettings

QUEUE_ENV = "SAMPLE_APP_ARQ_QUEUE"


def queue_name() -> str:
    return os.environ.get(QUEUE_ENV) or "arq:queue"


async def build_report(ctx: dict[str, Any], name: str) -> str:
    return f"report {name} built by job {ctx['job_id']}"


async def nightly_cleanup(ctx: dict[str, Any]) -> None:
    return None


class WorkerSettings:
    functions: ClassVar[list[Any]] = [build_report]
    cron_jobs: ClassVar[list[Any]] = [cron(nightly_cleanup, hour=3, minute=0)]
    redis_settings = RedisSettings.from_dsn(os.environ.get("REDIS_URL") or "redis://localhost:6379/0")
    queue_name = queue_name()
