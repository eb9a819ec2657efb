"""The reference FastAPI app: init exactly once per deploy, then serve.

    gunicorn -c gunicorn.conf.py        # 4 UvicornWorker processes, see hyperion_lock.gunicorn_post_fork

Startup timeline of each worker (the lifespan, after gunicorn forked it):

1. Connect Redis through :class:`~hyperion_lock.OptionalRedis` when ``HYPERION_LOCK_REDIS_URL`` is set (an
   unreachable Redis fails the startup within ``HYPERION_LOCK_CONNECT_TIMEOUT``); without it the workers of
   this host coordinate through file locks. Create the SQLAlchemy engine (``DATABASE_URL``, default SQLite
   ``./var/demo.sqlite3``). Nothing is connected at import time.
2. ``run_once("migrate")`` then ``run_once("seed")``: one worker runs each job, the others wait for its
   outcome. If the runner dies, a waiter takes over after the lease TTL (Redis) or at once (file lock).
3. SIGTERM/SIGINT while waiting ends the wait at once; the worker then stops without serving (exit 0).
   If a job fails, every worker's lifespan raises: uvicorn reports "Application startup failed", the worker
   exits with code 3 and the gunicorn master halts the deploy with a non-zero exit status.
4. Serve. ``GET /health`` is 200 from here on; ``GET /startup`` reports the jobs' outcomes, identical in every
   worker. ``GET /quotes/{symbol}?range=1d&interval=5m`` is cached across all workers (see :mod:`.quotes`).
   ``GET /metrics``: Prometheus metrics, summed over every worker under gunicorn (see docs/metrics.md).
5. Shutdown: once the lifespan's exit begins, ``GET /health`` answers 503 (for requests still being served).

Readiness before step 4 cannot be a 503: no worker accepts connections before its lifespan startup finished, so
a client of a worker that is still initialising sees "connection refused" (or, under gunicorn, whose master
holds the listening socket, a connection nobody answers until some worker is ready). Probe ``/health`` for 200.

This module declares the routes, so it does not use ``from __future__ import annotations``: FastAPI reads the
parameter annotations at route declaration, and the dependency alias built inside :func:`create_app` (around
that app's :class:`~hyperion_lock.OptionalRedis`) only exists in the function's scope, where a string
annotation could not be resolved.
"""

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import redis.asyncio as aredis
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import Engine, select

from hyperion_lock import (
    Coordinator,
    OptionalRedis,
    Outcome,
    Settings,
    WaitInterruptedError,
    gunicorn_worker_count,
    render_metrics,
    stop_requested,
)

from . import jobs, quotes
from .db import database_url, describe_url, make_engine
from .models import Item

logger = logging.getLogger(__name__)


class StartupState:
    """What this worker knows about its own startup (read by /health and /startup).

    ``finished`` is True from the end of the lifespan startup (the init jobs are done) until the lifespan's exit
    begins: exactly while this worker serves. ``stopping`` is True once that exit began.
    """

    def __init__(self) -> None:
        self.finished = False
        self.stopping = False
        self.generation = ""
        self.jobs: dict[str, dict[str, Any]] = {}


def outcome_report(outcome: Outcome) -> dict[str, Any]:
    return {
        "runner_pid": outcome.runner_pid,
        "runner_host": outcome.runner_host,
        "fencing_token": outcome.fencing_token,
        "outcome": str(outcome.status),
        "duration_s": round(outcome.duration_s, 3),
    }


async def initialise(coordinator: Coordinator, state: StartupState, url: str, engine: Engine) -> None:
    """Run the init jobs in order through the coordinator, recording their outcomes in ``state``."""
    steps: list[tuple[str, Any, tuple[Any, ...]]] = [("migrate", jobs.migrate, (url,)), ("seed", jobs.seed, (engine,))]
    with stop_requested(asyncio.get_running_loop(), cancel=False) as stop:
        for name, job, args in steps:
            if stop.is_set():  # SIGTERM arrived during the previous job: start no new one
                raise WaitInterruptedError(f"stop requested before job {name!r}", key=name,
                                           generation=coordinator.settings.generation)
            await _run_step(coordinator, state, name, job, args)


async def _run_step(coordinator: Coordinator, state: StartupState, name: str, job: Any, args: tuple[Any, ...]) -> None:
    state.jobs[name] = {"runner_pid": None, "fencing_token": None, "outcome": "running", "duration_s": 0.0}
    outcome = await coordinator.run_once(name, job, *args)
    state.jobs[name] = outcome_report(outcome)
    logger.info(
        "worker pid %d: job %r %s (runner %s, fencing token %d, %.2f s)", os.getpid(), name,
        "ran here" if outcome.ran_here else "was done by another worker", outcome.runner,
        outcome.fencing_token, outcome.duration_s,
    )


def metrics() -> Response:
    """Prometheus metrics; under gunicorn, the sums over every worker of this master (PROMETHEUS_MULTIPROC_DIR)."""
    body, content_type = render_metrics()
    return Response(body, headers={"Content-Type": content_type})


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app. Only configuration is read here; Redis and the database are connected in the lifespan."""
    base = settings or Settings.from_env()
    optional_redis = OptionalRedis(settings=base)
    cache = quotes.make_cache(base)  # connects lazily, per worker, on first use (after the fork)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state: StartupState = app.state.startup
        current = Settings.from_env() if settings is None else settings  # the gunicorn master may have set env
        state.generation = current.generation
        url = database_url()
        logger.info(
            "worker pid %d starting: generation %s, %s worker(s), database %s, Redis %s",
            os.getpid(), current.generation, gunicorn_worker_count() or "?", describe_url(url),
            describe_url(current.redis_url) if current.redis_url else "none (file locks on this host)",
        )
        async with optional_redis.lifespan(app) as client:
            engine = make_engine(url)
            app.state.engine = engine
            try:
                try:
                    await initialise(Coordinator(client, settings=current), state, url, engine)
                except WaitInterruptedError as exc:
                    # Asked to stop (SIGTERM/SIGINT) while another worker ran a job: not a boot failure. Finish
                    # the lifespan without serving (health never turns 200); uvicorn sees its exit flag and stops,
                    # the worker exits 0, and the master's shutdown is not turned into a "failed to boot" halt.
                    logger.info("worker pid %d: %s; exiting without serving", os.getpid(), exc.message)
                    yield
                    return
                except Exception as exc:
                    logger.error("worker pid %d: startup failed, this worker will exit: %s: %s",
                                 os.getpid(), type(exc).__name__, exc)
                    raise
                await cache.connect()  # warm the cache's connection up; fails open (logged) without Redis
                state.finished = True
                logger.info("worker pid %d: startup finished; serving", os.getpid())
                yield
            finally:
                state.finished, state.stopping = False, True  # the lifespan's exit began: /health answers 503
                await cache.aclose()
                engine.dispose()

    app = FastAPI(title="hyperion_lock reference app", lifespan=lifespan)
    app.add_middleware(quotes.WorkerPidHeader)
    app.state.startup = StartupState()
    app.state.cache = cache
    RedisDep = Annotated[aredis.Redis | None, Depends(optional_redis)]

    @app.get("/health")
    def health(request: Request) -> JSONResponse:
        """200 while this worker serves (startup finished); 503 once its shutdown began."""
        state: StartupState = request.app.state.startup
        status = "ok" if state.finished else "stopping" if state.stopping else "starting"
        return JSONResponse({"status": status, "pid": os.getpid()}, status_code=200 if state.finished else 503)

    @app.get("/startup")
    def startup(request: Request) -> dict[str, Any]:
        state: StartupState = request.app.state.startup
        return {"pid": os.getpid(), "generation": state.generation, "jobs": state.jobs}

    @app.get("/items")
    def items(request: Request) -> list[str]:
        engine: Engine = request.app.state.engine
        with engine.connect() as conn:
            return list(conn.scalars(select(Item.name).order_by(Item.name)))

    @app.get("/redis")
    async def redis_info(client: RedisDep) -> dict[str, Any]:
        if client is None:
            return {"redis": None}
        return {"redis": "ok" if await client.ping() else "no answer"}

    app.add_api_route("/metrics", metrics, methods=["GET"])
    quotes.add_routes(app, cache)
    return app


app = create_app()
