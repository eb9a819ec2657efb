"""Optional Redis for FastAPI apps: a client when a URL is configured and reachable, ``None`` in development."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

import redis.asyncio as aredis
from fastapi import FastAPI

from hyperion_lock.connection.clients import (
    RedisCall,
    RetryPolicy,
    aclose,
    async_client_from_url,
    with_retries,
)
from hyperion_lock.connection.urls import redact_url
from hyperion_lock.settings import Settings

logger = logging.getLogger(__name__)

__all__ = ["OptionalRedis"]


class OptionalRedis:
    """Owns one asyncio Redis client per worker process, created in the lifespan (after gunicorn forks).

    Use it as a FastAPI dependency (``Depends(optional_redis)``, typed ``Redis | None``) and enter
    :meth:`lifespan` from the app's lifespan. Without a URL the dependency yields ``None``. With a URL that
    does not answer within ``connect_timeout``: ``on_unreachable="raise"`` (default) fails the startup with
    :class:`RedisUnavailableError` — a deploy with a wrong URL should not come up silently degraded — while
    ``"none"`` logs a warning and serves with ``None``.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        settings: Settings | None = None,
        on_unreachable: Literal["raise", "none"] = "raise",
    ) -> None:
        self.settings = settings or Settings.from_env()
        self.url = url if url is not None else self.settings.redis_url
        if self.url:
            async_client_from_url(self.url, connect_timeout=1, socket_timeout=1)  # validate early
        self.on_unreachable = on_unreachable
        self.client: aredis.Redis | None = None

    def __repr__(self) -> str:
        return f"OptionalRedis(url={redact_url(self.url)!r}, connected={self.client is not None})"

    async def connect(self) -> aredis.Redis | None:
        if not self.url:
            logger.info("no Redis URL configured: the Redis dependency yields None")
            return None
        client = async_client_from_url(
            self.url, connect_timeout=self.settings.connect_timeout, socket_timeout=self.settings.connect_timeout
        )
        try:
            await with_retries(
                client.ping, RedisCall("ping Redis", str(redact_url(self.url))),
                RetryPolicy(self.settings.connect_timeout),
            )
        except Exception:
            await aclose(client)
            if self.on_unreachable == "raise":
                raise
            logger.warning("Redis at %s is unreachable; serving without it", redact_url(self.url))
            return None
        self.client = client
        return client

    async def close(self) -> None:
        if self.client is not None:
            client, self.client = self.client, None
            await aclose(client)

    @asynccontextmanager
    async def lifespan(self, app: FastAPI | None = None) -> AsyncIterator[aredis.Redis | None]:
        client = await self.connect()
        try:
            yield client
        finally:
            await self.close()

    def __call__(self) -> aredis.Redis | None:
        """The FastAPI dependency: the connected client, or ``None``.

        It takes no parameters on purpose: FastAPI resolves a dependency's parameter annotations through the
        callable's module globals, which a callable *instance* does not expose to every FastAPI version; an
        unresolved ``Request`` would turn into a required query parameter (422) and break ``/openapi.json``.
        """
        return self.client
