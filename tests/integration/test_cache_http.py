"""Cached FastAPI endpoints through the ASGI interface: keys from requests, headers, 304, client refresh, errors.

Two apps on one Redis stand for two workers. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from hyperion_lock import Cache, Settings
from hyperion_lock.cache.engine import Engine
from hyperion_lock.cache.store import Message
from tests.support import until

pytestmark = pytest.mark.integration
HEADERS = ("etag", "cache-control", "age", "x-cache")


class Item(BaseModel):
    name: str
    at: dt.datetime
    note: str | None = None
    run: int


class Session:
    """A per-request dependency object: never part of a key."""


def session() -> Session:
    return Session()


def paging(page: int = 1) -> int:  # a query parameter declared by a dependency
    return page


def build(cache: Cache, runs: dict[str, int], gate: asyncio.Event | None = None,
          started: asyncio.Event | None = None, **options: Any) -> FastAPI:
    app = FastAPI()

    def count(name: str) -> int:
        runs[name] = runs.get(name, 0) + 1
        return runs[name]

    @app.get("/items/{name}", response_model=Item, response_model_exclude_none=True)
    @cache.endpoint("items", ttl=30, tags=lambda name, **_: [f"item:{name}"], vary=["Accept-Language"], **options)
    async def item(name: str, db: Annotated[Session, Depends(session)], page: Annotated[int, Depends(paging)],
                   kind: str = "a", tag: Annotated[list[str] | None, Query()] = None) -> Item:
        assert isinstance(db, Session)
        if started is not None:
            started.set()
        if gate is not None:
            await gate.wait()
        if name == "missing":
            count("missing attempts")
            raise HTTPException(404, f"no item {name}")
        return Item(name=name, at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC), run=count(name))

    @app.get("/sync/{n}")
    @cache.endpoint("sync", ttl=30)
    def sync_square(n: int, request: Request) -> dict[str, int]:
        assert isinstance(request, Request)
        return {"square": n * n, "run": count(f"sync{n}")}

    @app.get("/raw")
    @cache.endpoint("raw", ttl=30)
    async def raw() -> Any:
        return JSONResponse({"a": 1})

    return app


@asynccontextmanager
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


def make(url: str | None, prefix: str, **overrides: Any) -> Cache:
    return Cache(url, settings=Settings(redis_url=None, key_prefix=prefix), **overrides)


@pytest.fixture
def prefix() -> str:
    return f"h{uuid.uuid4().hex[:10]}"


@pytest.fixture(params=["memory", "redis"])
def url(request: pytest.FixtureRequest) -> str | None:
    return None if request.param == "memory" else str(request.getfixturevalue("redis_url"))


async def test_first_response_has_the_same_headers_as_every_later_one(url: str | None, prefix: str) -> None:
    cache, runs = make(url, prefix), dict[str, int]()
    try:
        async with client(build(cache, runs)) as c:
            first = await c.get("/items/a?kind=b")
            second = await c.get("/items/a?kind=b")
            assert (first.status_code, second.status_code) == (200, 200)
            assert first.headers["x-cache"] == "MISS" and second.headers["x-cache"] == "HIT"
            for name in HEADERS:
                assert name in first.headers and name in second.headers, name
            assert first.headers["etag"] == second.headers["etag"] and first.content == second.content
            assert first.headers["cache-control"] == "max-age=30" and first.headers["age"] == "0"
            assert first.headers["vary"] == "Accept-Language" == second.headers["vary"]
            assert first.json() == {"name": "a", "at": "2026-01-01T00:00:00Z", "run": 1}  # exclude_none applied
            not_modified = await c.get("/items/a?kind=b", headers={"If-None-Match": first.headers["etag"]})
            assert not_modified.status_code == 304 and not_modified.content == b""
            assert not_modified.headers["etag"] == first.headers["etag"] and not_modified.headers["x-cache"] == "HIT"
            other = await c.get("/items/a?kind=b", headers={"If-None-Match": '"something-else"'})
            assert other.status_code == 200 and runs == {"a": 1}
    finally:
        await cache.aclose()


async def test_keys_come_from_route_path_declared_query_and_vary_headers(url: str | None, prefix: str) -> None:
    cache, runs = make(url, prefix), dict[str, int]()
    try:
        async with client(build(cache, runs)) as c:
            base = (await c.get("/items/a?kind=b&page=2")).headers["etag"]
            same = ["/items/a?page=2&kind=b", "/items/a?kind=b&page=2&_=123&utm=x"]  # order; undeclared params
            for path in same:
                r = await c.get(path)
                assert (r.headers["x-cache"], r.headers["etag"]) == ("HIT", base), path
            assert runs == {"a": 1}
            assert (await c.get("/items/a?kind=b&page=3")).headers["x-cache"] == "MISS"  # a dependency's param
            assert (await c.get("/items/a?tag=x&tag=y")).headers["x-cache"] == "MISS"
            assert (await c.get("/items/a?tag=y&tag=x")).headers["x-cache"] == "MISS"  # repeated values: order kept
            assert (await c.get("/items/a?tag=x&tag=y")).headers["x-cache"] == "HIT"
            fr = await c.get("/items/a?kind=b&page=2", headers={"Accept-Language": "fr"})
            assert fr.headers["x-cache"] == "MISS"  # a vary header is part of the key
            assert (await c.get("/items/b")).headers["x-cache"] == "MISS"  # another path parameter
            assert runs == {"a": 5, "b": 1}
            sync1, sync2 = await c.get("/sync/3"), await c.get("/sync/3")
            assert sync1.json() == sync2.json() == {"square": 9, "run": 1} and sync2.headers["x-cache"] == "HIT"
            raw = await c.get("/raw")
            assert raw.status_code == 500  # a Response cannot be cached as data (CacheSerializationError)
    finally:
        await cache.aclose()


async def test_client_no_cache_is_ignored_unless_the_endpoint_allows_it(redis_url: str, prefix: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    strict, lenient = make(redis_url, prefix), make(redis_url, prefix + "x")
    strict_runs: dict[str, int] = {}
    lenient_runs: dict[str, int] = {}
    forced = [0]  # lookups that asked to recompute (a client's no-cache, allowed)
    lookup = Cache._lookup

    async def counting(self: Cache, *args: Any, **kwargs: Any) -> Any:
        forced[0] += bool(kwargs.get("force"))
        return await lookup(self, *args, **kwargs)

    monkeypatch.setattr(Cache, "_lookup", counting)
    try:
        async with client(build(strict, strict_runs)) as c:
            await c.get("/items/a")
            for header in ({"Cache-Control": "no-cache"}, {"Cache-Control": "max-age=0"}, {"Pragma": "no-cache"}):
                assert (await c.get("/items/a", headers=header)).headers["x-cache"] == "HIT"
            assert strict_runs == {"a": 1} and forced == [0]
        gate = asyncio.Event()
        gate.set()
        async with client(build(lenient, lenient_runs, gate, allow_client_refresh=True)) as c:
            await c.get("/items/a")
            gate.clear()  # the recomputation waits until all five requests are in: they overlap for sure
            refreshing = [asyncio.create_task(c.get("/items/a", headers={"Cache-Control": "no-cache"}))
                          for _ in range(5)]
            await until(lambda: forced[0] >= 5, "5 forced lookups", 10)
            gate.set()
            refreshed = [await r for r in refreshing]
            assert {r.json()["run"] for r in refreshed} == {2}  # recomputed, once for the concurrent ones
            assert (await c.get("/items/a")).json()["run"] == 2
    finally:
        await strict.aclose()
        await lenient.aclose()


async def test_workers_share_entries_etags_and_http_errors(redis_url: str, prefix: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Two apps (two workers) on one Redis: one computation, the same ETag, and an HTTPException raised in one
    reaches the requests waiting in the other with its status and detail (their lease wait would be 30 s)."""
    gate, started = asyncio.Event(), asyncio.Event()
    caches = [make(redis_url, prefix, lease_ttl=30), make(redis_url, prefix, lease_ttl=30)]
    runs: dict[str, int] = {}
    apps = [build(c, runs, gate, started) for c in caches]
    waiting = spy_waits(monkeypatch)
    try:
        async with client(apps[0]) as c0, client(apps[1]) as c1:
            async with asyncio.timeout(10):
                first = asyncio.create_task(c0.get("/items/z"))
                await started.wait()
                others = [asyncio.create_task(c1.get("/items/z")) for _ in range(3)]
                await until(lambda: waiting[0] >= 1, "the other worker waits for the computation", 5)
                gate.set()
                responses = [await first] + [await o for o in others]
            assert {r.headers["etag"] for r in responses} == {responses[0].headers["etag"]}
            assert runs == {"z": 1} and sorted(r.headers["x-cache"] for r in responses).count("MISS") == 1
            gate.clear()
            started.clear()
            async with asyncio.timeout(10):
                failing = asyncio.create_task(c0.get("/items/missing"))
                await started.wait()
                before = waiting[0]
                second = asyncio.create_task(c1.get("/items/missing"))
                await until(lambda: waiting[0] > before, "one more wait", 5)
                gate.set()
                lost = [await failing, await second]
            assert [r.status_code for r in lost] == [404, 404]
            assert {r.json()["detail"] for r in lost} == {"no item missing"}
            assert runs["missing attempts"] == 1  # the waiting worker got the error, it did not compute
    finally:
        for c in caches:
            await c.aclose()


def spy_waits(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the callers that began waiting for another worker's computation (listening for its message)."""
    count = [0]
    original = Engine._wait

    async def spy(future: asyncio.Future[Message] | None, timeout: float) -> Message | None:
        count[0] += future is not None
        return await original(future, timeout)

    monkeypatch.setattr(Engine, "_wait", staticmethod(spy))
    return count


async def test_same_content_has_the_same_etag_after_a_restart(redis_url: str, prefix: str) -> None:
    """The ETag is a hash of the bytes: a fresh worker with an empty cache computing the same data agrees."""
    tags = []
    for attempt in range(2):
        cache = make(redis_url, f"{prefix}{attempt}")
        try:
            async with client(build(cache, {})) as c:
                tags.append((await c.get("/sync/4")).headers["etag"])
        finally:
            await cache.aclose()
    assert tags[0] == tags[1]
