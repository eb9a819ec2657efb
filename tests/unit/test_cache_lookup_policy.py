"""The cache's pure lookup policy: every (state, reply or event) combination, with a fake clock and
no store. The rules under test are those of :mod:`hyperion_lock.cache.lookup`'s docstring."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest

from hyperion_lock.cache.lookup import (
    RETRY_SOON,
    Act,
    LeaseRenewal,
    LookupPolicy,
    Next,
    Notice,
    Refresh,
    Renew,
)
from hyperion_lock.cache.policy import EntryAge
from hyperion_lock.cache.store import Entry, Header, LeaseState, Message, Read, TakeMode
from hyperion_lock.cache.types import CacheStatus

T0 = 1000.0
WAIT_TIMEOUT = 30.0
TTL_MS, STALE_MS, AHEAD_MS = 30_000, 10_000, 3_000  # 40 s of life; refreshed in its last 3 fresh s
VERSION, ENTRY_VERSION = 7, 5
ERROR = Message("k", "error", "ValueError", "boom", 502, {"why": "x"}, "host:1")


@dataclass
class Clock:
    """The fake clock: the policy never reads one, the test passes its readings."""

    now: float = T0

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def entry(fresh_left_ms: int, *, error: bool = False, payload: bytes = b"1") -> Entry:
    header = Header(TTL_MS, STALE_MS, "etag", "json", ENTRY_VERSION, error=error)
    return Entry(header, payload, fresh_left_ms + STALE_MS)


ENTRIES: dict[str, Entry | None] = {
    "none": None,
    "fresh": entry(AHEAD_MS + 1),
    "early": entry(AHEAD_MS),
    "stale": entry(0),
    "error": entry(TTL_MS, error=True, payload=ERROR.to_json().encode()),
    "garbled-error": entry(TTL_MS, error=True, payload=b"\xff not a message"),
}


def read(lease: LeaseState, kind: str = "none", lease_left_ms: int = 2_000) -> Read:
    left = lease_left_ms if lease is not LeaseState.FREE else -2  # -2: no lease
    return Read(ENTRIES[kind], lease, left, VERSION)


def policy(*, force: bool = False, inline: bool = False, listening: bool = False,
           now: float = T0) -> LookupPolicy:
    p = LookupPolicy(now, wait_timeout=WAIT_TIMEOUT, force=force, refresh_ahead_ms=AHEAD_MS,
                     inline=inline)
    if listening:  # the state after a successful LISTEN
        assert p.on_listen(now, True).act is Act.READ
    return p


def reading(force: bool, listening: bool) -> Next:
    return Next(Act.READ, take=TakeMode.ALWAYS if force else TakeMode.IF_MISSING, expect=listening)


# -- start ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("force", [False, True])
def test_a_lookup_starts_with_a_read_taking_the_lease_if_missing_or_always_when_forced(
        force: bool) -> None:
    assert policy(force=force).start() == reading(force, listening=False)


# -- the store's reply to READ: every (force, listening, refresh mode) x (lease) x (entry) ---------
# Expected for an entry that is served: (status, refreshed if the lease is free). "W": the lease is
# another caller's: listen first, then wait. "F": recompute (read again, forced). "L": lead.
#                  entry kind:      lease FREE            lease OTHER           lease MINE
NOT_FORCED: dict[str, tuple[object, object, object]] = {
    "none": ("F", "W", "L"),
    "fresh": ((CacheStatus.HIT, False), (CacheStatus.HIT, False), "L"),
    "early": ((CacheStatus.HIT, True), (CacheStatus.HIT, False), "L"),
    "stale": ((CacheStatus.STALE, True), (CacheStatus.STALE, False), "L"),
    "error": ("RAISE", "RAISE", "L"),
    "garbled-error": ("F", "F", "L"),
}
LEASES = (LeaseState.FREE, LeaseState.OTHER, LeaseState.MINE)


def expected_reply(kind: str, lease: LeaseState, *, force: bool, listening: bool,
                   inline: bool) -> Next:
    rule = NOT_FORCED[kind][LEASES.index(lease)]
    if force and rule != "L":  # forced: whatever entry there is, it is not served
        rule = "W" if lease is LeaseState.OTHER else "F"
    if rule == "L":
        return Next(Act.LEAD, version=VERSION)
    if rule == "F":
        return reading(force=True, listening=listening)
    if rule == "W":
        return Next(Act.WAIT, timeout=2.05) if listening else Next(Act.LISTEN)
    if rule == "RAISE":
        return Next(Act.RAISE, message=ERROR)
    assert isinstance(rule, tuple)
    status, refreshed = rule
    e = ENTRIES[kind]
    assert e is not None
    refresh = (Refresh.INLINE if inline else Refresh.BACKGROUND) if refreshed else Refresh.NONE
    assert isinstance(status, CacheStatus)
    return Next(Act.SERVE, entry=e, status=status,
                age=EntryAge(TTL_MS, STALE_MS, e.left_ms), refresh=refresh, version=ENTRY_VERSION)


@pytest.mark.parametrize(("force", "listening", "inline", "lease", "kind"), list(itertools.product(
    [False, True], [False, True], [False, True], LEASES, list(ENTRIES))))
def test_every_reply_to_a_read(force: bool, listening: bool, inline: bool, lease: LeaseState,
                               kind: str) -> None:
    p = policy(force=force, listening=listening, inline=inline)
    step = p.on_read(T0, read(lease, kind))
    assert step == expected_reply(kind, lease, force=force, listening=listening, inline=inline)
    # A recomputation stays forced (until another caller's "ok"); nothing else changes the mode.
    assert p.force is (force or step == reading(True, listening))
    assert p.listening is listening


def test_the_lease_taken_leads_under_the_version_read_with_it_not_the_entrys() -> None:
    step = policy().on_read(T0, Read(ENTRIES["stale"], LeaseState.MINE, 3_000, 42))
    assert step == Next(Act.LEAD, version=42)


def test_a_refresh_stores_under_the_version_the_entry_was_written_with() -> None:
    step = policy().on_read(T0, Read(ENTRIES["stale"], LeaseState.FREE, -2, 42))
    assert step.refresh is Refresh.BACKGROUND and step.version == ENTRY_VERSION


# -- freshness boundaries, as the store's clock reports them --------------------------------------
@pytest.mark.parametrize(("fresh_left_ms", "status", "refreshed"), [
    (TTL_MS, CacheStatus.HIT, False),  # just written
    (AHEAD_MS + 1, CacheStatus.HIT, False),  # the last millisecond before the refresh window
    (AHEAD_MS, CacheStatus.HIT, True),  # the refresh window begins: served, refreshed
    (1, CacheStatus.HIT, True),  # its last fresh millisecond
    (0, CacheStatus.STALE, True),  # past its TTL: stale, served while it is refreshed
    (-STALE_MS + 1, CacheStatus.STALE, True),  # the last millisecond of the stale period
])
def test_freshness_boundaries_decide_status_and_refresh(fresh_left_ms: int, status: CacheStatus,
                                                         refreshed: bool) -> None:
    e = entry(fresh_left_ms)
    step = policy().on_read(T0, Read(e, LeaseState.FREE, -2, VERSION))
    assert step.act is Act.SERVE and step.status is status and step.entry is e
    assert step.refresh is (Refresh.BACKGROUND if refreshed else Refresh.NONE)


@pytest.mark.parametrize(("fresh_left_ms", "max_age", "age"), [
    (TTL_MS, 30, 0), (29_999, 29, 0), (29_000, 29, 1), (1, 0, 29), (0, 0, 30), (-5_000, 0, 35),
])
def test_a_served_entry_says_its_max_age_and_age_in_whole_seconds(fresh_left_ms: int, max_age: int,
                                                                   age: int) -> None:
    step = policy().on_read(T0, Read(entry(fresh_left_ms), LeaseState.OTHER, 2_000, VERSION))
    assert step.age is not None and (step.age.max_age, step.age.age) == (max_age, age)


def test_without_refresh_ahead_only_a_stale_entry_is_refreshed() -> None:
    p = LookupPolicy(T0, wait_timeout=WAIT_TIMEOUT, refresh_ahead_ms=0)
    assert p.on_read(T0, Read(entry(1), LeaseState.FREE, -2, VERSION)).refresh is Refresh.NONE
    assert p.on_read(T0, Read(entry(0), LeaseState.FREE, -2, VERSION)).refresh is Refresh.BACKGROUND


# -- LISTEN ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("force", [False, True])
def test_subscribed_reads_again_now_listening_so_no_message_is_lost(force: bool) -> None:
    p = policy(force=force)
    assert p.on_read(T0, read(LeaseState.OTHER)) == Next(Act.LISTEN)
    assert p.on_listen(T0, True) == reading(force, listening=True)
    assert p.listening


def test_not_subscribed_waits_without_wake_ups_and_tries_to_listen_again_next_round() -> None:
    clock = Clock()
    p = policy()
    assert p.on_read(clock.now, read(LeaseState.OTHER, lease_left_ms=2_000)) == Next(Act.LISTEN)
    # The listen attempt itself took 0.5 s: the wait is measured from its end.
    assert p.on_listen(clock.advance(0.5), False) == Next(Act.WAIT, timeout=2.05)
    assert not p.listening
    assert p.on_message(clock.advance(2.05), None) == reading(False, listening=False)
    assert p.on_read(clock.now, read(LeaseState.OTHER)) == Next(Act.LISTEN)


# -- WAIT: how long, never past the deadline ---------------------------------------------------
@pytest.mark.parametrize(("elapsed", "lease_left_ms", "timeout"), [
    (0.0, 2_000, 2.05),  # until the holder's lease would have expired, plus a little slack
    (0.0, 0, 0.05),  # it is expiring now
    (0.0, -2, 0.05),  # gone between the reply's two parts: read again almost at once
    (29.0, 2_000, 1.0),  # the deadline comes first
    (WAIT_TIMEOUT - 0.01, 2_000, 0.01),
    (WAIT_TIMEOUT, 2_000, 0.0),  # at the deadline: no wait at all
    (WAIT_TIMEOUT + 5, 2_000, 0.0),  # past it (a slow read)
])
def test_the_wait_lasts_until_the_lease_would_expire_never_past_the_deadline(
        elapsed: float, lease_left_ms: int, timeout: float) -> None:
    p = policy(listening=True)
    step = p.on_read(T0 + elapsed, read(LeaseState.OTHER, lease_left_ms=lease_left_ms))
    assert step.act is Act.WAIT and step.timeout == pytest.approx(timeout)


# -- the end of a WAIT: every message, forced or not, before / at / after the deadline ------------
MESSAGES: dict[str, Message | None] = {
    "none": None,  # no message in time
    "ok": Message("k", "ok"),
    "retry": Message("k", "retry"),
    "bypass": Message("k", "bypass"),
    "error": ERROR,
    "unknown": Message("k", "something newer"),  # from a later release: read again
}
WHEN = {"before": WAIT_TIMEOUT - 0.001, "at": WAIT_TIMEOUT, "after": WAIT_TIMEOUT + 1}


@pytest.mark.parametrize(("force", "kind", "when"), list(itertools.product(
    [False, True], list(MESSAGES), list(WHEN))))
def test_every_end_of_a_wait(force: bool, kind: str, when: str) -> None:
    p = policy(force=force, listening=True)
    assert p.on_read(T0, read(LeaseState.OTHER)).act is Act.WAIT
    step = p.on_message(T0 + WHEN[when], MESSAGES[kind])
    still_forced = force and kind != "ok"  # another caller's "ok" is fresh enough
    if kind == "error":  # passed on at once, even past the deadline
        assert step == Next(Act.RAISE, message=ERROR)
    elif kind == "bypass":  # not cacheable: computed here, whenever it comes
        assert step == Next(Act.DIRECT, notice=Notice.BYPASS)
    elif when == "before":
        assert step == reading(still_forced, listening=True)
        assert p.force is still_forced
    else:
        assert step == Next(Act.DIRECT, notice=Notice.WAITED)


# -- undecodable entries ------------------------------------------------------------------------
@pytest.mark.parametrize("listening", [False, True])
def test_an_entry_that_cannot_be_decoded_is_recomputed_until_another_caller_stores_one(
        listening: bool) -> None:
    p = policy(listening=listening)
    assert p.on_read(T0, read(LeaseState.FREE, "fresh")).act is Act.SERVE
    assert p.on_undecodable() == reading(True, listening)
    # Forced: a fresh entry another caller left meanwhile is not served (maybe the same bytes)...
    assert p.on_read(T0, read(LeaseState.OTHER, "fresh")).act in (Act.LISTEN, Act.WAIT)
    if not listening:
        p.on_listen(T0, True)
        p.on_read(T0, read(LeaseState.OTHER, "fresh"))
    # ... until its computation says "ok": then it is served.
    assert p.on_message(T0 + 1, Message("k", "ok")) == reading(False, listening=True)
    assert p.on_read(T0 + 1, read(LeaseState.FREE, "fresh")).act is Act.SERVE


# -- whole lookups on the fake clock --------------------------------------------------------------
def test_a_holder_that_dies_is_taken_over_when_its_lease_expires() -> None:
    clock = Clock()
    p = policy()
    assert p.start() == reading(False, listening=False)
    assert p.on_read(clock.now, read(LeaseState.OTHER, lease_left_ms=3_000)) == Next(Act.LISTEN)
    assert p.on_listen(clock.advance(0.01), True) == reading(False, listening=True)
    wait = p.on_read(clock.advance(0.001), read(LeaseState.OTHER, lease_left_ms=2_989))
    assert wait.act is Act.WAIT and wait.timeout == pytest.approx(3.039)
    assert p.on_message(clock.advance(wait.timeout), None) == reading(False, listening=True)
    assert p.on_read(clock.now, Read(None, LeaseState.MINE, 3_000, VERSION)) == Next(
        Act.LEAD, version=VERSION)


def test_a_live_slow_holder_is_waited_for_until_the_deadline_then_computed_here() -> None:
    clock = Clock()
    p = policy(listening=True)
    step, rounds = p.start(), 0
    while step.act is Act.READ and rounds < 100:  # bounded: a policy that never gives up fails
        step = p.on_read(clock.now, read(LeaseState.OTHER, lease_left_ms=3_000))  # kept renewed
        assert step.act is Act.WAIT and clock.now + step.timeout <= T0 + WAIT_TIMEOUT
        step = p.on_message(clock.advance(step.timeout), None)
        rounds += 1
    assert step == Next(Act.DIRECT, notice=Notice.WAITED)
    assert clock.now == pytest.approx(T0 + WAIT_TIMEOUT) and rounds == 10  # 9 x 3.05 s, then 2.55 s


def test_a_forced_lookup_takes_the_fresh_value_another_caller_just_stored() -> None:
    p = policy(force=True, listening=True)
    assert p.on_read(T0, read(LeaseState.OTHER, "stale")).act is Act.WAIT
    assert p.on_message(T0 + 0.2, Message("k", "ok")) == reading(False, listening=True)
    step = p.on_read(T0 + 0.2, read(LeaseState.FREE, "fresh"))
    assert step.act is Act.SERVE and step.status is CacheStatus.HIT and step.refresh is Refresh.NONE


def test_the_same_inputs_give_the_same_steps() -> None:
    """No clock, no randomness: two policies fed the same replies and events decide alike."""
    def run() -> list[Next]:
        p = policy()
        return [p.start(), p.on_read(T0, read(LeaseState.OTHER)), p.on_listen(T0 + 0.1, False),
                p.on_message(T0 + 2.2, None), p.on_read(T0 + 2.2, read(LeaseState.FREE, "stale"))]

    assert run() == run()


# -- keeping the lease ----------------------------------------------------------------------------
def test_the_lease_is_renewed_every_third_of_its_ttl_bound_by_at_least_op_timeout() -> None:
    r = LeaseRenewal(3_000, op_timeout=0.05)
    assert (r.interval, r.delay(), r.bound) == (1.0, 1.0, 1.0)
    assert LeaseRenewal(3_000, op_timeout=2.0).bound == 2.0  # a slow Redis still gets its bound


def test_a_failed_renewal_is_retried_soon_and_the_rhythm_resumes_once_one_is_answered() -> None:
    r = LeaseRenewal(3_000, op_timeout=0.05)
    assert r.on_renewed(None) is Renew.RETRY and r.delay() == RETRY_SOON
    assert r.on_renewed(None) is Renew.RETRY and r.delay() == RETRY_SOON  # as long as they fail
    assert r.on_renewed(True) is Renew.AGAIN and r.delay() == 1.0


def test_a_retry_is_never_later_than_the_regular_interval() -> None:
    r = LeaseRenewal(90, op_timeout=0.05)  # a 90 ms lease: renewed every 30 ms
    r.on_renewed(None)
    assert r.delay() == pytest.approx(0.03)


@pytest.mark.parametrize("failing", [False, True])
def test_a_renewal_answered_not_held_means_the_lease_is_lost(failing: bool) -> None:
    r = LeaseRenewal(3_000, op_timeout=0.05, failing=failing)
    assert r.on_renewed(False) is Renew.LOST
