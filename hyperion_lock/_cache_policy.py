"""The cache's decisions as pure code: freshness, early refresh, the circuit breaker and the HTTP rules.

Nothing here does I/O or reads a clock: callers pass ``now`` (monotonic seconds) and what the store replied, so
every timing decision is tested with a fake clock (``tests/test_cache_policy.py``).

Freshness of an entry is judged from three numbers the store returns with it, all measured by the *store's*
clock (Redis ``PTTL``; the memory store's monotonic clock), never by a host's wall clock:

* ``ttl_ms`` and ``stale_ms`` as written with the entry; the entry's own expiry is ``ttl + stale`` after the
  write, so ``left_ms`` (its remaining PTTL) says where in that life it is:
* ``fresh_left = left_ms - stale_ms``: > ``refresh_ahead`` -> FRESH; in (0, refresh_ahead] -> FRESH but the
  first request to see it refreshes it in the background (early refresh: a hot key never expires under load);
  <= 0 -> STALE (served while exactly one worker refreshes it); the entry is gone after the stale period.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum


class Freshness(Enum):
    FRESH = "fresh"
    REFRESH_EARLY = "refresh_early"  # fresh; serve it and refresh it in the background
    STALE = "stale"  # past its TTL, within the stale period: serve it and refresh it in the background


@dataclass(frozen=True)
class EntryAge:
    """Where an entry is in its life, from the store's reply."""

    ttl_ms: int
    stale_ms: int
    left_ms: int  # remaining life of the stored entry (ttl + stale at the write)

    @property
    def fresh_left_ms(self) -> int:
        return self.left_ms - self.stale_ms

    @property
    def max_age(self) -> int:
        """Seconds a client may reuse it (``Cache-Control: max-age``): the fresh time left, rounded down."""
        return max(0, self.fresh_left_ms // 1000)

    @property
    def age(self) -> int:
        """Seconds since it was computed (the ``Age`` header)."""
        return max(0, (self.ttl_ms - self.fresh_left_ms) // 1000)


def freshness(age: EntryAge, refresh_ahead_ms: int) -> Freshness:
    fresh_left = age.fresh_left_ms
    if fresh_left <= 0:
        return Freshness.STALE
    if fresh_left <= refresh_ahead_ms:
        return Freshness.REFRESH_EARLY
    return Freshness.FRESH


def default_refresh_ahead(ttl: float) -> float:
    """A tenth of the TTL: long enough for one refresh, short enough that idle keys simply expire."""
    return ttl / 10


# -- circuit breaker --------------------------------------------------------------------------------------------
class BreakerChange(Enum):
    OPENED = "opened"  # log once: the cache is bypassed from now on
    REOPENED = "reopened"  # a recovery check failed: still bypassed (debug only)
    CLOSED = "closed"  # log once: caching resumed


@dataclass
class Breaker:
    """Closed: use the store. After ``threshold`` failures in a row (timeouts, refused connections, OOM), open:
    every request is computed directly, with no store call at all. While open, one recovery check per
    ``retry_after`` (doubling up to ``max_retry_after``) is made by a background task, never by a request; its
    success closes the breaker.

    Failure timeline with Redis stopped (SIGSTOP): requests in flight each wait at most the operation timeout,
    the breaker opens, later requests add nothing; a check every 0.5, 1, 2, ... 10 s; caching resumes at the
    first check after Redis is back.
    """

    threshold: int = 2
    retry_after: float = 0.5
    max_retry_after: float = 10.0
    failures: int = 0
    open_until: float | None = None  # monotonic time of the next recovery check while open
    _interval: float = 0.0

    @property
    def is_open(self) -> bool:
        return self.open_until is not None

    def allow(self) -> bool:
        return self.open_until is None

    def on_success(self) -> BreakerChange | None:
        self.failures = 0
        if self.open_until is None:
            return None
        self.open_until, self._interval = None, 0.0
        return BreakerChange.CLOSED

    def on_failure(self, now: float) -> BreakerChange | None:
        """A store call failed; a failure while open is a failed recovery check."""
        if self.open_until is not None:
            self._interval = min(self._interval * 2, self.max_retry_after)
            self.open_until = now + self._interval
            return BreakerChange.REOPENED
        self.failures += 1
        if self.failures < self.threshold:
            return None
        self._interval = self.retry_after
        self.open_until = now + self._interval
        return BreakerChange.OPENED

    def trip(self, now: float) -> BreakerChange | None:
        """Open at once (a worker's warm-up found no Redis): no request has to find out again."""
        if self.open_until is not None:
            return None
        self.failures = self.threshold - 1
        return self.on_failure(now)

    def check_in(self, now: float) -> float:
        """Seconds until the next recovery check (0 when due); ``math.inf`` when closed."""
        return math.inf if self.open_until is None else max(0.0, self.open_until - now)


# -- waiting for another worker's computation ------------------------------------------------------------------
def wait_for(now: float, lease_left_ms: int, deadline: float, slack: float = 0.05) -> float:
    """How long to wait for the holder's message before reading again: until its lease would have expired (it
    died or stalled: then the lease is free and this caller may take it), never past ``deadline``."""
    return max(0.0, min(max(lease_left_ms, 0) / 1000 + slack, deadline - now))


# -- HTTP --------------------------------------------------------------------------------------------------------
def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """``If-None-Match`` against our strong ETag, with the weak comparison RFC 9110 prescribes for it."""
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    ours = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == ours for tag in if_none_match.split(","))


def client_wants_fresh(cache_control: str | None, pragma: str | None = None) -> bool:
    """The request asks to bypass caches (``Cache-Control: no-cache`` / ``max-age=0``, ``Pragma: no-cache``)."""
    directives = {d.strip().lower() for d in (cache_control or "").split(",")}
    return bool({"no-cache", "max-age=0", "no-store"} & directives) or (pragma or "").strip().lower() == "no-cache"


def cache_control(template: str, max_age: int) -> str:
    return template.format(max_age=max_age)
