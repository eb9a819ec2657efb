"""The parent of a ``hyperion-lock run`` command: it dies with its runner and takes the whole command with it.

The runner starts it as ``python -I -S _command_guard.py RUNNER_PID LOCK_FD shell|exec ARG...`` in a session of
its own (standard library only: it must start fast and must not import the package). It starts the command in its
own process group and returns the command's exit status (128 + N when killed by signal N).

Failure timeline:

- The runner is SIGKILLed (or crashes) at any moment while the command runs: the kernel sends this process SIGTERM
  (``PR_SET_PDEATHSIG``, tied to the runner's thread that started it, which waits for it to exit and so lives as
  long as it does). The handler sees that its parent changed and SIGKILLs its whole process group: the command and
  everything it started (a pipeline, ``a && b``), so no copy outlives its runner to overlap with the copy a waiter
  starts after taking over.
- The runner died before the death signal was set: the parent check right after setting it sees it, and the
  command never starts.
- This process is killed: the command gets SIGKILL (its own ``PR_SET_PDEATHSIG``, set between fork and exec;
  this process is single-threaded, so that is safe here).
- The runner passes SIGTERM/SIGINT on to the process group: the command gets it; this process ignores it and keeps
  waiting for the command's exit status, which the runner records.
- File locks: ``LOCK_FD`` is the runner's locked descriptor (``-1`` with Redis). It is inherited here and by the
  command, so the flock stays held until the last process of the command is gone, even when the runner is gone
  first: a waiter can never start a second copy while one still runs.

Signals the runner ignored (``nohup``, a background job) stay ignored in the command.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from types import FrameType

PR_SET_PDEATHSIG = 1
DEATH_SIGNAL = signal.SIGTERM
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def die_with_parent(signum: int) -> bool:
    """Ask the kernel to send ``signum`` to this process when its parent (thread) exits; False when it cannot."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0)


def main(argv: list[str]) -> int:
    runner, lock_fd, mode, command = int(argv[0]), int(argv[1]), argv[2], argv[3:]
    ignored = [sig for sig in STOP_SIGNALS if signal.getsignal(sig) is signal.SIG_IGN]

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if os.getppid() != runner:  # the runner is gone: so is everything this command started
            os.killpg(0, signal.SIGKILL)
        # else the runner passed SIGTERM/SIGINT on to the group: the command got it too; wait for its exit

    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)
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
    return 128 - rc if rc < 0 else rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
