"""The store in this process's memory (no Redis): the same steps and replies as the Redis store, inside one
worker."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from hyperion_lock.cache.keys import CacheKeys
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
    resolve,
)


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
            future.get_loop().call_soon_threadsafe(resolve, future, message)

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
