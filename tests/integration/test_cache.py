"""The cache core on a real Redis (and in process memory): single flight across workers, errors, takeover,
invalidation, freshness, values, and failing open when Redis is paused, killed or out of memory.

Each Cache instance stands for one worker: it has its own clients, flights and breaker, exactly as in a
separate process; one test runs a real separate process. Every wait is bounded; nothing asserts a duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis
from pydantic import BaseModel
from redis.crc import key_slot

from hyperion_lock import (
    Cache,
    CacheComputeError,
    CacheSerializationError,
    CacheStatus,
    Settings,
)
from hyperion_lock.cache.codec import JsonCodec, PickleCodec
from hyperion_lock.cache.engine import Engine
from hyperion_lock.cache.keys import CacheKeys, key_identity
from hyperion_lock.cache.near import NearCache
from hyperion_lock.cache.policy import Health
from hyperion_lock.cache.store import MemoryStore, Message, Read, RedisStore, close_quietly
from hyperion_lock.cli.main import main
from hyperion_lock.cli.status import cache_report
from hyperion_lock.testing import RedisServer
from tests.support import ROOT, until

pytestmark = pytest.mark.integration
LOGGER = "hyperion_lock.cache.facade"


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def make(url: str | None, prefix: str, **overrides: Any) -> Cache:
    return Cache(url, settings=Settings(redis_url=None, key_prefix=prefix), **overrides)


class Counter:
    """A computation that counts its runs and returns a typed value; optionally waits for ``gate``."""

    def __init__(self, gate: asyncio.Event | None = None, fail: Exception | None = None) -> None:
        self.runs = 0
        self.started = asyncio.Event()
        self.gate = gate
        self.fail = fail

    async def __call__(self) -> Quote:
        self.runs += 1
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        else:
            await asyncio.sleep(0.05)
        if self.fail is not None:
            raise self.fail
        return Quote(symbol="AAPL", run=self.runs, at=dt.datetime.now(dt.UTC))


class Quote(BaseModel):
    symbol: str
    run: int
    at: dt.datetime


class Spy:
    """What the Redis stores of this process did: every read's reply, and how many callers began waiting for
    another's computation (listening for its message)."""

    def __init__(self) -> None:
        self.reads: list[Read] = []
        self.sent = 0  # reads sent, answered or not
        self.waits = 0


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Spy:
    seen = Spy()
    original, wait = RedisStore.read, Engine._wait

    async def read(self: RedisStore, *args: Any, **kwargs: Any) -> Read:
        seen.sent += 1
        reply = await original(self, *args, **kwargs)
        seen.reads.append(reply)
        return reply

    async def waiting(future: asyncio.Future[Message] | None, timeout: float) -> Message | None:
        seen.waits += future is not None
        return await wait(future, timeout)

    monkeypatch.setattr(RedisStore, "read", read)
    monkeypatch.setattr(Engine, "_wait", staticmethod(waiting))
    return seen


def refreshing(*caches: Cache) -> bool:
    """Whether a background refresh of any of these caches is still running (computing or storing)."""
    return any(ctx.refreshing for c in caches for ctx in c._engine.loops.values())


async def close(*caches: Cache) -> None:
    for c in caches:
        await c.aclose()


# -- single flight ------------------------------------------------------------------------------------------------
async def test_concurrent_misses_in_many_workers_compute_once(redis_url: str, prefix: str) -> None:
    workers = [make(redis_url, prefix) for _ in range(4)]
    compute = Counter()
    try:
        async with asyncio.timeout(20):
            results = await asyncio.gather(*[
                w.get_or_compute("quotes", {"symbol": "AAPL", "range": "1d"}, compute, ttl=30, returns=Quote)
                for w in workers for _ in range(8)
            ])
        assert compute.runs == 1
        assert {r.run for r in results} == {1} and all(isinstance(r.at, dt.datetime) for r in results)
        assert len({id(r) for r in results}) == len(results)  # every caller gets its own copy
        # The same key in another order is the same entry: a hit, no computation.
        again = await workers[0].get_or_compute("quotes", {"range": "1d", "symbol": "AAPL"}, compute, ttl=30,
                                                returns=Quote)
        assert again.run == 1 and compute.runs == 1
        totals = [w.stats()["quotes"] for w in workers]
        assert sum(t["misses"] for t in totals) == 1 and sum(t["computations"] for t in totals) == 1
        assert sum(t["hits"] for t in totals) == 32
    finally:
        await close(*workers)


async def test_an_error_reaches_every_waiter_at_once_and_is_not_cached(redis_url: str, prefix: str,
                                                                         spy: Spy) -> None:
    """The waiters' lease wait is 30 s, so only the published error can end their wait within the bound."""
    leader, other = make(redis_url, prefix, lease_ttl=30), make(redis_url, prefix, lease_ttl=30)
    gate = asyncio.Event()
    failing = Counter(gate, fail=ValueError("upstream said no"))
    spare = Counter()
    try:
        async with asyncio.timeout(10):
            first = asyncio.create_task(leader.get_or_compute("q", "k", failing, ttl=30, returns=Quote))
            await failing.started.wait()
            waiters = [asyncio.create_task(other.get_or_compute("q", "k", spare, ttl=30, returns=Quote))
                       for _ in range(3)]
            await until(lambda: spy.waits >= 1, "a waiter listens for the holder's message")
            gate.set()
            with pytest.raises(ValueError, match="upstream said no"):
                await first  # the computing caller gets its own exception
            for waiter in waiters:
                with pytest.raises(CacheComputeError, match="ValueError: upstream said no") as info:
                    await waiter
                assert info.value.error_type == "ValueError" and info.value.runner
        assert spare.runs == 0  # nobody took over: they got the error
        # Errors are not cached: the next call computes again.
        assert (await other.get_or_compute("q", "k", spare, ttl=30, returns=Quote)).run == 1
        assert other.stats()["q"]["errors"] == 3 and leader.stats()["q"]["errors"] == 1
    finally:
        await close(leader, other)


async def test_errors_are_cached_only_when_asked(redis_url: str, prefix: str) -> None:
    cache = make(redis_url, prefix)
    failing = Counter(fail=RuntimeError("bad"))
    try:
        for _ in range(2):
            with pytest.raises((RuntimeError, CacheComputeError)):
                await cache.get_or_compute("q", "k", failing, ttl=30, cache_errors=True, error_ttl=30, returns=Quote)
        assert failing.runs == 1
    finally:
        await close(cache)


_LEADER = """
import asyncio, sys
from hyperion_lock import Cache, Settings

async def main() -> None:
    cache = Cache(sys.argv[1], settings=Settings(key_prefix=sys.argv[2]), lease_ttl=1.0)

    async def compute() -> str:
        print("computing", flush=True)
        await asyncio.sleep(120)
        return "from the dead"

    await cache.get_or_compute("q", "k", compute, ttl=30)

asyncio.run(main())
"""


async def test_a_waiter_takes_over_when_the_computing_process_is_killed(redis_url: str, prefix: str,
                                                                        spy: Spy) -> None:
    proc = subprocess.Popen(  # noqa: ASYNC220 -- started once, before anything waits
        [sys.executable, "-c", _LEADER, redis_url, prefix], cwd=ROOT, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT)
    workers = [make(redis_url, prefix, lease_ttl=1.0) for _ in range(2)]
    runs = 0

    async def compute() -> str:
        nonlocal runs
        runs += 1
        return "taken over"

    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)  # type: ignore[union-attr]
        assert line.strip() == "computing", line
        async with asyncio.timeout(20):
            calls = [asyncio.create_task(w.get_or_compute("q", "k", compute, ttl=30)) for w in workers for _ in "abc"]
            await until(lambda: spy.waits >= 2, "both workers wait")
            proc.kill()
            results = await asyncio.gather(*calls)
        assert results == ["taken over"] * 6
        assert runs == 1  # one waiter took over, everywhere
    finally:
        proc.kill()
        proc.communicate()
        await close(*workers)


async def test_a_lost_cancellation_does_not_keep_a_finished_computation_waiting(
        prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """On Python < 3.12 ``asyncio.wait_for`` (redis-py's socket writes use it) drops a cancellation that arrives as
    its call completes. The renewer of a finished computation was stopped by cancelling it: such a lost cancel
    left the computation waiting for it forever, renewing its lease, and every other worker waited for the lease
    (seen under gunicorn: a request hung, the others computed after ``wait_timeout``)."""
    original = MemoryStore.renew
    renewing = asyncio.Event()

    async def renew_dropping_the_cancel(self: MemoryStore, *args: Any) -> bool:
        if not renewing.is_set():  # the first renewal is in flight when the computation ends
            renewing.set()
            # What Python 3.11's wait_for does when the reply arrives with the cancellation: the cancel is lost.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.05)
        return await original(self, *args)

    monkeypatch.setattr(MemoryStore, "renew", renew_dropping_the_cancel)
    cache = make(None, prefix, lease_ttl=0.3)

    async def compute() -> str:
        await renewing.wait()
        return "value"

    try:
        async with asyncio.timeout(10):
            assert await cache.get_or_compute("q", "k", compute, ttl=30) == "value"
            assert await cache.get_or_compute("q", "k", compute, ttl=30) == "value"
    finally:
        await close(cache)


async def test_slow_renewals_do_not_hand_the_entry_to_a_second_computation(
        redis_url: str, prefix: str, spy: Spy, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each renewal takes longer than the request path's 50 ms timeout (a loaded Redis or worker). Renewals were
    bound by that timeout and by the breaker: two slow ones opened it, renewing stopped, the lease expired and
    the other worker computed the entry a second time (two values served). Now one computation runs."""
    original = RedisStore.renew
    renewed: list[bool] = []  # the result of every slow renewal that completed

    async def slow_renew(self: RedisStore, *args: Any) -> bool:
        await asyncio.sleep(0.1)
        held = await original(self, *args)
        renewed.append(held)
        return held

    monkeypatch.setattr(RedisStore, "renew", slow_renew)
    workers = [make(redis_url, prefix, lease_ttl=0.6) for _ in range(2)]
    gate, counter = asyncio.Event(), Counter()
    counter.gate = gate
    try:
        async with asyncio.timeout(20):
            first = asyncio.create_task(workers[0].get_or_compute("q", "k", counter, ttl=30, returns=Quote))
            await counter.started.wait()
            other = asyncio.create_task(workers[1].get_or_compute("q", "k", counter, ttl=30, returns=Quote))
            await until(lambda: spy.waits >= 1, "the other worker waits")
            # Several lease lifetimes of slow renewals while the computation runs (one every ~0.3 s).
            await until(lambda: len(renewed) >= 5, "5 slow renewals completed")
            gate.set()
            results = [await first, await other]
        assert counter.runs == 1 and results[0] == results[1]
        assert all(renewed[:5]), renewed  # the lease was still held at each of them
    finally:
        await close(*workers)


# -- invalidation -------------------------------------------------------------------------------------------------
async def test_invalidation_by_key_tag_and_namespace_is_seen_by_every_worker(redis_url: str, prefix: str) -> None:
    a, b = make(redis_url, prefix), make(redis_url, prefix)
    runs: dict[str, int] = {}

    def compute(name: str) -> Callable[[], Any]:
        async def run() -> str:
            runs[name] = runs.get(name, 0) + 1
            return f"{name}#{runs[name]}"
        return run

    async def get(c: Cache, name: str, tags: tuple[str, ...]) -> str:
        return str(await c.get_or_compute("q", {"k": name}, compute(name), ttl=60, tags=tags))

    try:
        assert await get(a, "aapl-1d", ("symbol:AAPL",)) == "aapl-1d#1"
        assert await get(a, "aapl-5d", ("symbol:AAPL",)) == "aapl-5d#1"
        assert await get(a, "msft", ("symbol:MSFT",)) == "msft#1"
        assert await get(b, "aapl-1d", ("symbol:AAPL",)) == "aapl-1d#1"  # b sees a's entries
        assert await b.invalidate_tag("q", "symbol:AAPL") == 2
        assert await get(a, "aapl-1d", ("symbol:AAPL",)) == "aapl-1d#2"  # a sees b's invalidation at once
        assert await get(a, "aapl-5d", ("symbol:AAPL",)) == "aapl-5d#2"
        assert await get(a, "msft", ("symbol:MSFT",)) == "msft#1"  # other tags untouched
        assert await a.invalidate("q", {"k": "msft"}) == 1
        assert await get(b, "msft", ("symbol:MSFT",)) == "msft#2"
        assert await a.invalidate_namespace("q") == 3
        assert await get(b, "aapl-1d", ("symbol:AAPL",)) == "aapl-1d#3"
        assert await get(b, "msft", ("symbol:MSFT",)) == "msft#3"
        # Everything of the namespace lives in one slot; nothing was enumerated with KEYS/SCAN to get here.
        client = redis.Redis.from_url(redis_url)
        try:
            names = list(client.scan_iter(match=f"{prefix}:cache:{{q}}:*"))
            assert names and len({key_slot(n) for n in names}) == 1
            assert client.sismember(CacheKeys.registry(prefix), "q")
        finally:
            client.close()
    finally:
        await close(a, b)


def near_of(cache: Cache) -> NearCache:
    (ctx,) = cache._engine.loops.values()
    assert ctx.near is not None
    return ctx.near


async def test_fresh_hits_come_from_the_near_cache_until_the_channel_says_otherwise(redis_url: str, prefix: str,
                                                                                     spy: Spy) -> None:
    """Worker b serves a fresh entry it read once with no Redis call; every change made elsewhere reaches it
    through the namespace's channel, and once b has handled that message it never serves the old entry again.
    Its own invalidations apply to it at once; a broken pub/sub connection drops everything."""
    a, b = make(redis_url, prefix), make(redis_url, prefix)
    runs: dict[str, int] = {}

    async def get(c: Cache, name: str, *, force: bool = False) -> str:
        async def run() -> str:
            runs[name] = runs.get(name, 0) + 1
            return f"{name}#{runs[name]}"
        spec = c._spec("q", ttl=60, codec=JsonCodec(str))
        return str(c._value_of(spec, await c._lookup(spec, key_identity({"k": name}), ("t",), run, force=force)))

    async def kept(name: str, value: str) -> None:
        """b reads ``name`` again until it keeps it (a read that raced with a message on the channel, such as
        the "stored" of its own write, is not kept); then hits make no Redis call."""
        for _ in range(20):
            assert await get(b, name) == value
            if near_of(b).get(channel, key_identity({"k": name}), time.monotonic()) is not None:
                break
        reads = len(spy.reads)
        assert [await get(b, name) for _ in range(5)] == [value] * 5
        assert len(spy.reads) == reads

    async def heard_by_b(change: Awaitable[Any]) -> None:
        before = near_of(b).epoch(channel)
        await change
        await until(lambda: near_of(b).epoch(channel) != before, "b handled the channel's message")

    channel = a._keys("q").channel
    try:
        async with asyncio.timeout(30):
            assert await get(a, "k") == "k#1"
            assert await get(b, "k") == "k#1"  # read from Redis; b starts listening to the namespace
            await until(lambda: near_of(b).epoch(channel) is not None, "b listens to the namespace")
            await kept("k", "k#1")
            await heard_by_b(a.invalidate("q", {"k": "k"}))  # by key, in another worker
            assert await get(b, "k") == "k#2"
            await kept("k", "k#2")
            await heard_by_b(a.invalidate_tag("q", "t"))  # by tag
            assert await get(b, "k") == "k#3"
            await kept("k", "k#3")
            await heard_by_b(a.invalidate_namespace("q"))  # the whole namespace
            assert await get(b, "k") == "k#4"
            await kept("k", "k#4")
            await heard_by_b(get(a, "k", force=True))  # a new value written by another worker
            assert await get(b, "k") == "k#5"
            await kept("k", "k#5")
            assert await b.invalidate("q", {"k": "k"}) == 1  # its own invalidation: at once, no message needed
            assert await get(b, "k") == "k#6"
            await kept("k", "k#6")
            admin = redis.Redis.from_url(redis_url)
            try:
                admin.client_kill_filter(_type="pubsub")  # messages may be lost from here: nothing is kept
            finally:
                admin.close()
            await until(lambda: len(near_of(b)) == 0, "b dropped its near cache")
            reads = len(spy.reads)
            assert await get(b, "k") == "k#6" and len(spy.reads) == reads + 1
    finally:
        await close(a, b)


async def test_invalidation_during_a_computation_fences_its_write(redis_url: str, prefix: str) -> None:
    """A value computed from data older than the invalidation must not be stored after it."""
    a, b = make(redis_url, prefix), make(redis_url, prefix)
    gate = asyncio.Event()
    slow, fresh = Counter(gate), Counter()
    try:
        async with asyncio.timeout(10):
            invalidations: list[Callable[[], Awaitable[int]]] = [
                lambda: b.invalidate_tag("q", "t"), lambda: b.invalidate_namespace("q"), lambda: b.invalidate("q", "k")]
            for invalidate in invalidations:
                gate.clear()
                slow.started.clear()
                task = asyncio.create_task(a.get_or_compute("q", "k", slow, ttl=60, tags=("t",), returns=Quote))
                await slow.started.wait()
                await invalidate()
                gate.set()
                assert (await task).run == slow.runs  # its caller still gets the value it asked for...
                before = fresh.runs
                await b.get_or_compute("q", "k", fresh, ttl=60, tags=("t",), returns=Quote)
                assert fresh.runs == before + 1  # ...but it was not stored
                await b.invalidate("q", "k")
    finally:
        await close(a, b)



def _redis_ms(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return seconds * 1000 + micros / 1000


async def _redis_clock_passes(client: redis.Redis, when_ms: float) -> None:
    """Until Redis's own clock (the one the scripts' expiries use) is past ``when_ms``; bounded."""
    await until(lambda: _redis_ms(client) > when_ms, f"Redis's clock past {when_ms:.0f} ms", timeout=10)


@pytest.mark.parametrize("how", ["another entry of the tag stored later", "the tag index outlived by the lease"])
async def test_a_tag_invalidation_fences_a_computation_that_outlived_its_first_lease(
    redis_url: str, prefix: str, how: str
) -> None:
    """A computation longer than its lease TTL keeps renewing its lease; a tag invalidation during it must still
    fence its write. It once did not: the lease's registration in the tag index (what tag invalidation reads to
    find computations in flight) carried the first TTL's expiry and was never renewed, so the next PUT of any
    entry of that tag trimmed it; and the index key itself kept the life of an earlier, shorter entry and expired
    with the registration in it (that half needs no renewal: an index key created by a lease, then given a shorter
    entry's life by its PUT). Either way the old value was stored after the invalidation returned, and served. The
    cache model (tests/unit/test_cache_model.py) finds both with the scripts as they were."""
    lease_ttl = 0.3
    a, b = make(redis_url, prefix, lease_ttl=lease_ttl), make(redis_url, prefix, lease_ttl=lease_ttl)
    client = redis.Redis.from_url(redis_url)
    data = {"v": "old"}
    started, gate = asyncio.Event(), asyncio.Event()

    async def slow() -> str:
        seen = data["v"]  # what the computation read: the data before the change below
        started.set()
        await gate.wait()
        return seen

    try:
        async with asyncio.timeout(30):
            if how == "the tag index outlived by the lease":  # an entry of the tag whose life ends first
                await b.get_or_compute("n", "short", lambda: "s", ttl=0.2, tags=("t",))
            task = asyncio.create_task(a.get_or_compute("n", "k", slow, ttl=60, tags=("t",)))
            await started.wait()
            # Past the first lease TTL (and the short entry's life) by Redis's clock: the lease was renewed.
            await _redis_clock_passes(client, _redis_ms(client) + 3 * lease_ttl * 1000)
            if how == "another entry of the tag stored later":
                await b.get_or_compute("n", "other", lambda: "o", ttl=60, tags=("t",))
            data["v"] = "new"
            await b.invalidate_tag("n", "t")
            gate.set()
            assert await task == "old"  # its caller still gets the value it computed...
            served = await b.get_or_compute("n", "k", lambda: data["v"], ttl=60, tags=("t",))
            assert served == "new", "a value computed before the invalidation was stored and served after it"
    finally:
        client.close()
        await close(a, b)



@pytest.mark.parametrize("index", ["tag", "namespace"])
async def test_a_foreign_value_at_an_index_key_is_dropped_not_a_failing_redis(
    redis_url: str, prefix: str, index: str
) -> None:
    """Someone wrote a string where the cache keeps a tag's or the namespace's index (a sorted set). Every script
    that touched it failed with WRONGTYPE: the breaker took that for a failing Redis and the worker stopped
    caching every namespace, and invalidating the tag raised. The scripts now drop such a key, as they drop an
    unreadable entry: the entry is cached once, and the tag invalidation finds it."""
    cache = make(redis_url, prefix)
    client = redis.Redis.from_url(redis_url)
    keys = CacheKeys(prefix, "n")
    foreign = keys.tag_index("t") if index == "tag" else keys.index
    client.set(foreign, "not a sorted set")
    runs = Counter()
    try:
        for _ in range(3):
            await cache.get_or_compute("n", "k", runs, ttl=60, tags=("t",), returns=Quote)
        assert runs.runs == 1  # cached: neither computed directly nor refused by a breaker
        assert client.type(foreign) == b"zset"
        assert await cache.invalidate_tag("n", "t") == 1
        await cache.get_or_compute("n", "k", runs, ttl=60, tags=("t",), returns=Quote)
        assert runs.runs == 2
    finally:
        client.close()
        await close(cache)


# -- freshness ----------------------------------------------------------------------------------------------------
def _age_entry(url: str, prefix: str, namespace: str, left_ms: int) -> None:
    """Move every entry of a namespace to a point of its life: ``left_ms`` of life remaining (Redis's clock)."""
    client = redis.Redis.from_url(url)
    try:
        for name in client.scan_iter(match=CacheKeys(prefix, namespace).entry("*")):
            client.pexpire(name, left_ms)
    finally:
        client.close()


async def test_stale_entries_are_served_while_exactly_one_worker_refreshes(redis_url: str, prefix: str) -> None:
    workers = [make(redis_url, prefix) for _ in range(3)]
    compute = Counter()
    spec = [w._spec("q", ttl=30, stale=60, codec=JsonCodec(Quote)) for w in workers]
    try:
        async with asyncio.timeout(10):
            first = await workers[0]._lookup(spec[0], "k", (), compute)
            assert first.status is CacheStatus.MISS
            _age_entry(redis_url, prefix, "q", left_ms=30_000)  # 30 s past its TTL, 30 s of the stale period left
            served = await asyncio.gather(*[w._lookup(s, "k", (), compute) for w, s in zip(workers, spec, strict=True)
                                            for _ in range(4)])
            assert {r.status for r in served} == {CacheStatus.STALE} and {r.etag for r in served} == {first.etag}
            assert all(r.max_age == 0 and r.age >= 30 for r in served)
            await until(lambda: compute.runs == 2, "one background refresh")
            await until(lambda: not refreshing(*workers), "refresh stored")
            after = await workers[2]._lookup(spec[2], "k", (), compute)
        assert after.status is CacheStatus.HIT and after.etag != first.etag and after.max_age >= 29
        assert compute.runs == 2
    finally:
        await close(*workers)


async def test_hot_keys_are_refreshed_once_before_they_expire(redis_url: str, prefix: str) -> None:
    workers = [make(redis_url, prefix) for _ in range(3)]
    compute = Counter()
    spec = [w._spec("q", ttl=30, refresh_ahead=10, codec=JsonCodec(Quote)) for w in workers]
    try:
        async with asyncio.timeout(10):
            first = await workers[0]._lookup(spec[0], "k", (), compute)
            _age_entry(redis_url, prefix, "q", left_ms=5_000)  # fresh for 5 s more: inside the refresh window
            served = await asyncio.gather(*[w._lookup(s, "k", (), compute) for w, s in zip(workers, spec, strict=True)
                                            for _ in range(4)])
            assert {r.status for r in served} == {CacheStatus.HIT} and {r.etag for r in served} == {first.etag}
            await until(lambda: compute.runs == 2, "one early refresh")
            await until(lambda: not refreshing(*workers), "stored")
            after = await workers[1]._lookup(spec[1], "k", (), compute)
        assert after.status is CacheStatus.HIT and after.etag != first.etag and compute.runs == 2
    finally:
        await close(*workers)


async def test_memory_mode_has_the_same_semantics_inside_one_worker(prefix: str) -> None:
    now = [1000.0]
    cache = Cache(None, settings=Settings(redis_url=None, key_prefix=prefix), clock=lambda: now[0])
    assert not cache.uses_redis and "memory" in cache.describe()
    compute = Counter()
    spec = cache._spec("q", ttl=30, stale=10, refresh_ahead=3, codec=JsonCodec(Quote))
    try:
        async with asyncio.timeout(10):
            results = await asyncio.gather(*[cache._lookup(spec, "k", ("t",), compute) for _ in range(8)])
            assert compute.runs == 1 and sorted(r.status for r in results).count(CacheStatus.MISS) == 1
            now[0] += 28  # 2 s fresh left: early refresh, once
            assert (await cache._lookup(spec, "k", ("t",), compute)).status is CacheStatus.HIT
            await until(lambda: compute.runs == 2 and not refreshing(cache), "early refresh")
            now[0] += 35  # past the refreshed entry's TTL, within its stale period
            stale = await cache._lookup(spec, "k", ("t",), compute)
            assert stale.status is CacheStatus.STALE
            await until(lambda: compute.runs == 3 and not refreshing(cache), "stale refresh")
            now[0] += 100  # past the stale period: a miss
            assert (await cache._lookup(spec, "k", ("t",), compute)).status is CacheStatus.MISS
            assert await cache.invalidate_tag("q", "t") == 1
            assert (await cache._lookup(spec, "k", ("t",), compute)).status is CacheStatus.MISS
            assert await cache.invalidate_namespace("q") == 1
            assert compute.runs == 5
    finally:
        await close(cache)


# -- values -------------------------------------------------------------------------------------------------------
async def test_value_limits_and_serialisation_errors_are_clear_on_first_use(redis_url: str, prefix: str) -> None:
    a, b = make(redis_url, prefix, max_size=200), make(redis_url, prefix, max_size=200)
    try:
        gate, started = asyncio.Event(), asyncio.Event()

        async def big() -> str:
            started.set()
            await gate.wait()
            return "x" * 1000

        async with asyncio.timeout(10):
            first = asyncio.create_task(a.get_or_compute("q", "big", big, ttl=30))
            await started.wait()
            waiter = asyncio.create_task(b.get_or_compute("q", "big", big, ttl=30))
            gate.set()
            assert await first == await waiter == "x" * 1000  # over max_size: served, not stored

        async def when() -> dt.datetime:
            return dt.datetime(2026, 1, 1)

        with pytest.raises(CacheSerializationError, match="does not survive JSON"):
            await a.get_or_compute("q", "untyped", when, ttl=30)  # no `returns`: would come back as a str
        assert await a.get_or_compute("q", "typed", when, ttl=30, returns=dt.datetime) == dt.datetime(2026, 1, 1)
        assert await b.get_or_compute("q", "typed", when, ttl=30, returns=dt.datetime) == dt.datetime(2026, 1, 1)
    finally:
        await close(a, b)


async def test_signed_pickle_roundtrips_and_a_foreign_entry_is_recomputed(redis_url: str, prefix: str,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """Pickle only when chosen, signed: a value comes back as itself; an entry signed with another key (written by
    anyone else who can reach Redis) is never unpickled: it is treated as unreadable, logged once, recomputed."""
    caplog.set_level(logging.WARNING, LOGGER)
    ours, theirs = make(redis_url, prefix), make(redis_url, prefix)
    runs = {"ours": 0, "theirs": 0}

    @ours.cached("p", ttl=30, codec="pickle", signing_key=b"a" * 32)
    async def values(x: int) -> set[int]:
        runs["ours"] += 1
        return {x, 2}

    async def forged() -> set[int]:
        runs["theirs"] += 1
        return {-1}

    try:
        assert await values(1) == {1, 2} and await values(1) == {1, 2} and runs["ours"] == 1
        with redis.Redis.from_url(redis_url) as client:
            (ident,) = [name.decode().split(":e2:", 1)[1]
                        for name in client.scan_iter(match=CacheKeys(prefix, "p").entry("*"))]
        assert await values.invalidate(1) == 1  # type: ignore[attr-defined]
        spec = theirs._spec("p", ttl=30, codec=PickleCodec(b"z" * 32))
        await theirs._lookup(spec, ident, (), forged)  # an entry under the same key, signed with another key
        assert await values(1) == {1, 2} and runs == {"ours": 2, "theirs": 1}  # not unpickled: recomputed
        assert "cannot be decoded" in caplog.text and "signature does not match" in caplog.text
    finally:
        await close(ours, theirs)


async def test_decorated_functions_key_by_arguments_and_leave_out_sessions(redis_url: str, prefix: str) -> None:
    cache = make(redis_url, prefix)
    runs = 0

    class Session:  # a per-request object: not part of the identity
        pass

    @cache.cached("fn", ttl=30, tags=lambda symbol, **_: [f"symbol:{symbol}"])
    async def quote(symbol: str, session: Session, days: int = 1, *, fields: tuple[str, ...] = ("p",)) -> Quote:
        nonlocal runs
        runs += 1
        return Quote(symbol=symbol, run=runs, at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC))

    try:
        q1 = await quote("AAPL", Session())
        assert isinstance(q1, Quote) and q1.at.tzinfo is not None
        assert (await quote(symbol="AAPL", session=Session(), days=1)).run == 1  # defaults applied, new session
        assert (await quote("AAPL", Session(), 2)).run == 2
        assert (await quote("AAPL", Session(), 1, fields=("p", "v"))).run == 3
        assert await cache.invalidate_tag("fn", "symbol:AAPL") == 3
        assert (await quote("AAPL", Session())).run == 4
    finally:
        await close(cache)


def test_sync_functions_in_threads_of_many_workers_compute_once(redis_url: str, prefix: str) -> None:
    workers = [make(redis_url, prefix) for _ in range(2)]
    runs = 0
    lock = threading.Lock()
    go = threading.Event()

    def slow_square(x: int) -> int:
        nonlocal runs
        with lock:
            runs += 1
        go.wait(10)
        return x * x

    fns = [w.cached("sync", ttl=30)(slow_square) for w in workers]
    results: list[int] = []
    threads = [threading.Thread(target=lambda f=f: results.append(f(7))) for f in fns for _ in range(4)]
    try:
        for t in threads:
            t.start()
        go.set()
        for t in threads:
            t.join(20)
        assert results == [49] * 8 and runs == 1
        assert workers[0].get_or_compute_sync("sync", "x", lambda: [1, 2], ttl=30) == [1, 2]
        assert workers[1].get_or_compute_sync("sync", "x", lambda: [3], ttl=30) == [1, 2]
        assert workers[1].invalidate_tag_sync("sync", "none") == 0
    finally:
        for w in workers:
            w.close()


def test_invalidate_sync_drops_exactly_one_entry_for_every_worker(redis_url: str, prefix: str) -> None:
    """The blocking twin of ``invalidate``: the key exactly as given (a mapping here), in Redis and in the
    near cache of the worker that invalidates; the other entry of the namespace stays."""
    workers = [make(redis_url, prefix) for _ in range(2)]
    runs = {"a": 0, "b": 0}

    def compute(name: str) -> Callable[[], str]:
        def run() -> str:
            runs[name] += 1
            return f"{name}{runs[name]}"
        return run

    try:
        for w in workers:
            assert w.get_or_compute_sync("inv", {"k": "a"}, compute("a"), ttl=30) == "a1"
            assert w.get_or_compute_sync("inv", {"k": "b"}, compute("b"), ttl=30) == "b1"
        assert workers[1].invalidate_sync("inv", {"k": "a"}) == 1
        assert workers[1].invalidate_sync("inv", {"k": "a"}) == 0  # already gone
        assert workers[1].invalidate_sync("inv", "a") == 0  # a string key is another entry than a mapping
        assert workers[1].get_or_compute_sync("inv", {"k": "a"}, compute("a"), ttl=30) == "a2"
        # Worker 0 computed "a" itself (a computed value is not kept in its near cache): read from Redis.
        assert workers[0].get_or_compute_sync("inv", {"k": "a"}, compute("a"), ttl=30) == "a2"
        assert workers[0].get_or_compute_sync("inv", {"k": "b"}, compute("b"), ttl=30) == "b1"
        assert runs == {"a": 2, "b": 1}
    finally:
        for w in workers:
            w.close()


# -- Redis trouble ------------------------------------------------------------------------------------------------
@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as s:
        yield s


def failing_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and "is failing" in r.getMessage()]


def timeouts(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and "failed (TimeoutError" in r.getMessage()]


def resumed(caplog: pytest.LogCaptureFixture) -> bool:
    return any("caching resumed" in r.getMessage() for r in caplog.records if r.name == LOGGER)


async def test_paused_redis_fails_open_logs_once_and_caching_resumes(server: RedisServer, prefix: str,
                                                                       caplog: pytest.LogCaptureFixture,
                                                                       spy: Spy) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    cache = make(server.url, prefix, op_timeout=0.05, breaker_retry=0.1, breaker_max_retry=0.2)
    compute = Counter()
    spec = cache._spec("q", ttl=60, codec=JsonCodec(Quote))
    try:
        async with asyncio.timeout(30):
            assert await cache.connect()
            assert (await cache._lookup(spec, "k", (), compute)).status is CacheStatus.MISS
            server.pause()  # SIGSTOP: connections stay open, nothing answers
            try:
                late = make(server.url, prefix)  # a worker starting now: its warm-up fails open
                assert not await late.connect(budget=0.2)
                await late.aclose()
                reads_before, sent = len(spy.reads), spy.sent
                statuses = [(await cache._lookup(spec, "k", (), compute)).status]
                assert spy.sent == sent + 1  # a request waits for Redis once (its read), then computes directly
                statuses += [(await cache._lookup(spec, "k", (), compute)).status for _ in range(2)]
                statuses += [r.status for r in await asyncio.gather(*[cache._lookup(spec, f"k{i}", (), compute)
                                                                     for i in range(20)])]
                # A timeout alone is not an outage: the liveness check sent after the first one is not answered
                # either, and only then does the breaker open.
                await until(lambda: len(failing_lines(caplog)) == 2, "the liveness check failed")
                assert "liveness check got no answer" in failing_lines(caplog)[-1]
                statuses += [(await cache._lookup(spec, "k", (), compute)).status for _ in range(3)]
                assert set(statuses) == {CacheStatus.BYPASS}
                assert len(failing_lines(caplog)) == 2, failing_lines(caplog)  # once per worker, not per request
                assert len(spy.reads) == reads_before  # no read ever completed; after the breaker opened, none tried
            finally:
                server.resume()
            await until(lambda: resumed(caplog), "caching resumed", timeout=15)
            assert (await cache._lookup(spec, "k", (), compute)).status is CacheStatus.HIT  # the entry survived
        assert cache.stats()["q"]["bypass"] == 26
    finally:
        await close(cache)


#: Keeps Redis busy (it answers nothing else) for ARGV[1] ms of its own clock, like a Redis starved of CPU.
STALL = """
local t = redis.call('TIME')
local until_us = (tonumber(t[1]) * 1000000 + tonumber(t[2])) + tonumber(ARGV[1]) * 1000
repeat t = redis.call('TIME') until tonumber(t[1]) * 1000000 + tonumber(t[2]) >= until_us
return 1
"""


async def test_a_busy_redis_is_not_taken_for_a_dead_one(server: RedisServer, prefix: str,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """Redis answers nothing for 600 ms or more (a long script: what a CPU-starved Redis looks like from a worker), far
    beyond the 50 ms timeout. The calls in that window time out, but the liveness check they send is answered
    once Redis is back: the breaker never opens, and the worker keeps caching instead of computing every request
    itself. (With a fixed timeout and 2 failures in a row, the second timed-out request opened it.)"""
    caplog.set_level(logging.DEBUG, LOGGER)
    # The check waits at least 5 s; every hit reads Redis (no near cache), so the timeout follows its replies.
    cache = make(server.url, prefix, op_timeout=0.05, op_timeout_max=10.0, near_max_entries=0)
    compute = Counter()
    spec = cache._spec("q", ttl=60, codec=JsonCodec(Quote))
    admin = redis.Redis(port=server.port)
    try:
        async with asyncio.timeout(30):
            assert await cache.connect()
            assert (await cache._lookup(spec, "k", (), compute)).status is CacheStatus.MISS
            for _ in range(20):  # fast replies: the timeout comes down to the floor
                assert (await cache._lookup(spec, "k", (), compute)).status is CacheStatus.HIT
            ctx = next(iter(cache._engine.loops.values()))
            # Longer than the timeout (so calls time out; on a loaded machine replies are slower), shorter than
            # the check's bound.
            stall_ms = min(3000, max(600, int(3000 * ctx.guard.timeout)))
            assert ctx.guard.probe_timeout > stall_ms / 1000 > ctx.guard.timeout
            during: list[CacheStatus] = []
            for _ in range(5):  # until a call timed out during a stall (the stall may begin after a lookup)
                stall = asyncio.ensure_future(asyncio.to_thread(admin.eval, STALL, 0, stall_ms))
                while not stall.done():
                    during.append((await cache._lookup(spec, f"x{len(during)}", (), compute)).status)
                await stall
                if timeouts(caplog):
                    break
            assert timeouts(caplog)
            await until(lambda: ctx.guard.state is Health.CLOSED, "the liveness check answered")
            assert not failing_lines(caplog), failing_lines(caplog)
            assert set(during) <= {CacheStatus.BYPASS, CacheStatus.MISS}
            # Caching goes on: a new entry is stored and then served.
            assert (await cache._lookup(spec, "after", (), compute)).status is CacheStatus.MISS
            assert (await cache._lookup(spec, "after", (), compute)).status is CacheStatus.HIT
            assert not failing_lines(caplog)
    finally:
        admin.close()
        await close(cache)


async def test_an_opened_breaker_drops_the_near_cache(server: RedisServer, prefix: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """While Redis is only suspected (a timeout, the check still out), this worker's near cache keeps serving; once
    the breaker opens (this worker may be cut off from Redis, and so from the invalidation messages) it is
    dropped, and nothing is served from it until Redis answers again."""
    caplog.set_level(logging.INFO, LOGGER)
    cache = make(server.url, prefix, breaker_retry=0.1, breaker_max_retry=0.2)
    compute = Counter()
    spec = cache._spec("q", ttl=60, codec=JsonCodec(Quote))
    ident = key_identity({"k": "k"})
    try:
        async with asyncio.timeout(30):
            assert (await cache._lookup(spec, ident, (), compute)).status is CacheStatus.MISS
            near = near_of(cache)
            for _ in range(50):  # read until kept (the first reads come before the channel is confirmed)
                assert (await cache._lookup(spec, ident, (), compute)).status is CacheStatus.HIT
                if near.get(spec.keys.channel, ident, time.monotonic()) is not None:
                    break
            assert len(near) == 1
            server.pause()
            try:
                assert (await cache._lookup(spec, ident, (), compute)).status is CacheStatus.HIT  # no Redis call
                assert (await cache._lookup(spec, "other", (), compute)).status is CacheStatus.BYPASS
                await until(lambda: len(failing_lines(caplog)) == 1, "the breaker opened")
                assert len(near) == 0
                assert (await cache._lookup(spec, ident, (), compute)).status is CacheStatus.BYPASS
            finally:
                server.resume()
            await until(lambda: resumed(caplog), "caching resumed")
            assert (await cache._lookup(spec, ident, (), compute)).status is CacheStatus.HIT  # from Redis again
    finally:
        await close(cache)


async def test_killed_and_restarted_redis_and_oom_fail_open(server: RedisServer, prefix: str,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    cache = make(server.url, prefix, breaker_retry=0.1, breaker_max_retry=0.2)
    compute = Counter()
    spec = cache._spec("q", ttl=60, codec=JsonCodec(Quote))
    try:
        async with asyncio.timeout(40):
            assert (await cache._lookup(spec, "k", (), compute)).status is CacheStatus.MISS
            server.kill()
            assert {(await cache._lookup(spec, "k", (), compute)).status for _ in range(5)} == {CacheStatus.BYPASS}
            server.start()  # same port, empty (no persistence)
            await until(lambda: resumed(caplog), "caching resumed after restart", timeout=15)
            assert (await cache._lookup(spec, "k", (), compute)).status is CacheStatus.MISS
            assert (await cache._lookup(spec, "k", (), compute)).status is CacheStatus.HIT
            caplog.clear()
            admin = redis.Redis(port=server.port)
            try:
                admin.config_set("maxmemory-policy", "noeviction")
                admin.config_set("maxmemory", 1)  # every write refused: OOM
                statuses = {(await cache._lookup(spec, f"oom{i}", (), compute)).status for i in range(5)}
                assert statuses == {CacheStatus.BYPASS}
                assert len(failing_lines(caplog)) == 1 and "out of memory" in failing_lines(caplog)[0]
                admin.config_set("maxmemory", 0)
            finally:
                admin.close()
            await until(lambda: resumed(caplog), "caching resumed after OOM", timeout=15)
            assert (await cache._lookup(spec, "after", (), compute)).status is CacheStatus.MISS
            assert (await cache._lookup(spec, "after", (), compute)).status is CacheStatus.HIT
    finally:
        await close(cache)


async def test_wrong_password_is_named_once_and_requests_still_succeed(prefix: str,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    with RedisServer(password="right-pw") as server:
        url = server.url.replace("right-pw", "wrong-pw")
        cache = make(url, prefix)
        try:
            values = [await cache.get_or_compute("q", f"k{i}", Counter(), ttl=30, returns=Quote) for i in range(4)]
            assert len(values) == 4
            lines = failing_lines(caplog)
            assert len(lines) == 1 and "refused the credentials" in lines[0]
            assert "wrong-pw" not in caplog.text
        finally:
            await close(cache)


async def test_status_reports_namespaces_keys_memory_and_every_workers_counts(redis_url: str, prefix: str,
                                                                               capsys: pytest.CaptureFixture[str]
                                                                               ) -> None:
    workers = [make(redis_url, prefix) for _ in range(2)]
    compute = Counter()
    for w in workers:
        for key in ("a", "b", "a"):
            await w.get_or_compute("quotes", key, compute, ttl=60, returns=Quote)
    with pytest.raises(ValueError, match="no"):
        await workers[0].get_or_compute("quotes", "c", Counter(fail=ValueError("no")), ttl=60, returns=Quote)
    await close(*workers)  # each adds its counts to the shared ones
    client = redis.Redis.from_url(redis_url)
    try:
        (row,) = cache_report(client, prefix)
    finally:
        client.close()
    assert row["namespace"] == "quotes" and row["keys"] == 2 and row["memory_bytes"] > 0
    assert (row["hits"], row["misses"], row["errors"], row["computations"]) == (4, 2, 1, 3)
    assert row["compute_seconds"] > 0
    assert main(["status", "--url", redis_url, "--prefix", prefix]) == 0
    out = capsys.readouterr().out
    assert "cache:" in out and re.search(r"quotes\s+keys=2 memory=[\d.]+ KiB hits=4 misses=2", out), out


async def test_a_ready_sync_or_asyncio_client_can_be_given_instead_of_a_url(prefix: str) -> None:
    """The cache builds its own per-loop clients from the given client's connection settings (password included,
    never printed)."""
    import redis.asyncio as aredis

    with RedisServer(password="client-pw") as server:
        sync_client, async_client = redis.Redis.from_url(server.url), aredis.Redis.from_url(server.url)
        caches = [Cache(c, settings=Settings(redis_url=None, key_prefix=prefix)) for c in (sync_client, async_client)]
        compute = Counter()
        try:
            values = [await c.get_or_compute("q", "k", compute, ttl=30, returns=Quote) for c in caches]
            assert compute.runs == 1 and values[0] == values[1]
            assert all("client-pw" not in c.describe() and "Redis at redis://127.0.0.1" in c.describe()
                       for c in caches)
        finally:
            await close(*caches)
            sync_client.close()
            await close_quietly(async_client)  # aclose() since redis-py 5.0.1, close() before
