"""The reference app's cached endpoint: quotes from a slow, simulated upstream, cached across all workers.

``GET /quotes/{symbol}?range=1d&interval=5m`` (both query parameters optional) returns a :class:`Quote` computed
by :func:`upstream_quote`, which records the call in the database (table ``upstream_calls``, revision 0003)
and then waits ``HYPERION_DEMO_UPSTREAM_DELAY`` seconds (default 0.3). The result is cached for
``HYPERION_DEMO_QUOTE_TTL`` seconds (default 30), then served stale for ``HYPERION_DEMO_QUOTE_STALE`` seconds
(default 10) while one worker refreshes it, tagged ``symbol:<SYMBOL>``. A symbol starting with ``FAIL`` makes
the upstream fail (502) after the delay.

``GET /upstream-calls`` counts the upstream calls of every worker since the database was created;
``POST /quotes/{symbol}/invalidate`` drops every cached quote of the symbol: ``{"invalidated": n}``.

``GET /me/watchlist`` is the safe pattern for an answer that depends on who asks: the user comes from a bearer
token (``Authorization: Bearer demo-<name>``, through FastAPI's ``HTTPBearer``), and the endpoint is cached with
``vary=["Authorization"]``: one entry per token (its key holds a keyed hash of it, never the token), served with
``Cache-Control: private``. Without ``vary`` the cache would refuse the endpoint at decoration, since an
``HTTPBearer`` nobody keyed would hand the first user's watchlist to everyone. ``/quotes`` beside it is marked
``shared=True``: its answer does not depend on who asks, so a request carrying a token or a cookie is answered
from the same entries (without it, such a request would bypass the cache: ``X-Cache: BYPASS``).

With Redis (``HYPERION_LOCK_REDIS_URL``) a burst of requests for one cold key makes one upstream call across all
workers; without it, at most one per worker.

This module declares routes, so it does not use ``from __future__ import annotations`` (see :mod:`.app`).
"""

import asyncio
import datetime as dt
import hashlib
import os
import time
from decimal import Decimal
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from sqlalchemy import Engine, func, insert, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hyperion_lock import Cache, Settings

from .models import UpstreamCall

UPSTREAM_DELAY_ENV = "HYPERION_DEMO_UPSTREAM_DELAY"
QUOTE_TTL_ENV = "HYPERION_DEMO_QUOTE_TTL"
QUOTE_STALE_ENV = "HYPERION_DEMO_QUOTE_STALE"
NAMESPACE = "quotes"


def _seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    value = float(raw) if raw else default
    if value < 0:
        raise ValueError(f"{name} must be >= 0 seconds, got {raw!r}")
    return value


class Quote(BaseModel):
    symbol: str
    range: str
    interval: str
    price: Decimal
    as_of: dt.datetime
    upstream_call: int
    computed_by: int


def record_call(engine: Engine, symbol: str, range_: str, interval: str) -> int:
    with engine.begin() as conn:
        row = conn.execute(insert(UpstreamCall).values(
            symbol=symbol, range=range_, interval=interval, pid=os.getpid(), started_at=time.time(),
        ).returning(UpstreamCall.id)).scalar_one()
    return int(row)


def count_calls(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(UpstreamCall)).scalar_one())


async def upstream_quote(engine: Engine, symbol: str, range_: str, interval: str) -> Quote:
    """The slow upstream: counted first (so a call that dies midway still counts), then the delay."""
    call = await asyncio.to_thread(record_call, engine, symbol, range_, interval)
    await asyncio.sleep(_seconds(UPSTREAM_DELAY_ENV, 0.3))
    if symbol.upper().startswith("FAIL"):
        raise HTTPException(502, f"upstream failed for {symbol} (call {call})")
    digest = hashlib.sha256(f"{symbol}:{range_}:{interval}:{call}".encode()).digest()
    price = Decimal(int.from_bytes(digest[:4], "big") % 1_000_000) / 100
    return Quote(symbol=symbol, range=range_, interval=interval, price=price, as_of=dt.datetime.now(dt.UTC),
                 upstream_call=call, computed_by=os.getpid())


def make_cache(settings: Settings) -> Cache:
    """Redis when ``HYPERION_LOCK_REDIS_URL`` is set, else each worker's memory; tunables from
    ``HYPERION_LOCK_CACHE_*``."""
    return Cache(settings=settings)


def symbol_tag(symbol: str) -> str:
    return f"symbol:{symbol.upper()}"


class Watchlist(BaseModel):
    user: str
    symbols: list[str]
    computed_by: int


WATCHLISTS = {"alice": ["AAPL", "MSFT"], "bob": ["TSLA", "NVDA"]}
bearer = HTTPBearer(description="Bearer demo-<name>")


def current_user(credentials: HTTPAuthorizationCredentials = Depends(bearer)) -> str:  # noqa: B008
    """The user of a demo token ``demo-<name>`` (a real app verifies a signed token here)."""
    name = credentials.credentials.removeprefix("demo-")
    if not credentials.credentials.startswith("demo-") or not name.isalnum():
        raise HTTPException(401, "unknown token: use Bearer demo-<name>")
    return name.lower()


def add_routes(app: FastAPI, cache: Cache) -> None:
    ttl = _seconds(QUOTE_TTL_ENV, 30.0)
    stale = _seconds(QUOTE_STALE_ENV, 10.0)

    @app.get("/quotes/{symbol}", response_model=Quote)
    @cache.endpoint(NAMESPACE, ttl=ttl, stale=stale, tags=lambda symbol, **_: [symbol_tag(symbol)], shared=True)
    async def quote(
        symbol: str, request: Request, range_: str = Query("1d", alias="range"), interval: str = "5m",
    ) -> Quote:
        return await upstream_quote(request.app.state.engine, symbol, range_, interval)

    @app.get("/me/watchlist", response_model=Watchlist)
    @cache.endpoint("watchlists", ttl=ttl, vary=["Authorization"])
    async def watchlist(user: str = Depends(current_user)) -> Watchlist:
        return Watchlist(user=user, symbols=WATCHLISTS.get(user, ["SPY"]), computed_by=os.getpid())

    @app.post("/quotes/{symbol}/invalidate")
    async def invalidate_quote(symbol: str) -> dict[str, int]:
        return {"invalidated": await cache.invalidate_tag(NAMESPACE, symbol_tag(symbol))}

    @app.get("/upstream-calls")
    async def upstream_calls(request: Request) -> dict[str, int]:
        return {"calls": await asyncio.to_thread(count_calls, request.app.state.engine)}

    @app.get("/cache-stats")
    def cache_stats() -> dict[str, Any]:
        return {"pid": os.getpid(), "namespaces": cache.stats()}


class WorkerPidHeader:
    """Adds ``X-Worker-Pid`` to every response (pure ASGI: no per-request task), so clients see which worker
    answered."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_pid(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-worker-pid", str(os.getpid()).encode())]
            await send(message)

        await self.app(scope, receive, send_with_pid)
