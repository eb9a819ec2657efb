"""Bad input gets a clear error within a bounded time, and never leaks a password."""


import hashlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, cast

import pytest
import redis

from hyperion_lock import (
    Coordinator,
    OptionalRedis,
    RedisAuthError,
    RedisUnavailableError,
    Settings,
)
from hyperion_lock.testing import RedisServer, free_port
from tests.support import noop

PACKAGE_ROOT = str(Path(cast(str, __import__("hyperion_lock").__file__)).resolve().parent.parent)


@pytest.mark.integration
def test_unreachable_redis_fails_within_connect_timeout() -> None:
    port = free_port()  # nothing listens here
    coordinator = Coordinator(f"redis://:topsecret@127.0.0.1:{port}/0", connect_timeout=1.0, generation="x")
    t0 = time.monotonic()
    with pytest.raises(RedisUnavailableError) as info:
        coordinator.run_once_sync("migrate", noop)
    assert time.monotonic() - t0 < 5
    text = str(info.value)
    assert "topsecret" not in text and str(port) in text and "key='migrate'" in text


@pytest.mark.integration
def test_blackholed_redis_fails_within_bounded_time() -> None:
    """A port that accepts TCP but never answers (a hung server) must not hang the worker."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        coordinator = Coordinator(f"redis://127.0.0.1:{port}/0", connect_timeout=1.0, lease_ttl=3, generation="x")
        t0 = time.monotonic()
        with pytest.raises(RedisUnavailableError):
            coordinator.run_once_sync("migrate", noop)
        assert time.monotonic() - t0 < 10


@pytest.mark.integration
def test_wrong_password_is_reported_at_once_without_the_password() -> None:
    with RedisServer(password="right-one") as server:
        url = server.url.replace("right-one", "wrong-one")
        t0 = time.monotonic()
        with pytest.raises(RedisAuthError) as info:
            Coordinator(url, generation="x").run_once_sync("migrate", noop)
        assert time.monotonic() - t0 < 2  # not retried: retrying cannot fix credentials
        assert "wrong-one" not in str(info.value) and "right-one" not in str(info.value)
        # Missing password against a protected server: same clear error, whichever refusal arrives first
        # (NOAUTH, or Redis cutting off a long unauthenticated command).
        for _ in range(5):
            with pytest.raises(RedisAuthError):
                Coordinator(f"redis://127.0.0.1:{server.port}/0", generation="x").run_once_sync("migrate", noop)
        # The right password works.
        assert Coordinator(server.url, generation="x").run_once_sync("migrate", noop).ran_here


@pytest.mark.integration
def test_sync_client_with_wrong_password() -> None:
    with RedisServer(password="pw1") as server:
        client = redis.Redis(host="127.0.0.1", port=server.port, password="nope")
        with pytest.raises(RedisAuthError):
            Coordinator(client, generation="x").run_once_sync("migrate", noop)
        client.close()


@pytest.mark.integration
async def test_optional_redis_connects_and_closes(redis_url: str) -> None:
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
async def test_optional_redis_unreachable_raises_or_degrades() -> None:
    url = f"redis://:pw@127.0.0.1:{free_port()}/0"
    settings = Settings(connect_timeout=0.5)
    with pytest.raises(RedisUnavailableError) as info:
        await OptionalRedis(url, settings=settings).connect()
    assert ":pw@" not in str(info.value)
    assert await OptionalRedis(url, settings=settings, on_unreachable="none").connect() is None
    assert "pw@" not in repr(OptionalRedis(url, settings=settings))


_PRINT_GENERATION = "from hyperion_lock.settings import Settings; print(Settings().generation)"


def _child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": PACKAGE_ROOT, "HYPERION_LOCK_GENERATION": ""}


def _own_start_ticks() -> str:
    return Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]


@pytest.mark.integration
def test_restarts_under_a_shell_get_new_generations() -> None:
    """A single-process app restarted by the same non-Python parent (here bash) runs its init again."""
    py = sys.executable
    script = f"{py} -c '{_PRINT_GENERATION}'; {py} -c '{_PRINT_GENERATION}'; true"
    out = subprocess.run(["bash", "-c", script], env=_child_env(), capture_output=True, text=True, check=True)
    first, second = out.stdout.split()
    assert first != second
    assert first.split(":")[1] != second.split(":")[1]  # each is its own pid


@pytest.mark.integration
def test_children_of_one_python_parent_share_the_parents_generation() -> None:
    """Workers of one Python master (forked or spawned) share the master's identity."""
    outputs = [
        subprocess.run([sys.executable, "-c", _PRINT_GENERATION], env=_child_env(), capture_output=True,
                       text=True, check=True).stdout.strip()
        for _ in range(2)
    ]
    assert outputs[0] == outputs[1]
    assert outputs[0].endswith(f":{os.getpid()}:{_own_start_ticks()}")


@pytest.mark.integration
def test_default_lock_dir_follows_the_working_directory(tmp_path: Path) -> None:
    app = tmp_path / "my app"
    app.mkdir()
    code = "from hyperion_lock.settings import Settings; s = Settings(); print(s.lock_dir); print(s.describe_target())"
    env = {**_child_env(), "HYPERION_LOCK_LOCK_DIR": "", "HYPERION_LOCK_REDIS_URL": ""}
    out = subprocess.run([sys.executable, "-c", code], cwd=app, env=env, capture_output=True, text=True, check=True)
    lock_dir, target = out.stdout.splitlines()
    digest = hashlib.sha256(os.path.realpath(app).encode()).hexdigest()[:8]
    import tempfile

    assert lock_dir == os.path.join(tempfile.gettempdir(), f"hyperion_lock-{os.getuid()}", f"my-app-{digest}")
    assert target == f"file locks in {lock_dir}"

