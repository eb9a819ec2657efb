"""Bad input gets a clear error within a bounded time, and never leaks a password."""


import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

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
from hyperion_lock.gunicorn import new_generation
from hyperion_lock.settings import ProcessInfo, default_generation, default_lock_dir, name_part
from tests.support import noop


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


def test_sync_twin_refuses_an_asyncio_client() -> None:
    import redis.asyncio as aredis

    client = aredis.Redis()
    with pytest.raises(ConfigurationError, match="asyncio client"):
        Coordinator(client).run_once_sync("migrate", noop)


async def test_optional_redis_is_none_without_url() -> None:
    dep = OptionalRedis(None, settings=Settings(redis_url=None))
    async with dep.lifespan() as client:
        assert client is None
        assert dep() is None


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


@pytest.mark.parametrize("host", ["web 1.example", "héllo", "a{b}/c", "", "x" * 300])
def test_both_generation_rules_label_the_host_alike(host: str) -> None:
    """The gunicorn master's generation and the default one name the host alike (one rule)."""
    inspect = _procs({200: ProcessInfo(200, PY, "555")})
    generation = default_generation(pid=200, ppid=100, host=host or None, inspect=inspect)
    label = generation.rsplit(":", 2)[0]
    assert new_generation(pid=7, now=1.5, host=host) == f"{label}:7:1500"
    if host:  # none: both take this machine's host name
        assert label == name_part(host, 100)


def test_name_part_replaces_what_a_name_cannot_hold_and_cuts() -> None:
    assert name_part("web 1.example:{x}/é", 100) == "web-1.example--x---"
    assert name_part("Cls.<locals>.fn/x", 100, keep="/") == "Cls.-locals-.fn/x"
    assert name_part("abcdef", 3) == "abc"
    assert name_part("", 10) == ""


def test_default_lock_dir_is_per_app_directory(tmp_path: Path) -> None:
    (tmp_path / "a" / "app").mkdir(parents=True)
    (tmp_path / "b" / "app").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "a" / "app")
    real = os.path.realpath(tmp_path / "a" / "app")
    expected = f"/tmp/hyperion_lock-1000/app-{hashlib.sha256(real.encode()).hexdigest()[:8]}"
    assert default_lock_dir(str(tmp_path / "a" / "app"), tmp="/tmp", uid=1000) == expected
    assert default_lock_dir(str(tmp_path / "link"), tmp="/tmp", uid=1000) == expected  # same app, other spelling
    assert default_lock_dir(str(tmp_path / "b" / "app"), tmp="/tmp", uid=1000) != expected  # same name, other app

