"""Ending a wait promptly on SIGTERM/SIGINT without taking the signal away from the server that owns it.

One process-wide hook serves every wait that is active at the moment, however many overlap (several tasks,
several loops, nested calls): it is installed when the first wait begins and the process's previous handlers are
put back, exactly as found, when the last one ends. The hook marks every active request, cancels the waiting
tasks of those that asked for it (through their own loops), then runs the previous handler (uvicorn's,
gunicorn's, asyncio.run's), so the server still learns it must exit.

Under ``asyncio.run`` the previous SIGINT handler would cancel the main task without a message, wherever the wait
runs; while a wait is active the hook cancels the waiting tasks instead (each ends with ``WaitInterruptedError``),
and it only chains to that handler when no wait asked to be cancelled.

A signal the process ignores (``SIG_IGN``, e.g. SIGINT in a background job of a non-interactive shell, or set by
the app) is left ignored: the wait installs nothing for it, so it does not end the wait either.

Handlers can only be installed from the main thread: a wait that begins in another thread while no wait of the
main thread is active learns of no signal (the server's own shutdown still ends it).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

STOP_MESSAGE = "hyperion_lock: stop requested"
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Marked when SIGTERM/SIGINT arrived during the block; with ``cancel`` it also cancels the waiting task."""

    def __init__(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any] | None, *, cancel: bool) -> None:
        self.loop = loop
        self.task = task if cancel else None
        self.active = True
        self.requested = False
        self.signum: int | None = None

    def is_set(self) -> bool:
        return self.requested

    def _mark(self, signum: int) -> None:
        """Runs in the signal handler: only plain assignments here, the cancellation goes through the loop."""
        self.requested = True
        self.signum = signum
        if self.task is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nothing left to cancel
                self.loop.call_soon_threadsafe(self._cancel)

    def _cancel(self) -> None:
        task = self.task
        if self.active and task is not None and not task.done() and not task.cancelling():
            task.cancel(STOP_MESSAGE)

    def absorb(self) -> bool:
        """Called on ``CancelledError`` in the waiting task: True (and the cancellation undone) when it came from
        a stop request, so the caller raises ``WaitInterruptedError`` instead."""
        if not self.requested:
            return False
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            task.uncancel()
        return True


class _Hook:
    """The process-wide handler and the requests it serves."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active: list[StopRequest] = []
        self.previous: dict[int, Any] = {}  # handlers we replaced; empty while ours are not installed

    def handler(self, signum: int, frame: FrameType | None) -> None:
        active = list(self.active)
        for request in active:
            request._mark(signum)
        previous = self.previous.get(signum)
        if any(r.task is not None for r in active) and _is_asyncio_run_sigint(previous):
            return  # our cancellation does asyncio.run's job, and ends each wait with WaitInterruptedError
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL and not self.active:
            # Left installed by a wait that ended outside the main thread: act as the default would.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        # SIG_DFL during a wait: it ends with WaitInterruptedError, which unwinds the process cleanly. (An ignored
        # signal never gets here: enter() leaves SIG_IGN in place.)

    def enter(self, request: StopRequest) -> None:
        with self.lock:
            self.active.append(request)
            if self.previous or threading.current_thread() is not threading.main_thread():
                return
            for sig in SIGNALS:
                with contextlib.suppress(ValueError, OSError):
                    if signal.getsignal(sig) != signal.SIG_IGN:  # the process chose to ignore it: respect that
                        self.previous[sig] = signal.signal(sig, self.handler)

    def leave(self, request: StopRequest) -> None:
        with self.lock:
            request.active = False
            with contextlib.suppress(ValueError):
                self.active.remove(request)
            if self.active or not self.previous or threading.current_thread() is not threading.main_thread():
                return
            for sig, previous in self.previous.items():
                with contextlib.suppress(ValueError, OSError, TypeError):
                    if signal.getsignal(sig) == self.handler:  # someone installed theirs since: leave it alone
                        signal.signal(sig, previous)
            self.previous.clear()


_HOOK = _Hook()


def _is_asyncio_run_sigint(handler: Any) -> bool:
    """``asyncio.run``'s SIGINT handler cancels the *main* task: a wait running in a child task (``gather``)
    would then end the program with ``KeyboardInterrupt`` instead of ``WaitInterruptedError``."""
    runner_handler = getattr(getattr(asyncio, "Runner", None), "_on_sigint", None)
    bound = handler.func if isinstance(handler, functools.partial) else handler  # 3.11+: partial(_on_sigint, ...)
    return runner_handler is not None and getattr(bound, "__func__", None) is runner_handler


@contextlib.contextmanager
def stop_requested(loop: asyncio.AbstractEventLoop | None = None, *, cancel: bool = True) -> Iterator[StopRequest]:
    """While the block runs, SIGTERM/SIGINT mark the returned request and, with ``cancel``, cancel the current
    task with :data:`STOP_MESSAGE` (the caller turns that into ``WaitInterruptedError``; see
    :meth:`StopRequest.absorb`); a signal set to ``SIG_IGN`` stays ignored. Without ``cancel`` the block only
    learns of the request, e.g. to start no further job after the current one. The previous handlers keep running,
    and come back when the block ends.
    """
    running = loop or asyncio.get_running_loop()
    request = StopRequest(running, asyncio.current_task(running), cancel=cancel)
    _HOOK.enter(request)
    try:
        yield request
    finally:
        _HOOK.leave(request)
