"""The cache's decisions as pure code: freshness, early refresh, the circuit breaker and the HTTP rules.

Nothing here does I/O or reads a clock: callers pass ``now`` (monotonic seconds) and what the store replied, so
every timing decision is tested with a fake clock (``tests/unit/test_cache_policy.py``).

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
from collections import deque
from dataclasses import dataclass, field
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


# -- store guard: adaptive timeout, liveness checks, circuit breaker ---------------------------------------------
class Health(Enum):
    CLOSED = "closed"  # use the store
    SUSPECT = "suspect"  # a call timed out; a liveness check is in flight; calls still go to the store
    OPEN = "open"  # the store failed: every call is skipped (computed directly) until a check is answered


class Outcome(Enum):
    OK = "ok"  # the store answered
    TIMEOUT = "timeout"  # no answer within the bound: slow or stopped, not known yet
    ERROR = "error"  # an answer that is a failure, at once: connection refused, OOM, wrong password, ...


class Action(Enum):
    """What the I/O around a :class:`StoreGuard` must do after reporting an outcome."""

    NONE = "none"
    PROBE = "probe"  # send one liveness check (bound: ``probe_timeout``) and report it with ``on_probe``
    OPENED = "opened"  # log once; run recovery checks (``check_in`` / ``on_check``) in the background
    CLOSED = "closed"  # log once: caching resumed


@dataclass
class StoreGuard:
    """Tells a slow store from a dead one (busy is not down), for one event loop of one worker.

    Inputs: reply times of successful calls, outcomes of calls, of liveness checks and of recovery checks, and
    clock readings (monotonic seconds). Outputs: the current operation ``timeout``, whether a call may go to the
    store at all (``allow``), and the next :class:`Action`. No I/O, no clock of its own.

    * **Adaptive timeout** (like TCP's retransmission timeout): ``multiple`` x a high percentile (``quantile``) of
      the last ``window`` reply times, never below ``floor`` nor above ``ceiling``. Before the first reply it is
      the ceiling; the calls sent before it (a worker's first burst opens connections and loads scripts while
      its event loop is busy starting) are not samples: after their replies it is the floor until calls sent
      later answer (with a near cache in front, a worker may make few such calls). Slow replies raise it at once; fast
      replies lower it only as they push the slow ones out of the window. The reply time of a check that answered
      after a timeout is held as a lower bound for the next ``window`` replies.
    * **A timeout is not a failure by itself.** The first one sends a liveness check with a longer bound
      (``probe_timeout``) and the guard is SUSPECT: calls still go to the store (each waiting at most the current
      timeout). Any answer (a check or another call) proves the store alive: CLOSED again, nothing counted, and
      the check's own reply time enters the window (so the timeout grows with a slow store). Only a check that is
      not answered either, or fails, opens the breaker.
    * **Immediate errors count** (refused connection, OOM, authentication): ``threshold`` of them open it, with
      no waiting (a killed store fails fast).
    * **Open**: no call goes to the store. Recovery checks run in the background, never in a request, each with a
      long bound (``check_timeout``), so a stopped store that resumes is seen as soon as it answers. A check that
      fails at once (connection refused) is retried after ``retry_after``, doubling up to ``max_retry_after``; one
      that timed out is followed by the next at once. The first answered check closes the breaker.

    Failure timelines: Redis SIGSTOPped -- the calls in flight each wait one timeout (≈ ``floor`` on an idle
    store), the check is not answered within ``probe_timeout``: OPEN; later requests add nothing; SIGCONT -- the
    pending recovery check is answered: CLOSED. Redis starved of CPU -- replies slow down, the timeout follows
    them; a reply later than that sends a check, which is answered (late): CLOSED, nothing bypassed after that
    request. Redis SIGKILLed -- every call is refused at once: OPEN after ``threshold`` calls; restarted -- the
    next recovery check (at most ``max_retry_after`` later) closes it.
    """

    floor: float = 0.05
    ceiling: float = 1.0
    multiple: float = 4.0
    quantile: float = 0.95
    window: int = 64
    threshold: int = 2
    retry_after: float = 0.5
    max_retry_after: float = 10.0
    check_timeout: float = 2.0
    state: Health = Health.CLOSED
    errors: int = 0  # immediate errors since the breaker last closed
    timeout: float = 0.0  # the current operation timeout (seconds); set from the samples
    _samples: deque[float] = field(default_factory=deque)
    _since_estimate: int = 0
    _estimated: bool = False
    _replied: bool = False
    _held: float = 0.0  # reply time of the last answered check, a lower bound while _held_for > 0
    _held_for: int = 0  # replies left
    _next_check: float = 0.0
    _interval: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.floor <= self.ceiling:
            raise ValueError(f"the timeout floor ({self.floor}) must be > 0 and <= the ceiling ({self.ceiling})")
        self.timeout = self.ceiling

    # -- reading ---------------------------------------------------------------------------------------------------
    def allow(self) -> bool:
        """Whether a call may go to the store now (not while open)."""
        return self.state is not Health.OPEN

    @property
    def is_open(self) -> bool:
        return self.state is Health.OPEN

    @property
    def probe_timeout(self) -> float:
        """Bound of the liveness check after a timeout: longer than a call's, within the ceiling."""
        return min(self.ceiling, max(4 * self.timeout, self.ceiling / 2))

    def check_in(self, now: float) -> float:
        """Seconds until the next recovery check while open (0 when due); ``math.inf`` otherwise."""
        return max(0.0, self._next_check - now) if self.state is Health.OPEN else math.inf

    # -- outcomes of calls -------------------------------------------------------------------------------------------
    @property
    def warm(self) -> bool:
        """Whether a reply came already. A call sent before the first one (a worker's first burst: connections
        opened, scripts loaded, first imports stalling the event loop) is ``cold``: its time is not a sample."""
        return self._replied

    def on_reply(self, seconds: float, *, cold: bool = False) -> Action:
        """A call answered after ``seconds``: a sample of the store's reply time (unless it was sent ``cold``),
        and proof it is alive (a SUSPECT guard is CLOSED again). It does not close an open breaker: a store out
        of memory still answers reads; only a recovery check, a write, does that."""
        if self.state is Health.SUSPECT:
            self.state = Health.CLOSED
        self._replied = True
        if cold:
            if not self._estimated:
                self.timeout = self.floor  # the store answers; its own times come with the next calls
            return Action.NONE
        self._samples.append(seconds)
        if len(self._samples) > self.window:
            self._samples.popleft()
        self._since_estimate += 1
        self._held_for -= 1
        if seconds * self.multiple > self.timeout or self._since_estimate >= self.window // 4 or not self._estimated:
            self._estimate()
        return Action.NONE

    def on_timeout(self) -> Action:
        """A call got no answer within ``timeout``: check whether the store is alive before calling it down."""
        if self.state is Health.CLOSED:
            self.state = Health.SUSPECT
            return Action.PROBE
        return Action.NONE

    def on_error(self, now: float) -> Action:
        """A call failed at once (refused, OOM, auth): the ``threshold``-th since the breaker last closed opens
        it (replies in between do not reset the count: a store out of memory answers reads but refuses every
        write)."""
        if self.state is Health.OPEN:
            return Action.NONE
        self.errors += 1
        return self._open(now) if self.errors >= self.threshold else Action.NONE

    def on_probe(self, now: float, outcome: Outcome, seconds: float = 0.0) -> Action:
        """The liveness check sent after a timeout ended: answered -> CLOSED (its reply time is a sample);
        otherwise the store is down -> OPEN."""
        if outcome is Outcome.OK:
            self._hold(seconds)
            return self.on_reply(seconds)
        if self.state is Health.SUSPECT:
            return self._open(now)
        return Action.NONE  # closed meanwhile by another answer, or opened already

    def trip(self, now: float) -> Action:
        """Open at once (a worker's warm-up found no store): no request has to find out again."""
        return Action.NONE if self.state is Health.OPEN else self._open(now)

    # -- recovery while open -------------------------------------------------------------------------------------
    def on_check(self, now: float, outcome: Outcome, seconds: float = 0.0) -> Action:
        """A recovery check ended: answered -> closed; failed at once -> back off; not answered -> check again."""
        if self.state is not Health.OPEN:
            return Action.NONE
        if outcome is Outcome.OK:
            self._hold(seconds)
            self.on_reply(seconds)
            self.state, self.errors, self._interval = Health.CLOSED, 0, 0.0
            return Action.CLOSED
        if outcome is Outcome.ERROR:
            self._interval = min(self._interval * 2, self.max_retry_after)
            self._next_check = now + self._interval
        else:
            self._next_check = now  # it waited ``check_timeout`` already
        return Action.NONE

    # -- internals -------------------------------------------------------------------------------------------------
    def _open(self, now: float) -> Action:
        self.state = Health.OPEN
        self._interval = self.retry_after
        self._next_check = now + self._interval
        return Action.OPENED

    def _hold(self, seconds: float) -> None:
        """A check answered after ``seconds`` while calls were timing out: the store is that slow now. One sample
        of a window would sit above the percentile, so it is held as a lower bound for the next ``window``
        replies instead (TCP keeps its backed-off timeout until new samples come in, the same way)."""
        self._held, self._held_for = seconds, self.window

    def _estimate(self) -> None:
        self._since_estimate, self._estimated = 0, True
        ordered = sorted(self._samples)
        high = ordered[min(len(ordered) - 1, int(self.quantile * len(ordered)))]
        if self._held_for > 0:
            high = max(high, self._held)
        self.timeout = min(self.ceiling, max(self.floor, self.multiple * high))


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
