"""Ending a wait promptly on SIGTERM/SIGINT without taking the signal away from the server that owns it."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

STOP_MESSAGE = "hyperion_lock: stop requested"


class StopRequest:
    """Set when SIGTERM/SIGINT arrived; while ``active`` it also cancels the waiting task (no helper tasks)."""

    def __init__(self, task: asyncio.Task[Any] | None, *, cancel: bool) -> None:
        self.task = task if cancel else None
        self.active = True
        self.requested = False

    def is_set(self) -> bool:
        return self.requested

    def _fire(self) -> None:
        self.requested = True
        if self.active and self.task is not None and not self.task.done():
            self.task.cancel(STOP_MESSAGE)


@contextlib.contextmanager
def stop_requested(loop: asyncio.AbstractEventLoop, *, cancel: bool = True) -> Iterator[StopRequest]:
    """While the block runs, SIGTERM/SIGINT mark the request and, with ``cancel``, cancel the current task with
    :data:`STOP_MESSAGE` (the caller turns that into ``WaitInterruptedError``). Without ``cancel`` the block
    only learns of the request (e.g. to start no further job after the current one).

    The previous handler (uvicorn's, gunicorn's, Python's default) is chained, not replaced: it still runs, so
    the server still learns it must exit. Outside the main thread no handler can be installed and nothing fires.
    """
    request = StopRequest(asyncio.current_task(), cancel=cancel)
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous: dict[signal.Signals, Any] = {}

    def handler(signum: int, frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(request._fire)
        prev = previous.get(signal.Signals(signum))
        if callable(prev):
            prev(signum, frame)
        # SIG_DFL/SIG_IGN: the wait ends with WaitInterruptedError, which unwinds the process cleanly.

    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(ValueError, OSError):
            previous[sig] = signal.signal(sig, handler)
    try:
        yield request
    finally:
        request.active = False  # a signal from now on only marks the request; it never cancels the leader
        for sig, prev in previous.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(sig, prev)
