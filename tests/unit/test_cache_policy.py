"""The cache's pure parts: freshness, breaker, waiting, HTTP rules, keys and codecs (no I/O, fake clocks)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import math
import uuid
from decimal import Decimal
from enum import Enum

import pytest
from pydantic import BaseModel
from redis.crc import key_slot

from hyperion_lock import CacheSerializationError, ConfigurationError
from hyperion_lock._aio import within
from hyperion_lock.cache.codec import JsonCodec, PickleCodec, etag_of
from hyperion_lock.cache.keys import CacheKeys, identity, key_identity, text, typed
from hyperion_lock.cache.near import NearCache, NearEntry
from hyperion_lock.cache.policy import (
    Action,
    EntryAge,
    Freshness,
    Health,
    Outcome,
    StoreGuard,
    client_wants_fresh,
    etag_matches,
    freshness,
    wait_for,
)
from hyperion_lock.cache.types import CacheSettings


# -- freshness ----------------------------------------------------------------------------------------------------
def test_freshness_phases_follow_the_store_clock() -> None:
    """ttl 30 s, stale 10 s, refresh ahead 3 s: the entry lives 40 s; its remaining PTTL says the phase."""
    ttl, stale, ahead = 30_000, 10_000, 3_000
    assert freshness(EntryAge(ttl, stale, left_ms=40_000), ahead) is Freshness.FRESH
    assert freshness(EntryAge(ttl, stale, left_ms=13_001), ahead) is Freshness.FRESH
    assert freshness(EntryAge(ttl, stale, left_ms=13_000), ahead) is Freshness.REFRESH_EARLY
    assert freshness(EntryAge(ttl, stale, left_ms=10_001), ahead) is Freshness.REFRESH_EARLY
    assert freshness(EntryAge(ttl, stale, left_ms=10_000), ahead) is Freshness.STALE
    assert freshness(EntryAge(ttl, stale, left_ms=1), ahead) is Freshness.STALE
    # No early refresh configured: fresh until the TTL.
    assert freshness(EntryAge(ttl, 0, left_ms=1), 0) is Freshness.FRESH


def test_max_age_and_age_are_the_fresh_time_left_and_spent() -> None:
    age = EntryAge(30_000, 10_000, left_ms=35_500)  # 25.5 s fresh left, computed 4.5 s ago
    assert (age.max_age, age.age) == (25, 4)
    stale = EntryAge(30_000, 10_000, left_ms=5_000)
    assert (stale.max_age, stale.age) == (0, 35)


# -- store guard ----------------------------------------------------------------------------------------------
def guard(**options: float) -> StoreGuard:
    return StoreGuard(**{"floor": 0.05, "ceiling": 1.0, "multiple": 4.0, "quantile": 0.95, "window": 64,
                         "threshold": 2, "retry_after": 0.5, "max_retry_after": 2.0, "check_timeout": 2.0,
                         **options})  # type: ignore[arg-type]


def test_the_timeout_is_the_ceiling_until_the_first_reply_then_follows_the_replies() -> None:
    g = guard()
    assert g.timeout == 1.0 and g.allow() and not g.warm  # connections and scripts being set up: the ceiling
    for _ in range(16):  # a worker's first burst, all sent before any reply: slow, and not samples
        g.on_reply(0.9, cold=True)
    assert g.timeout == 0.05 and g.warm
    g.on_reply(0.001)
    assert g.timeout == 0.05  # fast replies: the floor
    for _ in range(100):
        g.on_reply(0.002)
    assert g.timeout == 0.05
    g.on_reply(0.030)
    assert g.timeout == pytest.approx(0.05)  # 1 slow reply of 64 is above the 95th percentile: no change
    for _ in range(4):
        g.on_reply(0.030)
    assert g.timeout == pytest.approx(0.120)  # 5 of 64: the 95th percentile is 30 ms
    g.on_reply(0.400)
    assert g.timeout == 0.120  # a single outlier does not move the percentile...
    for _ in range(10):
        g.on_reply(0.400)
    assert g.timeout == 1.0  # ...a slow period does, up to the ceiling (4 x 0.4 s > 1 s)
    for _ in range(63):
        g.on_reply(0.002)
    assert g.timeout == 1.0  # the slow replies are still in the window (updated every 16 replies)
    for _ in range(16):
        g.on_reply(0.002)
    assert g.timeout == 0.05  # pushed out of the window: back to the floor
    assert g.state is Health.CLOSED and g.errors == 0


def test_a_timeout_is_a_failure_only_when_the_liveness_check_also_fails() -> None:
    g = guard()
    g.on_reply(0.002)
    assert g.on_timeout() is Action.PROBE  # one check...
    assert g.state is Health.SUSPECT
    assert g.on_timeout() is Action.NONE and g.on_timeout() is Action.NONE  # ...however many calls time out
    assert g.allow()  # calls still go to the store meanwhile
    assert g.probe_timeout == pytest.approx(0.5)  # longer than a call's bound
    # Busy, not down: the check is answered (late). Closed again, nothing counted, and the timeout now covers it.
    assert g.on_probe(10.0, Outcome.OK, 0.2) is Action.NONE
    assert g.state.value == "closed" and g.errors == 0 and g.allow()
    assert g.timeout == pytest.approx(0.8)  # 4 x the 0.2 s reply, from now on...
    for _ in range(63):
        g.on_reply(0.002)
    assert g.timeout == pytest.approx(0.8)  # ...held while fast replies refill the window...
    g.on_reply(0.002)
    assert g.timeout == 0.05  # ...and only until then
    # Another call's reply also proves it alive while the check is still out; the check's later verdict is moot.
    assert g.on_timeout() is Action.PROBE
    assert g.on_reply(0.003) is Action.NONE and g.allow() and not g.is_open
    assert g.on_timeout() is Action.PROBE  # closed again: a new timeout is checked again
    assert g.on_probe(11.0, Outcome.OK, 0.002) is Action.NONE and g.allow()
    assert g.on_timeout() is Action.PROBE and g.on_reply(0.002) is Action.NONE
    assert g.on_probe(11.0, Outcome.TIMEOUT) is Action.NONE and g.allow()  # the late verdict of a closed check
    # Down: the check is not answered either (stopped) -> open, once.
    assert g.on_timeout() is Action.PROBE
    assert g.on_probe(12.0, Outcome.TIMEOUT) is Action.OPENED and not g.allow()
    assert g.on_timeout() is Action.NONE and g.on_error(12.1) is Action.NONE and g.trip(12.1) is Action.NONE
    # A check that fails at once (refused, OOM) opens it too.
    h = guard()
    h.on_reply(0.002)
    assert h.on_timeout() is Action.PROBE and h.on_probe(1.0, Outcome.ERROR) is Action.OPENED


def test_immediate_errors_open_without_waiting_and_replies_do_not_hide_them() -> None:
    g = guard(threshold=2)
    assert g.on_error(1.0) is Action.NONE and g.allow()  # one refused call is not an outage
    g.on_reply(0.001)  # an out-of-memory Redis answers reads but refuses writes: the count goes on
    assert g.on_error(1.1) is Action.OPENED and not g.allow()
    assert g.on_reply(0.001) is Action.NONE and not g.allow()  # a late reply does not close it
    assert g.on_probe(1.2, Outcome.OK, 0.001) is Action.NONE and not g.allow()  # nor a check that was out
    one = guard(threshold=1)
    assert one.on_error(0.0) is Action.OPENED


def test_recovery_checks_close_on_the_first_answer_and_back_off_only_when_refused() -> None:
    g = guard(retry_after=0.5, max_retry_after=2.0)
    assert g.check_in(0.0) == math.inf  # closed: no checks
    assert g.trip(10.0) is Action.OPENED and g.trip(10.0) is Action.NONE  # a failed warm-up opens it, once
    assert g.check_in(10.0) == pytest.approx(0.5) and g.check_in(11.0) == 0.0
    # Refused at once: back off 1, 2, 2 s.
    assert g.on_check(10.5, Outcome.ERROR) is Action.NONE and g.check_in(10.5) == pytest.approx(1.0)
    assert g.on_check(11.5, Outcome.ERROR) is Action.NONE and g.check_in(11.5) == pytest.approx(2.0)
    assert g.on_check(13.5, Outcome.ERROR) is Action.NONE and g.check_in(13.5) == pytest.approx(2.0)
    # Not answered within its (long) bound: the next check goes out at once, so a resume is seen at once.
    assert g.on_check(17.5, Outcome.TIMEOUT) is Action.NONE and g.check_in(17.5) == 0.0
    assert not g.allow()
    assert g.on_check(17.6, Outcome.OK, 0.3) is Action.CLOSED and g.allow() and g.state is Health.CLOSED
    assert g.timeout == pytest.approx(1.0)  # its 0.3 s answer is the only sample: 4 x 0.3 s, capped
    assert g.on_check(17.7, Outcome.OK) is Action.NONE  # a check that ends after closing changes nothing
    # Closed again: the error count starts over, and the first interval is the first one again.
    assert g.on_error(20.0) is Action.NONE
    assert g.on_error(20.0) is Action.OPENED and g.check_in(20.0) == pytest.approx(0.5)


def test_a_stopped_store_opens_after_one_check_and_a_starved_one_never_does() -> None:
    """The two timelines side by side, driven through the guard's own decisions (fake clock)."""
    stopped, starved = guard(), guard()
    for g in (stopped, starved):
        for _ in range(64):
            g.on_reply(0.001)
    now = 100.0
    # Stopped: a request times out after the floor, the check is never answered.
    assert stopped.timeout == 0.05 and stopped.on_timeout() is Action.PROBE
    now += stopped.probe_timeout
    assert stopped.on_probe(now, Outcome.TIMEOUT) is Action.OPENED and not stopped.allow()
    # Starved: replies take 30-300 ms for a while; each late one is checked, the check answers, the timeout grows.
    opened = []
    for slow in (0.03, 0.06, 0.12, 0.2, 0.3, 0.3, 0.3, 0.1, 0.3):
        if slow > starved.timeout:
            assert starved.on_timeout() is Action.PROBE
            opened.append(starved.on_probe(now, Outcome.OK, slow))
        else:
            starved.on_reply(slow)
    assert set(opened) == {Action.NONE} and starved.allow() and starved.timeout == 1.0
    with pytest.raises(ValueError, match="floor"):
        StoreGuard(floor=2.0, ceiling=1.0)


def test_wait_ends_when_the_holders_lease_would_expire_or_at_the_deadline() -> None:
    assert wait_for(now=100.0, lease_left_ms=2_000, deadline=130.0) == pytest.approx(2.05)
    assert wait_for(now=129.0, lease_left_ms=2_000, deadline=130.0) == pytest.approx(1.0)
    assert wait_for(now=131.0, lease_left_ms=2_000, deadline=130.0) == 0.0
    assert wait_for(now=100.0, lease_left_ms=-2, deadline=130.0) == pytest.approx(0.05)  # lease just vanished


# -- HTTP ---------------------------------------------------------------------------------------------------------
def test_if_none_match_and_client_refresh_rules() -> None:
    tag = '"abc"'
    assert etag_matches('"abc"', tag) and etag_matches('W/"abc"', tag) and etag_matches('"x", "abc"', tag)
    assert etag_matches("*", tag)
    assert not etag_matches('"abd"', tag) and not etag_matches(None, tag) and not etag_matches("", tag)
    assert client_wants_fresh("no-cache") and client_wants_fresh("max-age=0") and client_wants_fresh("No-Store, x")
    assert client_wants_fresh(None, "no-cache")
    assert not client_wants_fresh("max-age=60") and not client_wants_fresh(None)


# -- keys ---------------------------------------------------------------------------------------------------------
def test_identity_sorts_names_keeps_repeated_values_in_order_and_stays_readable() -> None:
    a = identity("/quotes/{symbol}", [("q", "range", "1d"), ("p", "symbol", "AAPL"), ("q", "interval", "5m")])
    b = identity("/quotes/{symbol}", [("q", "interval", "5m"), ("q", "range", "1d"), ("p", "symbol", "AAPL")])
    assert a == b == "/quotes/{symbol}?p.symbol=AAPL&q.interval=5m&q.range=1d"
    first = identity("/x", [("q", "tag", "a"), ("q", "tag", "b")])
    assert first != identity("/x", [("q", "tag", "b"), ("q", "tag", "a")])  # order of repeated values matters
    # Separators inside values cannot forge other parameters.
    assert identity("/x", [("q", "a", text("1&q.b=2"))]) != identity("/x", [("q", "a", "1"), ("q", "b", "2")])
    # Only long parts are hashed; the endpoint and the short parts stay readable.
    long = identity("/search", [("q", "text", "x" * 500), ("q", "page", "2")])
    assert long.startswith("/search?q.page=2&q.text=~") and len(long) < 120


def test_canonical_values_are_stable_and_objects_are_left_out() -> None:
    class Color(Enum):
        RED = "red"

    class Query(BaseModel):
        q: str
        n: int

    assert typed(Color.RED) == "!enum.Color(red)" and typed(True) == "!true" and typed(None) == "!null"
    assert typed(dt.date(2026, 1, 2)) == "!date.2026-01-02" and typed(Decimal("1.50")) == "!dec.1.50"
    assert typed(uuid.UUID(int=1)) == "!uuid.00000000-0000-0000-0000-000000000001"
    assert typed({"b": 1, "a": 2}) == typed({"a": 2, "b": 1})
    assert typed({1, 2}) == typed({2, 1}) and typed([1, 2]) != typed([2, 1])
    assert typed(Query(q="x", n=1)) == "!model.Query(%7B%22q%22:%22x%22%2C%22n%22:1%7D)"
    assert typed(object()) is None and typed([1, object()]) is None  # a session, a client, a request
    assert key_identity({"b": 1, "a": "x"}) == key_identity({"a": "x", "b": 1})
    with pytest.raises(ConfigurationError, match="cannot be part of a cache key"):
        key_identity({"session": object()})


def test_every_key_of_a_namespace_is_in_one_cluster_slot() -> None:
    keys = CacheKeys("app", "quotes")
    names = [keys.entry("/q?p.s=A"), keys.lease("/q?p.s=A"), keys.version, keys.index, keys.tag_index("symbol:A"),
             keys.stats, keys.channel, keys.entry("/other/{x}?p.x=%7B%7D"), keys.secret]
    assert len({key_slot(n.encode()) for n in names}) == 1
    assert keys.entry("/q?p.s=A") == "app:cache:{quotes}:e2:/q?p.s=A"  # key format 2
    assert key_slot(CacheKeys("app", "other").version.encode()) != key_slot(keys.version.encode())
    with pytest.raises(ConfigurationError, match="namespace"):
        CacheKeys("app", "quo{tes}")
    with pytest.raises(ConfigurationError, match="':' separates"):
        CacheKeys("app", "a:b")


# -- codecs -------------------------------------------------------------------------------------------------------
class Quote(BaseModel):
    symbol: str
    at: dt.datetime
    price: Decimal


def test_json_codec_decodes_through_the_declared_type() -> None:
    q = Quote(symbol="A", at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC), price=Decimal("1.25"))
    codec = JsonCodec(list[Quote])
    back = codec.decode(codec.encode([q]))
    assert back == [q] and isinstance(back[0].at, dt.datetime) and isinstance(back[0].price, Decimal)
    when = JsonCodec(dt.datetime)
    assert when.decode(when.encode(q.at)) == q.at
    assert etag_of(codec.encode([q])) == etag_of(JsonCodec(list[Quote]).encode([q]))  # same bytes, same ETag


def test_json_codec_refuses_on_first_use_what_would_come_back_changed() -> None:
    untyped = JsonCodec()
    with pytest.raises(CacheSerializationError, match="does not survive JSON"):
        untyped.encode({"at": dt.datetime(2026, 1, 1)})  # would come back as a string
    with pytest.raises(CacheSerializationError, match="does not survive JSON"):
        untyped.encode((1, 2))  # would come back as a list
    with pytest.raises(CacheSerializationError, match="cannot encode a object"):
        untyped.encode(object())
    assert untyped.decode(untyped.encode({"a": [1, 2.5, None, "x"]})) == {"a": [1, 2.5, None, "x"]}


def test_pickle_needs_a_signing_key_and_refuses_foreign_payloads() -> None:
    with pytest.raises(ConfigurationError, match="signing_key"):
        PickleCodec(None)
    with pytest.raises(ConfigurationError, match="32 bytes"):
        PickleCodec(b"short")
    codec = PickleCodec(b"k" * 32)
    assert codec.decode(codec.encode({1, 2})) == {1, 2}
    forged = PickleCodec(b"z" * 32).encode({"x": 1})
    with pytest.raises(CacheSerializationError, match="signature does not match"):
        codec.decode(forged)
    with pytest.raises(CacheSerializationError, match="signature"):
        codec.decode(b"\x80\x04K\x01.")  # an unsigned pickle is never loaded


def test_cache_settings_from_env_and_their_checks() -> None:
    s = CacheSettings.from_env({"HYPERION_LOCK_CACHE_OP_TIMEOUT": "0.02", "HYPERION_LOCK_CACHE_MAX_SIZE": "2048"})
    assert s.op_timeout == 0.02 and s.max_size == 2048 and s.lease_ttl == 3.0 and s.op_timeout_max == 1.0
    with pytest.raises(ConfigurationError, match="op_timeout"):
        CacheSettings(op_timeout=0)

    with pytest.raises(ConfigurationError, match="unknown cache setting"):
        CacheSettings.from_env({}, lease=1)


# -- store-call timeouts ------------------------------------------------------------------------------------------
async def test_a_store_call_times_out_unless_redis_is_seen_alive() -> None:
    """A reply 0.2 s late: with no sign of life the call times out after 0.05 s; while other replies arrive (or
    before the store's first reply ever) it is given up to the cap; never longer than the cap."""

    async def late(value: str) -> str:
        await asyncio.sleep(0.2)
        return value

    with pytest.raises(TimeoutError, match="no reply within 50 ms"):
        await within(late("dead"), 0.05, alive=lambda since: False)
    assert await within(late("alive"), 0.05, alive=lambda since: True) == "alive"
    with pytest.raises(TimeoutError):
        await within(late("too late"), 0.05, alive=lambda since: True, cap=0.1)
    assert await within(late("fast enough"), 0.5) == "fast enough"


async def test_a_store_call_that_loses_the_timeouts_cancel_is_cancelled_again() -> None:
    """A write to a stopped Redis completes into the socket buffer and redis-py's ``wait_for`` (Python < 3.12)
    then drops the cancel; the call waits for a reply up to its socket timeout (seconds). It is cancelled again,
    and the caller still sees one ``TimeoutError``, its task not left marked as cancelling; a cancel from
    outside is still a ``CancelledError``."""
    reply_forever, writing = asyncio.Event(), asyncio.Event()

    async def losing_the_first_cancel() -> str:
        writing.set()  # the write has started: a cancel from now on lands in it
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(10)  # the write: the first cancel arrives as it completes, and is lost
        await reply_forever.wait()  # the read of a reply that never comes
        return "never"

    async with asyncio.timeout(5):
        with pytest.raises(TimeoutError, match="no reply within 50 ms"):
            await within(losing_the_first_cancel(), 0.05, alive=lambda since: False)
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0

    async def outside() -> str:
        return await within(losing_the_first_cancel(), 0.05, alive=lambda since: False)

    writing.clear()
    caller = asyncio.ensure_future(outside())
    async with asyncio.timeout(5):
        await writing.wait()
    caller.cancel()  # lost in the write, then the timeout's cancel lands: the outer cancel must still win
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(5):
            await caller


# -- near cache -------------------------------------------------------------------------------------------------
def near_entry(payload: bytes = b"v", fresh_left_ms: int = 10_000, ahead_ms: int = 1_000,
               sent_at: float = 100.0) -> NearEntry:
    return NearEntry.of(payload, '"e"', 30_000, fresh_left_ms, ahead_ms, sent_at)


def test_the_near_cache_keeps_entries_only_while_its_channel_is_confirmed() -> None:
    near = NearCache(max_entries=10, max_bytes=1000)
    assert near.epoch("ch") is None  # not subscribed: nothing may be kept
    assert not near.offer("ch", "k", near_entry(), None, 100.0) and near.get("ch", "k", 100.0) is None
    assert near.wants("ch", 100.0) and not near.wants("ch", 100.0)  # one subscription asked for
    near.failed("ch", 100.0, retry_after=5.0)
    assert not near.wants("ch", 104.9)  # failed (e.g. no channel permission): not asked again on every read...
    assert near.wants("ch", 105.0)  # ...but a while later
    near.subscribed("ch")
    assert not near.wants("ch", 200.0)
    epoch = near.epoch("ch")
    assert near.offer("ch", "k", near_entry(), epoch, 100.0)
    assert near.get("ch", "k", 100.0) is not None and near.get("other", "k", 100.0) is None
    # The connection breaks: everything is dropped, and nothing is kept until confirmed again.
    near.lost()
    assert len(near) == 0 and near.epoch("ch") is None and near.wants("ch", 200.0)
    assert not near.offer("ch", "k", near_entry(), epoch, 100.0)
    near.subscribed("ch")
    assert not near.offer("ch", "k", near_entry(), epoch, 100.0)  # an epoch from before the loss is refused
    assert near.offer("ch", "k", near_entry(), near.epoch("ch"), 100.0)


def test_a_message_heard_between_a_read_and_its_offer_refuses_the_offer() -> None:
    near = NearCache()
    near.subscribed("ch")
    before = near.epoch("ch")  # taken when the read is sent
    near.message("ch", "other")  # an invalidation handled before the read's reply (any entry of the channel)
    assert not near.offer("ch", "k", near_entry(), before, 100.0) and near.get("ch", "k", 100.0) is None
    near.message("elsewhere", "k")  # another namespace's message does not matter
    assert near.offer("ch", "k", near_entry(), near.epoch("ch"), 100.0)


def test_messages_drop_their_entry_or_their_whole_namespace() -> None:
    near = NearCache()
    for channel in ("a", "b"):
        near.subscribed(channel)
        for ident in ("k1", "k2"):
            assert near.offer(channel, ident, near_entry(), near.epoch(channel), 100.0)
    near.message("a", "k1")  # a new value, a key or tag invalidation, a released lease
    assert near.get("a", "k1", 100.0) is None and near.get("a", "k2", 100.0) is not None
    near.message("a", "")  # a namespace invalidation
    assert near.get("a", "k2", 100.0) is None
    assert near.get("b", "k1", 100.0) is not None and near.get("b", "k2", 100.0) is not None and len(near) == 2


def test_a_near_entry_is_served_until_it_stops_being_simply_fresh_counted_from_the_read() -> None:
    near = NearCache()
    near.subscribed("ch")
    kept = near_entry(fresh_left_ms=10_000, ahead_ms=1_000, sent_at=100.0)  # fresh until 110, early refresh at 109
    assert (kept.fresh_end, kept.keep_until) == (110.0, 109.0)
    assert near.offer("ch", "k", kept, near.epoch("ch"), 101.0)
    assert near.get("ch", "k", 108.999) is kept
    assert near.get("ch", "k", 109.0) is None and len(near) == 0  # from here the store decides (refresh, stale)
    assert not near.offer("ch", "k", kept, near.epoch("ch"), 109.5)  # a reply that arrives too late is not kept


def test_the_near_cache_is_bounded_in_entries_and_bytes() -> None:
    near = NearCache(max_entries=3, max_bytes=800)
    near.subscribed("ch")
    for i in range(5):
        assert near.offer("ch", f"k{i}", near_entry(b"x" * 10), near.epoch("ch"), 100.0)
    assert len(near) == 3 and near.get("ch", "k0", 100.0) is None and near.get("ch", "k4", 100.0) is not None
    near.get("ch", "k2", 100.0)  # used: the least recently used is k3 now
    assert near.offer("ch", "big", near_entry(b"y" * 100), near.epoch("ch"), 100.0)
    assert near.get("ch", "k3", 100.0) is None and near.get("ch", "k2", 100.0) is not None
    assert not near.offer("ch", "huge", near_entry(b"z" * 101), near.epoch("ch"), 100.0)  # > 1/8 of the bytes
    for i in range(8):
        near.offer("ch", f"b{i}", near_entry(b"w" * 100), near.epoch("ch"), 100.0)
    assert sum(len(e.payload) for e in near._entries.values()) <= 800
    off = NearCache(max_entries=0)
    off.subscribed("ch")
    assert not off.wants("x", 100.0) and not off.offer("ch", "k", near_entry(), off.epoch("ch"), 100.0)
