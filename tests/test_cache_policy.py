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
from hyperion_lock._cache import CacheSettings, key_identity
from hyperion_lock._cache_codec import JsonCodec, PickleCodec, etag_of
from hyperion_lock._cache_keys import CacheKeys, canonical, identity
from hyperion_lock._cache_policy import (
    Breaker,
    BreakerChange,
    EntryAge,
    Freshness,
    client_wants_fresh,
    etag_matches,
    freshness,
    wait_for,
)
from hyperion_lock._cache_store import within


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


# -- breaker ------------------------------------------------------------------------------------------------------
def test_breaker_opens_after_failures_in_a_row_and_backs_off() -> None:
    b = Breaker(threshold=2, retry_after=0.5, max_retry_after=2.0)
    assert b.allow() and b.check_in(0.0) == math.inf
    assert b.on_failure(now=10.0) is None and b.allow()  # one failure is not an outage
    assert b.on_success() is None and b.failures == 0  # a success in between resets the count
    assert b.on_failure(now=11.0) is None
    assert b.on_failure(now=11.1) is BreakerChange.OPENED  # logged once
    assert not b.allow()
    assert b.check_in(11.1) == pytest.approx(0.5) and b.check_in(12.0) == 0.0
    # Failed recovery checks double the interval up to the cap; none is reported as a new opening.
    assert b.on_failure(now=12.0) is BreakerChange.REOPENED and b.check_in(12.0) == pytest.approx(1.0)
    assert b.on_failure(now=13.0) is BreakerChange.REOPENED and b.check_in(13.0) == pytest.approx(2.0)
    assert b.on_failure(now=15.0) is BreakerChange.REOPENED and b.check_in(15.0) == pytest.approx(2.0)
    assert b.on_success() is BreakerChange.CLOSED and b.allow()
    # After closing, it takes `threshold` new failures to open again, with the first interval again.
    assert b.on_failure(now=20.0) is None
    assert b.on_failure(now=20.0) is BreakerChange.OPENED and b.check_in(20.0) == pytest.approx(0.5)
    # A failed warm-up opens it at once, once.
    fresh = Breaker(threshold=2, retry_after=0.5)
    assert fresh.trip(now=1.0) is BreakerChange.OPENED and not fresh.allow() and fresh.trip(now=1.1) is None


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
    assert identity("/x", [("q", "a", "1&q.b=2")]) != identity("/x", [("q", "a", "1"), ("q", "b", "2")])
    # Only long parts are hashed; the endpoint and the short parts stay readable.
    long = identity("/search", [("q", "text", "x" * 500), ("q", "page", "2")])
    assert long.startswith("/search?q.page=2&q.text=~") and len(long) < 120


def test_canonical_values_are_stable_and_objects_are_left_out() -> None:
    class Color(Enum):
        RED = "red"

    class Query(BaseModel):
        q: str
        n: int

    assert canonical(Color.RED) == "red" and canonical(True) == "true" and canonical(None) == "null"
    assert canonical(dt.date(2026, 1, 2)) == "2026-01-02" and canonical(Decimal("1.50")) == "1.50"
    assert canonical(uuid.UUID(int=1)) == "00000000-0000-0000-0000-000000000001"
    assert canonical({"b": 1, "a": 2}) == canonical({"a": 2, "b": 1})
    assert canonical({1, 2}) == canonical({2, 1}) and canonical([1, 2]) != canonical([2, 1])
    assert canonical(Query(q="x", n=1)) == '{"q":"x","n":1}'
    assert canonical(object()) is None and canonical([1, object()]) is None  # a session, a client, a request
    assert key_identity({"b": 1, "a": "x"}) == key_identity({"a": "x", "b": 1})
    with pytest.raises(ConfigurationError, match="cannot be part of a cache key"):
        key_identity({"session": object()})


def test_every_key_of_a_namespace_is_in_one_cluster_slot() -> None:
    keys = CacheKeys("app", "quotes")
    names = [keys.entry("/q?p.s=A"), keys.lease("/q?p.s=A"), keys.version, keys.index, keys.tag_index("symbol:A"),
             keys.stats, keys.channel, keys.entry("/other/{x}?p.x=%7B%7D")]
    assert len({key_slot(n.encode()) for n in names}) == 1
    assert keys.entry("/q?p.s=A") == "app:cache:{quotes}:e:/q?p.s=A"
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
    assert s.op_timeout == 0.02 and s.max_size == 2048 and s.lease_ttl == 3.0
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
