"""``hyperion-lock run``: the command never outlives its runner, so a waiter that takes over never runs a second
copy beside a first one (real runners, SIGKILLed while their command runs, with Redis and with file locks)."""

from __future__ import annotations

import fcntl
import functools
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from hyperion_lock.testing import RedisServer
from tests.support import wait_until
from tests.support.deploy import blocked_on_flock, clean_env, waiting_on_redis

pytestmark = pytest.mark.integration

GUARD = Path(__file__).resolve().parents[2] / "hyperion_lock" / "cli" / "guard.py"

# One copy of the command: it notes any earlier copy whose process group still has a live process ("overlap"),
# then logs "start <pid> <pgid> <pid of its own child> <lock files it holds open>", holds until the gate file
# exists (at most 60 s), logs "end".
COPY = r"""
import os, subprocess, sys, time
log, gate = sys.argv[1], sys.argv[2]

def alive(pgid):
    for entry in os.listdir("/proc"):
        try:
            fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False

def lock_fds():
    found = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            found += os.readlink(f"/proc/self/fd/{fd}").endswith("+lock")
        except OSError:
            pass
    return found

lines = open(log).read().splitlines() if os.path.exists(log) else []
earlier = [int(line.split()[2]) for line in lines if line.startswith("start ")]
child = subprocess.Popen(["sleep", "60"])
with open(log, "a") as f:
    for pgid in earlier:
        if alive(pgid):
            f.write(f"overlap {os.getpid()} {pgid}\n")
    f.write(f"start {os.getpid()} {os.getpgid(0)} {child.pid} {lock_fds()}\n")
deadline = time.monotonic() + 60
while not os.path.exists(gate) and time.monotonic() < deadline:
    time.sleep(0.05)
child.kill()
with open(log, "a") as f:
    f.write(f"end {os.getpid()}\n")
"""


def _lines(log: Path, kind: str) -> list[list[str]]:
    text = log.read_text() if log.exists() else ""
    return [line.split()[1:] for line in text.splitlines() if line.startswith(kind + " ")]


def _live(pids: Iterable[int]) -> list[int]:
    """The processes among ``pids`` that still exist and are not zombies."""
    found = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X"):
            found.append(pid)
    return found


def _group(pgid: int) -> list[int]:
    """Live processes of process group ``pgid``."""
    members = []
    for entry in os.listdir("/proc"):
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry))
    return members


@pytest.mark.parametrize("backend", ["redis", "file-locks"])
def test_sigkilled_runner_takes_its_command_along(backend: str, tmp_path: Path,
                                                  request: pytest.FixtureRequest) -> None:
    """SIGKILL the caller whose command runs while another caller waits: the command (and the process it started)
    dies with its caller, and the waiter's copy starts only once it is gone: never two copies at once. Before, the
    command lived on in its own session, and the waiter started a second copy beside it (at once with file locks,
    after one lease TTL with Redis)."""
    log, gate = tmp_path / "log", tmp_path / "gate"
    if backend == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        where, env = ["--url", server.url], clean_env(HYPERION_LOCK_LEASE_TTL="2")
        waiting: Callable[[Iterable[int]], set[int]] = functools.partial(waiting_on_redis, server.url)
    else:
        where, env = [], clean_env(HYPERION_LOCK_LOCK_DIR=str(tmp_path / "locks"))
        waiting = blocked_on_flock
    argv = [sys.executable, "-m", "hyperion_lock.cli.main", "run", *where, "--key", "copy", "--generation", "g1", "--",
            sys.executable, "-c", COPY, str(log), str(gate)]
    first = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second: subprocess.Popen[str] | None = None
    try:
        [(_, pgid, grandchild, _)] = wait_until(lambda: _lines(log, "start"), "the first caller's command started")
        first_copy = _group(int(pgid))
        assert int(grandchild) in first_copy
        second = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        second_pid = second.pid
        wait_until(lambda: waiting([second_pid]), "the second caller waits for the running command")
        first.kill()
        first.wait(30)
        wait_until(lambda: len(_lines(log, "start")) == 2, "the waiting caller ran the command after the takeover")
        gate.touch()
        out, _ = second.communicate(timeout=60)
    finally:
        gate.touch()  # lets any copy still running end
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert not _lines(log, "overlap"), f"two copies ran at once: {log.read_text()}"
    assert second.returncode == 0, out
    assert not _live(first_copy), "the killed caller's command outlived it"
    starts, ends = _lines(log, "start"), _lines(log, "end")
    assert [e[0] for e in ends] == [starts[1][0]], log.read_text()  # only the second copy ended
    # With file locks each copy held the lock itself (the first through its caller, the second after its caller
    # waited for the lock); with Redis there is no lock file.
    assert [s[3] for s in starts] == (["1", "1"] if backend == "file-locks" else ["0", "0"]), log.read_text()


def test_guard_does_not_start_the_command_when_its_runner_is_already_gone(tmp_path: Path) -> None:
    """The runner died between starting the guard and the guard setting its death signal: the guard's parent is no
    longer the runner it was given, and the command must not start (nobody would stop it)."""
    marker = tmp_path / "ran"
    gone = subprocess.Popen(["true"])
    gone.wait()
    result = subprocess.run([sys.executable, "-I", "-S", str(GUARD), str(gone.pid), "-1", "shell", f"touch {marker}"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 128 + 9, result
    assert not marker.exists()


def test_guard_returns_the_command_status_and_passes_the_lock_descriptor(tmp_path: Path) -> None:
    """Started by its runner (here: this process), the guard runs the command with the given descriptor open and
    returns its status, 128 + N when a signal ended it."""
    fd = os.open(tmp_path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        seen = tmp_path / "seen"
        cmd = f"readlink /proc/$$/fd/{fd} > {seen}; kill -TERM $$"
        result = subprocess.run([sys.executable, "-I", "-S", str(GUARD), str(os.getpid()), str(fd), "shell", cmd],
                                pass_fds=(fd,), timeout=60, check=False)
    finally:
        os.close(fd)
    assert result.returncode == 128 + 15
    assert seen.read_text().strip() == str(tmp_path / "lock")


def test_guard_keeps_signals_its_runner_ignored(tmp_path: Path) -> None:
    """A caller started with SIGINT ignored (a background job, ``nohup``-like): the command ignores it too, although
    the guard itself handles SIGINT/SIGTERM."""
    seen = tmp_path / "ignored"
    cmd = f"grep SigIgn /proc/$$/status > {seen}"
    guard = f"trap '' INT; exec {sys.executable} -I -S {GUARD} {os.getpid()} -1 shell '{cmd}'"
    result = subprocess.run(["sh", "-c", guard], timeout=60, check=False)
    assert result.returncode == 0
    mask = int(seen.read_text().split()[1], 16)
    assert mask & (1 << (2 - 1)), "SIGINT is no longer ignored in the command"  # bit N-1 for signal N
    assert not mask & (1 << (15 - 1))


# A command whose processes try to outlive it: one child in its process group, one in a process group of its own
# (as `timeout` makes), one daemon double-forked into a session of its own (setsid). It writes their pids, then
# holds until the gate file exists (at most 60 s). The three sleep 600 s: only a kill ends them within a test.
ESCAPING = r"""
import os, subprocess, sys, time
pids_file, gate = sys.argv[1], sys.argv[2]
pids = [subprocess.Popen(["sleep", "600"]).pid, subprocess.Popen(["sleep", "600"], process_group=0).pid]
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    daemon = os.fork()
    if daemon == 0:
        os.execvp("sleep", ["sleep", "600"])
    os.write(w, f"{daemon}\n".encode())
    os._exit(0)
os.wait()
pids.append(int(os.read(r, 64)))
with open(pids_file + ".tmp", "w") as f:
    f.write(" ".join(map(str, pids)))
os.rename(pids_file + ".tmp", pids_file)
deadline = time.monotonic() + 60
while not os.path.exists(gate) and time.monotonic() < deadline:
    time.sleep(0.05)
"""


def _escaping_run(tmp_path: Path, gate: Path) -> subprocess.Popen[bytes]:
    """``hyperion-lock run`` of ESCAPING with file locks, its output in ``tmp_path/out`` (not a pipe: processes that
    outlive the caller would keep a pipe open), the pids in ``tmp_path/pids``."""
    env = clean_env(HYPERION_LOCK_LOCK_DIR=str(tmp_path / "locks"))
    argv = [sys.executable, "-m", "hyperion_lock.cli.main", "run", "--key", "escape", "--generation", "g1", "--",
            sys.executable, "-c", ESCAPING, str(tmp_path / "pids"), str(gate)]
    with open(tmp_path / "out", "wb") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)


def _started(tmp_path: Path) -> list[int]:
    pids = tmp_path / "pids"
    return [int(p) for p in pids.read_text().split()] if pids.exists() else []


def _end(caller: subprocess.Popen[bytes], tmp_path: Path, gate: Path) -> None:
    """Clean-up: whatever the test found, nothing it started runs on."""
    gate.touch()
    for pid in _live(_started(tmp_path)):
        os.kill(pid, 9)
    if caller.poll() is None:
        caller.kill()
    caller.wait()


def _children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


def _lock_free(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def test_sigkilled_runner_takes_along_what_left_the_process_group(tmp_path: Path) -> None:
    """SIGKILL the caller while its command's processes sit in another process group and another session: every
    one of them dies, and the lock is free only once they are gone. Before, only the guard's process group was
    killed: a `timeout`-like child and a setsid daemon lived on (the daemon holding the lock file's descriptor)."""
    gate = tmp_path / "gate"
    caller = _escaping_run(tmp_path, gate)
    try:
        pids = wait_until(lambda: _started(tmp_path), "the command started its processes")
        assert len(_live(pids)) == 3
        [lock] = (tmp_path / "locks").glob("*+lock")
        caller.kill()
        caller.wait(30)
        # The guard holds the lock too until it has killed and reaped the command's processes, then exits.
        wait_until(lambda: _lock_free(lock), "the lock is free after the runner's SIGKILL")
        assert not _live(pids), "a process of the command outlived its runner, the lock was free meanwhile"
    finally:
        _end(caller, tmp_path, gate)


def test_sigkilled_guard_takes_along_what_the_command_started(tmp_path: Path) -> None:
    """SIGKILL the guard (OOM killer, an operator's kill) while the caller lives: the caller records the command as
    killed only once nothing it started runs any more. Before, the caller recorded status 137 and released the lock
    while the command's other processes ran on, and a reset and a new run started a second copy beside them."""
    gate = tmp_path / "gate"
    caller = _escaping_run(tmp_path, gate)
    try:
        pids = wait_until(lambda: _started(tmp_path), "the command started its processes")
        assert len(_live(pids)) == 3
        [guard] = _children(caller.pid)
        os.kill(guard, 9)
        assert caller.wait(60) == 128 + 9, (tmp_path / "out").read_text()
        assert not _live(pids), "the command's processes outlived the recorded outcome"
    finally:
        _end(caller, tmp_path, gate)


def test_command_leaves_nothing_running_when_it_exits(tmp_path: Path) -> None:
    """A command that exits leaving processes behind (`cmd &`, a daemon): they are killed before the outcome is
    recorded, so "done" means nothing of the command runs. Before, they ran on after the caller returned."""
    gate = tmp_path / "gate"
    gate.touch()  # the command exits as soon as it started its three processes
    caller = _escaping_run(tmp_path, gate)
    try:
        assert caller.wait(60) == 0, (tmp_path / "out").read_text()
        pids = _started(tmp_path)
        assert len(pids) == 3 and not _live(pids), "the command's processes outlived it"
    finally:
        _end(caller, tmp_path, gate)


def test_runner_paused_past_its_lease_kills_its_command_when_it_resumes(tmp_path: Path,
                                                                       redis_server: RedisServer) -> None:
    """SIGSTOP the caller whose command runs, longer than the lease TTL: a waiter takes over and starts its copy.
    When the paused caller resumes, its renewal sees the newer holder and it kills its own command at once (exit 1,
    lease lost) instead of letting it run on beside the successor's. Before, the resumed caller waited for its
    command's natural end, however long, both copies running. (While the caller is stopped its command still runs:
    a stopped process cannot act; only the job's store refusing lower fencing tokens closes that window.)"""
    log, gate = tmp_path / "log", tmp_path / "gate"
    env = clean_env(HYPERION_LOCK_LEASE_TTL="2")
    argv = [sys.executable, "-m", "hyperion_lock.cli.main", "run", "--url", redis_server.url, "--key", "paused",
            "--generation", "g1", "--", sys.executable, "-c", COPY, str(log), str(gate)]
    first = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second: subprocess.Popen[bytes] | None = None
    first_copy: list[int] = []
    try:
        [(_, pgid, _, _)] = wait_until(lambda: _lines(log, "start"), "the first caller's command started")
        first_copy = _group(int(pgid))
        os.kill(first.pid, signal.SIGSTOP)
        second = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: len(_lines(log, "start")) == 2, "the waiter took over after the lease expired")
        os.kill(first.pid, signal.SIGCONT)
        assert first.wait(30) == 1  # lease lost
        assert not _live(first_copy), "the resumed caller returned with its command still running"
        assert not [e for e in _lines(log, "end") if e[0] == _lines(log, "start")[0][0]], "the first copy ran on"
        gate.touch()
        assert second.wait(60) == 0
    finally:
        gate.touch()
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
                proc.wait()
        for pid in _live(first_copy):
            os.kill(pid, signal.SIGKILL)


def test_run_started_with_sigint_ignored_keeps_it_ignored(tmp_path: Path) -> None:
    """``hyperion-lock run`` started with SIGINT ignored (a background job of a script, ``nohup``-like): the command
    ignores it too, and a SIGINT to the caller does not end it. Before, the caller put its forwarding handler over
    the ignored disposition: the command got SIGINT at its default (the guard saw no SIG_IGN to keep), and a SIGINT
    to the caller killed the command (status 130, the job recorded as failed)."""
    seen, gate = tmp_path / "seen", tmp_path / "gate"
    cmd = (f"grep SigIgn /proc/$$/status > {seen}.tmp; mv {seen}.tmp {seen}; "
           f"i=0; while [ ! -e {gate} ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done")
    run = (f"trap '' INT; exec {shlex.quote(sys.executable)} -m hyperion_lock.cli.main run --key ignored "
           f"--generation g1 -- {shlex.quote(cmd)}")
    caller = subprocess.Popen(["sh", "-c", run], env=clean_env(HYPERION_LOCK_LOCK_DIR=str(tmp_path / "locks")))
    try:
        wait_until(seen.exists, "the command started")
        mask = int(seen.read_text().split()[1], 16)
        assert mask & (1 << (signal.SIGINT - 1)), "SIGINT is not ignored in the command"
        os.kill(caller.pid, signal.SIGINT)
        gate.touch()
        assert caller.wait(60) == 0
    finally:
        gate.touch()
        if caller.poll() is None:
            caller.kill()
            caller.wait()
