"""The wait's signal hook: installed for the signals the process handles, never over one it ignores."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

from hyperion_lock import stop_requested


def test_an_ignored_signal_stays_ignored_during_a_wait() -> None:
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        async def wait() -> tuple[Any, Any, bool]:
            with stop_requested() as stop:
                inside = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
                os.kill(os.getpid(), signal.SIGINT)  # dropped by the kernel: nothing can mark the request
                await asyncio.sleep(0)
                return (*inside, stop.is_set())

        sigint, sigterm, stopped = asyncio.run(wait())
        assert sigint == signal.SIG_IGN
        assert callable(sigterm) and sigterm != signal.SIG_DFL  # the hook is there for the signal not ignored
        assert not stopped
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
