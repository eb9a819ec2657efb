"""The web app: five run-once init jobs in the lifespan, as in issue #10.

Production runs ``uvicorn sample_app.main:app --workers 4`` (or ``fastapi run --workers 4``) with
``WEB_CONCURRENCY=4`` and ``REDIS_URL`` set. The app's tests patch :func:`get_number_of_workers` to return 1
and :func:`get_redis_client` to return their own client.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis
from arq import create_pool
from arq.connections import ArqRedis, RedisSettings
from fastapi import FastAPI, HTTPException, Request

# The one-import change; before: from app.utils.locks import use_lock_for_workers
from hyperion_lock import use_lock_for_workers

from . import jobs
from .worker import queue_name

LOG_FORMAT = "%(levelname)s [%(process)d] %(name)s: %(message)s"
logging.basicConfig(level=os.environ.get("SAMPLE_APP_LOG_LEVEL") or "INFO", format=LOG_FORMAT)
logger = logging.getLogger("sample_app")


def get_number_of_workers() -> int:
    """How many workers serve the app: ``WEB_CONCURRENCY`` (uvicorn's default for ``--workers``), else 1."""
    return int(os.environ.get("WEB_CONCURRENCY") or 1)


def get_redis_client() -> redis.Redis | None:
    """The app's synchronous Redis client, from ``REDIS_URL``; ``None`` when it is not set."""
    url = os.environ.get("REDIS_URL")
    return redis.Redis.from_url(url) if url else None


def arq_settings(client: redis.Redis) -> RedisSettings:
    """arq talks to the same Redis as ``client``."""
    kwargs = client.connection_pool.connection_kwargs
    return RedisSettings(
        host=kwargs.get("host", "localhost"), port=kwargs.get("port", 6379), database=kwargs.get("db", 0),
        username=kwargs.get("username"), password=kwargs.get("password"),
    )


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    workers = get_number_of_workers()
    client = get_redis_client()
    jobs.RAN.clear()
    logger.info("worker %d starting (%d worker(s), Redis %s)", os.getpid(), workers, "on" if client else "off")
    arq_pool: ArqRedis | None = None
    try:
        await use_lock_for_workers(jobs.init_db, "init_db", client, workers, logger, "init_db_done")
        await use_lock_for_workers(jobs.seed_admin, "seed_admin", client, workers, logger)
        await use_lock_for_workers(jobs.sync_permissions, "sync_permissions", client, workers, logger)
        await use_lock_for_workers(jobs.register_cron_jobs, "register_cron_jobs", client, workers, logger)
        await use_lock_for_workers(jobs.warm_cache, "warm_cache", client, workers, logger, None, client)
        if client is not None:
            arq_pool = await create_pool(arq_settings(client))
        app.state.redis = client
        app.state.arq = arq_pool
        logger.info("worker %d ready", os.getpid())
        yield
    finally:
        if arq_pool is not None:
            await arq_pool.aclose()
        if client is not None:
            client.close()


app = FastAPI(lifespan=lifespan)


@app.get("/health")
def health() -> dict[str, Any]:
    return {"status": "ok", "pid": os.getpid()}


@app.get("/startup")
def startup() -> dict[str, Any]:
    """Which init jobs ran in this worker."""
    return {"pid": os.getpid(), "ran_here": list(jobs.RAN)}


@app.get("/redis")
def redis_ping(request: Request) -> dict[str, Any]:
    client: redis.Redis | None = request.app.state.redis
    return {"redis": client.ping() if client is not None else None}


@app.post("/reports/{name}")
async def enqueue_report(name: str, request: Request) -> dict[str, Any]:
    pool: ArqRedis | None = request.app.state.arq
    if pool is None:
        raise HTTPException(503, "background jobs need Redis (REDIS_URL)")
    job = await pool.enqueue_job("build_report", name, _queue_name=queue_name())
    if job is None:
        raise HTTPException(409, "a job with this id is already queued")
    return {"job_id": job.job_id}
