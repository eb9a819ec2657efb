"""Bad settings refused when made, bad entries contained, oversized or unannotated answers served: on a real Redis,
through real HTTP (in-process ASGI) for endpoints.

Each Cache instance stands for one worker (its own clients, flights and breaker). Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Annotated, Any, TypeVar

import httpx
import pytest
import redis
from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from hyperion_lock import Cache, ConfigurationError, Settings
from hyperion_lock.cache.keys import CacheKeys

pytestmark = pytest.mark.integration
LOGGER = "hyperion_lock.cache.facade"
YEAR = 365 * 86400
F = TypeVar("F", bound=Callable[..., Any])


@pytest.fixture
def prefix() -> str:
    return f"b{uuid.uuid4().hex[:10]}"


def make(url: str | None, prefix: str, **overrides: Any) -> Cache:
    return Cache(url, settings=Settings(redis_url=None, key_prefix=prefix), **overrides)


@asynccontextmanager
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


def breaker_open(cache: Cache) -> bool:
    return any(ctx.guard.is_open for ctx in cache._engine.loops.values())


def failing(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "is failing" in r.getMessage()]


# -- 5. bad settings are refused when they are made ---------------------------------------------------------------
@pytest.mark.parametrize(("variable", "value"), [
    ("LEASE_TTL", "1e300"), ("LEASE_TTL", "0.01"), ("OP_TIMEOUT", "inf"), ("OP_TIMEOUT", "nan"),
    ("OP_TIMEOUT", "3600"), ("WAIT_TIMEOUT", "-1"), ("MAX_SIZE", "0"), ("MAX_SIZE", "1e300"),
    ("MAX_SIZE", "1.5"), ("BREAKER_FAILURES", "0"), ("BREAKER_RETRY", "1e300"), ("BREAKER_MAX_RETRY", "1e9"),
    ("STATS_INTERVAL", "inf"), ("MEMORY_MAX_ENTRIES", "1e12"),
])
def test_every_cache_setting_from_the_environment_is_checked_at_construction(
        redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    monkeypatch.setenv(f"HYPERION_LOCK_CACHE_{variable}", value)
    with pytest.raises(ConfigurationError, match=f"HYPERION_LOCK_CACHE_{variable}"):
        make(redis_url, prefix)


@pytest.mark.parametrize("setting", [
    {"lease_ttl": 1e300}, {"op_timeout": float("inf")}, {"max_size": -1}, {"max_size": 2**40},
    {"breaker_retry": 20.0, "breaker_max_retry": 10.0}, {"wait_timeout": True}, {"lease": 1},
])
def test_every_cache_setting_given_as_an_argument_is_checked_at_construction(redis_url: str, prefix: str,
                                                                             setting: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        make(redis_url, prefix, **setting)


BAD_OPTIONS: list[dict[str, Any]] = [
    {"stale": float("inf")}, {"stale": 1e300}, {"stale": -1}, {"error_ttl": -1}, {"error_ttl": 0},
    {"ttl": 0}, {"ttl": float("nan")}, {"ttl": 1e300}, {"refresh_ahead": 31}, {"refresh_ahead": -1},
    {"lease_ttl": 1e300}, {"lease_ttl": 0.001}, {"max_size": 0}, {"max_size": 2**40}, {"max_size": 1.5},
    {"nonsense": 1},
]


@pytest.mark.parametrize("options", BAD_OPTIONS)
def test_every_duration_and_size_of_a_function_is_checked_at_decoration(redis_url: str, prefix: str,
                                                                        options: dict[str, Any]) -> None:
    cache = make(redis_url, prefix)
    with pytest.raises(ConfigurationError, match=next(iter(options)) if "nonsense" not in options else "unknown"):
        @cache.cached("f", **{"ttl": 30, **options})
        async def f(x: int) -> int:
            return x


@pytest.mark.parametrize("options", BAD_OPTIONS)
def test_every_duration_and_size_of_an_endpoint_is_checked_at_decoration(redis_url: str, prefix: str,
                                                                        options: dict[str, Any]) -> None:
    cache, app = make(redis_url, prefix), FastAPI()
    with pytest.raises(ConfigurationError, match=next(iter(options)) if "nonsense" not in options else "unknown"):
        @app.get("/e")
        @cache.endpoint("e", **{"ttl": 30, **options})
        async def e() -> dict[str, int]:
            return {"a": 1}


async def test_the_extremes_of_every_range_work_on_redis(redis_url: str, prefix: str) -> None:
    """The largest accepted durations are accepted by Redis too (PX of ttl + stale), and 0 where 0 is allowed."""
    cache, runs = make(redis_url, prefix, lease_ttl=86400, max_size=512 << 20, op_timeout=60,
                       breaker_failures=1000, wait_timeout=86400), [0]

    @cache.cached("long", ttl=YEAR, stale=YEAR, error_ttl=YEAR, refresh_ahead=0, lease_ttl=0.1, max_size=1)
    async def small(x: int) -> int:
        runs[0] += 1
        return x

    @cache.cached("short", ttl=0.001, stale=0, refresh_ahead=0.001)
    async def short(x: int) -> int:
        return x

    try:
        assert [await small(1), await small(1), await short(2)] == [1, 1, 2] and runs == [1]
        assert not breaker_open(cache)
        with redis.Redis.from_url(redis_url) as r:
            (name,) = r.scan_iter(match=CacheKeys(prefix, "long").entry("*"))
            assert r.pttl(name) > (2 * YEAR - 60) * 1000
    finally:
        await cache.aclose()


# -- 5. a bad entry is a miss for that entry alone ----------------------------------------------------------------
CORRUPTIONS: list[tuple[str, Any]] = [
    ("h", b"not json"),
    ("h", b"[1, 2, 3]"),
    ("h", b'{"t": "30000", "s": 0, "e": "\\"x\\"", "c": "json", "n": 0}'),
    ("h", b'{"s": 0, "e": "\\"x\\"", "c": "json", "n": 0}'),
    ("h", b'{"t": 30000, "s": 0, "e": {"x": 1}, "c": "json", "n": 0}'),
    ("h", b'{"t": 30000, "s": -5, "e": "\\"x\\"", "c": "json", "n": 0}'),
    ("h", b"\xff\xfe"),
    ("h", b'{"t": 30000, "s": 0, "e": "\\"x\\"", "c": "pickle", "n": 0}'),  # another codec's entry
    ("v", b"{not the value"),  # the header is fine, the payload cannot be decoded
    ("type", b"a string, not a hash"),  # another Redis type under the entry's name
]


def corrupt(url: str, prefix: str, namespace: str, how: tuple[str, Any]) -> bytes:
    """Spoil the one entry of ``namespace`` in Redis; returns its name."""
    field, value = how
    with redis.Redis.from_url(url) as r:
        (name,) = r.scan_iter(match=CacheKeys(prefix, namespace).entry("*"))
        if field == "type":
            r.delete(name)
            r.set(name, value, ex=60)
        else:
            r.hset(name, field, value)
        return bytes(name)


@pytest.mark.parametrize("how", CORRUPTIONS, ids=[f"{f}:{v[:24]!r}" for f, v in CORRUPTIONS])
async def test_a_bad_entry_is_a_miss_for_that_entry_alone(redis_url: str, prefix: str, how: tuple[str, Any],
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """One entry spoiled (a header of the wrong shape or type, an undecodable payload, another codec, another Redis
    type): every worker recomputes it once, the new value replaces it, one WARNING names it, and the breaker stays
    closed: the other entries of this and other namespaces are still served from Redis."""
    caplog.set_level(logging.WARNING, LOGGER)
    workers = [make(redis_url, prefix), make(redis_url, prefix)]
    runs: dict[str, int] = {}

    def cached(cache: Cache) -> tuple[Any, Any]:
        @cache.cached("bad", ttl=60)
        async def value(x: int) -> dict[str, int]:
            runs[f"bad{x}"] = runs.get(f"bad{x}", 0) + 1
            return {"x": x, "run": runs[f"bad{x}"]}

        @cache.cached("good", ttl=60)
        async def other(x: int) -> dict[str, int]:
            runs[f"good{x}"] = runs.get(f"good{x}", 0) + 1
            return {"x": x, "run": runs[f"good{x}"]}

        return value, other

    (bad_a, good_a), (bad_b, good_b) = cached(workers[0]), cached(workers[1])
    try:
        async with asyncio.timeout(30):
            assert await bad_a(1) == {"x": 1, "run": 1} and await good_a(2) == {"x": 2, "run": 1}
            name = corrupt(redis_url, prefix, "bad", how)
            for _ in range(3):
                assert await bad_a(1) == {"x": 1, "run": 2}  # recomputed once, then served
                assert await bad_b(1) == {"x": 1, "run": 2}
                assert await good_a(2) == await good_b(2) == {"x": 2, "run": 1}
            assert runs == {"bad1": 2, "good2": 1}
        assert not any(breaker_open(w) for w in workers) and not failing(caplog)
        warnings = [r.getMessage() for r in caplog.records if "cannot be decoded" in r.getMessage()]
        assert len(warnings) == 1 and "bad" in warnings[0], warnings
        with redis.Redis.from_url(redis_url) as r:
            assert r.type(name) == b"hash" and r.hget(name, "v") == b'{"x":1,"run":2}'  # replaced
    finally:
        for w in workers:
            await w.aclose()


@pytest.mark.parametrize("how", [*CORRUPTIONS[:3], CORRUPTIONS[7], CORRUPTIONS[9]],
                         ids=["not-json", "list", "str-ttl", "codec", "type"])
async def test_a_bad_entry_of_an_endpoint_is_recomputed_and_served(redis_url: str, prefix: str,
                                                                   how: tuple[str, Any]) -> None:
    cache, app, runs = make(redis_url, prefix), FastAPI(), [0]

    @app.get("/q/{symbol}")
    @cache.endpoint("quotes", ttl=60)
    async def quote(symbol: str) -> dict[str, Any]:
        runs[0] += 1
        return {"symbol": symbol, "run": runs[0]}

    try:
        async with client(app) as c:
            assert (await c.get("/q/A")).json() == {"symbol": "A", "run": 1}
            corrupt(redis_url, prefix, "quotes", how)
            again = await c.get("/q/A")
            assert (again.status_code, again.headers["x-cache"], again.json()) == (200, "MISS", {"symbol": "A",
                                                                                                  "run": 2})
            hit = await c.get("/q/A")
            assert (hit.headers["x-cache"], hit.json()) == ("HIT", {"symbol": "A", "run": 2})
        assert not breaker_open(cache)
    finally:
        await cache.aclose()



def test_every_cache_setting_has_a_documented_range() -> None:
    """A setting added later gets a range and a row in docs/caching.md's table, or this fails."""
    from dataclasses import fields

    from hyperion_lock.cache.types import CACHE_SETTING_BOUNDS, CacheSettings
    from tests.support import ROOT

    table = (ROOT / "docs" / "caching.md").read_text().split("## Settings", 1)[1].split("\n## ", 1)[0]
    for f in fields(CacheSettings):
        assert f.name in CACHE_SETTING_BOUNDS, f.name
        assert f"`{f.name.upper()}`" in table, f.name


# -- 9. endpoints without a response model ------------------------------------------------------------------------
class Side(enum.Enum):
    BUY = "buy"


class Leg(BaseModel):
    price: Decimal
    at: dt.datetime


def payload(symbol: str, range: str) -> dict[str, Any]:
    """What people return from unannotated endpoints: everything jsonable_encoder knows, nothing a schema names."""
    return {
        "symbol": symbol, "range": range, "name": "Société Générale ✓ 株", "prices": (1e16, 0.1, -0.0, 3),
        "at": dt.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=dt.timezone(dt.timedelta(hours=2))),
        "day": dt.date(2026, 1, 2),
        "id": uuid.UUID(int=7), "fee": Decimal("1.10"), "side": Side.BUY, "tags": frozenset({"x"}), "none": None,
        "leg": Leg(price=Decimal("2.5"), at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC)),
        "nested": [{"a": [1, {"b": None}]}],
    }


def quote_app(cache: Cache | None) -> FastAPI:
    """The same three endpoints, cached (``cache``) or not: unannotated, ``response_model=None``, annotated."""
    app = FastAPI()

    def cached(namespace: str) -> Callable[[F], F]:
        return (lambda fn: fn) if cache is None else cache.endpoint(namespace, ttl=60)

    @app.get("/quotes/{symbol}")
    @cached("plain")
    async def quotes(symbol: str, range: str = "1d"):  # type: ignore[no-untyped-def]
        return payload(symbol, range)

    @app.get("/none/{symbol}", response_model=None)
    @cached("none")
    def none(symbol: str, range: str = "1d") -> Any:
        return payload(symbol, range)

    @app.get("/typed/{symbol}")
    @cached("typed")
    async def typed(symbol: str, range: str = "1d") -> dict[str, Any]:
        return payload(symbol, range)

    return app


async def test_unannotated_endpoints_answer_the_bytes_fastapi_would_send(redis_url: str, prefix: str) -> None:
    """``async def quotes(symbol: str, range: str = "1d"):`` returning a dict answered 500 on every request
    (PydanticSchemaGenerationError for inspect._empty). Now a MISS, a HIT and another worker's HIT carry exactly the
    body of the same endpoint without the cache."""
    workers = [make(redis_url, prefix), make(redis_url, prefix)]
    try:
        async with client(quote_app(None)) as plain, client(quote_app(workers[0])) as a, \
                client(quote_app(workers[1])) as b:
            for path in ("/quotes/AAPL", "/quotes/AAPL?range=5d", "/none/MSFT", "/typed/IBM?range=1y"):
                expected = await plain.get(path)
                assert expected.status_code == 200, expected.text
                answers = [await a.get(path), await a.get(path), await b.get(path)]
                assert [r.status_code for r in answers] == [200, 200, 200], answers[0].text
                assert [r.headers["x-cache"] for r in answers] == ["MISS", "HIT", "HIT"], path
                for r in answers:
                    assert r.content == expected.content, path
                    assert r.headers["content-type"] == expected.headers["content-type"]
    finally:
        for w in workers:
            await w.aclose()


# -- 6. oversized answers are served, not failed ------------------------------------------------------------------
def too_large_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "more than max_size" in r.getMessage()]


def entries(url: str, prefix: str, namespace: str) -> list[bytes]:
    with redis.Redis.from_url(url) as r:
        return list(r.scan_iter(match=CacheKeys(prefix, namespace).entry("*")))


async def test_an_oversized_function_value_is_returned_uncached_to_every_caller(
        redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    """The computing call, a caller joining it in the same worker and a caller waiting for it in another worker
    all get the value (the waiter is told at once to compute it itself, not after the 30 s lease); nothing is
    stored; one WARNING for the function however often it happens."""
    caplog.set_level(logging.WARNING, LOGGER)
    a, b = make(redis_url, prefix, max_size=200, lease_ttl=30), make(redis_url, prefix, max_size=200, lease_ttl=30)
    gate, started, runs = asyncio.Event(), asyncio.Event(), [0]

    def decorate(cache: Cache) -> Any:
        @cache.cached("big", ttl=30)
        async def big(n: int) -> str:
            runs[0] += 1
            started.set()
            await gate.wait()
            return "x" * n

        return big

    big_a, big_b = decorate(a), decorate(b)
    try:
        async with asyncio.timeout(10):
            first = asyncio.create_task(big_a(1000))
            await started.wait()
            joiner = asyncio.create_task(big_a(1000))
            waiter = asyncio.create_task(big_b(1000))
            await until_waiting(b)
            gate.set()
            assert [await first, await joiner, await waiter] == ["x" * 1000] * 3
            assert runs == [2]  # worker a once (shared by its joiner), worker b once, directly
            assert await big_a(1000) == "x" * 1000 and runs == [3]  # not cached
            assert await big_a(10) == "x" * 10 and await big_b(10) == "x" * 10 and runs == [4]  # small: cached
        assert len(entries(redis_url, prefix, "big")) == 1
        assert len(too_large_warnings(caplog)) == 2 and "big" in too_large_warnings(caplog)[0]  # once per worker
        assert a.stats()["big"]["bypass"] == 3 and a.stats()["big"]["errors"] == 0
    finally:
        await a.aclose()
        await b.aclose()


async def until_waiting(cache: Cache) -> None:
    """Until a lookup of ``cache`` waits for another worker's lease (it listens on the namespace's channel)."""
    from tests.support import until

    await until(lambda: any(ctx.flights for ctx in cache._engine.loops.values())
                and any(getattr(ctx.store, "_listener", None) is not None
                        and ctx.store._listener._waiting  # type: ignore[attr-defined]
                        for ctx in cache._engine.loops.values()), "a waiter in the other worker", 10)


def test_an_oversized_sync_function_value_is_returned_uncached(redis_url: str, prefix: str,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    cache, runs = make(redis_url, prefix, max_size=100), [0]

    @cache.cached("sync", ttl=30)
    def big(n: int) -> list[int]:
        runs[0] += 1
        return list(range(n))

    try:
        assert big(100) == list(range(100)) and big(100) == list(range(100)) and runs == [2]
        assert big(3) == [0, 1, 2] and big(3) == [0, 1, 2] and runs == [3]
        assert len(too_large_warnings(caplog)) == 1
    finally:
        cache.close()


async def test_an_oversized_response_is_served_uncached_with_one_warning_per_endpoint(
        redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    """A 3 MiB response (default max_size 1 MiB) answered 500. Now 200 with the body, X-Cache: BYPASS, in every
    worker, including one whose request waited for the computation."""
    caplog.set_level(logging.WARNING, LOGGER)
    workers = [make(redis_url, prefix, lease_ttl=30), make(redis_url, prefix, lease_ttl=30)]
    gate, started, runs = asyncio.Event(), asyncio.Event(), [0]

    def build(cache: Cache) -> FastAPI:
        app = FastAPI()

        @app.get("/export/{kind}")
        @cache.endpoint("export", ttl=30)
        async def export(kind: str, mib: int = 3) -> dict[str, str]:
            runs[0] += 1
            started.set()
            await gate.wait()
            return {"kind": kind, "data": "y" * (mib << 20)}

        @app.get("/other")
        @cache.endpoint("other", ttl=30, max_size=10)
        async def other() -> dict[str, str]:
            return {"data": "z" * 100}

        return app

    try:
        async with client(build(workers[0])) as a, client(build(workers[1])) as b:
            async with asyncio.timeout(20):
                first = asyncio.create_task(a.get("/export/csv"))
                await started.wait()
                waiting = asyncio.create_task(b.get("/export/csv"))
                await until_waiting(workers[1])
                gate.set()
                answers = [await first, await waiting, await a.get("/export/json"), await a.get("/export/csv")]
            for r in answers:
                assert r.status_code == 200 and r.headers["x-cache"] == "BYPASS", r.text[:200]
                assert len(r.content) > 3 << 20 and r.headers["etag"]
            assert answers[0].content == answers[1].content == answers[3].content and runs == [4]
            small = [await a.get("/export/csv?mib=0"), await a.get("/export/csv?mib=0")]
            assert [r.headers["x-cache"] for r in small] == ["MISS", "HIT"]
            assert (await a.get("/other")).status_code == 200
        warnings = too_large_warnings(caplog)
        assert len(warnings) == 3, warnings  # /export/{kind} in each worker, /other once
        assert sum("/export/{kind}" in w for w in warnings) == 2 and sum("/other" in w for w in warnings) == 1
        assert len(entries(redis_url, prefix, "export")) == 1  # only the small one
    finally:
        for w in workers:
            await w.aclose()


# -- 6. what an endpoint sets on `response: Response` is never silently dropped -----------------------------------
def visitor(request: Request, response: Response) -> str:
    """A dependency that sets a per-client cookie and header on every request (hits included)."""
    who = request.headers.get("x-visitor", "nobody")
    response.set_cookie("visitor", who)
    response.headers["X-Visitor"] = who
    return who


def header_app(cache: Cache | None, runs: dict[str, int]) -> FastAPI:
    """The same endpoints cached (``cache``) or not."""
    app = FastAPI()

    def cached(namespace: str) -> Callable[[F], F]:
        return (lambda fn: fn) if cache is None else cache.endpoint(namespace, ttl=60)

    def count(name: str) -> int:
        runs[name] = runs.get(name, 0) + 1
        return runs[name]

    @app.get("/created/{name}")
    @cached("created")
    async def created(name: str, response: Response) -> dict[str, Any]:
        response.status_code = 201
        response.headers["X-Source"] = "upstream"
        response.headers.append("X-Multi", "1")
        response.headers.append("X-Multi", "2")
        response.headers["Cache-Control"] = "public, max-age=5"
        return {"name": name, "run": count("created")}

    @app.get("/login/{name}")
    @cached("login")
    def login(name: str, response: Response) -> dict[str, Any]:
        response.set_cookie("session", f"s-{name}-{count('login')}")
        return {"name": name}

    @app.get("/greet", status_code=202)
    @cached("greet")
    async def greet(who: Annotated[str, Depends(visitor)]) -> dict[str, Any]:
        return {"hello": "world", "run": count("greet")}

    return app


async def test_status_and_headers_set_on_the_response_are_cached_with_the_answer(redis_url: str,
                                                                                   prefix: str) -> None:
    """They used to be dropped from every cached answer (MISS included): 200 and no header."""
    workers, runs = [make(redis_url, prefix), make(redis_url, prefix)], dict[str, int]()
    try:
        async with client(header_app(None, {})) as plain, client(header_app(workers[0], runs)) as a, \
                client(header_app(workers[1], runs)) as b:
            expected = await plain.get("/created/x")
            answers = [await a.get("/created/x"), await a.get("/created/x"), await b.get("/created/x")]
            assert [r.headers["x-cache"] for r in answers] == ["MISS", "HIT", "HIT"] and runs == {"created": 1}
            for r in answers:
                assert r.status_code == expected.status_code == 201
                assert r.headers["x-source"] == "upstream" and r.headers.get_list("x-multi") == ["1", "2"]
                assert r.headers["cache-control"] == "public, max-age=5"  # the endpoint's choice wins
                assert r.content == b'{"name":"x","run":1}'
    finally:
        for w in workers:
            await w.aclose()


async def test_an_answer_that_sets_a_cookie_is_served_with_it_and_never_cached(
        redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    """A Set-Cookie from the endpoint used to be dropped silently; caching it would hand one client's cookie to
    all. It is served with its cookie, computed for every request, and one WARNING says why."""
    caplog.set_level(logging.WARNING, LOGGER)
    cache, runs = make(redis_url, prefix), dict[str, int]()
    try:
        async with client(header_app(cache, runs)) as c:
            answers = []
            for _ in range(2):
                answers.append(await c.get("/login/ann"))
                c.cookies.clear()  # a new client each time (a request with a Cookie would bypass the cache anyway)
            assert [r.cookies.get("session") for r in answers] == ["s-ann-1", "s-ann-2"]
            assert [r.headers["x-cache"] for r in answers] == ["BYPASS", "BYPASS"]
            assert [r.json() for r in answers] == [{"name": "ann"}] * 2
        warnings = [r.getMessage() for r in caplog.records if "Set-Cookie" in r.getMessage()]
        assert len(warnings) == 1 and "/login/{name}" in warnings[0]
        assert not entries(redis_url, prefix, "login")
    finally:
        await cache.aclose()


async def test_what_dependencies_set_on_the_response_reaches_only_their_request(redis_url: str,
                                                                                prefix: str) -> None:
    """A dependency runs for every request, hits included: its cookie and header are this request's (Bob never
    gets Alice's), and the route's status_code is kept (it used to be 200, and the cookie dropped)."""
    cache, runs = make(redis_url, prefix), dict[str, int]()
    try:
        async with client(header_app(None, {})) as plain, client(header_app(cache, runs)) as c:
            expected = await plain.get("/greet", headers={"X-Visitor": "alice"})
            alice = await c.get("/greet", headers={"X-Visitor": "alice"})
            c.cookies.clear()  # bob is another client: he does not send alice's cookie (that would bypass)
            bob = await c.get("/greet", headers={"X-Visitor": "bob"})
            assert (alice.headers["x-cache"], bob.headers["x-cache"], runs) == ("MISS", "HIT", {"greet": 1})
            assert alice.status_code == bob.status_code == expected.status_code == 202
            assert (alice.cookies.get("visitor"), alice.headers["x-visitor"]) == ("alice", "alice")
            assert (bob.cookies.get("visitor"), bob.headers["x-visitor"]) == ("bob", "bob")
            assert alice.content == bob.content == b'{"hello":"world","run":1}'
            assert expected.cookies.get("visitor") == "alice"
    finally:
        await cache.aclose()


def test_an_endpoint_annotated_to_return_a_response_is_refused_at_decoration(redis_url: str, prefix: str) -> None:
    """It used to be accepted and answer 500 on every request (the cache cannot store a Response object)."""
    cache, app = make(redis_url, prefix), FastAPI()
    with pytest.raises(ConfigurationError, match=r"returns a JSONResponse.*response: Response"):
        @app.get("/raw")
        @cache.endpoint("raw", ttl=30)
        async def raw() -> JSONResponse:
            return JSONResponse({"a": 1})
