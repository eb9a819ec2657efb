"""Turning a URL or a ready client into something the coordinator can use, and naming what went wrong."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis
import redis.asyncio as aredis
from redis import exceptions as rexc

from ._errors import ConfigurationError, RedisAuthError, RedisUnavailableError
from ._settings import redact_url

T = TypeVar("T")

#: Errors after which trying again later can succeed (server restarting, network blip, paused server).
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    rexc.ConnectionError,
    rexc.TimeoutError,
    rexc.BusyLoadingError,
    ConnectionError,
    TimeoutError,
    OSError,
)


def as_text(value: Any) -> str | None:
    """A Redis reply as text, whether the client decodes responses or not."""
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def is_auth_error(exc: BaseException) -> bool:
    if isinstance(exc, rexc.AuthenticationError | rexc.AuthenticationWrongNumberOfArgsError):
        return True
    text = str(exc)
    return isinstance(exc, rexc.ResponseError) and (
        text.startswith(("NOAUTH", "WRONGPASS"))
        or "invalid password" in text
        or "invalid username" in text
        or "unauthenticated" in text  # Redis 7 cuts off long commands from clients that did not AUTH
    )


def auth_error(exc: BaseException, where: str, key: str | None, generation: str | None) -> RedisAuthError:
    return RedisAuthError(
        f"Redis at {where} refused the credentials ({type(exc).__name__}: {exc}); "
        "check the password and user in HYPERION_LOCK_REDIS_URL",
        key=key,
        generation=generation,
    )


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, TRANSIENT_ERRORS) and not is_auth_error(exc)


def client_kwargs(connect_timeout: float, socket_timeout: float) -> dict[str, Any]:
    return {
        "socket_connect_timeout": connect_timeout,
        "socket_timeout": socket_timeout,
        "driver_info": None,  # no CLIENT SETINFO round trips on every new connection
        "protocol": 2,  # RESP2: no HELLO handshake per connection (pub/sub has its own connection anyway)
    }


def _from_url(factory: Callable[..., T], url: str, connect_timeout: float, socket_timeout: float) -> T:
    try:
        return factory(url, **client_kwargs(connect_timeout, socket_timeout))
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(
            f"invalid Redis URL {redact_url(url)!r}: {exc}. Expected redis://[[user]:password@]host[:port][/db], "
            "rediss://... or unix:///path/to/socket"
        ) from None


def async_client_from_url(url: str, *, connect_timeout: float, socket_timeout: float) -> aredis.Redis:
    """An asyncio client for ``url``; a malformed URL raises :class:`ConfigurationError` (password redacted)."""
    return _from_url(aredis.Redis.from_url, url, connect_timeout, socket_timeout)


def sync_client_from_url(url: str, *, connect_timeout: float, socket_timeout: float) -> redis.Redis:
    """A sync client for ``url``; a malformed URL raises :class:`ConfigurationError` (password redacted)."""
    return _from_url(redis.Redis.from_url, url, connect_timeout, socket_timeout)


def describe_client(client: object) -> str:
    """A password-free description of a client's server, for logs."""
    pool = getattr(client, "connection_pool", None)
    kwargs: dict[str, Any] = getattr(pool, "connection_kwargs", {}) or {}
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    return f"redis://{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"


async def with_retries(
    action: Callable[[], Awaitable[T]],
    *,
    budget: float,
    what: str,
    where: str,
    clock: Callable[[], float],
    sleep: Callable[[float], Awaitable[None]],
    key: str | None = None,
    generation: str | None = None,
    max_backoff: float = 2.0,
    on_retry: Callable[[BaseException, int], None] | None = None,
) -> T:
    """Run ``action`` until it succeeds, retrying transient Redis errors with capped exponential backoff.

    Gives up with :class:`RedisUnavailableError` once ``budget`` seconds have passed since the first failure;
    wrong credentials raise :class:`RedisAuthError` at once (retrying cannot fix them).
    """
    first_failure: float | None = None
    delay = 0.05
    attempt = 0
    while True:
        try:
            return await action()
        except Exception as exc:
            if is_auth_error(exc):
                raise auth_error(exc, where, key, generation) from None
            if not is_transient(exc):
                raise
            now = clock()
            first_failure = now if first_failure is None else first_failure
            attempt += 1
            if now - first_failure >= budget:
                raise RedisUnavailableError(
                    f"could not {what}: Redis at {where} did not answer for {now - first_failure:.1f} s "
                    f"({attempt} attempts; last error {type(exc).__name__}: {exc}). Is the server running and "
                    "the URL right?",
                    key=key,
                    generation=generation,
                ) from None
            if on_retry is not None:
                on_retry(exc, attempt)
            await sleep(min(delay, max(0.0, budget - (now - first_failure))))
            delay = min(delay * 2, max_backoff)


async def close_quietly(closer: Callable[[], Awaitable[object]]) -> None:
    """Close a client or pub/sub; errors of a dead connection do not matter any more. (redis-py bounds the wait
    for a closing socket by its socket timeouts, so no extra timeout task is needed here.)"""
    with contextlib.suppress(Exception):
        await closer()
