"""An app for the cross-user, cross-tenant and cross-mount cache test under ``gunicorn -w 4`` (see
tests/e2e/test_cache_keys_e2e.py): the reference app's ``GET /me/watchlist`` (bearer token, ``vary``), a user read
from a declared ``Authorization`` header, one from a dependency reading the header itself (bypasses), a tenant
resolved from the Host header, and two sub-applications mounted at ``/v1`` and ``/v2`` with the same route.

Every answer names the worker that computed it (``computed_by``); ``X-Worker-Pid`` names the one that answered.
This module declares routes, so it does not use ``from __future__ import annotations``.
"""

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, Header, Request

from demo import quotes
from hyperion_lock import Cache, Settings

cache = Cache(settings=Settings.from_env())


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    await cache.connect()
    yield
    await cache.aclose()


app = FastAPI(lifespan=lifespan)
app.add_middleware(quotes.WorkerPidHeader)
quotes.add_routes(app, cache)  # GET /me/watchlist as the reference app declares it


@app.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/me")
@cache.endpoint("me", ttl=300)
async def me(authorization: Annotated[str, Header()]) -> dict[str, object]:
    return {"user": authorization.removeprefix("Bearer "), "computed_by": os.getpid()}


def user_from_header(request: Request) -> str:
    return request.headers.get("authorization", "anonymous").removeprefix("Bearer ")


@app.get("/me/unkeyed")
@cache.endpoint("me", ttl=300)
async def me_unkeyed(user: Annotated[str, Depends(user_from_header)]) -> dict[str, object]:
    return {"user": user, "computed_by": os.getpid()}


def tenant_of(request: Request) -> str:
    return request.headers.get("host", "").split(":")[0]


@app.get("/tenant/settings")
@cache.endpoint("tenants", ttl=300)
async def tenant_settings(tenant: Annotated[str, Depends(tenant_of)]) -> dict[str, object]:
    return {"tenant": tenant, "computed_by": os.getpid()}


def versioned(version: str) -> FastAPI:
    sub = FastAPI()

    @sub.get("/items")
    @cache.endpoint("items", ttl=300)
    async def items() -> dict[str, object]:
        return {"version": version, "computed_by": os.getpid()}

    return sub


app.mount("/v1", versioned("v1"))
app.mount("/v2", versioned("v2"))
