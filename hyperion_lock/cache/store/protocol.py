"""What a store is: the steps both stores offer (:class:`Store`), with the same meaning, and their typed replies
(:class:`Read`, :class:`LeaseState`, :class:`PutResult`), the stored header and the message a waiter hears."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, NoReturn, Protocol, cast

from hyperion_lock.cache.keys import CacheKeys
from hyperion_lock.connection.clients import async_closer
from hyperion_lock.connection.clients import close_quietly as _close_quietly


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


def resolve(future: asyncio.Future[Message], message: Message) -> None:
    """Hand ``message`` to a waiter's future, unless it is already done (cancelled, or told before)."""
    if not future.done():
        future.set_result(message)
