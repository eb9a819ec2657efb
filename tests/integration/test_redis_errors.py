"""Redis failures that retrying cannot fix are named at once; the rest give up within the startup budget.

Every case talks to a real server or socket: a private redis-server (ACL users, database count), a TLS-only
redis-server with a self-signed certificate made by the openssl CLI, a listener that accepts and never answers,
and a closed port. Wall-clock asserts use generous bounds (3x the budget); "at once" means well under the budget.
"""


from __future__ import annotations

import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
import redis.asyncio as aredis

from hyperion_lock.connection.clients import (
    RedisCall,
    RetryPolicy,
    aclose,
    async_client_from_url,
    with_retries,
)
from hyperion_lock.connection.urls import redact_url
from hyperion_lock.errors import (
    ConfigurationError,
    RedisAuthError,
    RedisDatabaseIndexError,
    RedisPermissionError,
    RedisTLSError,
    RedisUnavailableError,
)
from hyperion_lock.testing import RedisServer, free_port
from tests.support.tls import TlsRedis

T = TypeVar("T")


BUDGET = 1.0


async def _retry(
    url: str, action: Callable[[aredis.Redis], Awaitable[T]], *, budget: float = BUDGET, overall: bool = True,
    socket_timeout: float | None = 30.0, prefix: str | None = None, described: str = "{}",
) -> tuple[T, float]:
    """``action(client)`` under with_retries the way the core's first connect uses it; returns (result, elapsed)."""
    client = async_client_from_url(url, connect_timeout=budget, socket_timeout=socket_timeout)
    started = time.monotonic()
    try:
        result = await with_retries(
            lambda: action(client),
            RedisCall("connect for job 'migrate'", described.format(redact_url(url)), key="migrate",
                      generation="g7", prefix=prefix),
            RetryPolicy(budget, overall=overall),
        )
        return result, time.monotonic() - started
    finally:
        await aclose(client)


async def _fails(url: str, action: Callable[[aredis.Redis], Awaitable[Any]], **kw: Any) -> tuple[Exception, float]:
    started = time.monotonic()
    with pytest.raises(Exception) as info:
        await _retry(url, action, **kw)
    return info.value, time.monotonic() - started


def _ping(client: aredis.Redis) -> Awaitable[Any]:
    return client.ping()


def _assert_context(err: Exception) -> None:
    assert getattr(err, "key", None) == "migrate" and getattr(err, "generation", None) == "g7"
    assert "key='migrate'" in str(err) and "generation='g7'" in str(err)


@pytest.mark.integration
async def test_server_that_accepts_and_never_answers_gives_up_within_budget() -> None:
    with socket.socket() as listener:  # the kernel completes the handshake; nobody ever reads or replies
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        err, elapsed = await _fails(f"redis://127.0.0.1:{port}/0", _ping, socket_timeout=30.0)
    assert isinstance(err, RedisUnavailableError)
    assert elapsed < 3 * BUDGET, elapsed  # the 30 s socket timeout does not count: the attempt in flight is cut
    text = str(err)
    assert f"127.0.0.1:{port}" in text and "no reply to the last attempt" in text
    assert "host and port" in text and "paused" in text and "rediss://" in text
    _assert_context(err)


@pytest.mark.integration
async def test_closed_port_gives_up_within_budget() -> None:
    port = free_port()
    err, elapsed = await _fails(f"redis://:pw@127.0.0.1:{port}/0", _ping)
    assert isinstance(err, RedisUnavailableError)
    assert BUDGET * 0.9 <= elapsed < 3 * BUDGET, elapsed  # retried for the budget, not longer
    assert f"127.0.0.1:{port}" in str(err) and "ConnectionError" in str(err) and ":pw@" not in str(err)
    _assert_context(err)


@pytest.mark.integration
@pytest.mark.parametrize("described", ["{}", "Redis at {}"])  # the Redis backend describes itself the 2nd way
async def test_tls_client_against_plain_server_names_the_scheme(redis_server: RedisServer, described: str) -> None:
    err, elapsed = await _fails(f"rediss://127.0.0.1:{redis_server.port}/0", _ping, socket_timeout=30.0,
                                described=described)
    assert isinstance(err, RedisUnavailableError)
    assert elapsed < 3 * BUDGET, elapsed
    assert "TLS" in str(err) and "use redis://" in str(err) and "use rediss://" not in str(err)
    assert str(err).count("Redis at") == 1
    _assert_context(err)


@pytest.mark.integration
async def test_budget_counts_from_the_first_failure_without_overall() -> None:
    """The old contract stays for reconnects: the attempt in flight is bounded only by the socket timeout."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        err, elapsed = await _fails(f"redis://127.0.0.1:{port}/0", _ping, overall=False, socket_timeout=0.5,
                                    budget=0.2)
    assert isinstance(err, RedisUnavailableError)
    assert elapsed >= 0.5  # at least one full socket timeout before the first failure started the clock


@pytest.mark.integration
async def test_wrong_database_index_is_a_configuration_error_at_once(redis_server: RedisServer) -> None:
    err, elapsed = await _fails(f"redis://127.0.0.1:{redis_server.port}/99", _ping, budget=5.0)
    assert isinstance(err, RedisDatabaseIndexError) and isinstance(err, ConfigurationError)
    assert elapsed < 2.5, elapsed  # not retried for the 5 s budget
    assert "database 99" in str(err) and "'databases' setting" in str(err)
    _assert_context(err)
    ok, _ = await _retry(f"redis://127.0.0.1:{redis_server.port}/15", _ping)
    assert ok is True


@pytest.fixture
def limited_user(redis_server: RedisServer) -> Iterator[str]:
    """An ACL user that may PING and touch keys/channels under ``other:`` only; returns its URL."""
    import redis

    admin = redis.Redis(port=redis_server.port)
    admin.execute_command("ACL", "SETUSER", "app", "on", ">apppw", "resetchannels", "~other:*", "&other:*",  # type: ignore[no-untyped-call]
                          "+ping", "+get", "+publish")
    admin.close()
    yield f"redis://app:apppw@127.0.0.1:{redis_server.port}/0"


@pytest.mark.integration
@pytest.mark.parametrize(
    ("action", "needs"),
    [
        (lambda c: c.get("myapp:{migrate}:lease"), "~myapp:*"),
        (lambda c: c.publish("myapp:{migrate}:events", "x"), "&myapp:*"),
        (lambda c: c.evalsha("0" * 40, 0), "+evalsha"),
    ],
    ids=["key", "channel", "command"],
)
async def test_missing_acl_permission_is_named(limited_user: str, action: Any, needs: str) -> None:
    err, elapsed = await _fails(limited_user, action, budget=5.0, prefix="myapp")
    assert isinstance(err, RedisPermissionError) and isinstance(err, ConfigurationError)
    assert elapsed < 2.5, elapsed
    text = str(err)
    assert needs in text.partition(". The user needs")[0]  # the specific missing permission comes first
    assert "ACL SETUSER" in text and "~myapp:*" in text and "&myapp:*" in text and "EVALSHA" in text
    assert "apppw" not in text
    _assert_context(err)


@pytest.mark.integration
async def test_wrong_password_is_an_auth_error_at_once() -> None:
    with RedisServer(password="right-pw") as server:
        err, elapsed = await _fails(f"redis://:wrong-pw@127.0.0.1:{server.port}/0", _ping, budget=5.0)
    assert isinstance(err, RedisAuthError)
    assert elapsed < 2.5 and "wrong-pw" not in str(err) and "right-pw" not in str(err)
    _assert_context(err)






@pytest.mark.integration
async def test_untrusted_certificate_is_a_tls_error_at_once(tls_redis: TlsRedis) -> None:
    ok, _ = await _retry(f"rediss://127.0.0.1:{tls_redis.port}/0?ssl_ca_certs={tls_redis.ca}", _ping)
    assert ok is True  # the server is fine with the right CA
    err, elapsed = await _fails(f"rediss://:pw@127.0.0.1:{tls_redis.port}/0", _ping, budget=5.0)
    assert isinstance(err, RedisTLSError) and isinstance(err, ConfigurationError)
    assert elapsed < 2.5, elapsed
    assert "certificate" in str(err) and "ssl_ca_certs" in str(err) and ":pw@" not in str(err)
    _assert_context(err)


@pytest.mark.integration
async def test_plain_client_against_tls_server_names_the_scheme(tls_redis: TlsRedis) -> None:
    err, elapsed = await _fails(f"redis://127.0.0.1:{tls_redis.port}/0", _ping)
    assert isinstance(err, RedisUnavailableError)  # a reset connection looks like a restarting server
    assert elapsed < 3 * BUDGET, elapsed
    assert "use rediss://" in str(err)
    _assert_context(err)

