"""The benchmark app: one quotes endpoint cached by the implementation named in ``BENCH_CACHE_IMPL``.

    BENCH_CACHE_IMPL=hyperion|hyperion-15ms|hyperion-nonear|fastapi-cache2|cashews|aiocache|none \\
    BENCH_REDIS_URL=redis://... \\
    BENCH_CALLS_FILE=/tmp/calls BENCH_TTL=30 BENCH_DELAY=0.3 \\
    gunicorn -w 4 -k uvicorn_worker.UvicornWorker benchmarks.cache_app:app

``GET /quotes/{symbol}?range=1d&interval=5m`` waits ``BENCH_DELAY`` seconds (the upstream) and appends one line
to ``BENCH_CALLS_FILE`` per upstream call (O_APPEND: lines of every worker, none lost), so the benchmark counts
upstream calls without asking Redis. Each implementation is used the way its documentation shows, with its
single-flight option where it has one (cashews ``lock=True``, aiocache ``cached_stampede``). ``hyperion-15ms`` is
hyperion_lock with ``op_timeout=0.015`` instead of the default 0.05 (faster fail-over, less slack under load);
``hyperion-nonear`` without its near cache (every hit reads Redis), to measure what the near cache brings.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Query
from pydantic import BaseModel

IMPL = os.environ.get("BENCH_CACHE_IMPL", "hyperion")
URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
TTL = float(os.environ.get("BENCH_TTL", "30"))
DELAY = float(os.environ.get("BENCH_DELAY", "0.3"))
CALLS = os.environ.get("BENCH_CALLS_FILE", "/tmp/bench-calls")


class Quote(BaseModel):
    symbol: str
    range: str
    interval: str
    price: float
    as_of: dt.datetime
    pid: int


async def upstream(symbol: str, range_: str, interval: str) -> Quote:
    fd = os.open(CALLS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{os.getpid()} {symbol}\n".encode())
    finally:
        os.close(fd)
    await asyncio.sleep(DELAY)
    return Quote(symbol=symbol, range=range_, interval=interval, price=123.45, as_of=dt.datetime.now(dt.UTC),
                 pid=os.getpid())


Endpoint = Callable[..., Awaitable[Any]]
Lifespan = Callable[[FastAPI], Any]


async def plain(symbol: str, range_: str = Query("1d", alias="range"), interval: str = "5m") -> Quote:
    return await upstream(symbol, range_, interval)


def with_hyperion(**overrides: Any) -> tuple[Endpoint, Lifespan | None]:
    from hyperion_lock import Cache

    cache = Cache(URL, **overrides)
    endpoint: Endpoint = cache.endpoint("quotes", ttl=TTL)(plain)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await cache.connect()
        yield
        await cache.aclose()

    return endpoint, lifespan


def with_fastapi_cache2() -> tuple[Endpoint, Lifespan | None]:
    fastapi_cache = importlib.import_module("fastapi_cache")
    backend = importlib.import_module("fastapi_cache.backends.redis")
    decorator = importlib.import_module("fastapi_cache.decorator")
    aredis = importlib.import_module("redis.asyncio")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        fastapi_cache.FastAPICache.init(backend.RedisBackend(aredis.from_url(URL)), prefix="fc")
        yield

    return decorator.cache(expire=int(TTL))(plain), lifespan


def with_cashews() -> tuple[Endpoint, Lifespan | None]:
    cashews = importlib.import_module("cashews")
    cashews.cache.setup(URL)
    return cashews.cache(ttl=TTL, lock=True)(plain), None


def with_aiocache() -> tuple[Endpoint, Lifespan | None]:
    aiocache = importlib.import_module("aiocache")
    serializers = importlib.import_module("aiocache.serializers")
    host, port = URL.split("//", 1)[1].split("/", 1)[0].split(":")

    def key(func: Any, *args: Any, **kwargs: Any) -> str:
        return f"q:{kwargs.get('symbol')}:{kwargs.get('range_')}:{kwargs.get('interval')}"

    decorated = aiocache.cached_stampede(lease=2, ttl=TTL, cache=aiocache.Cache.REDIS, endpoint=host,
                                         port=int(port), serializer=serializers.PickleSerializer(), key_builder=key)
    return decorated(plain), None


def build() -> FastAPI:
    choices: dict[str, Callable[[], tuple[Endpoint, Lifespan | None]]] = {
        "hyperion": with_hyperion, "hyperion-15ms": lambda: with_hyperion(op_timeout=0.015),
        "hyperion-nonear": lambda: with_hyperion(near_max_entries=0),
        "fastapi-cache2": with_fastapi_cache2, "cashews": with_cashews,
        "aiocache": with_aiocache, "none": lambda: (plain, None),
    }
    endpoint, lifespan = choices[IMPL]()
    app = FastAPI(lifespan=lifespan)
    app.get("/quotes/{symbol}")(endpoint)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"impl": IMPL}

    return app


if os.environ.get("BENCH_LOG_LEVEL"):  # e.g. DEBUG: what the cache decided, per worker, in the gunicorn log
    logging.basicConfig(level=os.environ["BENCH_LOG_LEVEL"].upper(),
                        format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s")
    logging.getLogger("asyncio").setLevel(logging.WARNING)
app = build()
