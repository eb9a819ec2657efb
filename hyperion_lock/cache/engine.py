"""The cache's machinery behind :class:`~hyperion_lock.cache.facade.Cache`: per-event-loop state,
the guarded store calls and the breaker around them, and the lookup's I/O (read, fly, wait, lead,
renew, serve, refresh, finish, fail), each step chosen by the pure
:class:`~hyperion_lock.cache.lookup.LookupPolicy` (and the lease's renewal by ``LeaseRenewal``).

Timeline of one lookup of entry ``E`` (namespace ``N``) -- the same for ``await cache.get_or_compute(...)``, a
decorated function and a cached FastAPI endpoint:

1. Concurrent callers in this process share one *flight*: only its first caller talks to the store.
2. If the circuit breaker is open (the store failed just before), compute directly: nothing else is tried.
3. Listen to ``N``'s channel (once per process), register interest in ``E``, then one Lua call reads ``E`` and,
   if there is no valid entry, takes ``E``'s compute lease (owner token, short TTL).
4. A valid entry is served: FRESH -> HIT; soon stale -> HIT and one background refresh; past its TTL but within
   the stale period -> STALE and one background refresh. The lease makes each refresh single everywhere.
5. Lease won -> compute (the lease renewed every third of its TTL), store the value (fenced: only while the
   lease is ours and nothing was invalidated since), publish "ok": every waiter reads it. If the computation
   raises, the waiters get the error at once through the channel (it is cached only with ``cache_errors``).
6. Lease held elsewhere -> wait for its message, at most until that lease would expire: if its holder died
   (SIGKILL) the lease expires and the next read takes it over. No polling.

Redis trouble (dead, SIGSTOPped, OOM, wrong password): every store call has a timeout that follows the reply
times actually observed (``op_timeout`` .. ``op_timeout_max``). A call that times out is computed directly and
sends one liveness check with a longer bound: a busy Redis answers it and nothing else changes; a stopped one
does not, and the breaker opens. Refused connections and error replies open it at once (the second one). The
failure is logged once; while open every request is computed directly with nothing added, and a background
check (never a request) closes it as soon as Redis answers a write again.

With no Redis (``Cache(None)`` and no ``HYPERION_LOCK_REDIS_URL``), the same steps run against this process's
memory: the same semantics inside one worker, one computation per worker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hashlib
import hmac
import logging
import math
import os
import secrets
import socket
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import redis as _redis
import redis.asyncio as aredis

from hyperion_lock._aio import cancel_and_wait, within
from hyperion_lock.cache.codec import JsonCodec, etag_of
from hyperion_lock.cache.errors import CacheComputeError, CacheError
from hyperion_lock.cache.keys import CacheKeys
from hyperion_lock.cache.lookup import Act, LeaseRenewal, LookupPolicy, Next, Notice, Refresh, Renew
from hyperion_lock.cache.near import NearCache, NearEntry
from hyperion_lock.cache.policy import (
    Action,
    EntryAge,
    Freshness,
    Outcome,
    StoreGuard,
    freshness,
)
from hyperion_lock.cache.store import (
    Entry,
    Header,
    MemoryStore,
    Message,
    PutResult,
    Read,
    RedisStore,
    Store,
    TakeMode,
    client_for_cache,
)
from hyperion_lock.cache.types import (
    _UNSET,
    Answer,
    CacheSettings,
    CacheStatus,
    NamespaceStats,
    Result,
    Spec,
)
from hyperion_lock.connection.clients import describe_client, redis_error
from hyperion_lock.connection.urls import redact_url
from hyperion_lock.metrics import metrics
from hyperion_lock.settings import Settings

T = TypeVar("T")
RedisLike = aredis.Redis | _redis.Redis


class _Unavailable(Exception):
    """The store failed or the breaker is open: compute directly."""


def _runner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class _Loop:
    """What one event loop uses: its store (Redis clients are bound to a loop), guard and flights."""

    def __init__(self, store: Store, guard: StoreGuard, near: NearCache | None = None) -> None:
        self.store = store
        self.guard = guard
        self.near = near  # Redis only: fresh entries served from this process, dropped by the channel's messages
        if near is not None:
            store.watch(near)
        self.flights: dict[tuple[str, str], asyncio.Future[Result]] = {}
        self.refreshing: set[tuple[str, str]] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.recovering = False

    def spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task


@dataclass
class _Lead:
    """This call computes the entry: it holds the lease (``direct``: nothing is stored, the store is down)."""

    ctx: _Loop | None
    spec: Spec
    ident: str
    tags: tuple[str, ...]
    token: str = ""
    version: int = 0
    renewer: asyncio.Task[None] | None = None
    stopped: bool = False  # the computation ended: the renewer must stop, even if its cancel is lost

    @property
    def direct(self) -> bool:
        return self.ctx is None

    async def stop_renewing(self) -> None:
        """Stop renewing the lease. The renewer also checks ``stopped`` after every round trip: a cancel lost in
        redis-py (Python < 3.12, see :mod:`hyperion_lock._aio`) once left a finished computation waiting for it forever,
        renewing its lease, while every other worker waited for that lease."""
        self.stopped = True
        if self.renewer is not None:
            await cancel_and_wait([self.renewer])
            self.renewer = None


class Engine:
    """What one :class:`~hyperion_lock.cache.facade.Cache` runs on: its stores (one per event loop),
    their guards, the flights, the counts and the sync API's private event loop. ``log`` is the
    cache's logger."""

    def __init__(self, source: RedisLike | str | None, settings: Settings,
                 cache_settings: CacheSettings, log: logging.Logger, clock: Callable[[], float],
                 key_secret: bytes | None) -> None:
        self._source = source
        self.settings = settings
        self.cache_settings = cache_settings
        self.log = log
        self._clock = clock
        self._memory = MemoryStore(cache_settings.memory_max_entries, clock)
        self.loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Loop] = (
            weakref.WeakKeyDictionary())
        self._stats: dict[str, NamespaceStats] = {}
        self._flushed: dict[str, dict[str, float]] = {}
        self._lock = threading.Lock()
        self._sync_flights: dict[tuple[str, str], concurrent.futures.Future[Result]] = {}
        self._bg: tuple[asyncio.AbstractEventLoop, threading.Thread] | None = None
        self._warned: set[str] = set()
        self._key_secret = key_secret
        self._secrets: dict[str, tuple[bytes, float]] = {}

    # -- description and administration ------------------------------------------------------------------------
    def describe(self) -> str:
        if isinstance(self._source, str):
            return f"Redis at {redact_url(self._source)}"
        if self._source is not None:
            return f"Redis at {describe_client(self._source)}"
        return "process memory (no Redis: one computation per worker)"

    def keys(self, namespace: str) -> CacheKeys:
        return CacheKeys(self.settings.key_prefix, namespace)

    async def admin(self, action: Callable[[Store], Awaitable[int]], namespace: str, ident: str = "") -> int:
        """Invalidations are not failed open: a caller must know when one did not happen. This event loop's near
        cache drops what was invalidated (``ident``, else the whole namespace) as soon as it returns; the other
        workers' near caches when the channel's message reaches them."""
        ctx = self._ctx()
        try:
            return await within(action(ctx.store), max(self.cache_settings.op_timeout, 1.0))
        finally:
            if ctx.near is not None:
                ctx.near.message(self.keys(namespace).channel, ident)

    # -- statistics ------------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, dict[str, float]]:
        """This process's counts per namespace (:meth:`Cache.stats`)."""
        with self._lock:
            return {ns: s.as_dict() for ns, s in self._stats.items()}

    def count(self, namespace: str, status: CacheStatus | None = None, *, error: bool = False,
              compute: float | None = None) -> None:
        with self._lock:
            s = self._stats.setdefault(namespace, NamespaceStats())
            if status is not None:
                name = {CacheStatus.HIT: "hits", CacheStatus.MISS: "misses", CacheStatus.STALE: "stale",
                        CacheStatus.BYPASS: "bypass"}[status]
                setattr(s, name, getattr(s, name) + 1)
            if error:
                s.errors += 1
            if compute is not None:
                s.computations += 1
                s.compute_seconds += compute
        metrics.cache_counted(namespace, status, error=error, compute=compute)

    def _deltas(self) -> dict[str, dict[str, float]]:
        with self._lock:
            out = {}
            for ns, s in self._stats.items():
                now, before = s.as_dict(), self._flushed.get(ns, {})
                delta = {k: v - before.get(k, 0) for k, v in now.items() if v != before.get(k, 0)}
                if delta:
                    out[ns] = delta
                    self._flushed[ns] = now
            return out

    async def _flush_loop(self, ctx: _Loop) -> None:
        while True:
            await asyncio.sleep(self.cache_settings.stats_interval)
            await self._flush(ctx)

    async def _flush(self, ctx: _Loop) -> None:
        if not ctx.store.shared or not ctx.guard.allow():
            return
        for ns, delta in self._deltas().items():
            try:
                await within(ctx.store.add_stats(self.keys(ns), delta), max(self.cache_settings.op_timeout, 0.5))
            except Exception as exc:
                self.log.debug("cache: could not add counts of %s to %s: %s", ns, ctx.store.describe(), exc)

    # -- per event loop ------------------------------------------------------------------------------------------
    def _ctx(self) -> _Loop:
        loop = asyncio.get_running_loop()
        ctx = self.loops.get(loop)
        if ctx is None:
            cs = self.cache_settings
            store: Store = self._memory
            if self._source is not None:
                store = RedisStore(client_for_cache(self._source, socket_timeout=5.0), self._where(),
                                   self.settings.key_prefix)
            guard = StoreGuard(floor=cs.op_timeout, ceiling=max(cs.op_timeout, cs.op_timeout_max),
                               threshold=cs.breaker_failures, retry_after=cs.breaker_retry,
                               max_retry_after=cs.breaker_max_retry)
            # No near cache on a Cluster: its per-node sharded subscriptions reconnect inside redis-py unseen.
            nearby = isinstance(store, RedisStore) and not store.sharded and cs.near_max_entries > 0
            near = NearCache(cs.near_max_entries, cs.near_max_bytes) if nearby else None
            ctx = self.loops[loop] = _Loop(store, guard, near)
            # What a lookup needs is imported and set up with the loop's context (connect(), in the lifespan),
            # never on a hit: the metrics, and the JSON codec's pydantic (it imports its schema machinery on the
            # first TypeAdapter).
            metrics.prepare()
            JsonCodec()
            if store.shared:
                ctx.spawn(self._flush_loop(ctx), "hyperion-lock-cache-stats")
        return ctx

    def _where(self) -> str:
        return self.describe().removeprefix("Redis at ")

    async def connect(self, budget: float = 1.0) -> bool:
        """Warm this event loop's store up within ``budget`` seconds, failing open (:meth:`Cache.connect`)."""
        ctx = self._ctx()
        try:
            await within(ctx.store.warm(), budget)
        except Exception as exc:
            self._failed(ctx, exc, trip=True)
            return False
        return True

    async def aclose(self) -> None:
        """Flush the counts and close this loop's connections."""
        loop = asyncio.get_running_loop()
        ctx = self.loops.pop(loop, None)
        if ctx is None:
            return
        await self._flush(ctx)
        await cancel_and_wait(list(ctx.tasks))
        await ctx.store.close()

    def close(self) -> None:
        """Stop the private event loop of the sync API (if it was started)."""
        with self._lock:
            bg, self._bg = self._bg, None
        if bg is not None:
            loop, thread = bg
            asyncio.run_coroutine_threadsafe(self.aclose(), loop).result(5)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)
            loop.close()

    # -- guarded store calls -------------------------------------------------------------------------------------
    async def _guard(self, ctx: _Loop, call: Callable[[], Awaitable[T]]) -> T:
        """One store call on a request's path, bound by the guard's current timeout (see :class:`StoreGuard`)."""
        guard = ctx.guard
        if not guard.allow():
            raise _Unavailable
        started, cold = time.monotonic(), not guard.warm
        try:
            result = await within(call(), guard.timeout, ctx.store.replied_since, guard.ceiling)
        except Exception as exc:
            self._failed(ctx, exc)
            raise _Unavailable from exc
        guard.on_reply(time.monotonic() - started, cold=cold)
        return result

    def _failed(self, ctx: _Loop, exc: Exception, *, trip: bool = False) -> None:
        """A store call failed: a timeout sends a liveness check; an error counts towards opening the breaker."""
        now = self._clock()
        if trip:
            action = ctx.guard.trip(now)
        elif _timed_out(exc):
            action = ctx.guard.on_timeout()
        else:
            action = ctx.guard.on_error(now)
        self.log.debug("cache: %s failed (%s: %s)", ctx.store.describe(), type(exc).__name__, exc)
        self._act(ctx, action, exc)

    def _act(self, ctx: _Loop, action: Action, exc: BaseException | None) -> None:
        if action is Action.PROBE:
            ctx.spawn(self._probe(ctx), "hyperion-lock-cache-probe")
        elif action is Action.OPENED:
            self._opened(ctx, exc)
        elif action is Action.CLOSED:
            self.log.warning("cache: %s answers again; caching resumed", ctx.store.describe())

    async def _probe(self, ctx: _Loop) -> None:
        """The liveness check after a timeout: a small write with a longer bound. Answered: Redis is only busy
        (its reply time enters the guard's window, raising the timeout); not answered or refused: it is down."""
        started = time.monotonic()
        try:
            await within(ctx.store.check(), ctx.guard.probe_timeout)
        except Exception as exc:
            self._act(ctx, ctx.guard.on_probe(self._clock(), _outcome(exc)), exc)
            return
        self._act(ctx, ctx.guard.on_probe(self._clock(), Outcome.OK, time.monotonic() - started), None)

    def _opened(self, ctx: _Loop, exc: BaseException | None) -> None:
        if ctx.near is not None:
            ctx.near.lost()  # this worker may be cut off from Redis: its channel's messages may not reach it
        specific = redis_error(exc, where=self._where(), key=None, generation=None,
                               prefix=self.settings.key_prefix) if isinstance(exc, Exception) else None
        detail = str(specific) if specific is not None else f"{type(exc).__name__}: {exc}"
        if _timed_out(exc):
            detail += f", and a liveness check got no answer within {ctx.guard.probe_timeout * 1000:.0f} ms either"
        if isinstance(exc, _redis.exceptions.OutOfMemoryError):
            detail += ("; Redis is out of memory and refuses writes: raise maxmemory, or let it evict cache entries "
                       "(maxmemory-policy volatile-lru: every cache entry has a TTL)")
        self.log.warning(
            "cache: %s is failing (%s); computing every request directly, not caching, until it answers again "
            "(checked in the background)", ctx.store.describe(), detail,
            exc_info=not isinstance(exc, _redis.RedisError | OSError | TimeoutError),
        )
        if not ctx.recovering:
            ctx.recovering = True
            ctx.spawn(self._recover(ctx), "hyperion-lock-cache-recovery")

    async def _recover(self, ctx: _Loop) -> None:
        """Recovery checks while the breaker is open, in the background: each waits long for its answer, so a
        stopped Redis that resumes closes the breaker at once; a refused one is retried with back-off."""
        guard = ctx.guard
        try:
            while guard.is_open:
                await asyncio.sleep(guard.check_in(self._clock()))
                started = time.monotonic()
                try:
                    await within(ctx.store.check(), guard.check_timeout)
                except Exception as exc:
                    guard.on_check(self._clock(), _outcome(exc))
                    self.log.debug("cache: %s still failing (%s)", ctx.store.describe(), exc)
                    continue
                self._act(ctx, guard.on_check(self._clock(), Outcome.OK, time.monotonic() - started), None)
        finally:
            ctx.recovering = False

    # -- outside a lookup -----------------------------------------------------------------------------------------
    async def key_secret(self, namespace: str) -> bytes | None:
        """The key of ``namespace``'s keyed hashes (:meth:`Cache.key_secret`): derived from the configured
        secret, else read from the store (again each minute); the last one known, or ``None``, when the store
        cannot give it now."""
        now = self._clock()
        known = self._secrets.get(namespace)
        if known is not None and known[1] > now:
            return known[0]
        if self._key_secret is not None:
            derived = hmac.new(self._key_secret, namespace.encode(), hashlib.sha256).digest()
            self._secrets[namespace] = (derived, math.inf)
            return derived
        ctx = self._ctx()
        keys = self.keys(namespace)
        try:
            key = await self._guard(ctx, lambda: ctx.store.secret(keys))
        except _Unavailable:
            return known[0] if known is not None else None
        self._secrets[namespace] = (key, now + 60.0)
        return key

    async def direct(self, spec: Spec, ident: str, compute: Callable[[], Awaitable[Any]]) -> Result:
        """Compute without the store: neither served from nor written to it (``BYPASS``)."""
        result = await self._compute(_Lead(None, spec, ident, ()), compute)
        self.count(spec.namespace, result.status)
        return result

    def once(self, what: str, level: int, message: str, *args: Any) -> None:
        if what not in self._warned:
            self._warned.add(what)
            self.log.log(level, message, *args)

    # -- the algorithm (async; the sync API runs the same steps on a private loop) -----------------------------
    async def lookup(self, spec: Spec, ident: str, tags: tuple[str, ...],
                     compute: Callable[[], Awaitable[Any]], *, force: bool = False) -> Result:
        """The entry ``ident`` of ``spec``: served, or computed by one caller while the others wait. Callers of
        this process share one flight per entry; a cancelled caller does not cancel the computation."""
        ctx = self._ctx()
        k = (spec.namespace, ident)
        flight = ctx.flights.get(k)
        direct = False
        if flight is None and not force:
            fresh = await self._fresh_hit(ctx, spec, ident, tags)
            if isinstance(fresh, Result):
                self.count(spec.namespace, fresh.status)
                return fresh
            direct = fresh is _Unavailable  # its read failed (or timed out): one wait per request, not two
            flight = ctx.flights.get(k)  # another caller may have started one meanwhile
        if flight is not None:
            try:
                result = (await asyncio.shield(flight)).shared()
            except Exception:
                self.count(spec.namespace, error=True)  # the flight's own caller counted its error already
                raise
        else:
            flight = ctx.flights[k] = asyncio.ensure_future(self._fly(spec, ident, tags, compute, force, direct))
            flight.add_done_callback(lambda f: ctx.flights.pop(k, None) if ctx.flights.get(k) is f else None)
            result = await asyncio.shield(flight)
        self.count(spec.namespace, result.status)
        return result

    async def _fresh_hit(self, ctx: _Loop, spec: Spec, ident: str,
                         tags: tuple[str, ...]) -> Result | type[_Unavailable] | None:
        """The fast path: an entry that is simply fresh, from the near cache (no Redis call) or from one read in
        the caller's own task (then kept in the near cache). Anything else (missing, soon stale, stale, an error
        entry) goes through the flight; ``_Unavailable`` when the read failed or timed out (or the breaker is
        open): then the flight computes directly, so a request waits for the store at most once."""
        near, epoch, sent = ctx.near, None, 0.0
        if near is not None and ctx.guard.allow():
            sent = time.monotonic()
            kept = near.get(spec.keys.channel, ident, sent)
            if kept is not None:
                return self._near_result(spec, kept, sent)
            epoch = near.epoch(spec.keys.channel)
            if epoch is None and near.wants(spec.keys.channel, sent):
                ctx.spawn(self._listen_near(ctx, near, spec.keys), "hyperion-lock-cache-listen")
        try:
            read = await self._read(ctx, spec, ident, tags, "", TakeMode.NEVER)
        except _Unavailable:
            return _Unavailable
        entry = read.entry
        if entry is None or entry.header.error:
            return None
        age = EntryAge(entry.header.ttl_ms, entry.header.stale_ms, entry.left_ms)
        if freshness(age, spec.refresh_ahead_ms) is not Freshness.FRESH:
            return None
        result = self._result(spec, entry, age, CacheStatus.HIT)
        if result is not None and epoch is not None and near is not None:
            kept = NearEntry.of(entry.payload, entry.header.etag, entry.header.ttl_ms, age.fresh_left_ms,
                                spec.refresh_ahead_ms, sent)
            near.offer(spec.keys.channel, ident, kept, epoch, time.monotonic())
        return result

    def _near_result(self, spec: Spec, kept: NearEntry, now: float) -> Result | None:
        age = EntryAge(kept.ttl_ms, 0, int((kept.fresh_end - now) * 1000))
        if not spec.decode:
            return Result(kept.payload, kept.etag, CacheStatus.HIT, age.max_age, age.age)
        try:
            value = spec.codec.decode(kept.payload)  # a new object per call: callers may change theirs
        except Exception:
            return None  # it decoded when kept; the flight reads it again and says what is wrong
        return Result(kept.payload, kept.etag, CacheStatus.HIT, age.max_age, age.age, value)

    async def _listen_near(self, ctx: _Loop, near: NearCache, keys: CacheKeys) -> None:
        """Subscribe to a namespace's channel for the near cache (the listener confirms it to the near cache)."""
        if not await self._listen(ctx, keys):
            near.failed(keys.channel, time.monotonic())

    async def _read(self, ctx: _Loop, spec: Spec, ident: str, tags: tuple[str, ...], token: str,
                    take: TakeMode) -> Read:
        """One guarded read; an entry whose stored header is unreadable comes back as a miss (logged once)."""
        read = await self._guard(ctx, functools.partial(ctx.store.read, spec.keys, ident, tags, token,
                                                        self._lease_ms(spec), take))
        if read.unreadable is not None:
            self._unreadable(spec, read.unreadable)
        return read

    def _result(self, spec: Spec, entry: Entry, age: EntryAge, status: CacheStatus) -> Result | None:
        """A served entry, decoded for the function API; ``None`` when it cannot be decoded (recompute it)."""
        value = _UNSET
        if entry.header.codec != spec.codec.name:
            self._unreadable(spec, f"written with codec {entry.header.codec!r}, read with {spec.codec.name!r}")
            return None
        if spec.decode:
            try:
                value = spec.codec.decode(entry.payload)
            except Exception as exc:
                self._unreadable(spec, f"{type(exc).__name__}: {exc}")
                return None
        return Result(entry.payload, entry.header.etag, status, age.max_age, age.age, value, entry.header.status,
                      entry.header.headers)

    def _unreadable(self, spec: Spec, why: str) -> None:
        """An entry that cannot be decoded, or whose stored header has the wrong shape or type, is a miss for that
        entry alone: computed again (its next write replaces it), logged once per namespace, and never counted
        as a store failure (Redis answered: the breaker stays closed for every other entry)."""
        self.once(f"decode:{spec.namespace}", logging.WARNING, "cache: an entry of %s cannot be decoded (%s; "
                   "written by an older release, or not by this cache?); computing it again, the new value replaces "
                   "it", spec.namespace, why)

    async def _fly(self, spec: Spec, ident: str, tags: tuple[str, ...], compute: Callable[[], Awaitable[Any]],
                   force: bool, direct: bool = False) -> Result:
        begun = _Lead(None, spec, ident, tags) if direct else await self._begin(spec, ident, tags, compute, force)
        if isinstance(begun, Result):
            return begun
        return await self._compute(begun, compute)

    async def _compute(self, lead: _Lead, compute: Callable[[], Awaitable[Any]]) -> Result:
        """Run the computation this call leads (or makes directly), and store, release or abandon after it."""
        started = self._clock()
        try:
            value = await compute()
        except Exception as exc:
            await self._fail(lead, exc, self._clock() - started)
            raise
        except BaseException:
            await self._abandon(lead)
            raise
        return await self._finish(lead, value, self._clock() - started)

    async def _begin(self, spec: Spec, ident: str, tags: tuple[str, ...],
                     refresher: Callable[[], Awaitable[Any]], force: bool) -> Result | _Lead:
        ctx = self._ctx()
        if not ctx.guard.allow():
            return _Lead(None, spec, ident, tags)
        try:
            return await self._read_until_served(ctx, spec, ident, tags, refresher, force)
        except _Unavailable:
            return _Lead(None, spec, ident, tags)

    async def _read_until_served(self, ctx: _Loop, spec: Spec, ident: str, tags: tuple[str, ...],
                                 refresher: Callable[[], Awaitable[Any]], force: bool) -> Result | _Lead:
        """Perform the steps of one :class:`LookupPolicy` until it serves, leads or gives up.
        Interest in the entry's message is registered before each read once the channel is
        subscribed, and dropped after it."""
        token = secrets.token_hex(16)
        policy = LookupPolicy(self._clock(), wait_timeout=self.cache_settings.wait_timeout,
                              force=force, refresh_ahead_ms=spec.refresh_ahead_ms,
                              inline=spec.refresh == "inline")
        step = policy.start()
        future: asyncio.Future[Message] | None = None
        try:
            while True:
                if step.act is Act.READ:
                    if future is not None:
                        ctx.store.forget(spec.keys, ident, future)
                    future = ctx.store.expect(spec.keys, ident) if step.expect else None
                    read = await self._read(ctx, spec, ident, tags, token, step.take)
                    step = policy.on_read(self._clock(), read)
                elif step.act is Act.LISTEN:
                    step = policy.on_listen(self._clock(), await self._listen(ctx, spec.keys))
                elif step.act is Act.WAIT:
                    message = await self._wait(future, step.timeout)
                    step = policy.on_message(self._clock(), message)
                elif step.act is Act.SERVE:
                    served = await self._serve(ctx, spec, ident, tags, step, refresher)
                    if served is not None:
                        return served
                    step = policy.on_undecodable()
                else:
                    return self._settle(ctx, spec, ident, tags, token, step)
        finally:
            if future is not None:
                ctx.store.forget(spec.keys, ident, future)

    def _settle(self, ctx: _Loop, spec: Spec, ident: str, tags: tuple[str, ...], token: str,
                step: Next) -> _Lead:
        """The policy's last step, unless it serves: lead (the lease is ours), compute directly, or
        raise another caller's error."""
        if step.act is Act.LEAD:
            return self._lead(ctx, spec, ident, tags, token, step.version)
        if step.act is Act.RAISE:
            assert step.message is not None
            raise self._remote_error(spec, ident, step.message)
        if step.notice is Notice.WAITED:
            self.log.warning("cache: waited %.0f s for %s %s; computing it here",
                             self.cache_settings.wait_timeout, spec.namespace, ident)
        return _Lead(None, spec, ident, tags)

    async def _listen(self, ctx: _Loop, keys: CacheKeys) -> bool:
        """Subscribe to the namespace's channel (a new connection the first time). If that fails, the caller
        still waits, only without wake-ups: it reads again when the holder's lease would have expired."""
        try:
            await within(ctx.store.listen(keys), max(self.cache_settings.op_timeout, 0.5), ctx.store.replied_since)
        except Exception as exc:
            self.log.debug("cache: cannot listen to %s on %s (%s); waiting for the lease instead", keys.channel,
                           ctx.store.describe(), exc)
            return False
        return True

    @staticmethod
    async def _wait(future: asyncio.Future[Message] | None, timeout: float) -> Message | None:
        try:
            if future is None:
                await asyncio.sleep(timeout)
                return None
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            return None

    def _lease_ms(self, spec: Spec) -> int:
        return int((spec.lease_ttl or self.cache_settings.lease_ttl) * 1000)

    def _lead(self, ctx: _Loop, spec: Spec, ident: str, tags: tuple[str, ...], token: str, version: int) -> _Lead:
        lead = _Lead(ctx, spec, ident, tags, token, version)
        lead.renewer = asyncio.ensure_future(self._renew(lead))
        return lead

    async def _renew(self, lead: _Lead) -> None:
        """Renew the lease every third of its TTL while the computation runs. This runs in the
        background, so it is bound neither by the request path's ``op_timeout`` nor by the breaker: a
        renewal that is only slow (a loaded Redis or worker) must not hand the entry to a second
        computation. A failed renewal is tried again soon; the lease is lost only when Redis answers
        none of them for a whole TTL (then a waiter takes over, and this computation's write is
        refused). When to renew and when to give up: :class:`LeaseRenewal`."""
        assert lead.ctx is not None
        ctx, lease_ms = lead.ctx, self._lease_ms(lead.spec)
        renewal = LeaseRenewal(lease_ms, self.cache_settings.op_timeout)
        while not lead.stopped:
            await asyncio.sleep(renewal.delay())
            try:
                held = await within(ctx.store.renew(lead.spec.keys, lead.ident, lead.tags, lead.token, lease_ms),
                                    renewal.bound, ctx.store.replied_since)
            except Exception as exc:
                self.log.debug("cache: renewing the lease of %s %s failed (%s: %s)", lead.spec.namespace,
                               lead.ident, type(exc).__name__, exc)
                renewal.on_renewed(None)
                continue
            if renewal.on_renewed(held) is Renew.LOST and not lead.stopped:
                self.log.debug("cache: lease of %s %s lost while computing (invalidated or taken over)",
                               lead.spec.namespace, lead.ident)
                return

    async def _serve(self, ctx: _Loop, spec: Spec, ident: str, tags: tuple[str, ...], step: Next,
                     refresher: Callable[[], Awaitable[Any]]) -> Result | _Lead | None:
        """Serve the entry of a ``SERVE`` step and see to its refresh; ``None`` when it cannot be
        decoded."""
        entry, age, status = step.entry, step.age, step.status
        assert entry is not None and age is not None and status is not None
        result = self._result(spec, entry, age, status)
        if result is None:
            return None
        if step.refresh is Refresh.INLINE:
            token = secrets.token_hex(16)
            lease_ms = self._lease_ms(spec)
            if await self._guard(ctx, lambda: ctx.store.take(spec.keys, ident, tags, token, lease_ms)):
                return self._lead(ctx, spec, ident, tags, token, step.version)
        elif step.refresh is Refresh.BACKGROUND:
            self._refresh_later(ctx, spec, ident, tags, step.version, refresher)
        return result

    def _refresh_later(self, ctx: _Loop, spec: Spec, ident: str, tags: tuple[str, ...], version: int,
                       refresher: Callable[[], Awaitable[Any]]) -> None:
        k = (spec.namespace, ident)
        if k not in ctx.refreshing:
            ctx.refreshing.add(k)
            task = ctx.spawn(self._refresh(ctx, spec, ident, tags, version, refresher), "hyperion-lock-cache-refresh")
            task.add_done_callback(lambda _: ctx.refreshing.discard(k))

    async def _refresh(self, ctx: _Loop, spec: Spec, ident: str, tags: tuple[str, ...], version: int,
                       refresher: Callable[[], Awaitable[Any]]) -> None:
        """Recompute a stale or soon-stale entry in the background, if this caller wins its lease."""
        token = secrets.token_hex(16)
        try:
            if not await self._guard(ctx, lambda: ctx.store.take(spec.keys, ident, tags, token,
                                                                 self._lease_ms(spec))):
                return  # another worker refreshes it (an expected race)
        except _Unavailable:
            return
        lead = self._lead(ctx, spec, ident, tags, token, version)
        started = self._clock()
        try:
            value = await refresher()
        except Exception as exc:
            await self._fail(lead, exc, self._clock() - started)
            self.log.warning("cache: refreshing %s %s failed (%s: %s); serving the cached value until it expires",
                             spec.namespace, ident, type(exc).__name__, exc)
            return
        except BaseException:
            await self._abandon(lead)
            raise
        try:
            await self._finish(lead, value, self._clock() - started)
        except CacheError as exc:
            self.log.warning("cache: refreshing %s %s failed: %s", spec.namespace, ident, exc)

    def _storable(self, spec: Spec, answer: Answer, size: int) -> bool:
        """Whether a computed answer may be stored. One over ``max_size``, or one its endpoint marked uncacheable
        (a ``Set-Cookie``), is served, not stored, with one WARNING per endpoint or function (per namespace for
        ``get_or_compute``) and worker."""
        limit = spec.max_size or self.cache_settings.max_size
        what = spec.name or spec.namespace
        if size > limit:
            self.once(f"too-large:{spec.namespace}:{spec.name}", logging.WARNING,
                       "cache: a value of %s (%s) is %d bytes encoded, more than max_size=%d: served without caching "
                       "(X-Cache: BYPASS); raise max_size for it, or return less", spec.namespace, what, size, limit)
            return False
        if answer.uncacheable:
            self.once(f"uncacheable:{spec.namespace}:{spec.name}", logging.WARNING,
                       "cache: an answer of %s (%s) is served without caching (X-Cache: BYPASS): %s", spec.namespace,
                       what, answer.uncacheable)
            return False
        return True

    async def _finish(self, lead: _Lead, value: Any, seconds: float) -> Result:
        """Store a computed value and wake the waiters. A value that cannot be stored (over ``max_size``, or
        marked uncacheable) is returned to this caller (and this process's flight) uncached; the waiters of other
        workers are told to compute it directly."""
        spec = lead.spec
        await lead.stop_renewing()
        self.count(spec.namespace, compute=seconds)
        answer = value if isinstance(value, Answer) else Answer(value)
        try:
            payload = spec.codec.encode(answer.value)
        except CacheError as exc:
            await self._fail(lead, exc, seconds, counted=True)
            raise
        result = Result(payload, etag_of(payload), CacheStatus.MISS, int(spec.ttl), 0, answer.value,
                        answer.status_code, answer.headers)
        ctx = lead.ctx
        if not self._storable(spec, answer, len(payload)):
            if ctx is not None:
                with contextlib.suppress(_Unavailable):
                    await self._guard(ctx, functools.partial(ctx.store.release, spec.keys, lead.ident, lead.token,
                                                             Message(lead.ident, "bypass")))
            return replace(result, status=CacheStatus.BYPASS)
        if ctx is None:
            return replace(result, status=CacheStatus.BYPASS)
        header = Header(int(spec.ttl * 1000), int(spec.stale * 1000), result.etag, spec.codec.name, lead.version,
                        owner=lead.token, compute_ms=int(seconds * 1000), runner=_runner(),
                        status=answer.status_code, headers=answer.headers)
        try:
            stored = await self._guard(ctx, functools.partial(ctx.store.put, spec.keys, lead.ident, lead.tags,
                                                              lead.token, header, payload, lead.version))
            if stored is not PutResult.STORED:
                self.log.debug("cache: %s %s not stored (%s): invalidated or taken over while computing",
                               spec.namespace, lead.ident, stored.name)
        except _Unavailable:
            pass
        return result

    async def _fail(self, lead: _Lead, exc: Exception, seconds: float, *, counted: bool = False) -> None:
        """The computation raised: pass the error to the waiters at once (or cache it, with ``cache_errors``)."""
        spec = lead.spec
        await lead.stop_renewing()
        if not counted:
            self.count(spec.namespace, error=True, compute=seconds)
        ctx = lead.ctx
        if ctx is None:
            return
        status = getattr(exc, "status_code", None)
        message = Message(lead.ident, "error", type(exc).__qualname__, str(exc)[:2000],
                          status if isinstance(status, int) else None, getattr(exc, "detail", None), _runner())
        try:
            if spec.cache_errors and not isinstance(exc, CacheError):
                header = Header(int(spec.error_ttl * 1000), 0, "", "error", lead.version, owner=lead.token,
                                error=True, compute_ms=int(seconds * 1000), runner=_runner())
                await self._guard(ctx, lambda: ctx.store.put(spec.keys, lead.ident, lead.tags, lead.token, header,
                                                             message.to_json().encode(), lead.version))
            else:
                await self._guard(ctx, lambda: ctx.store.release(spec.keys, lead.ident, lead.token, message))
        except _Unavailable:
            pass

    async def _abandon(self, lead: _Lead) -> None:
        """Interrupted (cancelled): let the lease go at once so a waiter takes over."""
        await lead.stop_renewing()
        ctx = lead.ctx
        if ctx is not None:
            with contextlib.suppress(_Unavailable):
                await self._guard(ctx, lambda: ctx.store.release(lead.spec.keys, lead.ident, lead.token,
                                                                 Message(lead.ident, "retry")))

    def _remote_error(self, spec: Spec, ident: str, m: Message) -> CacheComputeError:
        self.count(spec.namespace, error=True)
        return CacheComputeError(
            f"the computation of this entry failed in {m.runner or 'another worker'} ({m.error_type}: "
            f"{m.error_message}); it is tried again by the next request", key=f"{spec.namespace}:{ident}",
            error_type=m.error_type, error_message=m.error_message, status_code=m.status_code, detail=m.detail,
            runner=m.runner,
        )

    # -- the sync API: the same steps on a private event loop, the computation in the calling thread --------------
    def _bg_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._bg is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="hyperion-lock-cache", daemon=True)
                thread.start()
                self._bg = (loop, thread)
            return self._bg[0]

    def run_bg(self, coro: Awaitable[T]) -> T:
        return asyncio.run_coroutine_threadsafe(_coroutine(coro), self._bg_loop()).result()

    def lookup_sync(self, spec: Spec, ident: str, tags: tuple[str, ...], compute: Callable[[], Any],
                    *, force: bool = False) -> Result:
        k = (spec.namespace, ident)
        with self._lock:
            flight = self._sync_flights.get(k)
            leading = flight is None
            if flight is None:
                flight = self._sync_flights[k] = concurrent.futures.Future()
        if not leading:
            try:
                result = flight.result().shared()
            except Exception:
                self.count(spec.namespace, error=True)
                raise
            self.count(spec.namespace, result.status)
            return result
        try:
            result = self._fly_sync(spec, ident, tags, compute, force)
            flight.set_result(result)
        except BaseException as exc:
            flight.set_exception(exc)
            raise
        finally:
            with self._lock:
                if self._sync_flights.get(k) is flight:
                    del self._sync_flights[k]
        self.count(spec.namespace, result.status)
        return result

    def _fly_sync(self, spec: Spec, ident: str, tags: tuple[str, ...], compute: Callable[[], Any],
                  force: bool) -> Result:
        def refresher() -> Awaitable[Any]:
            return asyncio.get_running_loop().run_in_executor(None, compute)

        begun = self.run_bg(self._begin(spec, ident, tags, refresher, force))
        if isinstance(begun, Result):
            return begun
        started = self._clock()
        try:
            value = compute()
        except Exception as exc:
            self.run_bg(self._fail(begun, exc, self._clock() - started))
            raise
        except BaseException:
            self.run_bg(self._abandon(begun))
            raise
        return self.run_bg(self._finish(begun, value, self._clock() - started))



def _timed_out(exc: BaseException | None) -> bool:
    """No answer in time (ours, or redis-py's socket timeout), as opposed to an answer that is an error."""
    return isinstance(exc, TimeoutError | _redis.exceptions.TimeoutError)


def _outcome(exc: BaseException) -> Outcome:
    return Outcome.TIMEOUT if _timed_out(exc) else Outcome.ERROR


async def _coroutine(awaitable: Awaitable[T]) -> T:
    return await awaitable

