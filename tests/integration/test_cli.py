"""The ``hyperion-lock`` console script against a real password-protected Redis and on file locks."""

from __future__ import annotations

import functools
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest
import redis

from hyperion_lock import JobKeys
from hyperion_lock.connection.clients import _ACL_COMMANDS
from hyperion_lock.testing import RedisServer, free_port
from tests.support import wait_until
from tests.support.deploy import blocked_on_flock, clean_env, parent_pid, waiting_on_redis

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
    slow = subprocess.Popen([sys.executable, "-m", "hyperion_lock.cli.main", "run", "--key", "slow", *gen, "--",
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
    argv = [sys.executable, "-m", "hyperion_lock.cli.main", "run", "--url", secured_redis.url, "--key", "k",
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


def _gated_command(ran: Path, gate: Path) -> str:
    """Shell command line: append the shell's pid to ``ran``, then block until ``gate`` exists (at most 60 s)."""
    return (f"echo $$ >> {ran}; i=0; while [ ! -e {gate} ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done; "
            f"[ -e {gate} ]")


def _caller_of(shell: int) -> int | None:
    """The ``hyperion-lock run`` process whose command ``shell`` is: its parent is the command's guard (which kills
    the command if the caller dies), whose parent is the caller."""
    guard = parent_pid(shell)
    return parent_pid(guard) if guard is not None else None


def _runners(ran: Path) -> list[int]:
    """The pids of the shells that ran the command (one line each)."""
    return [int(line) for line in ran.read_text().split()] if ran.exists() else []


@pytest.mark.parametrize("backend", ["redis", "file-locks"])
def test_concurrent_runs_run_the_command_exactly_once(backend: str, tmp_path: Path,
                                                      request: pytest.FixtureRequest) -> None:
    """Several ``hyperion-lock run`` started at once: the command runs in exactly one of them, the others wait for
    it (seen from outside: subscribed to Redis / blocked on the lock file) and then exit 0 without running it."""
    n = 4
    ran, gate = tmp_path / "ran.txt", tmp_path / "gate"
    if backend == "redis":
        server: RedisServer = request.getfixturevalue("secured_redis")
        where, env = ["--url", server.url], clean_env()
        waiting: Callable[[Iterable[int]], set[int]] = functools.partial(waiting_on_redis, server.url)
    else:
        where, env = [], clean_env(HYPERION_LOCK_LOCK_DIR=str(tmp_path / "locks"))
        waiting = blocked_on_flock
    argv = [sys.executable, "-m", "hyperion_lock.cli.main", "run", *where, "--key", "once", "--generation", "g1", "--",
            _gated_command(ran, gate)]
    procs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(n)]
    try:
        # The command started somewhere (its shell is a child of the leading caller) ...
        wait_until(lambda: _runners(ran), "the command started in one caller")

        def others_waiting() -> bool:
            leaders = {_caller_of(pid) for pid in _runners(ran)}
            others = {p.pid for p in procs} - leaders
            return others <= waiting(others)

        # ... and every other caller is waiting for it (or, if coordination broke, ran it too): release it.
        wait_until(others_waiting, "every other caller waits for the running command")
        gate.touch()
        outputs = [p.communicate(timeout=60)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert [p.returncode for p in procs] == [0] * n, outputs
    runners = _runners(ran)
    assert len(runners) == 1, f"the command ran {len(runners)} times: {runners}; outputs {outputs}"
    # A later call for the same generation finds it done and does not run it again.
    again = cli("run", *where, "--key", "once", "--generation", "g1", "--", f"echo $$ >> {ran}", env=env)
    assert again.returncode == 0, again
    assert _runners(ran) == runners


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
    """SIGTERM to the caller while it leads (the lease names it, its command runs) is passed on to the command's
    process group; the lease is held until the command exits, so a caller waiting meanwhile never runs it; the
    failure is recorded with the signal's status (128 + 15), and the waiting caller exits with that status too."""
    url = secured_redis.url
    ran, reached = tmp_path / "ran.txt", tmp_path / "reached"
    argv = [sys.executable, "-m", "hyperion_lock.cli.main", "run", "--url", url, "--key", "long", "--generation", "g1",
            "--", f"echo $$ >> {ran}; sleep 60; touch {reached}"]
    leader = subprocess.Popen(argv, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    waiter: subprocess.Popen[str] | None = None
    try:
        # Proof that it leads before the signal is sent: the lease names it and the command's shell is its own.
        assert wait_for_lease(url, "long")["pid"] == leader.pid
        shell = wait_until(lambda: _runners(ran), "the command started in the leading caller")[0]
        assert _caller_of(shell) == leader.pid
        waiter = subprocess.Popen(argv, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        waiter_pid = waiter.pid
        wait_until(lambda: waiting_on_redis(url, [waiter_pid]), "the second caller waits for the running command")
        leader.send_signal(signal.SIGTERM)
        _, err = leader.communicate(timeout=30)
        out, _ = waiter.communicate(timeout=30)
    finally:
        for proc in (leader, waiter):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert leader.returncode == 143, err
    assert not reached.exists(), "the command was not stopped by the forwarded SIGTERM"
    assert _runners(ran) == [shell], "the command ran again after the leader's was stopped"
    assert waiter.returncode == 143, out
    report = json.loads(cli("status", "--json", "--url", url, "--key", "long").stdout)
    assert report["jobs"][0]["state"] == "failed" and "status 143" in report["jobs"][0]["last_error"]
    client = redis.Redis.from_url(url)
    try:
        assert client.get(JobKeys("hyperion_lock", "long").lease) is None  # handed back once the command exited
    finally:
        client.close()


@pytest.mark.parametrize("backend", ["redis", "file-locks"])
def test_status_judges_the_newest_generation_by_default(backend: str, tmp_path: Path,
                                                        request: pytest.FixtureRequest) -> None:
    """A failure of an older deployment (here a one-off job the new one does not run) no longer makes ``status``
    exit 1 for the whole result TTL: without ``--generation`` it judges the generation of the newest lease or
    outcome, and says which; ``--generation`` still judges any other."""
    if backend == "redis":
        server: RedisServer = request.getfixturevalue("secured_redis")
        where, env = ["--url", server.url], clean_env()
    else:
        where, env = [], clean_env(HYPERION_LOCK_LOCK_DIR=str(tmp_path / "locks"))
    assert cli("run", *where, "--key", "oneoff", "--generation", "g1", "--", "exit 7", env=env).returncode == 7
    assert cli("status", *where, env=env).returncode == 1  # g1 is the newest: its failure counts
    assert cli("run", *where, "--key", "migrate", "--generation", "g2", "--", "true", env=env).returncode == 0

    status = cli("status", "--json", *where, env=env)
    report = json.loads(status.stdout)
    assert status.returncode == 0, status
    assert (report["generation"], report["generation_chosen"], report["exit_code"]) == ("g2", "newest", 0)
    jobs = {j["key"]: j for j in report["jobs"]}
    assert jobs["migrate"]["state"] == "done"
    assert jobs["oneoff"]["state"] == "idle" and [o["generation"] for o in jobs["oneoff"]["outcomes"]] == ["g1"]
    text = cli("status", *where, env=env)
    assert text.returncode == 0 and "generation g2 (the newest seen; --generation to choose)" in text.stdout
    assert cli("status", *where, "--generation", "g1", env=env).returncode == 1  # still judged when asked for
    assert cli("status", *where, "--key", "oneoff", env=env).returncode == 2  # named, and not run for g2

    # A lease taken after the newest outcome makes its generation the current one: migrate has not run in it yet.
    ran, gate = tmp_path / "ran.txt", tmp_path / "gate"
    slow = subprocess.Popen([sys.executable, "-m", "hyperion_lock.cli.main", "run", *where, "--key", "seed",
                             "--generation", "g3", "--", _gated_command(ran, gate)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _runners(ran), "the g3 job to start")
        report = json.loads(cli("status", "--json", *where, env=env).stdout)
        jobs = {j["key"]: j for j in report["jobs"]}
        assert report["generation"] == "g3" and report["exit_code"] == 2
        assert (jobs["seed"]["state"], jobs["migrate"]["state"]) == ("running", "idle")
    finally:
        gate.touch()
        slow.communicate(timeout=60)


def test_status_says_when_the_cache_cannot_be_listed(secured_redis: RedisServer) -> None:
    """With the run-once core's minimal ACL (and SCAN) status still reports the jobs, and says it could not list
    the cache instead of claiming there is none."""
    user = f"status{time.time_ns()}"
    admin = redis.Redis.from_url(secured_redis.url)
    try:
        admin.sadd("hyperion_lock:cache:namespaces", "quotes")
        admin.execute_command("ACL", "SETUSER", user, "on", ">user-pw", "resetchannels",  # type: ignore[no-untyped-call]
                              "~hyperion_lock:*", "&hyperion_lock:*", *_ACL_COMMANDS.split(), "+scan")
        url = f"redis://{user}:user-pw@127.0.0.1:{secured_redis.port}/0"
        text = cli("status", "--url", url)
        assert text.returncode == 0, text
        assert "no cache namespaces yet" not in text.stdout
        assert "cache: not readable as this Redis user" in text.stdout and "docs/caching.md" in text.stdout
        assert "user-pw" not in text.stdout + text.stderr
        report = json.loads(cli("status", "--json", "--url", url).stdout)
        assert report["cache"] is None and "no permissions to run" in report["cache_error"]
        # As a user allowed to read it, the namespace is listed.
        assert "quotes" in cli("status", "--url", secured_redis.url).stdout
    finally:
        admin.delete("hyperion_lock:cache:namespaces")
        admin.execute_command("ACL", "DELUSER", user)  # type: ignore[no-untyped-call]
        admin.close()


@pytest.mark.parametrize("argv", [["--help"], ["status", "--help"], ["wait", "--help"]])
def test_help_lists_the_exit_codes(argv: list[str]) -> None:
    shown = cli(*argv)
    assert shown.returncode == 0 and "pydoc" not in shown.stdout
    for line in ("status  0 every job done", "reset   0 cleared", "run     where the command ran",
                 "wait    0 the job is done", "the generation of the newest lease"):
        assert line in shown.stdout, shown.stdout
