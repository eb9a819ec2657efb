"""A real app's pins: ``redis==5.0.8`` and ``arq==0.26.3`` (arq requires ``redis<6``). Installing hyperion_lock next
to them must resolve without touching either, and the library must work on that redis-py, with a sync and an
asyncio client."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest
import redis

from hyperion_lock import JobKeys
from tests.support.venv import make_venv, package_source, venv_env

ROOT = Path(__file__).resolve().parents[2]
APP_PINS = {"redis": "5.0.8", "arq": "0.26.3"}

pytestmark = pytest.mark.integration

_SCRIPT = """
import asyncio, json, os, sys

import arq  # the app's job queue imports next to the library on the same redis-py
import redis
import redis.asyncio as aredis
from redis.utils import HIREDIS_AVAILABLE

from hyperion_lock import Coordinator

url, generation, prefix = sys.argv[1:4]
calls = {"sync": 0, "async": 0}


def sync_job() -> None:
    calls["sync"] += 1


async def async_job() -> None:
    calls["async"] += 1


def run_sync() -> list[dict[str, object]]:
    client = redis.Redis.from_url(url)
    try:
        results = []
        for _ in range(2):
            coordinator = Coordinator(client, generation=generation, key_prefix=prefix, lease_ttl=2)
            outcome = coordinator.run_once_sync("sync-job", sync_job)
            results.append({"ran_here": outcome.ran_here, "status": str(outcome.status), "calls": calls["sync"]})
        return results
    finally:
        client.close()


async def run_async() -> list[dict[str, object]]:
    client = aredis.Redis.from_url(url)
    try:
        results = []
        for _ in range(2):
            coordinator = Coordinator(client, generation=generation, key_prefix=prefix, lease_ttl=2)
            outcome = await coordinator.run_once("async-job", async_job)
            results.append({"ran_here": outcome.ran_here, "status": str(outcome.status), "calls": calls["async"]})
        return results
    finally:
        await client.aclose()


print(json.dumps({"redis": redis.__version__, "hiredis": HIREDIS_AVAILABLE, "arq": arq.VERSION,
                  "sync": run_sync(), "async": asyncio.run(run_async())}))
"""


def _pip(python: str, *args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([python, "-m", "pip", *args, "--disable-pip-version-check"], check=True,
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=540)


def _installed(python: str, env: dict[str, str], cwd: Path) -> dict[str, str]:
    listed = _pip(python, "list", "--format", "json", env=env, cwd=cwd)
    return {row["name"].lower().replace("_", "-"): row["version"] for row in json.loads(listed.stdout)}


@pytest.mark.timeout(900)
def test_installs_next_to_an_app_pinning_redis_5_and_arq(tmp_path: Path, redis_url: str) -> None:
    # Build from a copy of what the package is made of: building in the repository would leave build/ and
    # *.egg-info in a working tree others use at the same time.
    src = package_source(tmp_path / "src")
    env = venv_env()
    python = str(make_venv(tmp_path / "venv"))

    # The app's environment first, then the library into it, as `pip install hyperion_lock` would.
    _pip(python, "install", "-q", *(f"{name}=={version}" for name, version in APP_PINS.items()), env=env, cwd=tmp_path)
    before = _installed(python, env, tmp_path)
    assert {name: before.get(name) for name in APP_PINS} == APP_PINS, before
    _pip(python, "install", "-q", str(src), env=env, cwd=tmp_path)

    shown = _pip(python, "show", "redis", env=env, cwd=tmp_path).stdout
    assert "Version: 5.0.8" in shown.splitlines(), shown
    after = _installed(python, env, tmp_path)
    assert "hyperion-lock" in after, after
    changed = {name: (version, after.get(name)) for name, version in before.items() if after.get(name) != version}
    assert changed == {}, f"installing hyperion_lock changed the app's packages: {changed}"
    assert not {"fastapi", "starlette", "uvicorn", "uvicorn-worker", "gunicorn"} & set(after), after
    check = subprocess.run([python, "-m", "pip", "check", "--disable-pip-version-check"], check=False,
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr

    generation, prefix = f"compat-{uuid.uuid4().hex[:12]}", f"test-compat-{uuid.uuid4().hex[:12]}"
    # Deprecation warnings are errors: a call redis-py 5.0.8 deprecates (e.g. the asyncio close()) would show.
    done = subprocess.run([python, "-W", "error::DeprecationWarning", "-c", _SCRIPT, redis_url, generation, prefix],
                          check=False, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["redis"] == "5.0.8" and result["arq"] == "0.26.3" and result["hiredis"] is True, result
    for flavour in ("sync", "async"):
        first, second = result[flavour]
        assert first == {"ran_here": True, "status": "done", "calls": 1}, (flavour, result)
        assert second == {"ran_here": False, "status": "done", "calls": 1}, (flavour, result)  # not run again
    assert "ResourceWarning" not in done.stderr, done.stderr
    with redis.Redis.from_url(redis_url) as client:
        for key in ("sync-job", "async-job"):
            assert client.exists(JobKeys(prefix, key).outcome(generation)), key
