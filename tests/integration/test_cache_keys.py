"""What is in a cache key, and what bypasses the shared cache: through the ASGI app in-process on a real Redis.

Every input an endpoint declares is in its key (host, mount point, header, cookie and dependency parameters);
a request carrying a credential the key does not include is answered directly (``BYPASS``); a security scheme
nobody keyed is refused; no literal value takes the form of a hashed one; values of headers and cookies are in
key names only as keyed hashes; function arguments keep their type; invalidation finds exactly what was cached.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import httpx
import pytest
import redis
from fastapi import APIRouter, Cookie, Depends, FastAPI, Header, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from hyperion_lock import Cache, ConfigurationError, Settings
from hyperion_lock.cache.keys import digest
from hyperion_lock.testing import free_port

pytestmark = pytest.mark.integration


bearer, api_key = HTTPBearer(), APIKeyHeader(name="X-Api-Key")


def key_user(key: Annotated[str, Depends(api_key)]) -> str:
    return key


def make(url: str, prefix: str, **options: Any) -> Cache:
    return Cache(url, settings=Settings(redis_url=None, key_prefix=prefix), **options)


@pytest.fixture
def prefix() -> str:
    return f"k{uuid.uuid4().hex[:10]}"


@asynccontextmanager
async def client(app: FastAPI, host: str = "test") -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url=f"http://{host}") as c:
        yield c


def key_names(url: str, prefix: str) -> list[str]:
    with redis.Redis.from_url(url) as r:
        return [k.decode() for k in r.scan_iter(match=f"{prefix}:*", count=1000)]


def current_user(request: Request) -> str:
    """The usual hand-written pattern: a dependency that reads the header itself (nothing declared)."""
    return request.headers.get("authorization", "anonymous").removeprefix("Bearer ")


def users_app(cache: Cache, runs: list[str]) -> FastAPI:
    app = FastAPI()

    @app.get("/me/header")
    @cache.endpoint("me", ttl=30)
    async def me_header(authorization: Annotated[str, Header()]) -> dict[str, str]:
        runs.append("header")
        return {"user": authorization.removeprefix("Bearer ")}

    @app.get("/me/cookie")
    @cache.endpoint("me", ttl=30)
    async def me_cookie(session: Annotated[str, Cookie()]) -> dict[str, str]:
        runs.append("cookie")
        return {"user": session}

    @app.get("/me/dependency")
    @cache.endpoint("me", ttl=30)
    async def me_dependency(user: Annotated[str, Depends(current_user)]) -> dict[str, str]:
        runs.append("dependency")
        return {"user": user}

    @app.get("/me/watchlist")
    @cache.endpoint("me", ttl=30, vary=["Authorization"])
    async def watchlist(credentials: Annotated[HTTPAuthorizationCredentials, Depends(bearer)]) -> dict[str, str]:
        runs.append("watchlist")
        return {"user": credentials.credentials}

    @app.get("/public")
    @cache.endpoint("me", ttl=30, shared=True)
    async def public(user: Annotated[str, Depends(current_user)]) -> dict[str, int]:
        runs.append("public")
        return {"n": len(runs)}

    @app.get("/plain")
    @cache.endpoint("me", ttl=30)
    async def plain() -> dict[str, int]:
        runs.append("plain")
        return {"n": len(runs)}

    return app


ALICE, BOB = {"Authorization": "Bearer alice-token-0123456789"}, {"Authorization": "Bearer bob-token-9876543210"}


async def test_a_declared_header_cookie_or_credential_keys_the_answer_per_user(redis_url: str,
                                                                              prefix: str) -> None:
    cache, runs = make(redis_url, prefix), list[str]()
    try:
        async with client(users_app(cache, runs)) as c:
            for path, alice, bob in [("/me/header", ALICE, BOB), ("/me/watchlist", ALICE, BOB)]:
                a1, b1, a2 = (await c.get(path, headers=alice), await c.get(path, headers=bob),
                              await c.get(path, headers=alice))
                assert a1.json()["user"].startswith("alice") and b1.json()["user"].startswith("bob"), path
                assert (a1.headers["x-cache"], b1.headers["x-cache"], a2.headers["x-cache"]) == ("MISS",) * 2 + ("HIT",)
                assert a2.json() == a1.json()
                assert a1.headers["cache-control"] == "private, max-age=30"
                assert re.fullmatch(r"private, max-age=\d+", a2.headers["cache-control"])
                assert "authorization" in a1.headers["vary"].lower()
            c.cookies.set("session", "alice")
            a1 = await c.get("/me/cookie")
            c.cookies.set("session", "bob")
            b1 = await c.get("/me/cookie")
            assert (a1.json(), b1.json()) == ({"user": "alice"}, {"user": "bob"})
            assert b1.headers["x-cache"] == "MISS" and b1.headers["cache-control"].startswith("private")
            assert (await c.get("/me/cookie")).headers["x-cache"] == "HIT"  # bob again
        names = key_names(redis_url, prefix)
        assert any(":e2:" in n for n in names)
        for secret in ("alice", "bob", "Bearer"):
            assert not [n for n in names if secret in n], names  # values only as keyed hashes
    finally:
        await cache.aclose()


async def test_a_credential_the_key_does_not_include_bypasses_the_shared_cache(
        redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    cache, runs = make(redis_url, prefix, credential_headers=["X-Api-Key"]), list[str]()
    try:
        with caplog.at_level(logging.WARNING):
            async with client(users_app(cache, runs)) as c:
                a, b = await c.get("/me/dependency", headers=ALICE), await c.get("/me/dependency", headers=BOB)
                assert a.json()["user"].startswith("alice") and b.json()["user"].startswith("bob")
                assert a.headers["x-cache"] == b.headers["x-cache"] == "BYPASS"
                assert a.headers["cache-control"] == "private, no-store"
                anonymous = [await c.get("/me/dependency") for _ in range(2)]
                assert [r.headers["x-cache"] for r in anonymous] == ["MISS", "HIT"]  # no credential: shared
                assert anonymous[1].json() == {"user": "anonymous"}
                assert (await c.get("/me/dependency", headers=ALICE)).json()["user"].startswith("alice")
                # A configured credential header, and a cookie, bypass too.
                assert (await c.get("/plain", headers={"X-Api-Key": "k1"})).headers["x-cache"] == "BYPASS"
                c.cookies.set("sid", "s1")
                assert (await c.get("/plain")).headers["x-cache"] == "BYPASS"
                c.cookies.clear()
                assert (await c.get("/plain")).headers["x-cache"] == "MISS"
                # shared=True: the answer does not depend on who asks.
                shared = [await c.get("/public", headers=h) for h in (ALICE, BOB)]
                assert [r.headers["x-cache"] for r in shared] == ["MISS", "HIT"]
                assert shared[0].headers["cache-control"] == "max-age=30"
        assert runs.count("dependency") == 4  # alice, bob, anonymous once, alice again
        warnings = [r.getMessage() for r in caplog.records if "BYPASS" in r.getMessage()]
        assert len([w for w in warnings if "/me/dependency" in w]) == 1, warnings  # once per endpoint
        assert len([w for w in warnings if "GET /plain" in w]) == 1, warnings  # X-Api-Key, then a cookie
        assert "vary=['Authorization']" in warnings[0] and "shared=True" in warnings[0]
        assert all("alice" not in w and "bob" not in w for w in warnings)
        assert not [n for n in key_names(redis_url, prefix) if "dependency" in n and "alice" in n]
    finally:
        await cache.aclose()


async def test_an_unkeyed_security_scheme_is_refused_naming_the_parameter(redis_url: str, prefix: str) -> None:
    cache = make(redis_url, prefix)
    app = FastAPI()
    with pytest.raises(ConfigurationError, match=r"'credentials' uses HTTPBearer.*vary=\['Authorization'\]"):
        @cache.endpoint("s", ttl=30)
        async def unkeyed(credentials: Annotated[HTTPAuthorizationCredentials, Depends(bearer)]) -> int:
            return 1

    with pytest.raises(ConfigurationError, match=r"'key' uses APIKeyHeader.*'x-api-key'.*vary=\['X-Api-Key'\]"):
        @cache.endpoint("s", ttl=30)
        async def deep(user: Annotated[str, Depends(key_user)]) -> int:  # a sub-dependency's scheme

            return 1

    @cache.endpoint("s", ttl=30, vary=["X-Api-Key"])
    async def keyed(user: Annotated[str, Depends(key_user)]) -> str:
        return user

    with pytest.raises(ConfigurationError, match=r"'user' is a Security\(...\) dependency.*vary"):
        @cache.endpoint("s", ttl=30)
        async def scoped(user: Annotated[str, Security(current_user, scopes=["me"])]) -> int:
            return 1

    @cache.endpoint("s", ttl=30, vary=["Authorization"])
    async def scoped_keyed(user: Annotated[str, Security(current_user, scopes=["me"])]) -> int:
        return 1

    with pytest.raises(ConfigurationError, match="reads a request body"):
        @cache.endpoint("s", ttl=30)
        async def with_body(item: dict[str, int]) -> int:
            return 1

    # Dependencies given to the route are seen at its first request; so is a method other than GET.
    router = APIRouter(dependencies=[Depends(bearer)])

    @router.get("/guarded")
    @cache.endpoint("s", ttl=30)
    async def guarded() -> int:
        return 1

    @app.post("/posted")
    @cache.endpoint("s", ttl=30)
    async def posted(q: str = "x") -> int:
        return 1

    app.include_router(router)
    app.get("/keyed")(keyed)
    try:
        async with client(app) as c:
            assert (await c.get("/guarded", headers=ALICE)).status_code == 500
            assert (await c.post("/posted")).status_code == 500
            assert (await c.get("/keyed", headers={"X-Api-Key": "k1"})).text == '"k1"'
            assert (await c.get("/keyed", headers={"X-Api-Key": "k2"})).text == '"k2"'
    finally:
        await cache.aclose()


def tenant_of(request: Request) -> str:
    return request.headers.get("host", "").split(":")[0]


async def test_host_and_mount_point_are_in_the_key(redis_url: str, prefix: str) -> None:
    cache = make(redis_url, prefix)
    app = FastAPI()

    @app.get("/settings")
    @cache.endpoint("t", ttl=30)
    async def settings(tenant: Annotated[str, Depends(tenant_of)]) -> dict[str, str]:
        return {"tenant": tenant}

    @app.get("/single")
    @cache.endpoint("t", ttl=30, host=False)
    async def single(tenant: Annotated[str, Depends(tenant_of)]) -> dict[str, str]:
        return {"tenant": tenant}

    for version in ("v1", "v2"):
        sub = FastAPI()

        @sub.get("/items")
        @cache.endpoint("t", ttl=30)
        async def items(version: str = version) -> dict[str, str]:
            return {"version": version}

        app.mount(f"/{version}", sub)
    try:
        async with client(app, "a.example") as a, client(app, "b.example") as b:
            assert (await a.get("/settings")).json() == {"tenant": "a.example"}
            other = await b.get("/settings")
            assert other.json() == {"tenant": "b.example"} and other.headers["x-cache"] == "MISS"
            assert (await a.get("/single")).json() == {"tenant": "a.example"}
            assert (await b.get("/single")).headers["x-cache"] == "HIT"  # host=False: one entry for every host
            assert (await a.get("/v1/items")).json() == {"version": "v1"}
            v2 = await a.get("/v2/items")
            assert v2.json() == {"version": "v2"} and v2.headers["x-cache"] == "MISS"
            assert (await a.get("/v2/items")).headers["x-cache"] == "HIT"
    finally:
        await cache.aclose()


def tenant_header(x_tenant: Annotated[str, Header()] = "main") -> str:
    return x_tenant


async def test_a_dependencys_declared_parameters_and_written_out_defaults(redis_url: str, prefix: str) -> None:
    cache, runs = make(redis_url, prefix), list[str]()
    app = FastAPI()

    @app.get("/report")
    @cache.endpoint("d", ttl=30)
    async def report(tenant: Annotated[str, Depends(tenant_header)], range: str = "1d", page: int = 1,
                     ) -> dict[str, Any]:
        runs.append(tenant)
        return {"tenant": tenant, "range": range, "page": page}

    try:
        async with client(app) as c:
            first = await c.get("/report")
            assert first.json() == {"tenant": "main", "range": "1d", "page": 1}
            for same in ("/report?range=1d", "/report?page=1&range=1d", "/report?utm=x"):
                assert (await c.get(same)).headers["x-cache"] == "HIT", same  # defaults written out or not
            other = await c.get("/report", headers={"X-Tenant": "acme"})
            assert other.json()["tenant"] == "acme" and other.headers["x-cache"] == "MISS"
            assert other.headers["vary"] == "X-Tenant" and other.headers["cache-control"] == "max-age=30"
            assert (await c.get("/report?range=5d")).headers["x-cache"] == "MISS"
        assert runs == ["main", "acme", "main"]
        assert not [n for n in key_names(redis_url, prefix) if "acme" in n]
    finally:
        await cache.aclose()


async def test_a_query_value_in_the_form_of_a_hash_cannot_prime_another_entry(redis_url: str, prefix: str) -> None:
    cache = make(redis_url, prefix)
    app = FastAPI()

    @app.get("/search")
    @cache.endpoint("f", ttl=30)
    async def search(q: str) -> dict[str, str]:
        return {"q": q}

    long = "x" * 100
    try:
        async with client(app) as c:
            forged = await c.get("/search", params={"q": "~" + digest(long)})
            assert forged.json() == {"q": "~" + digest(long)}
            real = await c.get("/search", params={"q": long})
            assert real.json() == {"q": long} and real.headers["x-cache"] == "MISS"
            for marker in ("%7E", "!int.1", "![a]", "a,b", "a=b"):
                assert (await c.get("/search", params={"q": marker})).json() == {"q": marker}
    finally:
        await cache.aclose()


async def test_function_arguments_keep_their_type(redis_url: str, prefix: str) -> None:
    cache, runs = make(redis_url, prefix), list[Any]()

    @cache.cached("typed", ttl=30)
    async def echo(x: Any) -> dict[str, Any]:
        runs.append(x)
        return {"type": type(x).__name__, "value": list(x) if isinstance(x, tuple) else x}

    values: list[Any] = [1, "1", 1.0, True, None, "null", [1], ["1"], (1,), {"a": 1}, {"a": "1"}]
    try:
        for _ in range(2):
            for v in values:
                assert (await echo(v))["type"] == type(v).__name__, v
        assert len(runs) == len(values)  # each its own entry, each computed once
    finally:
        await cache.aclose()


async def test_invalidate_finds_exactly_what_was_cached_whatever_its_characters(redis_url: str,
                                                                                prefix: str) -> None:
    cache, runs = make(redis_url, prefix), [0]

    async def compute() -> int:
        runs[0] += 1
        return runs[0]

    @cache.cached("fn", ttl=30)
    async def rate(path: str, n: int = 1) -> int:
        return await compute()

    try:
        for key in ("/api/rates?base=EUR", {"path": "/api/rates?base=EUR&x=%20"}, "~abc", "a&b=c"):
            before = runs[0]
            assert await cache.get_or_compute("rates", key, compute, ttl=30) == before + 1
            assert await cache.get_or_compute("rates", key, compute, ttl=30) == before + 1  # cached
            assert await cache.invalidate("rates", key) == 1, key
            assert await cache.get_or_compute("rates", key, compute, ttl=30) == before + 2, key
        first = await rate("/api/rates?base=EUR")
        assert await rate("/api/rates?base=EUR", 1) == first
        assert await rate.invalidate("/api/rates?base=EUR") == 1  # type: ignore[attr-defined]
        assert await rate("/api/rates?base=EUR") == first + 1
    finally:
        await cache.aclose()


async def test_workers_agree_on_the_namespace_key_of_the_hashes(redis_url: str, prefix: str) -> None:
    """Without a configured key_secret, the first worker stores a random one in Redis and every worker uses it:
    a per-user entry made by one worker is served by another."""
    caches, runs = [make(redis_url, prefix), make(redis_url, prefix)], list[str]()
    try:
        async with client(users_app(caches[0], runs)) as c0, client(users_app(caches[1], runs)) as c1:
            first = await c0.get("/me/watchlist", headers=ALICE)
            second = await c1.get("/me/watchlist", headers=ALICE)
            assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
            assert (await c1.get("/me/watchlist", headers=BOB)).json()["user"].startswith("bob")
        assert runs == ["watchlist", "watchlist"]
        with redis.Redis.from_url(redis_url) as r:
            assert len(r.get(f"{prefix}:cache:{{me}}:k") or b"") == 32
        configured = [make(redis_url, prefix + "c", key_secret="a-configured-secret-0123456789") for _ in range(2)]
        async with client(users_app(configured[0], runs)) as c0, client(users_app(configured[1], runs)) as c1:
            assert (await c0.get("/me/header", headers=ALICE)).headers["x-cache"] == "MISS"
            assert (await c1.get("/me/header", headers=ALICE)).headers["x-cache"] == "HIT"
        with redis.Redis.from_url(redis_url) as r:
            assert r.get(f"{prefix}c:cache:{{me}}:k") is None  # a configured secret is never stored
        caches += configured
        with pytest.raises(ConfigurationError, match="at least 16 bytes"):
            make(redis_url, prefix, key_secret="short")
    finally:
        for cache in caches:
            await cache.aclose()


async def test_the_reference_apps_watchlist_is_cached_per_user(redis_url: str, prefix: str) -> None:
    from demo import quotes

    cache = make(redis_url, prefix)
    app = FastAPI()
    quotes.add_routes(app, cache)
    try:
        async with client(app) as c:
            alice = {"Authorization": "Bearer demo-alice"}
            a1 = await c.get("/me/watchlist", headers=alice)
            b1 = await c.get("/me/watchlist", headers={"Authorization": "Bearer demo-bob"})
            a2 = await c.get("/me/watchlist", headers=alice)
            assert a1.json()["user"] == "alice" and a1.json()["symbols"] == ["AAPL", "MSFT"]
            assert b1.json()["user"] == "bob" and b1.headers["x-cache"] == "MISS"
            assert a2.headers["x-cache"] == "HIT" and a2.json() == a1.json()
            assert a1.headers["cache-control"] == "private, max-age=30" and a1.headers["vary"] == "Authorization"
            assert (await c.get("/me/watchlist")).status_code in (401, 403)
            assert (await c.get("/me/watchlist", headers={"Authorization": "Bearer x"})).status_code == 401
        assert not [n for n in key_names(redis_url, prefix) if "demo-" in n or "alice" in n]
    finally:
        await cache.aclose()


async def test_without_the_namespace_key_a_request_is_answered_directly_and_without_redis_per_worker(
        prefix: str) -> None:
    dead = make(f"redis://127.0.0.1:{free_port()}/0", prefix)  # nothing listens: the secret cannot be read
    memory, runs = Cache(None, settings=Settings(redis_url=None, key_prefix=prefix)), list[str]()
    try:
        async with client(users_app(dead, runs)) as c:
            answers = [await c.get("/me/header", headers=h) for h in (ALICE, BOB)]
            assert [r.status_code for r in answers] == [200, 200]
            assert [r.headers["x-cache"] for r in answers] == ["BYPASS", "BYPASS"]
            assert answers[1].json()["user"].startswith("bob")
        async with client(users_app(memory, runs)) as c:  # no Redis: a random key of this process
            answers = [await c.get("/me/header", headers=h) for h in (ALICE, BOB, ALICE)]
            assert [r.headers["x-cache"] for r in answers] == ["MISS", "MISS", "HIT"]
            assert answers[1].json()["user"].startswith("bob") and answers[2].json() == answers[0].json()
    finally:
        await dead.aclose()
        await memory.aclose()
