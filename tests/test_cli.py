"""The ``hyperion-lock`` console script against a real password-protected Redis and on file locks."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from hyperion_lock import JobKeys
from hyperion_lock.testing import RedisServer, free_port

from ._deploy import clean_env

pytestmark = pytest.mark.integration
PASSWORD = "s3cret-Pw-42"


@pytest.fixture
def secured_redis() -> Iterator[RedisServer]:
    with RedisServer(password=PASSWORD) as server:
        yield server


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("hyperion-lock")
    assert exe, "console script missing: pip install -e ."
    return subprocess.run([exe, *args], check=False, capture_output=True, text=True, timeout=timeout,
                          env=env or clean_env())


def wait_for_lease(url: str, key: str, timeout: float = 30) -> dict[str, object]:
    client = redis.Redis.from_url(url)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            raw = client.get(JobKeys("hyperion_lock", key).lease)
            if raw:
                return dict(json.loads(raw))
            time.sleep(0.05)
    finally:
        client.close()
    raise AssertionError(f"no lease for {key} within {timeout} s")


def test_status_reset_and_json(secured_redis: RedisServer) -> None:
    url = secured_redis.url
    gen = ["--url", url, "--generation", "g1"]
    assert cli("run", "--key", "ok", *gen, "--", "true").returncode == 0
    bad = cli("run", "--key", "bad", *gen, "--", "echo boom; exit 7")
    assert bad.returncode == 7 and "boom" in bad.stdout
    slow = subprocess.Popen([sys.executable, "-m", "hyperion_lock._cli", "run", "--key", "slow", *gen, "--",
                             "sleep", "60"], env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lease = wait_for_lease(url, "slow")
        assert lease["pid"] == slow.pid

        text = cli("status", "--url", url)
        assert text.returncode == 1  # something failed
        assert PASSWORD not in text.stdout + text.stderr and "***" in text.stdout
        assert "slow" in text.stdout and "running" in text.stdout and f":{slow.pid}" in text.stdout

        js = cli("status", "--json", "--url", url)
        assert js.returncode == 1 and PASSWORD not in js.stdout
        report = json.loads(js.stdout)
        assert report["exit_code"] == 1 and "***" in report["where"]
        jobs = {j["key"]: j for j in report["jobs"]}
        assert set(jobs) == {"ok", "bad", "slow"}
        assert jobs["ok"]["state"] == "done" and jobs["ok"]["generation"] == "g1"
        assert jobs["bad"]["state"] == "failed" and "status 7" in jobs["bad"]["last_error"]
        running = jobs["slow"]
        assert running["state"] == "running" and running["holder"].endswith(f":{slow.pid}")
        assert running["fencing_token"] == 1 and 0 < running["lease_left_s"] <= 15

        assert cli("status", "--url", url, "--key", "ok").returncode == 0
        assert cli("status", "--url", url, "--key", "slow").returncode == 2
        assert cli("status", "--url", url, "--key", "ok", "--generation", "g2").returncode == 2  # not run for g2
        assert cli("status", "--url", url, "--key", "never").returncode == 2

        refused = cli("reset", "slow", "--url", url)
        assert refused.returncode == 1 and f":{slow.pid}" in refused.stderr and "--force" in refused.stderr
        cleared = cli("reset", "bad", "--url", url)
        assert cleared.returncode == 0 and "cleared 1" in cleared.stdout
        assert cli("status", "--url", url, "--key", "bad", "--key", "ok").returncode == 2  # bad: pending again
        # After a reset the job runs again for the same generation.
        assert cli("run", "--key", "bad", *gen, "--", "true").returncode == 0
        assert cli("status", "--url", url, "--key", "bad", "--key", "ok").returncode == 0

        slow.kill()  # its lease stays until the TTL runs out: --force clears it now
        slow.wait(10)
        forced = cli("reset", "slow", "--url", url, "--force")
        assert forced.returncode == 0, forced
        assert cli("status", "--url", url, "--key", "slow").returncode == 2
        client = redis.Redis.from_url(url)
        try:
            assert client.get(JobKeys("hyperion_lock", "slow").lease) is None
            assert client.get(JobKeys("hyperion_lock", "slow").fence) == b"1"  # the fencing counter is kept
        finally:
            client.close()
    finally:
        if slow.poll() is None:
            slow.kill()
            slow.wait(10)


def test_run_exit_code_reaches_every_caller(secured_redis: RedisServer) -> None:
    argv = [sys.executable, "-m", "hyperion_lock._cli", "run", "--url", secured_redis.url, "--key", "k",
            "--generation", "g1", "--", "sleep 1; exit 5"]
    procs = [subprocess.Popen(argv, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    try:
        outputs = [p.communicate(timeout=60)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert [p.returncode for p in procs] == [5, 5], outputs


def test_unreachable_and_wrong_password_exit_3(secured_redis: RedisServer) -> None:
    down = cli("status", "--url", f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0",
               env=clean_env(HYPERION_LOCK_CONNECT_TIMEOUT="1"))
    assert down.returncode == 3 and PASSWORD not in down.stderr and "***" in down.stderr
    wrong = cli("status", "--url", f"redis://:not-{PASSWORD}@127.0.0.1:{secured_redis.port}/0")
    assert wrong.returncode == 3 and PASSWORD not in wrong.stderr
    assert cli("reset", "x", "--url", f"redis://127.0.0.1:{free_port()}/0").returncode == 3


def test_run_needs_a_generation() -> None:
    result = cli("run", "--key", "k", "--", "true")
    assert result.returncode == 64 and "--generation" in result.stderr


def test_file_locks_without_redis(tmp_path: Path) -> None:
    env = clean_env(HYPERION_LOCK_LOCK_DIR=str(tmp_path / "locks"))
    assert cli("run", "--key", "seed", "--generation", "g1", "--", "true", env=env).returncode == 0
    assert cli("run", "--key", "boom", "--generation", "g1", "--", "exit 4", env=env).returncode == 4
    status = cli("status", "--json", env=env)
    assert status.returncode == 1
    jobs = {j["key"]: j for j in json.loads(status.stdout)["jobs"]}
    assert jobs["seed"]["state"] == "done" and jobs["boom"]["state"] == "failed"
    assert "file locks in" in json.loads(status.stdout)["where"]
    assert cli("reset", "boom", env=env).returncode == 0
    assert cli("status", env=env).returncode == 0
    # A second run of a done job for the same generation does not run the command.
    marker = tmp_path / "ran"
    assert cli("run", "--key", "seed", "--generation", "g1", "--", f"touch {marker}", env=env).returncode == 0
    assert not marker.exists()


def test_sigterm_reaches_the_command_and_its_exit_is_recorded(secured_redis: RedisServer, tmp_path: Path) -> None:
    """SIGTERM to the caller running the command is passed on; the lease is held until the command exits (it
    cannot run twice), and the failure is recorded with the signal's status (128 + 15)."""
    url = secured_redis.url
    started = tmp_path / "started"
    leader = subprocess.Popen(
        [sys.executable, "-m", "hyperion_lock._cli", "run", "--url", url, "--key", "long", "--generation", "g1", "--",
         f"touch {started}; sleep 60; echo not-reached"],
        env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for_lease(url, "long")
        deadline = time.monotonic() + 30
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists()
        leader.send_signal(signal.SIGTERM)
        _, err = leader.communicate(timeout=30)
        assert leader.returncode == 143, err
    finally:
        if leader.poll() is None:
            leader.kill()
            leader.communicate()
    report = json.loads(cli("status", "--json", "--url", url, "--key", "long").stdout)
    assert report["jobs"][0]["state"] == "failed" and "status 143" in report["jobs"][0]["last_error"]
