"""``hyperion-lock run`` (a shell command as a run-once job) and ``hyperion-lock wait`` (wait for a
job run elsewhere, never running it)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from hyperion_lock.cli.common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_RUNNING,
    EXIT_USAGE,
    settings_of,
    unreachable,
)
from hyperion_lock.cli.guard import adopt_orphans, children, kill_descendants
from hyperion_lock.errors import (
    HyperionLockError,
    JobFailedError,
    LeaseLostError,
    RedisAuthError,
    RedisDatabaseIndexError,
    RedisPermissionError,
    RedisTLSError,
    RedisUnavailableError,
    WaitInterruptedError,
    WaitTimeoutError,
)
from hyperion_lock.runonce.coordinator import Coordinator, current_lease
from hyperion_lock.runonce.file_backend import FileLayout, held_lock_fd
from hyperion_lock.settings import Settings

logger = logging.getLogger(__name__)

_GUARD = str(Path(__file__).with_name("guard.py"))  # run by path: it must not import the package
LEASE_CHECK = 0.1  # s between two looks at the lease while the command runs (renewals mark it lost)
_STATUS_RE = re.compile(r"command exited with status (-?\d+)")


class CommandJob:
    """A shell command as a run-once job, in its own process group so a signal reaches a whole pipeline.

    SIGTERM/SIGINT while the command runs here are passed on (:meth:`forward`) and the lease is kept until the
    command exits, so it never runs twice; its exit status is then recorded as the outcome. While waiting, the
    coordinator ends the wait itself (exit 130).

    If this process dies without a chance to react (SIGKILL, OOM killer, a crash), the command dies with it: on
    Linux it runs under ``hyperion_lock/cli/guard.py``, which SIGKILLs the command's process group when this
    process is gone (see there), and whatever the command left running when it exits. If the guard itself is
    SIGKILLed, what the command started is re-parented to this process (made a child subreaper when the command
    starts), which kills it before recording the outcome. With file locks the command also inherits the locked
    descriptor, so the lock is held for exactly as long as any process of the command lives: a waiter cannot
    start a second copy meanwhile.
    """

    def __init__(self, command: list[str], key: str, generation: str, lock: Path | None = None) -> None:
        self.command = command
        self.key = key
        self.generation = generation
        self.lock = lock  # the lock file with file locks: its held descriptor is passed to the command
        self.children: list[subprocess.Popen[bytes]] = []
        self.status: int | None = None  # exit status when it ran here
        self.guarded = sys.platform.startswith("linux") and bool(sys.executable)

    def _popen(self) -> subprocess.Popen[bytes]:
        # One argument: a shell command line; several: an argv run without a shell.
        cmd = self.command
        fd = held_lock_fd(self.lock) if self.lock is not None else None
        fds = () if fd is None else (fd,)
        if self.guarded:
            # Started from (and waited for by) this thread, which so outlives the guard: its death signal fires
            # only when this process dies.
            guard = [sys.executable, "-I", "-S", _GUARD, str(os.getpid()),
                     str(-1 if fd is None else fd), "shell" if len(cmd) == 1 else "exec", *cmd]
            return subprocess.Popen(guard, start_new_session=True, pass_fds=fds)
        if len(cmd) == 1:
            return subprocess.Popen(cmd[0], shell=True, start_new_session=True, pass_fds=fds)
        return subprocess.Popen(cmd, start_new_session=True, pass_fds=fds)

    def __call__(self) -> None:
        cmd = self.command
        others = frozenset(children())
        if self.guarded:
            adopt_orphans()  # this process (the CLI's own) becomes a subreaper: see cli/guard.py
        child = self._popen()
        self.children.append(child)
        rc = self._wait(child)
        if rc < 0 and self.guarded:
            # The guard was killed before it could kill what the command started; all of it was re-parented here
            # (a subreaper): kill it before the outcome is recorded and the lock released, or it would run on
            # beside the copy a waiter (or the next run after a reset) starts.
            kill_descendants(spare=others)
        self.status = 128 - rc if rc < 0 else rc  # killed by signal N: 128 + N, like a shell
        if self.status != 0:
            raise JobFailedError(f"command exited with status {self.status}: {shlex.join(cmd)}", key=self.key,
                                 generation=self.generation)

    def _wait(self, child: subprocess.Popen[bytes]) -> int:
        """The command's exit status; SIGKILLs it (the guard, and so all of it) once the lease is seen lost.

        A runner paused past its lease (SIGSTOP, a frozen VM, a cut-off host) learns at its next renewal that a
        waiter took over and started its own copy: the command must stop at once, not run on beside that copy.
        """
        lease = current_lease()
        while True:
            try:
                return child.wait(timeout=LEASE_CHECK)
            except subprocess.TimeoutExpired:
                pass
            if lease is not None and lease.lost:
                logger.error("%s: the lease was taken over (fencing token %d): killing the command",
                             self.key, lease.fencing_token)
                with contextlib.suppress(ProcessLookupError):  # the guard: the rest as when it is SIGKILLed
                    (os.kill if self.guarded else os.killpg)(child.pid, signal.SIGKILL)
                return child.wait()

    def forward(self, signum: int, frame: object) -> None:
        for child in self.children:
            if child.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(child.pid, signum)


def _generation(args: argparse.Namespace) -> str | None:
    generation = args.generation or os.environ.get("HYPERION_LOCK_GENERATION", "").strip()
    if not generation:
        print(f"hyperion-lock {args.command_name}: set --generation (or HYPERION_LOCK_GENERATION): a job runs "
              "once per generation, e.g. the release id", file=sys.stderr)
    return generation or None


def _run_request(args: argparse.Namespace) -> tuple[list[str], str] | int:
    """The command and generation of ``run``, or the usage exit code."""
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print("hyperion-lock run: give the command after '--'", file=sys.stderr)
        return EXIT_USAGE
    generation = _generation(args)
    return (command, generation) if generation else EXIT_USAGE


_EXIT_FOR: tuple[tuple[type[HyperionLockError], int], ...] = (
    (LeaseLostError, EXIT_FAILED),
    (WaitInterruptedError, EXIT_INTERRUPTED),
    (WaitTimeoutError, EXIT_RUNNING),
    (JobFailedError, EXIT_FAILED),
)


def _exit_for(exc: HyperionLockError, settings: Settings, name: str) -> int:
    """The exit code of ``run``/``wait`` for an error of the coordinator (configuration errors go to main)."""
    if isinstance(exc, RedisUnavailableError | RedisAuthError | RedisPermissionError | RedisTLSError
                  | RedisDatabaseIndexError):
        # the same code as status/reset: Redis cannot be used as configured
        return unreachable(settings, exc)
    code = next((code for kind, code in _EXIT_FOR if isinstance(exc, kind)), None)
    if code is None:
        raise exc
    print(f"hyperion-lock {name}: {exc}", file=sys.stderr)
    if isinstance(exc, JobFailedError) and name == "run":  # failed elsewhere: its exit status, if a command
        match = _STATUS_RE.search(exc.error_message or "")
        return (int(match.group(1)) % 256 or EXIT_FAILED) if match else EXIT_FAILED
    return code


def _run_failed(exc: HyperionLockError, job: CommandJob, settings: Settings) -> int:
    if isinstance(exc, JobFailedError) and job.status is not None:
        return job.status  # it ran here: its own exit status
    return _exit_for(exc, settings, "run")


def cmd_wait(args: argparse.Namespace) -> int:
    generation = _generation(args)
    if generation is None:
        return EXIT_USAGE
    settings = settings_of(args).with_(generation=generation, wait_timeout=args.timeout)
    try:
        outcome = asyncio.run(Coordinator(None, settings=settings).wait_for(args.key))
    except HyperionLockError as exc:
        return _exit_for(exc, settings, "wait")
    print(f"{args.key}: done for generation {generation} by {outcome.runner}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    request = _run_request(args)
    if isinstance(request, int):
        return request
    command, generation = request
    settings = settings_of(args).with_(generation=generation)
    lock = None if settings.redis_url else FileLayout(Path(settings.lock_dir), settings.key_prefix, args.key).lock
    job = CommandJob(command, args.key, generation, lock)
    # A signal this process ignores (a background job's SIGINT, nohup) stays ignored, here and so in the command.
    previous = {sig: signal.signal(sig, job.forward) for sig in (signal.SIGTERM, signal.SIGINT)
                if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        outcome = Coordinator(None, settings=settings).run_once_sync(args.key, job)
    except HyperionLockError as exc:
        return _run_failed(exc, job, settings)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not outcome.ran_here:
        print(f"hyperion-lock run: {args.key} already done for generation {generation} by {outcome.runner}",
              file=sys.stderr)
    return EXIT_OK
