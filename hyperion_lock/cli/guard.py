"""The parent of a ``hyperion-lock run`` command: it dies with its runner and takes the whole command with it.

The runner starts it as ``python -I -S guard.py RUNNER_PID LOCK_FD shell|exec ARG...`` in a session of
its own (standard library only: it must start fast and must not import the package). It starts the command in its
own process group and returns the command's exit status (128 + N when killed by signal N).

Failure timeline:

- The runner is SIGKILLed (or crashes) at any moment while the command runs: the kernel sends this process SIGTERM
  (``PR_SET_PDEATHSIG``, tied to the runner's thread that started it, which waits for it to exit and so lives as
  long as it does). The handler sees that its parent changed and SIGKILLs every process the command started
  (:func:`kill_descendants`), then exits, so no copy outlives its runner to overlap with the copy a waiter starts
  after taking over.
- The runner died before the death signal was set: the parent check right after setting it sees it, and the
  command never starts.
- The command exits while processes it started still run (``cmd &``, a daemon): they are SIGKILLed before this
  process returns the command's status, so the runner records an outcome only once nothing of the command runs.
- Leaving the process group or the session (``setsid``, ``timeout``, a double-forking daemon) does not escape:
  this process is a child subreaper (``PR_SET_CHILD_SUBREAPER``), so whatever the command started is re-parented
  to it, not to init, when its own parent exits, and is found and killed through the parent links.
- This process is SIGKILLed: the command gets SIGKILL (its own ``PR_SET_PDEATHSIG``, set between fork and exec;
  this process is single-threaded, so that is safe here). The runner is a subreaper too: what the command started
  is re-parented to it, and it kills them (:func:`kill_descendants`) before recording the outcome.
- The runner passes SIGTERM/SIGINT on to the process group: the command gets it; this process ignores it and keeps
  waiting for the command's exit status, which the runner records.
- File locks: ``LOCK_FD`` is the runner's locked descriptor (``-1`` with Redis). It is inherited here and by the
  command, so the flock stays held until the last process of the command is gone, even when the runner is gone
  first: a waiter can never start a second copy while one still runs.

Signals the runner ignored (``nohup``, a background job) stay ignored in the command.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from types import FrameType

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
MAX_ROUNDS = 10_000  # kill_descendants: each round kills one level of the tree (or what forked meanwhile)
DEATH_SIGNAL = signal.SIGTERM
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _prctl(option: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(option, value, 0, 0, 0) == 0)


def die_with_parent(signum: int) -> bool:
    """Ask the kernel to send ``signum`` to this process when its parent (thread) exits; False when it cannot."""
    return _prctl(PR_SET_PDEATHSIG, signum)


def adopt_orphans() -> bool:
    """Make this process a child subreaper: descendants whose parent exits are re-parented here, not to init, so
    :func:`kill_descendants` finds them even after they left the process group or session. False when it cannot."""
    return _prctl(PR_SET_CHILD_SUBREAPER, 1)


def children() -> list[int]:
    """The pids of this process's children (any thread's), zombies included."""
    me = os.getpid()
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{me}/task"):
            with open(f"/proc/{me}/task/{task}/children") as fh:
                found.extend(int(pid) for pid in fh.read().split())
        return found
    except OSError:  # no /proc/PID/task/TID/children (CONFIG_PROC_CHILDREN off): read every process's parent
        pass
    try:
        entries = os.listdir("/proc")
    except OSError:  # no /proc at all (not Linux): nothing was adopted either
        return []
    for entry in entries:
        try:
            with open(f"/proc/{entry}/stat") as fh:
                if int(fh.read().rsplit(")", 1)[1].split()[1]) == me:
                    found.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return found


def kill_descendants(spare: frozenset[int] = frozenset()) -> None:
    """SIGKILL and reap every child of this process but those in ``spare``, then the children re-parented here as
    their parents died, until none is left. With :func:`adopt_orphans` that is everything started below this
    process, whatever process group or session it moved to. Call it only once the children one waits for have
    been reaped."""
    for _ in range(MAX_ROUNDS):
        pids = [pid for pid in children() if pid not in spare]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in pids:  # once a parent is reaped its children are re-parented here: the next round sees them
            with contextlib.suppress(ChildProcessError):  # reaped by someone else meanwhile
                os.waitpid(pid, 0)


def main(argv: list[str]) -> int:
    runner, lock_fd, mode, command = int(argv[0]), int(argv[1]), argv[2], argv[3:]
    ignored = [sig for sig in STOP_SIGNALS if signal.getsignal(sig) is signal.SIG_IGN]

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if os.getppid() != runner:  # the runner is gone: so is everything this command started
            kill_descendants()
            os._exit(128 + signal.SIGKILL)
        # else the runner passed SIGTERM/SIGINT on to the group: the command got it too; wait for its exit

    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)
    adopt_orphans()
    die_with_parent(DEATH_SIGNAL)
    if os.getppid() != runner:  # it died before the death signal was set: never start the command
        return 128 + signal.SIGKILL
    guard = os.getpid()

    def child_setup() -> None:  # in the command's process, between fork and exec
        die_with_parent(signal.SIGKILL)
        if os.getppid() != guard:
            os._exit(128 + signal.SIGKILL)
        for sig in ignored:
            signal.signal(sig, signal.SIG_IGN)

    fds = (lock_fd,) if lock_fd >= 0 else ()
    try:
        if mode == "shell":
            child = subprocess.Popen(command[0], shell=True, pass_fds=fds, preexec_fn=child_setup)  # noqa: PLW1509 (one thread)
        else:
            child = subprocess.Popen(command, pass_fds=fds, preexec_fn=child_setup)  # noqa: PLW1509 (one thread)
    except OSError as exc:
        print(f"hyperion-lock run: cannot start {command[0]!r}: {exc.strerror or exc}", file=sys.stderr)
        return 127
    rc = child.wait()
    kill_descendants()  # what the command left running (``cmd &``, a daemon) must not outlive it
    return 128 - rc if rc < 0 else rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
