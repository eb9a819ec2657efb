"""Where cache entries live: Redis (shared by every worker and host) or this process's memory (no Redis).

Both stores offer the same steps with the same meaning, so the algorithm in :mod:`.facade` has one path:
``read`` (and take the compute lease when there is no valid entry), ``take`` (a refresh lease), ``renew``,
``put`` (fenced: only the lease's owner, only if nothing was invalidated since the lease was taken), ``release``
(give the lease up and tell the waiters why), the three invalidations, and ``expect``: a future for the next
message about one entry, registered *before* the read so a message sent in between is not missed.

Every Redis step is one Lua script (below), keyed on the owner token of the call. Replies become the typed
values :class:`Read`, :class:`LeaseState`, :class:`PutResult`.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, NoReturn, Protocol, TypeVar, cast

import redis as _redis
import redis.asyncio as aredis
from redis.asyncio import connection as aconn
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from hyperion_lock._aio import cancel_and_wait
from hyperion_lock.cache.keys import CacheKeys
from hyperion_lock.connection.clients import as_text, async_client_from_url, async_closer, client_kwargs
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

T = TypeVar("T")

# -- Lua ---------------------------------------------------------------------------------------------------------
# Every script touches the keys of one namespace only (one hash tag, one Cluster slot). The tag-invalidation
# script builds entry and lease names from the namespace's own prefix (ARGV), so they are in that slot too.

# A tag index (ZSET: entry id -> when it may last matter, in Redis ms) registers live entries and taken compute
# leases, so that tag invalidation can drop the one and fence the other. The index key lives as long as its
# latest member: a shorter life (an earlier entry's) would let it expire, registration and all, while a
# computation of an entry of that tag still runs, and that computation's value would then be stored after an
# invalidation of the tag had returned.
# KEEP(index, id, expiry, now): register id until expiry (never earlier than it already was), and keep the key.
KEEP = """
local function keep(index, id, expiry, now)
  redis.call('ZADD', index, 'GT', expiry, id)
  local top = redis.call('ZRANGE', index, -1, -1, 'WITHSCORES')
  local want = math.ceil(tonumber(top[2]) - now)
  local left = redis.call('PTTL', index)
  if want > 0 and left < want then redis.call('PEXPIRE', index, want) end
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# Read an entry; take its compute lease when there is no valid entry (or always, for a forced refresh).
# KEYS[1] entry (HASH h = header JSON, v = payload, n = namespace version it was written under; a key of another
#         type is deleted: nothing this cache wrote)
# KEYS[2] namespace version
# KEYS[3] compute lease
# KEYS[4..] tag indexes of this entry (a taken lease is registered there, so tag invalidation can fence it)
# ARGV[1] owner token of this call
# ARGV[2] lease TTL (ms)
# ARGV[3] '0' never take, '1' take when there is no valid entry, '2' take even over a valid entry
# ARGV[4] the entry's id (member of the indexes)
# returns [1] header JSON or false (no entry, or one written under an older namespace version: deleted now)
#         [2] payload or false
#         [3] remaining life of the entry (ms; -2 when there is none)
#         [4] lease: 1 held by this token (taken now, or by an earlier call with it), 0 by another, -1 free
#         [5] remaining life of the lease (ms; -2 when there is none)
#         [6] namespace version now (the fence a later PUT is checked against)
#         [7] why the entry's key was deleted as unreadable (another Redis type), or false
READ = KEEP + """
local version = redis.call('GET', KEYS[2]) or '0'
local e = redis.pcall('HMGET', KEYS[1], 'h', 'v', 'n')
local wrong = false
if e.err then  -- not a hash (WRONGTYPE): not an entry this cache can read; dropped like an outdated one
  redis.call('DEL', KEYS[1])
  wrong, e = e.err, {false, false, false}
end
local header, payload, left = e[1], e[2], -2
if header then
  if e[3] ~= version then
    redis.call('DEL', KEYS[1])
    header, payload = false, false
  else
    left = redis.call('PTTL', KEYS[1])
  end
end
local holder = redis.call('GET', KEYS[3])
local state = -1
if holder == ARGV[1] then state = 1 elseif holder then state = 0 end
if state == -1 and (ARGV[3] == '2' or (ARGV[3] == '1' and not header)) then
  redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[2])
  state = 1
  local now = now_ms()
  for i = 4, #KEYS do keep(KEYS[i], ARGV[4], now + tonumber(ARGV[2]), now) end
end
return {header, payload, left, state, redis.call('PTTL', KEYS[3]), tonumber(version), wrong}
"""

# Take the lease to refresh a stale (or soon stale) entry in the background.
# KEYS[1] compute lease
# KEYS[2..] tag indexes of this entry
# ARGV[1] owner token
# ARGV[2] lease TTL (ms)
# ARGV[3] the entry's id
# returns 1 held by this token (taken now, or by an earlier call with it), 0 held by another
TAKE = KEEP + """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then return 1 end
if holder then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local now = now_ms()
for i = 2, #KEYS do keep(KEYS[i], ARGV[3], now + tonumber(ARGV[2]), now) end
return 1
"""

# Keep the lease while the computation runs, and its registration in the entry's tag indexes with it (a
# registration that ran out with the first TTL was trimmed by the next PUT of the tag, and a tag invalidation then
# missed this computation). It is never re-created: an invalidation deletes it on purpose.
# KEYS[1] compute lease
# KEYS[2..] tag indexes of this entry
# ARGV[1] owner token
# ARGV[2] lease TTL (ms)
# ARGV[3] the entry's id
# returns 1 renewed, 0 lost (invalidated, or expired and taken by another worker; nothing changed)
RENEW = KEEP + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local now = now_ms()
for i = 2, #KEYS do keep(KEYS[i], ARGV[3], now + tonumber(ARGV[2]), now) end
return 1
"""

# Store a computed value: only while this token holds the lease, and only if the namespace was not invalidated
# since the lease was taken (key and tag invalidations delete the lease itself).
# KEYS[1] entry
# KEYS[2] namespace version
# KEYS[3] compute lease
# KEYS[4] namespace index
# KEYS[5..] tag indexes of this entry
# ARGV[1] owner token (also stored in the header as "o", so a retried call can tell it already stored)
# ARGV[2] header JSON
# ARGV[3] payload
# ARGV[4] entry life (ms): ttl + stale period
# ARGV[5] namespace version seen when the lease was taken
# ARGV[6] channel
# ARGV[7] message "stored"
# ARGV[8] message "nothing stored, read again"
# ARGV[9] the entry's id
# returns 1 stored, waiters woken (also for a retry of this token's own earlier call)
#         0 fenced: the namespace was invalidated meanwhile; nothing stored, lease dropped, waiters told to read again
#         2 lease lost: invalidated by key or tag, or expired and taken by another worker; nothing stored or
#           published (the invalidation told the waiters, or the new holder will)
PUT = KEEP + """
local holder = redis.call('GET', KEYS[3])
if holder ~= ARGV[1] then
  local h = redis.pcall('HGET', KEYS[1], 'h')
  if type(h) == 'string' then
    local ok, d = pcall(cjson.decode, h)
    if ok and type(d) == 'table' and d.o == ARGV[1] then return 1 end
  end
  return 2
end
redis.call('DEL', KEYS[3])
if tonumber(redis.call('GET', KEYS[2]) or '0') ~= tonumber(ARGV[5]) then
  redis.call('PUBLISH', ARGV[6], ARGV[8])
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'h', ARGV[2], 'v', ARGV[3], 'n', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
local now = now_ms()
local life = tonumber(ARGV[4])
redis.call('ZADD', KEYS[4], now + life, ARGV[9])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
for i = 5, #KEYS do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  redis.call('ZADD', KEYS[i], now + life, ARGV[9])
  keep(KEYS[i], ARGV[9], now + life, now)
end
redis.call('PUBLISH', ARGV[6], ARGV[7])
return 1
"""

# Give the lease up without a value (the computation raised, or was interrupted) and tell the waiters why.
# KEYS[1] compute lease
# ARGV[1] owner token
# ARGV[2] channel
# ARGV[3] message (the error, or "read again")
# returns 1 released and published, 0 not held by this token (nothing changed)
RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"""

# Drop one entry, and fence a computation of it that is in flight (its lease is deleted). The message goes out
# whether or not there was anything: waiters of a fenced computation read again, and every worker drops the
# entry from its near cache.
# KEYS[1] entry
# KEYS[2] compute lease
# KEYS[3] namespace index
# ARGV[1] channel
# ARGV[2] message "read again"
# ARGV[3] the entry's id
# returns 1 an entry was dropped, 0 there was none
INVALIDATE_KEY = """
local n = redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[2])
redis.call('PUBLISH', ARGV[1], ARGV[2])
redis.call('ZREM', KEYS[3], ARGV[3])
return n
"""

# Drop every entry carrying a tag, and fence the computations of such entries in flight. O(entries of the tag);
# one message per entry (waiters read again, near caches drop it).
# KEYS[1] tag index
# KEYS[2] namespace index
# ARGV[1] entry name prefix of the namespace
# ARGV[2] lease name prefix of the namespace
# ARGV[3] channel
# returns the number of entries dropped
INVALIDATE_TAG = """
local n = 0
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  n = n + redis.call('DEL', ARGV[1] .. id)
  redis.call('DEL', ARGV[2] .. id)
  redis.call('PUBLISH', ARGV[3], cjson.encode({k = id, o = 'retry'}))
  redis.call('ZREM', KEYS[2], id)
end
redis.call('DEL', KEYS[1])
return n
"""

# Drop a whole namespace in O(1): entries written under the old version are ignored (and deleted when read), and
# computations in flight are fenced by PUT's version check.
# KEYS[1] namespace version
# KEYS[2] namespace index
# ARGV[1] channel
# ARGV[2] message about the whole namespace (entry id ""): every near cache drops the namespace's entries
# returns the number of live entries dropped
INVALIDATE_NAMESPACE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = redis.call('ZCOUNT', KEYS[2], '(' .. now, '+inf')
redis.call('INCR', KEYS[1])
redis.call('DEL', KEYS[2])
redis.call('PUBLISH', ARGV[1], ARGV[2])
return n
"""


# The namespace's key for keyed hashes in key names: the first caller's random one, kept (no TTL).
# KEYS[1] secret   ARGV[1] a new random key, used only if there is none   returns the key
SECRET = """
local k = redis.call('GET', KEYS[1])
if not k then
  redis.call('SET', KEYS[1], ARGV[1])
  k = ARGV[1]
end
return k
"""

SCRIPTS = (READ, TAKE, RENEW, PUT, RELEASE, INVALIDATE_KEY, INVALIDATE_TAG, INVALIDATE_NAMESPACE, SECRET)


# -- typed replies -----------------------------------------------------------------------------------------------
class LeaseState(IntEnum):
    FREE = -1
    OTHER = 0  # another caller computes it
    MINE = 1


class PutResult(IntEnum):
    FENCED = 0  # invalidated while computing: not stored, waiters read again
    STORED = 1
    LOST = 2  # the lease was gone (invalidated by key/tag, or expired and taken over): not stored


class TakeMode(IntEnum):
    NEVER = 0
    IF_MISSING = 1
    ALWAYS = 2


@dataclass(frozen=True)
class Header:
    """What is stored beside a payload (wire names in :meth:`to_json`)."""

    ttl_ms: int
    stale_ms: int
    etag: str
    codec: str
    version: int  # namespace version it was written under
    owner: str = ""  # token of the call that wrote it
    error: bool = False  # a cached error (``cache_errors``): the payload is the error message
    compute_ms: int = 0
    runner: str = ""
    status: int = 0  # an HTTP status the endpoint set on ``response: Response`` (0: none)
    headers: tuple[tuple[str, str], ...] = ()  # HTTP headers the endpoint set on ``response: Response``

    def to_json(self) -> str:
        data: dict[str, Any] = {"t": self.ttl_ms, "s": self.stale_ms, "e": self.etag, "c": self.codec,
                                "n": self.version, "o": self.owner, "x": int(self.error), "d": self.compute_ms,
                                "r": self.runner}
        if self.status:
            data["hs"] = self.status
        if self.headers:
            data["hx"] = [list(pair) for pair in self.headers]
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> Header:
        """Parse a stored header; ``ValueError`` (with what is wrong) for anything of another shape or type: the
        caller treats that entry alone as unreadable (a miss), never the store as failing."""
        d = json.loads(text)
        if not isinstance(d, dict):
            raise ValueError(f"the header is a JSON {type(d).__name__}, not an object")
        get: Callable[..., Any] = d.get
        t, s, e, c, n = get("t"), get("s"), get("e"), get("c"), get("n")
        o, x, ms, r, hs, hx = get("o", ""), get("x", 0), get("d", 0), get("r", ""), get("hs", 0), get("hx")
        # one pass on the hit path; ``type(..) is int`` leaves bools out
        if not (type(t) is int and type(s) is int and type(n) is int and type(x) is int and type(ms) is int
                and type(hs) is int and t >= 0 and s >= 0 and n >= 0 and ms >= 0 and hs >= 0
                and type(e) is str and type(c) is str and type(o) is str and type(r) is str):
            _explain(d)
        return cls(ttl_ms=t, stale_ms=s, etag=e, codec=c, version=n, owner=o, error=bool(x), compute_ms=ms,
                   runner=r, status=hs, headers=_pairs(hx) if hx is not None else ())


_MISSING: Any = object()


def _explain(d: dict[str, Any]) -> NoReturn:
    """Raise ``ValueError`` naming the first header field that is missing or of the wrong type."""
    for name, kind, low, default in (("t", int, 0, _MISSING), ("s", int, 0, _MISSING), ("e", str, None, _MISSING),
                                     ("c", str, None, _MISSING), ("n", int, 0, _MISSING), ("o", str, None, ""),
                                     ("x", int, 0, 0), ("d", int, 0, 0), ("r", str, None, ""), ("hs", int, 0, 0)):
        value: Any = d.get(name, default)
        if value is _MISSING:
            raise ValueError(f"the header has no {name!r}")
        if isinstance(value, bool) or not isinstance(value, kind) or (low is not None and cast(int, value) < low):
            raise ValueError(f"the header's {name!r} is {value!r}, not a {kind.__name__}"
                             + (f" >= {low}" if low is not None else ""))
    raise ValueError("the header is of the wrong shape")


def _pairs(items: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(items, list) or not all(
            isinstance(i, list) and len(i) == 2 and all(isinstance(x, str) for x in i) for i in items):
        raise ValueError("the header's 'hx' is not a list of [name, value] strings")
    return tuple((name, value) for name, value in items)


@dataclass(frozen=True)
class Entry:
    header: Header
    payload: bytes
    left_ms: int


@dataclass(frozen=True)
class Read:
    entry: Entry | None
    lease: LeaseState
    lease_left_ms: int
    version: int
    unreadable: str | None = None  # there is an entry, but its header cannot be parsed (why): a miss, recomputed


@dataclass(frozen=True)
class Message:
    """What a waiter hears about an entry: ``ok`` (stored: read it), ``retry`` (nothing stored: read again,
    maybe take over), ``bypass`` (computed but not cacheable, over ``max_size``: compute it directly) or ``error``
    (the computation raised: pass it on)."""

    ident: str
    outcome: str
    error_type: str | None = None
    error_message: str | None = None
    status_code: int | None = None
    detail: Any = None
    runner: str | None = None

    def to_json(self) -> str:
        data: dict[str, Any] = {"k": self.ident, "o": self.outcome}
        if self.outcome == "error":
            data.update(t=self.error_type, m=self.error_message, s=self.status_code, d=self.detail, r=self.runner)
        return json.dumps(data, default=str)

    @classmethod
    def parse(cls, text: str) -> Message | None:
        try:
            d = json.loads(text)
            return cls(ident=str(d["k"]), outcome=str(d["o"]), error_type=d.get("t"), error_message=d.get("m"),
                       status_code=d.get("s"), detail=d.get("d"), runner=d.get("r"))
        except (ValueError, KeyError, TypeError):
            return None


class Observer(Protocol):
    """What hears about a channel besides the waiters (the near cache, :mod:`.near`)."""

    def subscribed(self, channel: str) -> None: ...

    def message(self, channel: str, ident: str) -> None: ...

    def lost(self) -> None: ...


class Store(Protocol):
    shared: bool  # True: every worker and host sees it (Redis)

    def watch(self, observer: Observer) -> None: ...

    def describe(self) -> str: ...

    def expect(self, keys: CacheKeys, ident: str) -> asyncio.Future[Message]: ...

    def forget(self, keys: CacheKeys, ident: str, future: asyncio.Future[Message]) -> None: ...

    def replied_since(self, when: float) -> bool: ...

    async def listen(self, keys: CacheKeys) -> None: ...

    async def warm(self) -> None: ...

    async def read(self, keys: CacheKeys, ident: str, tags: tuple[str, ...], token: str, lease_ms: int,
                   take: TakeMode) -> Read: ...

    async def take(self, keys: CacheKeys, ident: str, tags: tuple[str, ...], token: str, lease_ms: int) -> bool: ...

    async def renew(self, keys: CacheKeys, ident: str, tags: tuple[str, ...], token: str, lease_ms: int) -> bool: ...

    async def put(self, keys: CacheKeys, ident: str, tags: tuple[str, ...], token: str, header: Header,
                  payload: bytes, seen_version: int) -> PutResult: ...

    async def release(self, keys: CacheKeys, ident: str, token: str, message: Message) -> bool: ...

    async def invalidate_key(self, keys: CacheKeys, ident: str) -> int: ...

    async def invalidate_tag(self, keys: CacheKeys, tag: str) -> int: ...

    async def invalidate_namespace(self, keys: CacheKeys) -> int: ...

    async def check(self) -> None: ...

    async def secret(self, keys: CacheKeys) -> bytes: ...

    async def add_stats(self, keys: CacheKeys, counts: dict[str, float]) -> None: ...

    async def close(self) -> None: ...


async def close_quietly(resource: Any) -> None:
    """Close an asyncio client (with its pool) or pub/sub of any redis-py version, ignoring a dead connection."""
    await _close_quietly(async_closer(resource))


def _life_ms(header: Header) -> int:
    return max(1, header.ttl_ms + header.stale_ms)


# -- memory -------------------------------------------------------------------------------------------------------
@dataclass
class _MemEntry:
    header: Header
    payload: bytes
    expires: float


@dataclass
class _MemNamespace:
    version: int = 0
    entries: OrderedDict[str, _MemEntry] = field(default_factory=OrderedDict)
    leases: dict[str, tuple[str, float]] = field(default_factory=dict)
    tags: dict[str, set[str]] = field(default_factory=dict)


class MemoryStore:
    """This process's memory: the same semantics inside one worker, shared by its event loops and threads.

    At most ``max_entries`` entries per namespace (least recently used ones go first). Waiters on another loop
    of this process are woken with ``call_soon_threadsafe``.
    """

    shared = False

    def __init__(self, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._spaces: dict[str, _MemNamespace] = {}
        self._waiting: dict[tuple[str, str], set[asyncio.Future[Message]]] = {}
        self._secrets: dict[str, bytes] = {}

    def describe(self) -> str:
        return "process memory"

    def watch(self, observer: Observer) -> None:
        return None  # this process's memory needs no near cache

    def _space(self, keys: CacheKeys) -> _MemNamespace:
        return self._spaces.setdefault(keys.namespace, _MemNamespace())

    def expect(self, keys: CacheKeys, ident: str) -> asyncio.Future[Message]:
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        with self._lock:
            self._waiting.setdefault((keys.namespace, ident), set()).add(future)
        return future

    def forget(self, keys: CacheKeys, ident: str, future: asyncio.Future[Message]) -> None:
        with self._lock:
            waiting = self._waiting.get((keys.namespace, ident))
            if waiting is not None:
                waiting.discard(future)
                if not waiting:
                    del self._waiting[(keys.namespace, ident)]

    def _notify(self, namespace: str, message: Message) -> None:
        for future in list(self._waiting.get((namespace, message.ident), ())):
            future.get_loop().call_soon_threadsafe(_resolve, future, message)

    def replied_since(self, when: float) -> bool:
        return True

    async def listen(self, keys: CacheKeys) -> None:
        return None

    async def warm(self) -> None:
        return None

    def _live(self, space: _MemNamespace, ident: str, now: float) -> _MemEntry | None:
        entry = space.entries.get(ident)
        if entry is None:
            return None
        if entry.expires <= now or entry.header.version != space.version:
            del space.entries[ident]
            return None
        space.entries.move_to_end(ident)
        return entry

    def _holder(self, space: _MemNamespace, ident: str, now: float) -> tuple[str, float] | None:
        lease = space.leases.get(ident)
        if lease is not None and lease[1] <= now:
            del space.leases[ident]
            return None
        return lease

    def _owns(self, space: _MemNamespace, ident: str, token: str, now: float) -> bool:
        """Whether ``token`` holds the live compute lease of ``ident``."""
        lease = self._holder(space, ident, now)
        return lease is not None and lease[0] == token

    def _take(self, space: _MemNamespace, ident: str, tags: tuple[str, ...], token: str, until: float) -> None:
        space.leases[ident] = (token, until)
        for tag in tags:
            space.tags.setdefault(tag, set()).add(ident)

    async def read(self, keys: CacheKeys, ident: str, tags: tuple[str, ...], token: str, lease_ms: int,
                   take: TakeMode) -> Read:
        now = self._clock()
        with self._lock:
            space = self._space(keys)
            entry = self._live(space, ident, now)
            lease = self._holder(space, ident, now)
            state = LeaseState.FREE if lease is None else LeaseState.MINE if lease[0] == token else LeaseState.OTHER
            if state is LeaseState.FREE and (take is TakeMode.ALWAYS or (take is TakeMode.IF_MISSING and not entry)):
                self._take(space, ident, tags, token, now + lease_ms / 1000)
                state, lease = LeaseState.MINE, (token, now + lease_ms / 1000)
            found = Entry(entry.header, entry.payload, int((entry.expires - now) * 1000)) if entry else None
            lease_left = int((lease[1] - now) * 1000) if lease else -2
            return Read(found, state, lease_left, space.version)

    async def take(self, keys: CacheKeys, ident: str, tags: tuple[str, ...], token: str, lease_ms: int) -> bool:
        now = self._clock()
        with self._lock:
            space = self._space(keys)
            lease = self._holder(space, ident, now)
            if lease is not None:
                return lease[0] == token
            self._take(space, ident, tags, token, now + lease_ms / 1000)
            return True

    async def renew(self, keys: CacheKeys, ident: str, tags: tuple[str, ...], token: str, lease_ms: int) -> bool:
        now = self._clock()
        with self._lock:
            space = self._space(keys)
            if not self._owns(space, ident, token, now):
                return False
            space.leases[ident] = (token, now + lease_ms / 1000)
            return True

    async def put(self, keys: CacheKeys, ident: str, tags: tuple[str, ...], token: str, header: Header,
                  payload: bytes, seen_version: int) -> PutResult:
        now = self._clock()
        with self._lock:
            space = self._space(keys)
            if not self._owns(space, ident, token, now):
                return PutResult.LOST
            del space.leases[ident]
            if space.version != seen_version:
                self._notify(keys.namespace, Message(ident, "retry"))
                return PutResult.FENCED
            space.entries[ident] = _MemEntry(header, payload, now + _life_ms(header) / 1000)
            space.entries.move_to_end(ident)
            for tag in tags:
                space.tags.setdefault(tag, set()).add(ident)
            while len(space.entries) > self.max_entries:
                space.entries.popitem(last=False)
            self._notify(keys.namespace, Message(ident, "ok"))
            return PutResult.STORED

    async def release(self, keys: CacheKeys, ident: str, token: str, message: Message) -> bool:
        now = self._clock()
        with self._lock:
            space = self._space(keys)
            if not self._owns(space, ident, token, now):
                return False
            del space.leases[ident]
            self._notify(keys.namespace, message)
            return True

    def _drop(self, space: _MemNamespace, namespace: str, ident: str) -> int:
        dropped = int(space.entries.pop(ident, None) is not None)
        if space.leases.pop(ident, None) is not None:
            self._notify(namespace, Message(ident, "retry"))
        return dropped

    async def invalidate_key(self, keys: CacheKeys, ident: str) -> int:
        with self._lock:
            return self._drop(self._space(keys), keys.namespace, ident)

    async def invalidate_tag(self, keys: CacheKeys, tag: str) -> int:
        with self._lock:
            space = self._space(keys)
            return sum(self._drop(space, keys.namespace, ident) for ident in space.tags.pop(tag, set()))

    async def invalidate_namespace(self, keys: CacheKeys) -> int:
        now = self._clock()
        with self._lock:
            space = self._space(keys)
            live = sum(1 for e in space.entries.values() if e.expires > now and e.header.version == space.version)
            space.version += 1
            space.entries.clear()
            space.tags.clear()
            return live

    async def check(self) -> None:
        return None

    async def secret(self, keys: CacheKeys) -> bytes:
        with self._lock:
            return self._secrets.setdefault(keys.namespace, os.urandom(32))

    async def add_stats(self, keys: CacheKeys, counts: dict[str, float]) -> None:
        return None

    async def close(self) -> None:
        return None


def _resolve(future: asyncio.Future[Message], message: Message) -> None:
    if not future.done():
        future.set_result(message)


# -- Redis --------------------------------------------------------------------------------------------------------
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
                _resolve(future, parsed)

    def _reconnected(self, connection: Any) -> None:
        """redis-py reconnected the pub/sub connection by itself (its retry) and subscribes again: messages sent
        in between are lost. Waiters read again; the near cache drops everything until confirmed again."""
        if self.observer is not None:
            self.observer.lost()
        for (_channel, ident), futures in list(self._waiting.items()):
            for future in list(futures):
                _resolve(future, Message(ident, "retry"))

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
                _resolve(future, Message(ident, "retry"))
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


async def within(awaitable: Awaitable[T], timeout: float, alive: Callable[[float], bool] | None = None,
                 cap: float = 1.0) -> T:
    """Await in the calling task with a timeout that does not mistake a busy worker for a dead Redis.

    At the deadline a timer decides: if it fired late because the event loop was busy (a burst of requests: the
    reply may sit unread in a socket), or ``alive(since)`` says Redis answered other calls during the last
    ``timeout`` (alive, only slow to us), the deadline moves on (by ``timeout``, or twice the lateness), never
    past ``cap`` seconds in all; otherwise the call is cancelled and ``TimeoutError`` raised. A dead or stopped
    Redis answers nothing: an idle loop then times out after ``timeout`` exactly. No extra task per call.

    The cancel can be lost (Python < 3.12, see ``_aio``): a write to a stopped Redis completes at once, into
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
