"""``hyperion-lock wait``: an init container's wait for a job run elsewhere (real Redis, real processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from hyperion_lock.settings import host_label
from tests.support import ROOT

pytestmark = pytest.mark.integration


def _cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "hyperion_lock.cli.main", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _until(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_wait_returns_once_the_job_run_elsewhere_is_done(redis_url: str, tmp_path: Path) -> None:
    gen = f"wait-ok-{time.time_ns()}"
    gate, started = tmp_path / "gate", tmp_path / "started"
    waiter = _cli("wait", "--key", "migrate", "--generation", gen, "--url", redis_url)
    runner = _cli("run", "--key", "migrate", "--generation", gen, "--url", redis_url, "--",
                  f"touch {started}; while [ ! -f {gate} ]; do sleep 0.05; done")
    try:
        _until(started.exists, "the job to start")
        assert waiter.poll() is None  # the job cannot be done before the gate opens: still waiting
        gate.touch()
        assert runner.wait(60) == 0
        assert waiter.wait(60) == 0, waiter.communicate()
    finally:
        for proc in (waiter, runner):
            proc.kill()
            proc.communicate()


def test_wait_fails_when_the_job_failed(redis_url: str) -> None:
    gen = f"wait-failed-{time.time_ns()}"
    runner = _cli("run", "--key", "migrate", "--generation", gen, "--url", redis_url, "--", "exit 7")
    runner.communicate(timeout=60)
    assert runner.returncode == 7
    waiter = _cli("wait", "--key", "migrate", "--generation", gen, "--url", redis_url)
    _, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 1 and "status 7" in err, err


def test_wait_times_out_when_nothing_runs_the_job(redis_url: str) -> None:
    waiter = _cli("wait", "--key", "never", "--generation", f"wait-none-{time.time_ns()}", "--url", redis_url,
                  "--timeout", "1")
    _, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 2 and "wait_timeout=1 s" in err, err
    # Nobody ran it: the message says so instead of naming "another worker" that "still ran the job".
    assert "no worker held the job's lease and no outcome was recorded" in err and "still ran" not in err, err


def test_wait_timeout_names_the_runner_seen_last(redis_url: str, tmp_path: Path) -> None:
    gen = f"wait-slow-{time.time_ns()}"
    gate, started = tmp_path / "gate", tmp_path / "started"
    runner = _cli("run", "--key", "slow", "--generation", gen, "--url", redis_url, "--",
                  f"touch {started}; while [ ! -f {gate} ]; do sleep 0.05; done")
    try:
        _until(started.exists, "the job to start")
        waiter = _cli("wait", "--key", "slow", "--generation", gen, "--url", redis_url, "--timeout", "1")
        _, err = waiter.communicate(timeout=60)
        assert waiter.returncode == 2, err
        assert f"no outcome recorded yet; the job was last seen running in {host_label()}" in err, err
        assert f":{runner.pid} (fencing token" in err, err
    finally:
        gate.touch()
        runner.wait(60)
        runner.communicate()


def test_wait_is_interruptible(redis_url: str) -> None:
    env = {**os.environ, "HYPERION_LOCK_PROGRESS_INTERVAL": "0.2"}
    waiter = subprocess.Popen(
        [sys.executable, "-m", "hyperion_lock.cli.main", "wait", "--key", "never", "--generation",
         f"wait-sig-{time.time_ns()}", "--url", redis_url, "-v"],
        cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        assert waiter.stderr is not None
        line = waiter.stderr.readline()  # the first progress line comes from inside the wait
        assert "still waiting" in line, line
        waiter.send_signal(signal.SIGTERM)
        assert waiter.wait(30) == 130
    finally:
        waiter.kill()
        waiter.communicate()


#: Runs the CLI with SIGINT ignored, as a non-interactive shell starts a background job (SIG_IGN survives exec).
_SIGINT_IGNORED = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                   "os.execv(sys.executable, [sys.executable, '-m', 'hyperion_lock.cli.main', *sys.argv[1:]])")


def test_wait_keeps_an_ignored_sigint_ignored(redis_url: str) -> None:
    """A process that set SIGINT to SIG_IGN (``cmd &`` in a script) is not interrupted by SIGINT while it waits;
    SIGTERM, which it did not ignore, still ends the wait (130)."""
    env = {**os.environ, "HYPERION_LOCK_PROGRESS_INTERVAL": "0.2"}
    waiter = subprocess.Popen(
        [sys.executable, "-c", _SIGINT_IGNORED, "wait", "--key", "never", "--generation",
         f"wait-ign-{time.time_ns()}", "--url", redis_url, "-v"],
        cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        assert waiter.stderr is not None
        line = waiter.stderr.readline()  # the first progress line comes from inside the wait
        assert "still waiting" in line, line
        waiter.send_signal(signal.SIGINT)
        for _ in range(2):  # progress goes on after the signal: the wait did not end
            line = waiter.stderr.readline()
            assert "still waiting" in line, line
        assert waiter.poll() is None
        waiter.send_signal(signal.SIGTERM)
        assert waiter.wait(30) == 130
    finally:
        waiter.kill()
        waiter.communicate()


def test_wait_without_redis_says_it_needs_redis(tmp_path: Path) -> None:
    env = {**os.environ, "HYPERION_LOCK_LOCK_DIR": str(tmp_path)}
    env.pop("HYPERION_LOCK_REDIS_URL", None)
    done = subprocess.run([sys.executable, "-m", "hyperion_lock.cli.main", "wait", "--key", "k", "--generation", "g"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 64 and "needs Redis" in done.stderr, done.stderr
