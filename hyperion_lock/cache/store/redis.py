"""The store in Redis, shared by every worker and host: its client, the pub/sub listener that wakes waiters, and
the steps, each one Lua script of :mod:`.lua`."""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import Awaitable, Callable
from typing import Any

import redis as _redis
import redis.asyncio as aredis
from redis.asyncio import connection as aconn
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from hyperion_lock._aio import cancel_and_wait
from hyperion_lock.cache.keys import CacheKeys
from hyperion_lock.cache.store.lua import (
    INVALIDATE_KEY,
    INVALIDATE_NAMESPACE,
    INVALIDATE_TAG,
    PUT,
    READ,
    RELEASE,
    RENEW,
    SCRIPTS,
    SECRET,
    TAKE,
)
from hyperion_lock.cache.store.protocol import (
    Entry,
    Header,
    LeaseState,
    Message,
    Observer,
    PutResult,
    Read,
    TakeMode,
    _life_ms,
    close_quietly,
    resolve,
)
from hyperion_lock.connection.clients import as_text, async_client_from_url, client_kwargs
from hyperion_lock.connection.clients import close_quietly as _close_quietly
from hyperion_lock.connection.cluster import is_cluster_client, next_sharded, sharded_script, sharded_subscribe
from hyperion_lock.connection.sentinel import is_sentinel_pool
from hyperion_lock.connection.urls import (
    is_cluster_url,
    is_sentinel_url,
    redact_url,
    redis_url_problem,
)
from hyperion_lock.errors import ConfigurationError


def _async_class(sync_class: type) -> type:
    name = sync_class.__name__
    found = getattr(aconn, name, None)
    if not isinstance(found, type):
        raise ConfigurationError(
            f"cannot build an asyncio Redis client from a redis.Redis using {name}; pass a URL or a "
            "redis.asyncio.Redis to the Cache instead"
        )
    return found


#: What is taken over from a given client: where and who it connects as (and its TLS settings, ``ssl_*``); not its
#: pool's machinery (redis-py 8's maintenance-notification handlers need RESP3, these clients speak RESP2).
_COPIED = frozenset({"host", "port", "db", "username", "password", "path", "credential_provider", "client_name",
                     "socket_keepalive", "socket_keepalive_options", "socket_type"})
POOL_SIZE = 64  # connections per worker; a burst beyond it waits for a free one (bounded) instead of failing
POOL_WAIT = 1.0  # seconds a call may wait for a free connection


def client_for_cache(source: aredis.Redis | _redis.Redis | str, socket_timeout: float) -> aredis.Redis:
    """A private asyncio client for one event loop, from a URL or from the connection settings of a given client
    (its password stays inside redis-py). Its pool blocks (up to ``POOL_WAIT``) when all ``POOL_SIZE`` connections
    are busy: redis-py's default pool raises "Too many connections" in a burst instead. One immediate retry inside
    redis-py, for a pooled connection that died with a restarted server; no backoff: the cache fails fast and
    open, and its own circuit breaker decides when to try again. Responses stay bytes (payloads are binary).

    A ``redis+sentinel://`` URL gets redis-py's Sentinel client of the primary (it follows failovers), and a
    ``redis+cluster://`` URL its ``RedisCluster`` (redis-py >= 8: sharded pub/sub). redis-py has no blocking pool
    for either, and a bounded one would fail a burst past its size, so their pools are not bounded: a burst opens
    as many connections as it has concurrent store calls."""
    connect_timeout = min(1.0, socket_timeout)
    options: dict[str, Any] = {"retry": Retry(NoBackoff(), 1), "decode_responses": False}
    if isinstance(source, str) and (is_sentinel_url(source) or is_cluster_url(source)):
        return async_client_from_url(source, connect_timeout=connect_timeout, socket_timeout=socket_timeout,
                                     **options)
    own = {**client_kwargs(connect_timeout, socket_timeout), **options}
    sizing: dict[str, Any] = {"max_connections": POOL_SIZE, "timeout": POOL_WAIT}
    if isinstance(source, str):
        problem = redis_url_problem(source)
        if problem is not None:
            raise ConfigurationError(f"invalid Redis URL {redact_url(source)!r}: {problem}")
        return aredis.Redis(connection_pool=aredis.BlockingConnectionPool.from_url(source, **own, **sizing))
    if is_cluster_client(source):
        raise ConfigurationError("the cache cannot copy the settings of a RedisCluster client: give it the "
                                 "redis+cluster:// URL instead")
    pool = source.connection_pool
    if is_sentinel_pool(pool):
        raise ConfigurationError("the cache cannot copy the settings of a Sentinel client (they name no host): give "
                                 "it the redis+sentinel:// URL instead")
    cls = pool.connection_class if isinstance(source, aredis.Redis) else _async_class(pool.connection_class)
    accepted = inspect.signature(cls).parameters
    kwargs = {k: v for k, v in pool.connection_kwargs.items()
              if (k in _COPIED or k.startswith("ssl_")) and (k in accepted or "kwargs" in accepted)}
    kwargs.update({k: v for k, v in own.items() if k in accepted or "kwargs" in accepted})
    return aredis.Redis(connection_pool=aredis.BlockingConnectionPool(connection_class=cls, **kwargs, **sizing))


class _Listener:
    """One pub/sub connection per store: subscribes to each namespace's channel once (confirmed before the first
    read of that namespace) and routes messages to the futures waiting for an entry. If the connection breaks,
    every waiter is told to read again (messages may have been missed) and the next ``subscribe`` reconnects.

    On a Redis Cluster (given ``cluster_ready``, which loads the slot map: a cluster client must know it before it
    can tell which node to subscribe on) it uses sharded pub/sub: ``SSUBSCRIBE`` on the node owning each
    namespace's slot (redis-py's ``ClusterPubSub``, one connection per node). A node that drops the subscription
    (its slot moved, or it was demoted in a failover) counts as a broken connection, as does a MOVED reply."""

    def __init__(self, client: aredis.Redis, cluster_ready: Callable[[], Awaitable[None]] | None = None) -> None:
        self._client = client
        self._ready = cluster_ready
        self._pubsub: Any = None
        self._task: asyncio.Task[None] | None = None
        self._confirmed: dict[str, asyncio.Future[None]] = {}
        self._waiting: dict[tuple[str, str], set[asyncio.Future[Message]]] = {}
        self.observer: Observer | None = None  # told of every confirmation, message and loss (the near cache)

    def expect(self, channel: str, ident: str) -> asyncio.Future[Message]:
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault((channel, ident), set()).add(future)
        return future

    def forget(self, channel: str, ident: str, future: asyncio.Future[Message]) -> None:
        waiting = self._waiting.get((channel, ident))
        if waiting is not None:
            waiting.discard(future)
            if not waiting:
                del self._waiting[(channel, ident)]

    async def subscribe(self, channel: str) -> None:
        confirmed = self._confirmed.get(channel)
        if confirmed is None:
            confirmed = self._confirmed[channel] = asyncio.get_running_loop().create_future()
            try:
                if self._ready is not None:
                    await self._ready()
                if self._pubsub is None:
                    self._pubsub = self._client.pubsub()
                if self._ready is not None:
                    await sharded_subscribe(self._pubsub, channel)
                else:
                    await self._pubsub.subscribe(channel)
            except BaseException:
                self._reset()
                raise
            connection = getattr(self._pubsub, "connection", None)  # a Cluster's sharded pub/sub has one per node
            if connection is not None and hasattr(connection, "register_connect_callback"):
                connection.register_connect_callback(self._reconnected)
            if self._task is None or self._task.done():
                self._task = asyncio.create_task(self._read(self._pubsub), name="hyperion-lock-cache-listener")
        await asyncio.shield(confirmed)

    async def _read(self, pubsub: Any) -> None:
        try:
            while True:
                message = await (next_sharded(pubsub, 0.1) if self._ready else pubsub.get_message(timeout=None))
                if message is not None:
                    self._route(message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if self._pubsub is pubsub:
                self._reset(exc)

    def _route(self, message: dict[str, Any]) -> None:
        channel = as_text(message.get("channel")) or ""
        if message.get("type") == "subscribe":
            confirmed = self._confirmed.get(channel)
            if confirmed is not None and not confirmed.done():
                confirmed.set_result(None)
            if confirmed is not None and self.observer is not None:  # also after redis-py resubscribed by itself
                self.observer.subscribed(channel)
            return
        if message.get("type") != "message":
            return
        parsed = Message.parse(as_text(message.get("data")) or "")
        if parsed is not None:
            if self.observer is not None:
                self.observer.message(channel, parsed.ident)
            for future in list(self._waiting.get((channel, parsed.ident), ())):
                resolve(future, parsed)

    def _reconnected(self, connection: Any) -> None:
        """redis-py reconnected the pub/sub connection by itself (its retry) and subscribes again: messages sent
        in between are lost. Waiters read again; the near cache drops everything until confirmed again."""
        if self.observer is not None:
            self.observer.lost()
        for (_channel, ident), futures in list(self._waiting.items()):
            for future in list(futures):
                resolve(future, Message(ident, "retry"))

    def _reset(self, exc: BaseException | None = None) -> None:
        """Forget the connection; waiters read again (and find Redis down, or the value)."""
        if self.observer is not None:
            self.observer.lost()
        pubsub, self._pubsub = self._pubsub, None
        for confirmed in self._confirmed.values():
            if not confirmed.done():
                confirmed.set_exception(exc or ConnectionError("pub/sub connection lost"))
                confirmed.exception()  # retrieved: nobody may be waiting for it
        self._confirmed.clear()
        for (_channel, ident), futures in list(self._waiting.items()):
            for future in list(futures):
                resolve(future, Message(ident, "retry"))
        if pubsub is not None:
            asyncio.get_running_loop().create_task(close_quietly(pubsub))

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
        self._reset()


class RedisStore:
    """Entries in Redis, shared by every worker and host; one instance per event loop."""

    shared = True

    def __init__(self, client: aredis.Redis, where: str, prefix: str) -> None:
        self._client = client
        self.where = where
        self.prefix = prefix
        self._scripts: dict[str, Any] = {}
        self.sharded = is_cluster_client(client)  # a Redis Cluster: the scripts publish with SPUBLISH
        self._initialized: asyncio.Future[Any] | None = None
        self._listener = _Listener(client, self._ready if self.sharded else None)
        self._registered: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._last_reply = -1.0  # event-loop time of the last reply from Redis

    def describe(self) -> str:
        return f"Redis at {self.where}"

    def watch(self, observer: Observer) -> None:
        self._listener.observer = observer

    def replied_since(self, when: float) -> bool:
        """Whether Redis answered anything since ``when`` (loop time): it is alive, even if a reply is late. Also
        true before its first reply ever: connections and scripts are being set up (a worker's first burst), so
        a slow first call is given the whole cap of :func:`within` (1 s) before it counts as a failure."""
        return self._last_reply >= when or self._last_reply < 0

    async def _ready(self) -> None:
        """A Cluster client reads the slot map (``CLUSTER SHARDS``/``SLOTS`` from the startup nodes) before its first
        command. Concurrent first calls share one such read, shielded: a call that times out does not cancel it
        half-way, and once done it counts as a reply (Redis is there)."""
        reading = self._initialized
        if reading is None or (reading.done() and (reading.cancelled() or reading.exception() is not None)):
            reading = self._initialized = asyncio.ensure_future(self._client.initialize())
        if not reading.done():
            await asyncio.shield(reading)
            self._last_reply = asyncio.get_running_loop().time()

    async def warm(self) -> None:
        """Open a connection and load every script, so the first requests do not pay for it."""
        if self.sharded:
            await self._ready()
        for script in SCRIPTS:
            if script not in self._scripts:
                self._scripts[script] = self._client.register_script(self._code(script))
            await self._client.script_load(self._code(script))
        self._last_reply = asyncio.get_running_loop().time()

    async def _run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        if self.sharded:
            await self._ready()
        if script not in self._scripts:
            self._scripts[script] = self._client.register_script(self._code(script))
        result = await self._scripts[script](keys=keys, args=args)
        self._last_reply = asyncio.get_running_loop().time()
        return result

    def _code(self, script: str) -> str:
        """The script as sent: on a Cluster its wake-ups go to the namespace's shard channel (same hash tag as its
        keys, so the same slot and node)."""
        return sharded_script(script) if self.sharded else script

    def _register(self, keys: CacheKeys) -> None:
        """List the namespace for ``hyperion-lock status`` (its own key and slot: a separate, background call)."""
        if keys.namespace in self._registered:
            return
        self._registered.add(keys.namespace)

        async def register() -> None:
            try:
                await self._client.sadd(CacheKeys.registry(keys.prefix), keys.namespace)
            except Exception:
                self._registered.discard(keys.namespace)  # try again with the next read

        task = asyncio.get_running_loop().create_task(register())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def expect(self, keys: CacheKeys, ident: str) -> asyncio.Future[Message]:
        return self._listener.expect(keys.channel, ident)

    def forget(self, keys: CacheKeys, ident: str, future: asyncio.Future[Message]) -> None:
        self._listener.forget(keys.channel, ident, future)

    async def listen(self, keys: CacheKeys) -> None:
        """Listen to the namespace's channel (once per store); needed only by callers that wait."""
        await self._listener.subscribe(keys.channel)

    async def read(self, keys: CacheKeys, ident: str, tags: tuple[str, ...], token: str, lease_ms: int,
                   take: TakeMode) -> Read:
        header, payload, left, state, lease_left, version, *wrong = await self._run(
            READ, [keys.entry(ident), keys.version, keys.lease(ident), *(keys.tag_index(t) for t in tags)],
            [token, lease_ms, int(take), ident],
        )
        self._register(keys)
        entry, unreadable = None, (f"not a hash: {as_text(wrong[0])}" if wrong and wrong[0] else None)
        if header is not None and payload is not None:
            try:
                entry = Entry(Header.from_json(as_text(header) or ""), bytes(payload), int(left))
            except Exception as exc:  # the entry's own fault: Redis answered, so this is no store failure
                unreadable = f"{type(exc).__name__}: {exc}"
        return Read(entry, LeaseState(int(state)), int(lease_left), int(version), unreadable)

    async def take(self, keys: CacheKeys, ident: str, tags: tuple[str, ...], token: str, lease_ms: int) -> bool:
        taken = await self._run(TAKE, [keys.lease(ident), *(keys.tag_index(t) for t in tags)],
                                [token, lease_ms, ident])
        return bool(int(taken))

    async def renew(self, keys: CacheKeys, ident: str, tags: tuple[str, ...], token: str, lease_ms: int) -> bool:
        return bool(int(await self._run(RENEW, [keys.lease(ident), *(keys.tag_index(t) for t in tags)],
                                        [token, lease_ms, ident])))

    async def put(self, keys: CacheKeys, ident: str, tags: tuple[str, ...], token: str, header: Header,
                  payload: bytes, seen_version: int) -> PutResult:
        result = await self._run(
            PUT,
            [keys.entry(ident), keys.version, keys.lease(ident), keys.index, *(keys.tag_index(t) for t in tags)],
            [token, header.to_json(), payload, _life_ms(header), seen_version, keys.channel,
             Message(ident, "ok").to_json(), Message(ident, "retry").to_json(), ident],
        )
        return PutResult(int(result))

    async def release(self, keys: CacheKeys, ident: str, token: str, message: Message) -> bool:
        return bool(int(await self._run(RELEASE, [keys.lease(ident)], [token, keys.channel, message.to_json()])))

    async def invalidate_key(self, keys: CacheKeys, ident: str) -> int:
        return int(await self._run(INVALIDATE_KEY, [keys.entry(ident), keys.lease(ident), keys.index],
                                   [keys.channel, Message(ident, "retry").to_json(), ident]))

    async def invalidate_tag(self, keys: CacheKeys, tag: str) -> int:
        return int(await self._run(INVALIDATE_TAG, [keys.tag_index(tag), keys.index],
                                   [keys.entry_prefix, keys.lease_prefix, keys.channel]))

    async def invalidate_namespace(self, keys: CacheKeys) -> int:
        return int(await self._run(INVALIDATE_NAMESPACE, [keys.version, keys.index],
                                   [keys.channel, Message("", "retry").to_json()]))

    async def secret(self, keys: CacheKeys) -> bytes:
        value = await self._run(SECRET, [keys.secret], [os.urandom(32)])
        return value if isinstance(value, bytes) else str(value).encode("latin-1")

    async def check(self) -> None:
        """The circuit breaker's recovery check: a small write (an OOM or read-only server refuses it)."""
        await self._client.set(CacheKeys.probe(self.prefix), b"1", px=1000)

    async def add_stats(self, keys: CacheKeys, counts: dict[str, float]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for name, value in counts.items():
            if isinstance(value, int):
                pipe.hincrby(keys.stats, name, value)
            else:
                pipe.hincrbyfloat(keys.stats, name, value)
        await pipe.execute()

    async def close(self) -> None:
        await self._listener.close()
        await cancel_and_wait(list(self._tasks))
        await close_quietly(self._client)
        pool = getattr(self._client, "connection_pool", None)  # a RedisCluster has one per node, closed with it
        if pool is not None:
            await _close_quietly(pool.disconnect)  # a pool passed in is not closed by the client
