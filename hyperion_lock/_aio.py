"""Two asyncio helpers: awaiting something to its real end through cancellation, and cancelling tasks for sure.

A cancellation can be lost on Python < 3.12: ``asyncio.wait_for`` (redis-py awaits socket writes with it) returns
its call's result instead of raising ``CancelledError`` when the cancel arrives as the call completes. A task
that loops over Redis calls then simply carries on. Stopping a task therefore never relies on one ``cancel()``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection
from typing import Any, TypeVar

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


async def cancel_and_wait(tasks: Collection[asyncio.Future[Any]], patience: float = 0.2, rounds: int = 50) -> bool:
    """Cancel ``tasks`` and wait until they ended, cancelling again every ``patience`` seconds whatever is still
    running (its cancel was lost, see above), at most ``rounds`` times; return whether all ended. A task that
    ignores cancellation on purpose is left running after ``patience * rounds`` seconds (10 s by default)."""
    pending = {t for t in tasks if not t.done()}
    for _ in range(rounds):
        if not pending:
            return True
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=patience)
    return not pending
