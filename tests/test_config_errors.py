"""Bad input gets a clear error within a bounded time, and never leaks a password."""


import hashlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, cast

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
from hyperion_lock.settings import ProcessInfo, default_generation, default_lock_dir
from hyperion_lock.testing import RedisServer, free_port

from .conftest import noop

PACKAGE_ROOT = str(Path(cast(str, __import__("hyperion_lock").__file__)).resolve().parent.parent)


def _fields(fields: dict[str, Any]) -> dict[str, Any]:
    """Settings fields named at run time: mypy cannot match a dict's values to the fields' own types."""
    return fields


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://:s3cret@host:6379/0", "redis://:***@host:6379/0"),
        ("redis://user:s3cret@host/1", "redis://user:***@host:6379/1"),
        ("rediss://s3cret@host", "rediss://***@host:6379/0"),  # a lone userinfo may be a password
        ("redis://host:6379", "redis://host:6379/0"),
        ("redis://host/2?password=s3cret", "redis://:***@host:6379/2"),
        ("redis://[::1]:7000/3", "redis://[::1]:7000/3"),
        ("unix://:s3cret@/run/redis.sock?db=4", "unix://:***@/run/redis.sock?db=4"),
        ("redis://:a%2Fb@host", "redis://:***@host:6379/0"),
        ("postgresql+psycopg://app:s3cret@db:5432/app?sslmode=require&password=s3cret",
         "postgresql+psycopg://app:***@db:5432/app?sslmode=require&password=***"),
        ("sqlite:////srv/app/var/demo.sqlite3", "sqlite:////srv/app/var/demo.sqlite3"),
        ("", ""),
        (None, None),
    ],
)
def test_redact_url(url: str | None, expected: str | None) -> None:
    assert redact_url(url) == expected


@pytest.mark.parametrize("key", ["", " ", "has space", "a{b}", "x" * 201, "new\nline", "migrate\n"])
def test_invalid_job_keys_are_refused(key: str) -> None:
    with pytest.raises(ConfigurationError, match="invalid job key"):
        JobKeys("hyperion_lock", key)
    with pytest.raises(ConfigurationError):
        Coordinator(None, lock_dir="/tmp/x").run_once_sync(key, noop)


@pytest.mark.parametrize("ttl", [0, -1, "abc", float("nan"), float("inf"), 0.01])
def test_nonsensical_lease_ttl(ttl: float | str) -> None:
    with pytest.raises(ConfigurationError, match="lease_ttl"):
        Settings(lease_ttl=ttl)  # type: ignore[arg-type]  # a str on purpose


def test_settings_from_env_and_repr_hides_password() -> None:
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


def test_errors_share_one_root_and_carry_context() -> None:
    err = RedisUnavailableError("nope", key="migrate", generation="g1")
    assert isinstance(err, HyperionLockError)
    assert (err.key, err.generation) == ("migrate", "g1")
    assert "key='migrate'" in str(err) and "generation='g1'" in str(err)
    assert issubclass(RedisAuthError, ConfigurationError) and issubclass(ConfigurationError, HyperionLockError)


@pytest.mark.parametrize("url", ["http://:pw@localhost/", "redis://:pw@localhost:notaport/0", "nonsense"])
def test_bad_url_is_a_configuration_error_without_password(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Coordinator(url)
    assert ":pw@" not in str(info.value)


def test_wrong_type_of_client() -> None:
    with pytest.raises(ConfigurationError, match="redis must be"):
        Coordinator(42)  # type: ignore[arg-type]


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


def test_sync_twin_refuses_an_asyncio_client() -> None:
    import redis.asyncio as aredis

    client = aredis.Redis()
    with pytest.raises(ConfigurationError, match="asyncio client"):
        Coordinator(client).run_once_sync("migrate", noop)


# --- the optional-Redis FastAPI dependency -------------------------------------------------------------------
async def test_optional_redis_is_none_without_url() -> None:
    dep = OptionalRedis(None, settings=Settings(redis_url=None))
    async with dep.lifespan() as client:
        assert client is None
        assert dep() is None


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


# --- settings: ranges, names, failure_hold --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "highest"),
    [
        ("lease_ttl", 86400.0),
        ("result_ttl", 10 * 365 * 86400.0),
        ("connect_timeout", 3600.0),
        ("reconnect_timeout", 86400.0),
        ("wait_timeout", 86400.0),
        ("progress_interval", 86400.0),
    ],
)
def test_durations_have_an_upper_bound_named_in_the_message(name: str, highest: float) -> None:
    assert getattr(Settings(**_fields({name: highest})), name) == highest
    with pytest.raises(ConfigurationError, match=f"{name} must be .* and at most {int(highest)} s") as info:
        Settings(**_fields({name: highest * 1.001}))
    assert "got" in str(info.value)
    with pytest.raises(ConfigurationError, match=f"{name} must be .* and at most"):
        Settings.from_env({f"HYPERION_LOCK_{name.upper()}": str(highest * 2)})


def test_lease_ttl_range_message_names_both_ends() -> None:
    with pytest.raises(ConfigurationError, match=r"lease_ttl must be at least 0.1 s and at most 86400 s \(1 day\)"):
        Settings(lease_ttl=0.05)
    assert Settings(wait_timeout=None).wait_timeout is None


@pytest.mark.parametrize(("what", "field"), [("generation", "generation"), ("key prefix", "key_prefix")])
@pytest.mark.parametrize("value", ["release-42\n", "\nrelease-42", "release 42"])
def test_names_must_match_whole(what: str, field: str, value: str) -> None:
    with pytest.raises(ConfigurationError, match=f"invalid {what}"):
        Settings(**_fields({field: value}))


def test_failure_hold_setting() -> None:
    assert Settings().failure_hold == 300.0
    assert Settings.from_env({"HYPERION_LOCK_FAILURE_HOLD": "12.5"}).failure_hold == 12.5
    assert "failure_hold=12.5" in repr(Settings(failure_hold=12.5))
    for bad in (0, -1, "abc", float("nan"), float("inf")):
        with pytest.raises(ConfigurationError, match="failure_hold"):
            Settings(failure_hold=bad)  # type: ignore[arg-type]  # a str on purpose
    with pytest.raises(ConfigurationError, match="failure_hold must be > 0 and at most result_ttl"):
        Settings(result_ttl=60, failure_hold=61)
    assert Settings(result_ttl=60, failure_hold=60).failure_hold == 60


# --- default generation -------------------------------------------------------------------------------------
PY = "/usr/lib/python3.11/bin/python3.11"


def _procs(table: dict[int, ProcessInfo]) -> Callable[[int], ProcessInfo]:
    def inspect(pid: int) -> ProcessInfo:
        return table.get(pid, ProcessInfo(pid, None, None))
    return inspect


@pytest.mark.parametrize(
    ("parent", "expected"),
    [
        (ProcessInfo(100, PY, "444"), "web1:100:444"),  # worker of a Python master: the master's identity
        (ProcessInfo(100, "/usr/bin/bash", "444"), "web1:200:555"),  # started by a shell: its own identity
        (ProcessInfo(100, "/usr/lib/systemd/systemd", "1"), "web1:200:555"),
        (ProcessInfo(100, None, None), "web1:200:555"),  # parent's /proc unreadable
    ],
)
def test_default_generation_rule(parent: ProcessInfo, expected: str) -> None:
    inspect = _procs({100: parent, 200: ProcessInfo(200, PY, "555")})
    assert default_generation(pid=200, ppid=100, host="web1", inspect=inspect) == expected


def test_default_generation_without_a_parent_is_own_identity() -> None:
    # A container's PID 1 has ppid 0: it used to be "host:0:0" forever, so new code never re-ran its init.
    inspect = _procs({1: ProcessInfo(1, PY, "77"), 0: ProcessInfo(0, PY, "0")})
    assert default_generation(pid=1, ppid=0, host="c1", inspect=inspect) == "c1:1:77"


@pytest.mark.parametrize("host", ["web 1.example", "héllo", "a{b}/c", "", "x" * 300])
def test_default_generation_sanitises_the_host_name(host: str) -> None:
    inspect = _procs({200: ProcessInfo(200, PY, "555")})
    generation = default_generation(pid=200, ppid=100, host=host, inspect=inspect)
    assert Settings(generation=generation).generation == generation
    assert generation.endswith(":200:555")


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


# --- default lock directory ---------------------------------------------------------------------------------
def test_default_lock_dir_is_per_app_directory(tmp_path: Path) -> None:
    (tmp_path / "a" / "app").mkdir(parents=True)
    (tmp_path / "b" / "app").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "a" / "app")
    real = os.path.realpath(tmp_path / "a" / "app")
    expected = f"/tmp/hyperion_lock-1000/app-{hashlib.sha256(real.encode()).hexdigest()[:8]}"
    assert default_lock_dir(str(tmp_path / "a" / "app"), tmp="/tmp", uid=1000) == expected
    assert default_lock_dir(str(tmp_path / "link"), tmp="/tmp", uid=1000) == expected  # same app, other spelling
    assert default_lock_dir(str(tmp_path / "b" / "app"), tmp="/tmp", uid=1000) != expected  # same name, other app


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
