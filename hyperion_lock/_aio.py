"""One asyncio helper: awaiting something to its real end, even through cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def to_the_end(
    awaitable: Awaitable[T], on_cancel: Callable[[asyncio.Future[T]], object] | None = None
) -> tuple[asyncio.Future[T], bool]:
    """Await ``awaitable`` until it has really finished; return its future and whether *this* task was cancelled
    meanwhile (the caller re-raises ``CancelledError`` once it has cleaned up).

    A cancellation of the awaiting task does not reach the awaitable (it is shielded), except through
    ``on_cancel`` (e.g. ``Future.cancel`` for an async job, which stops at its next ``await``). A thread cannot be
    cancelled at all: a sync job keeps running, and so this keeps waiting, until it returns.
    """
    future = asyncio.ensure_future(awaitable)
    cancelled = False
    while not future.done():
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            if future.done():
                break
            cancelled = True
            if on_cancel is not None:
                on_cancel(future)
        except BaseException:
            if not future.done():  # not the awaitable's own error (e.g. KeyboardInterrupt in the loop)
                raise
    return future, cancelled
