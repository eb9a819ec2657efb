"""A minimal FastAPI app for the boot-overhead benchmark; its lifespan optionally runs a trivial run-once job.

    BENCH_BOOT_LOG=/tmp/boot.log BENCH_BOOT_INIT=1 BENCH_BOOT_REDIS_URL=redis://... BENCH_BOOT_GENERATION=g1 \
        gunicorn -k uvicorn_worker.UvicornWorker -w 8 benchmarks.bootapp:app

Each worker appends ``<pid> <time.time()> <seconds spent in run_once>`` to ``BENCH_BOOT_LOG`` once its
startup is complete.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from hyperion_lock import Coordinator


async def _trivial_init() -> None:
    return None


def _mark_ready(path: str, init_seconds: float) -> None:
    with open(path, "a") as fh:  # one short append, before the worker serves: blocking is fine here
        fh.write(f"{os.getpid()} {time.time()} {init_seconds}\n")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    t0 = time.perf_counter()
    if os.environ.get("BENCH_BOOT_INIT") == "1":
        coordinator = Coordinator(
            os.environ["BENCH_BOOT_REDIS_URL"], generation=os.environ["BENCH_BOOT_GENERATION"], lease_ttl=2
        )
        await coordinator.run_once("boot-init", _trivial_init)
    _mark_ready(os.environ["BENCH_BOOT_LOG"], time.perf_counter() - t0)
    yield


app = FastAPI(lifespan=lifespan)


@app.get("/")
async def root() -> dict[str, str]:
    return {"status": "ok"}
