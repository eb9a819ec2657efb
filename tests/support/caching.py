"""Single flight across workers, made certain: the tests of the cache on Sentinel, Cluster and TLS use it to show
that the callers of another worker really waited for one computation (instead of arriving after it and hitting)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from hyperion_lock import Cache
from hyperion_lock.cache.engine import Engine
from hyperion_lock.cache.store import Message


class Waits:
    """Counts the callers, in any cache of this process, that began waiting for another's computation (listening
    for its message)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        wait = Engine._wait

        async def waiting(future: asyncio.Future[Message] | None, timeout: float) -> Message | None:
            self.count += future is not None
            return await wait(future, timeout)

        monkeypatch.setattr(Engine, "_wait", staticmethod(waiting))


async def computed_once(caches: list[Cache], waits: Waits, namespace: str, key: str, value: Any,
                        per_cache: int = 3, timeout: float = 20.0, **options: Any) -> tuple[int, list[Any]]:
    """The first cache starts computing ``value``; ``per_cache`` callers of every other cache then ask for it, and
    the computation is held until every other cache waits for its message (a cache's concurrent callers share one
    wait). Returns (how many times it was computed, every caller's result)."""
    started, gate = asyncio.Event(), asyncio.Event()
    runs = 0

    async def compute() -> Any:
        nonlocal runs
        runs += 1
        started.set()
        await gate.wait()
        return value

    async with asyncio.timeout(timeout):
        first = asyncio.create_task(caches[0].get_or_compute(namespace, key, compute, **options))
        await started.wait()
        before = waits.count
        others = [asyncio.create_task(c.get_or_compute(namespace, key, compute, **options))
                  for c in caches[1:] for _ in range(per_cache)]
        while waits.count - before < len(caches) - 1:
            await asyncio.sleep(0.01)
            assert not any(t.done() for t in others), "a caller returned before the computation finished"
        gate.set()
        results = [await first, *await asyncio.gather(*others)]
    return runs, results
