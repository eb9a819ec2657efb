"""A per-worker near cache of hot entries: a fresh hit served from this process's memory, with no Redis call.

Pure: no I/O, no clock of its own (callers pass monotonic ``now``). The I/O around it is the namespace's pub/sub
channel, which every worker that reads a namespace listens to; the listener reports to this object
(:meth:`NearCache.subscribed`, :meth:`NearCache.message`, :meth:`NearCache.lost`).

**The promise.** An entry is kept here only while this worker's subscription to its namespace's channel is
confirmed and unbroken, and only until the point where the stored entry stops being simply fresh (its TTL minus
``refresh_ahead``, measured from when the read that found it was *sent*, so never later than in Redis). Every
change of an entry publishes on that channel inside the same Lua call that makes it (a new value: ``ok``; key and
tag invalidations: one ``retry`` per entry; a namespace invalidation: one message for the whole namespace), so:
once ``invalidate*()`` returned in any worker, this worker serves the old entry only until its event loop has read
that message from its pub/sub connection (the delay of a wake-up, milliseconds), never after. If the connection
breaks (messages may have been lost) or the store's breaker opens (this worker may be cut off from Redis),
everything here is dropped at once and nothing is kept until the channel is confirmed again.

**The race it closes.** A read's reply and a message about the same entry arrive on two connections; the
message may be handled first. So a read result is kept only if nothing was heard on its channel between the
read being sent and its result being offered (:meth:`epoch` before, :meth:`offer` after): a message processed
in between makes the offer a no-op.

Bounded: at most ``max_entries`` entries and ``max_bytes`` of payload (least recently used go first); an entry
larger than an eighth of ``max_bytes`` is never kept.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class NearEntry:
    """A fresh entry as this worker keeps it."""

    payload: bytes
    etag: str
    ttl_ms: int
    fresh_end: float  # local monotonic time its TTL ends (``max-age`` and ``Age`` are computed from it)
    keep_until: float  # local monotonic time it stops being simply fresh (TTL minus refresh_ahead)

    @classmethod
    def of(cls, payload: bytes, etag: str, ttl_ms: int, fresh_left_ms: int, refresh_ahead_ms: int,
           sent_at: float) -> NearEntry:
        """From a read sent at ``sent_at`` (local): its remaining times are counted from then (conservative)."""
        fresh_end = sent_at + fresh_left_ms / 1000
        return cls(payload, etag, ttl_ms, fresh_end, fresh_end - refresh_ahead_ms / 1000)


Epoch = tuple[int, int]


class NearCache:
    def __init__(self, max_entries: int = 1000, max_bytes: int = 16 << 20) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, str], NearEntry] = OrderedDict()
        self._bytes = 0
        self._epochs: dict[str, int] = {}  # per channel: messages heard
        self._generation = 0  # connections lost
        self._live: set[str] = set()  # channels whose subscription is confirmed and unbroken
        self._starting: set[str] = set()  # channels a subscription was asked for
        self._retry_at: dict[str, float] = {}  # channels whose subscription failed: not asked again before then

    def __len__(self) -> int:
        return len(self._entries)

    # -- serving -----------------------------------------------------------------------------------------------
    def get(self, channel: str, ident: str, now: float) -> NearEntry | None:
        key = (channel, ident)
        entry = self._entries.get(key)
        if entry is None:
            return None
        if now >= entry.keep_until:
            self._remove(key)
            return None
        self._entries.move_to_end(key)
        return entry

    def epoch(self, channel: str) -> Epoch | None:
        """Taken before a read is sent; ``None`` while the channel is not confirmed (nothing may be kept)."""
        if channel not in self._live:
            return None
        return self._generation, self._epochs.get(channel, 0)

    def offer(self, channel: str, ident: str, entry: NearEntry, epoch: Epoch | None, now: float) -> bool:
        """Keep a fresh entry a read returned, unless anything was heard on its channel since ``epoch``."""
        if epoch is None or self.epoch(channel) != epoch or now >= entry.keep_until:
            return False
        if self.max_entries <= 0 or len(entry.payload) * 8 > self.max_bytes:
            return False
        key = (channel, ident)
        self._remove(key)
        self._entries[key] = entry
        self._bytes += len(entry.payload)
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            self._remove(next(iter(self._entries)))
        return True

    # -- the subscription ----------------------------------------------------------------------------------------
    def wants(self, channel: str, now: float) -> bool:
        """Whether a subscription to ``channel`` should be started now (once, until it is lost or fails)."""
        if channel in self._live or channel in self._starting or self.max_entries <= 0:
            return False
        if now < self._retry_at.get(channel, -math.inf):
            return False
        self._starting.add(channel)
        return True

    def failed(self, channel: str, now: float, retry_after: float = 5.0) -> None:
        """Subscribing failed (Redis failing, or an ACL without the channel): a read ``retry_after`` seconds
        later asks again; until then hits read Redis, as without a near cache."""
        self._starting.discard(channel)
        self._retry_at[channel] = now + retry_after

    def subscribed(self, channel: str) -> None:
        self._starting.discard(channel)
        self._live.add(channel)

    def message(self, channel: str, ident: str) -> None:
        """Anything heard about ``ident`` (a new value, an invalidation, a released lease); ``""``: the whole
        namespace (a namespace invalidation)."""
        self._epochs[channel] = self._epochs.get(channel, 0) + 1
        if ident:
            self._remove((channel, ident))
        else:
            for key in [k for k in self._entries if k[0] == channel]:
                self._remove(key)

    def lost(self) -> None:
        """The pub/sub connection broke (messages may have been missed), or the store is failing: drop all."""
        self._generation += 1
        self._live.clear()
        self._starting.clear()
        self._entries.clear()
        self._bytes = 0

    def _remove(self, key: tuple[str, str]) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= len(entry.payload)
