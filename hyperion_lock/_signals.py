"""Ending a wait promptly on SIGTERM/SIGINT without taking the signal away from the server that owns it."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any


@contextlib.contextmanager
def stop_requested_event(loop: asyncio.AbstractEventLoop) -> Iterator[asyncio.Event]:
    """Yield an event that is set when SIGTERM or SIGINT arrives while the block runs.

    The previous handler (uvicorn's, gunicorn's, Python's default) is chained, not replaced: it still runs, so
    the server still learns it must exit. Outside the main thread no handler can be installed and the event is
    simply never set.
    """
    event = asyncio.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return
    previous: dict[signal.Signals, Any] = {}

    def handler(signum: int, frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(event.set)
        prev = previous.get(signal.Signals(signum))
        if callable(prev):
            prev(signum, frame)
        # SIG_DFL/SIG_IGN: the wait ends with WaitInterruptedError, which unwinds the process cleanly.

    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(ValueError, OSError):
            previous[sig] = signal.signal(sig, handler)
    try:
        yield event
    finally:
        for sig, prev in previous.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(sig, prev)
