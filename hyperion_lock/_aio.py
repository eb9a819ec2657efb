"""Three asyncio helpers: awaiting something to its real end through cancellation, cancelling tasks for sure, and
awaiting a store call with a timeout that tells a busy worker from a dead Redis (:func:`within`).

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


async def within(awaitable: Awaitable[T], timeout: float, alive: Callable[[float], bool] | None = None,
                 cap: float = 1.0) -> T:
    """Await in the calling task with a timeout that does not mistake a busy worker for a dead Redis.

    At the deadline a timer decides: if it fired late because the event loop was busy (a burst of requests: the
    reply may sit unread in a socket), or ``alive(since)`` says Redis answered other calls during the last
    ``timeout`` (alive, only slow to us), the deadline moves on (by ``timeout``, or twice the lateness), never
    past ``cap`` seconds in all; otherwise the call is cancelled and ``TimeoutError`` raised. A dead or stopped
    Redis answers nothing: an idle loop then times out after ``timeout`` exactly. No extra task per call.

    The cancel can be lost (Python < 3.12, see above): a write to a stopped Redis completes at once, into
    the socket buffer, and the call then waits for a reply until redis-py's own socket timeout (seconds). So the
    call is cancelled again every ``timeout`` until it ends.
    """
    try:
        return await _within(awaitable, timeout, alive, cap)
    except TimeoutError as exc:
        if str(exc):
            raise
        raise TimeoutError(f"no reply within {timeout * 1000:.0f} ms") from None


async def _within(awaitable: Awaitable[T], timeout: float, alive: Callable[[float], bool] | None,
                  cap: float) -> T:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    started = loop.time()
    insisted = 0  # cancels repeated after a lost one; taken back at the end, so the timeout still reads as one
    async with asyncio.timeout(None) as limit:
        timer: asyncio.TimerHandle | None = None

        def check(deadline: float) -> None:
            nonlocal timer
            now = loop.time()
            late = now - deadline
            busy = late >= timeout / 2 or (alive is not None and alive(now - timeout))
            if busy and now - started < cap:
                later = min(now + max(timeout, 2 * late), started + cap)
                timer = loop.call_at(later, check, later)
            else:
                limit.reschedule(now)  # expire now: cancels the call, raises TimeoutError here
                timer = loop.call_at(now + timeout, insist)

        def insist() -> None:
            nonlocal timer, insisted
            insisted += 1
            task.cancel()
            timer = loop.call_at(loop.time() + timeout, insist)

        timer = loop.call_at(started + timeout, check, started + timeout)
        try:
            return await awaitable
        finally:
            timer.cancel()
            for _ in range(insisted):
                task.uncancel()
