"""Bad input gets a clear error within a bounded time, and never leaks a password."""


import socket
import time
from typing import Annotated

import pytest
import redis

from hyperion_lock import (
    ConfigurationError,
    Coordinator,
    HyperionLockError,
    JobKeys,
    OptionalRedis,
    RedisAuthError,
    RedisUnavailableError,
    Settings,
    redact_url,
)
from hyperion_lock.testing import RedisServer, free_port


def _noop() -> None:
    return None


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://:s3cret@host:6379/0", "redis://:***@host:6379/0"),
        ("redis://user:s3cret@host/1", "redis://user:***@host/1"),
        ("rediss://s3cret@host", "rediss://***@host"),
        ("redis://host:6379", "redis://host:6379"),
        (None, None),
    ],
)
def test_redact_url(url, expected):
    assert redact_url(url) == expected


@pytest.mark.parametrize("key", ["", " ", "has space", "a{b}", "x" * 201, "new\nline"])
def test_invalid_job_keys_are_refused(key):
    with pytest.raises(ConfigurationError, match="invalid job key"):
        JobKeys("hyperion_lock", key)
    with pytest.raises(ConfigurationError):
        Coordinator(None, lock_dir="/tmp/x").run_once_sync(key, _noop)


@pytest.mark.parametrize("ttl", [0, -1, "abc", float("nan"), float("inf"), 0.01])
def test_nonsensical_lease_ttl(ttl):
    with pytest.raises(ConfigurationError, match="lease_ttl"):
        Settings(lease_ttl=ttl)


def test_settings_from_env_and_repr_hides_password():
    env = {
        "HYPERION_LOCK_REDIS_URL": "redis://:hunter2@127.0.0.1:1/0",
        "HYPERION_LOCK_LEASE_TTL": "7.5",
        "HYPERION_LOCK_GENERATION": "release-42",
        "HYPERION_LOCK_KEY_PREFIX": "myapp",
    }
    s = Settings.from_env(env)
    assert (s.lease_ttl, s.generation, s.key_prefix) == (7.5, "release-42", "myapp")
    assert "hunter2" not in repr(s) and "***" in repr(s)
    assert "hunter2" not in repr(Coordinator(settings=s))
    with pytest.raises(ConfigurationError, match="lease_ttl"):
        Settings.from_env({"HYPERION_LOCK_LEASE_TTL": "-3"})
    with pytest.raises(ConfigurationError, match="generation"):
        Settings.from_env({"HYPERION_LOCK_GENERATION": "has space"})


def test_errors_share_one_root_and_carry_context():
    err = RedisUnavailableError("nope", key="migrate", generation="g1")
    assert isinstance(err, HyperionLockError)
    assert (err.key, err.generation) == ("migrate", "g1")
    assert "key='migrate'" in str(err) and "generation='g1'" in str(err)
    assert issubclass(RedisAuthError, ConfigurationError) and issubclass(ConfigurationError, HyperionLockError)


@pytest.mark.parametrize("url", ["http://:pw@localhost/", "redis://:pw@localhost:notaport/0", "nonsense"])
def test_bad_url_is_a_configuration_error_without_password(url):
    with pytest.raises(ConfigurationError) as info:
        Coordinator(url)
    assert ":pw@" not in str(info.value)


def test_wrong_type_of_client():
    with pytest.raises(ConfigurationError, match="redis must be"):
        Coordinator(42)  # type: ignore[arg-type]


@pytest.mark.integration
def test_unreachable_redis_fails_within_connect_timeout():
    port = free_port()  # nothing listens here
    coordinator = Coordinator(f"redis://:topsecret@127.0.0.1:{port}/0", connect_timeout=1.0, generation="x")
    t0 = time.monotonic()
    with pytest.raises(RedisUnavailableError) as info:
        coordinator.run_once_sync("migrate", _noop)
    assert time.monotonic() - t0 < 5
    text = str(info.value)
    assert "topsecret" not in text and str(port) in text and "key='migrate'" in text


@pytest.mark.integration
def test_blackholed_redis_fails_within_bounded_time():
    """A port that accepts TCP but never answers (a hung server) must not hang the worker."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        coordinator = Coordinator(f"redis://127.0.0.1:{port}/0", connect_timeout=1.0, lease_ttl=3, generation="x")
        t0 = time.monotonic()
        with pytest.raises(RedisUnavailableError):
            coordinator.run_once_sync("migrate", _noop)
        assert time.monotonic() - t0 < 10


@pytest.mark.integration
def test_wrong_password_is_reported_at_once_without_the_password():
    with RedisServer(password="right-one") as server:
        url = server.url.replace("right-one", "wrong-one")
        t0 = time.monotonic()
        with pytest.raises(RedisAuthError) as info:
            Coordinator(url, generation="x").run_once_sync("migrate", _noop)
        assert time.monotonic() - t0 < 2  # not retried: retrying cannot fix credentials
        assert "wrong-one" not in str(info.value) and "right-one" not in str(info.value)
        # Missing password against a protected server: same clear error, whichever refusal arrives first
        # (NOAUTH, or Redis cutting off a long unauthenticated command).
        for _ in range(5):
            with pytest.raises(RedisAuthError):
                Coordinator(f"redis://127.0.0.1:{server.port}/0", generation="x").run_once_sync("migrate", _noop)
        # The right password works.
        assert Coordinator(server.url, generation="x").run_once_sync("migrate", _noop).ran_here


@pytest.mark.integration
def test_sync_client_with_wrong_password():
    with RedisServer(password="pw1") as server:
        client = redis.Redis(host="127.0.0.1", port=server.port, password="nope")
        with pytest.raises(RedisAuthError):
            Coordinator(client, generation="x").run_once_sync("migrate", _noop)
        client.close()


def test_sync_twin_refuses_an_asyncio_client():
    import redis.asyncio as aredis

    client = aredis.Redis()
    with pytest.raises(ConfigurationError, match="asyncio client"):
        Coordinator(client).run_once_sync("migrate", _noop)


# --- the optional-Redis FastAPI dependency -------------------------------------------------------------------
async def test_optional_redis_is_none_without_url():
    dep = OptionalRedis(None, settings=Settings(redis_url=None))
    async with dep.lifespan() as client:
        assert client is None
        assert dep(None) is None  # type: ignore[arg-type]


@pytest.mark.integration
async def test_optional_redis_connects_and_closes(redis_url):
    import httpx
    from fastapi import Depends, FastAPI
    from redis.asyncio import Redis

    dep = OptionalRedis(redis_url)
    app = FastAPI()

    @app.get("/ping")
    async def ping(r: Annotated[Redis | None, Depends(dep)]) -> dict[str, object]:
        assert r is not None
        return {"pong": await r.ping()}

    async with dep.lifespan(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            assert (await http.get("/ping")).json() == {"pong": True}
        assert dep.client is not None
    assert dep.client is None  # closed at shutdown


@pytest.mark.integration
async def test_optional_redis_unreachable_raises_or_degrades():
    url = f"redis://:pw@127.0.0.1:{free_port()}/0"
    settings = Settings(connect_timeout=0.5)
    with pytest.raises(RedisUnavailableError) as info:
        await OptionalRedis(url, settings=settings).connect()
    assert ":pw@" not in str(info.value)
    assert await OptionalRedis(url, settings=settings, on_unreachable="none").connect() is None
    assert "pw@" not in repr(OptionalRedis(url, settings=settings))
