"""The reference app through its ASGI interface, with its real lifespan (migrate + seed through the Coordinator on
SQLite in tmp_path, file locks in tmp_path or the real Redis), the way uvicorn drives it: lifespan startup, then
requests, then lifespan shutdown."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi import FastAPI
from starlette.types import Message, Scope

from demo.app import create_app
from hyperion_lock import JobKeys

pytestmark = pytest.mark.integration


class Lifespan:
    """Speaks the ASGI lifespan protocol to an app like a server does (startup, then shutdown)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.to_app: asyncio.Queue[Message] = asyncio.Queue()
        self.from_app: asyncio.Queue[Message] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    async def _receive(self) -> Message:
        return await self.to_app.get()

    async def _send(self, message: Message) -> None:
        await self.from_app.put(message)

    async def _step(self, kind: str) -> None:
        assert self.task is not None
        await self.to_app.put({"type": f"lifespan.{kind}"})
        reply = asyncio.ensure_future(self.from_app.get())
        await asyncio.wait({reply, self.task}, return_when=asyncio.FIRST_COMPLETED)
        if not reply.done():
            reply.cancel()
            self.task.result()  # the app's lifespan task ended without answering: raise what it raised
            raise AssertionError(f"the app ended its lifespan without answering lifespan.{kind}")
        message = reply.result()
        assert message["type"] == f"lifespan.{kind}.complete", message

    async def startup(self) -> None:
        scope: Scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
        self.task = asyncio.create_task(self.app(scope, self._receive, self._send))
        await self._step("startup")

    async def shutdown(self) -> None:
        assert self.task is not None
        await self._step("shutdown")
        await self.task


def client_for(app: FastAPI) -> httpx.AsyncClient:
    """HTTP requests into the app (the transport does not run the lifespan; :class:`Lifespan` does)."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app")


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    lifespan = Lifespan(app)
    await lifespan.startup()
    try:
        async with client_for(app) as client:
            yield client
    finally:
        await lifespan.shutdown()


@pytest.fixture
def app_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A fresh deployment: SQLite and lock directory in tmp_path, a new generation and key prefix, no Redis."""
    for name in list(os.environ):
        if name.startswith(("HYPERION_LOCK_", "HYPERION_DEMO_")) or name in {"DATABASE_URL", "WEB_CONCURRENCY"}:
            monkeypatch.delenv(name)
    tag = uuid.uuid4().hex[:12]
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path / 'demo.sqlite3'}",
        "HYPERION_LOCK_LOCK_DIR": str(tmp_path / "locks"),
        "HYPERION_LOCK_GENERATION": f"test-app-{tag}",
        "HYPERION_LOCK_KEY_PREFIX": f"test-app-{tag}",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    return env


def files_in(directory: str) -> list[str]:
    return sorted(os.listdir(directory))


def assert_jobs_ran_here(report: dict[str, Any], generation: str) -> None:
    assert report["generation"] == generation
    assert set(report["jobs"]) == {"migrate", "seed"}
    for job in report["jobs"].values():
        assert job["outcome"] == "done" and job["runner_pid"] == os.getpid() and job["fencing_token"] >= 1, job


async def test_openapi_docs_and_redis_without_redis(app_env: dict[str, str]) -> None:
    """The schema, the docs page and the Redis dependency resolve (no 422/500), and ``/redis`` says there is no
    Redis when none is configured; the lifespan really ran the init jobs."""
    app = create_app()
    async with serving(app) as client:
        schema = await client.get("/openapi.json")
        assert schema.status_code == 200, schema.text
        paths = schema.json()["paths"]
        assert {"/health", "/startup", "/items", "/redis"} <= set(paths)
        # The Redis dependency is resolved as a dependency, not mistaken for a required query parameter.
        assert "parameters" not in paths["/redis"]["get"], paths["/redis"]
        docs = await client.get("/docs")
        assert docs.status_code == 200 and "swagger" in docs.text.lower()
        answer = await client.get("/redis")
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"redis": None}
        report = (await client.get("/startup")).json()
        assert_jobs_ran_here(report, app_env["HYPERION_LOCK_GENERATION"])
        assert (await client.get("/items")).json() == ["alpha", "beta", "gamma"]
    assert files_in(app_env["HYPERION_LOCK_LOCK_DIR"])  # the coordination went through file locks


async def test_redis_endpoint_with_redis(
    app_env: dict[str, str], redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``HYPERION_LOCK_REDIS_URL`` set the dependency yields the connected client (``/redis`` pings it), and
    the init jobs were coordinated through that Redis (their outcomes are stored there)."""
    monkeypatch.setenv("HYPERION_LOCK_REDIS_URL", redis_url)
    app = create_app()
    async with serving(app) as client:
        answer = await client.get("/redis")
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"redis": "ok"}
        assert (await client.get("/openapi.json")).status_code == 200
        assert_jobs_ran_here((await client.get("/startup")).json(), app_env["HYPERION_LOCK_GENERATION"])
    with redis.Redis.from_url(redis_url) as r:
        for job in ("migrate", "seed"):
            assert r.exists(JobKeys(app_env["HYPERION_LOCK_KEY_PREFIX"], job).outcome(
                app_env["HYPERION_LOCK_GENERATION"])), job


async def test_health_is_200_while_serving_and_503_once_shutdown_began(app_env: dict[str, str]) -> None:
    """``/health`` is 200 from the end of the lifespan startup and 503 once the lifespan's exit began.

    (Before the startup finished no server accepts connections, so that state is seen as "connection refused",
    never as an answer; it is not asserted here.)"""
    app = create_app()
    lifespan = Lifespan(app)
    await lifespan.startup()
    async with client_for(app) as client:
        try:
            health = await client.get("/health")
            assert health.status_code == 200 and health.json() == {"status": "ok", "pid": os.getpid()}
        finally:
            await lifespan.shutdown()
        health = await client.get("/health")
        assert health.status_code == 503 and health.json() == {"status": "stopping", "pid": os.getpid()}
