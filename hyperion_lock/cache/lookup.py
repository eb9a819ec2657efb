"""The lookup of one entry as pure code: the store's replies and the caller's events in, the next
step out.

Why a module of its own, beside :mod:`.policy` rather than inside it: ``policy`` holds one-shot
judgements with no state per call (an entry's freshness, the store guard, the HTTP rules), used by
the hit path, the breaker and the HTTP layer alike. A lookup is a small state machine per call (is
it forced to recompute, does it listen to the namespace's channel, when does its wait end): the
cache's counterpart of run-once's :class:`~hyperion_lock.runonce.policy.WaitPolicy`, tested the same
way, exhaustively with a fake clock (``tests/unit/test_cache_lookup_policy.py``). It builds on
``policy`` (``freshness``, ``wait_for``) and reads the store's typed replies (``Read``,
``Message``).

Nothing here does I/O or reads a clock: the engine (:mod:`.engine`) passes ``now`` (monotonic
seconds) with each reply or event, and performs the :class:`Next` step it gets back.

Timeline of one lookup (the first caller of a flight in this process; fresh hits never get here):

1. ``READ`` the entry, taking its compute lease if there is no entry (``IF_MISSING``), or whatever
   there is when the lookup is forced (``ALWAYS``: a client asked for a fresh answer, or the stored
   entry was unreadable).
2. The lease is ours: ``LEAD`` (compute, then store under the namespace version read with it).
3. An entry, not forced: ``SERVE`` it -- HIT when fresh or soon stale, STALE past its TTL; soon
   stale or stale with a free lease also refreshes it (``BACKGROUND``, or ``INLINE``: take the
   lease and, if it is won, compute in this call). A cached error (``cache_errors``): ``RAISE`` it.
   A cached error whose message cannot be parsed, or an entry the engine cannot decode
   (``on_undecodable``), is recomputed: ``READ`` forced.
4. No entry and the lease free although the read was to take it (the entry was unreadable):
   ``READ`` forced.
5. The lease is another caller's: ``LISTEN`` to the namespace's channel, then ``READ`` again (a
   message sent before the subscription is not lost); once listening, ``WAIT`` for the holder's
   message, at most until its lease would expire (``wait_for``), never past the deadline.
6. After the wait: ``error`` -> ``RAISE`` it; ``bypass`` (not cacheable) -> ``DIRECT``; the deadline
   passed -> ``DIRECT`` (``WAITED``, worth a warning); else ``READ`` again, no longer forced after
   an ``ok`` (another caller has just computed it: that is fresh enough).

Failure timelines: the holder is SIGKILLed -- no message comes; the wait ends when its lease would
have expired, and the next ``READ`` finds the lease free and takes it. The channel cannot be
subscribed -- each round waits without a wake-up until the holder's lease would expire, then reads
again (and tries to listen again). The holder computes for longer than ``wait_timeout`` -- this
caller computes directly and stores nothing.

:class:`LeaseRenewal` is the computing side: when to renew the lease, how soon to retry a renewal
that failed, and that a renewal answered "not held" means the lease is lost (invalidated, or expired
and taken over).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from hyperion_lock.cache.policy import EntryAge, Freshness, freshness, wait_for
from hyperion_lock.cache.store import Entry, LeaseState, Message, Read, TakeMode
from hyperion_lock.cache.types import CacheStatus


class Act(Enum):
    READ = "read"  # read the entry (``take``); listen for its message meanwhile if ``expect``
    LISTEN = "listen"  # subscribe to the namespace's channel; report with ``on_listen``
    WAIT = "wait"  # wait for the holder's message at most ``timeout`` s; report with ``on_message``
    SERVE = "serve"  # decode ``entry`` and serve it (``status``, ``age``), and see to ``refresh``
    LEAD = "lead"  # the lease is ours: compute, and store under ``version``
    DIRECT = "direct"  # compute directly and store nothing (``notice`` says why)
    RAISE = "raise"  # the computation failed in another caller: raise its error (``message``)


class Refresh(Enum):
    """What serving an entry also does."""

    NONE = "none"
    BACKGROUND = "background"  # recompute it in a background task, if that task wins the lease
    INLINE = "inline"  # take the lease now: won -> compute in this call (``version``), else serve


class Notice(Enum):
    BYPASS = "bypass"  # the holder computed it but could not store it (over max_size, uncacheable)
    WAITED = "waited"  # ``wait_timeout`` passed


@dataclass(frozen=True)
class Next:
    act: Act
    take: TakeMode = TakeMode.IF_MISSING
    expect: bool = False
    timeout: float = 0.0
    entry: Entry | None = None
    status: CacheStatus | None = None
    age: EntryAge | None = None
    refresh: Refresh = Refresh.NONE
    version: int = 0  # the namespace version to store under (LEAD; SERVE's refresh)
    message: Message | None = None
    notice: Notice | None = None


class LookupPolicy:
    """State of one lookup. ``force``: recompute even if an entry is there (until another caller's
    ``ok``); ``refresh_ahead_ms``: an entry with no more fresh time left than this is refreshed
    while it is served; ``inline``: refresh in the serving call (``Spec.refresh == "inline"``), not
    in the background."""

    def __init__(self, now: float, *, wait_timeout: float, force: bool = False,
                 refresh_ahead_ms: int = 0, inline: bool = False) -> None:
        self.deadline = now + wait_timeout
        self.force = force
        self.refresh_ahead_ms = refresh_ahead_ms
        self.inline = inline
        self.listening = False  # subscribed to the namespace's channel (only waiters need it)
        self.lease_left_ms = 0  # of the holder's lease, as last read

    # -- inputs -----------------------------------------------------------------------------------
    def start(self) -> Next:
        return self._read()

    def on_read(self, now: float, read: Read) -> Next:
        """The store's reply to ``READ``."""
        if read.lease is LeaseState.MINE:
            return Next(Act.LEAD, version=read.version)
        if read.entry is not None and not self.force:
            return self._judge(read.entry, read.lease)
        if read.lease is not LeaseState.OTHER:  # free although asked to take it: entry unreadable
            return self._recompute()
        self.lease_left_ms = read.lease_left_ms
        if not self.listening:
            return Next(Act.LISTEN)
        return self._wait(now)

    def on_listen(self, now: float, subscribed: bool) -> Next:
        """``LISTEN`` ended: subscribed -> read again (a message sent before the subscription is not
        lost); not -> wait without wake-ups, until the holder's lease would have expired."""
        if subscribed:
            self.listening = True
            return self._read()
        return self._wait(now)

    def on_message(self, now: float, message: Message | None) -> Next:
        """``WAIT`` ended: the holder's message, or ``None`` when none came in time."""
        outcome = message.outcome if message is not None else None
        if message is not None and outcome == "error":
            return Next(Act.RAISE, message=message)
        self.force = self.force and outcome != "ok"  # just computed by another: fresh enough
        if outcome == "bypass":  # not cacheable (over max_size): compute it here, directly
            return Next(Act.DIRECT, notice=Notice.BYPASS)
        if now >= self.deadline:
            return Next(Act.DIRECT, notice=Notice.WAITED)
        return self._read()

    def on_undecodable(self) -> Next:
        """The entry of ``SERVE`` cannot be decoded (or has another codec): recompute it."""
        return self._recompute()

    # -- decisions --------------------------------------------------------------------------------
    def _read(self) -> Next:
        take = TakeMode.ALWAYS if self.force else TakeMode.IF_MISSING
        return Next(Act.READ, take=take, expect=self.listening)

    def _recompute(self) -> Next:
        self.force = True
        return self._read()

    def _wait(self, now: float) -> Next:
        return Next(Act.WAIT, timeout=wait_for(now, self.lease_left_ms, self.deadline))

    def _judge(self, entry: Entry, lease: LeaseState) -> Next:
        if entry.header.error:
            message = Message.parse(entry.payload.decode(errors="replace"))
            return Next(Act.RAISE, message=message) if message is not None else self._recompute()
        age = EntryAge(entry.header.ttl_ms, entry.header.stale_ms, entry.left_ms)
        verdict = freshness(age, self.refresh_ahead_ms)
        refresh = Refresh.NONE
        if verdict is not Freshness.FRESH and lease is LeaseState.FREE:
            refresh = Refresh.INLINE if self.inline else Refresh.BACKGROUND
        status = CacheStatus.STALE if verdict is Freshness.STALE else CacheStatus.HIT
        return Next(Act.SERVE, entry=entry, status=status, age=age, refresh=refresh,
                    version=entry.header.version)


# -- the computing side: keeping the lease --------------------------------------------------------
class Renew(Enum):
    AGAIN = "again"  # renewed: renew again after ``delay()``
    RETRY = "retry"  # failed (no answer, or an error): retry soon, the lease may still be ours
    LOST = "lost"  # answered "not held": invalidated, or expired and taken over; stop renewing


RETRY_SOON = 0.05  # seconds before a failed renewal is retried (never later than the interval)


@dataclass
class LeaseRenewal:
    """When a computing call renews its lease: every third of its TTL, a failed renewal again after
    :data:`RETRY_SOON`; each renewal waits at most ``bound`` seconds (never less than
    ``op_timeout``). The lease is lost only when Redis answers that it is not held; unanswered
    renewals are retried, so a slow Redis or worker does not hand the entry to a second computation
    (if none is answered for a whole TTL, the lease expires, a waiter takes over, and this
    computation's write is refused by its fence)."""

    lease_ms: int
    op_timeout: float
    failing: bool = False

    @property
    def interval(self) -> float:
        return self.lease_ms / 3000

    @property
    def bound(self) -> float:
        return max(self.op_timeout, self.interval)

    def delay(self) -> float:
        return min(self.interval, RETRY_SOON) if self.failing else self.interval

    def on_renewed(self, held: bool | None) -> Renew:
        """A renewal ended: ``held`` as Redis answered, ``None`` when it failed or got no answer."""
        if held is None:
            self.failing = True
            return Renew.RETRY
        self.failing = False
        return Renew.AGAIN if held else Renew.LOST
