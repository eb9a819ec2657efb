"""The model of the cache's Lua scripts (``tests/support/model/cache_model.py``) is held to the real scripts: random
sequences of store calls run against a real redis-server, through the library's own argument building
(:class:`~hyperion_lock.cache.store.RedisStore`'s ``read``, ``take``, ``renew``, ``put``, ``release`` and the three
invalidations, with key names from :class:`~hyperion_lock.cache.keys.CacheKeys`), and against the model. After every
call: the same reply, the same keys (type; string, hash fields, ZSET members; ZSET scores and PTTLs alike within a
slack) and the same messages published on the namespace's channel.

Time: the model counts every TTL and score from now; Redis counts scores from its ``TIME``, so a real score is
compared as ``score - TIME``. Time passes in ``age`` steps only, which move every TTL and every ZSET score back by the
same amount in Redis (a test-only script) and in the model. Ages are multiples of 100 s, and every duration (lease
250 s, entry lives 150 s and 450 s) is 50 s past one, so no expiry or score ever comes near "now": the time that
really passes during an example (seconds at most, on a loaded machine) decides nothing, and shows only as a real TTL
or score off by that much (``SLACK_MS``).

``HYPERION_LOCK_DIFF_EXAMPLES`` selects more examples than the suite's 100.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from hyperion_lock.cache import store as _store
from hyperion_lock.cache.keys import CacheKeys
from hyperion_lock.cache.store import Header, Message, RedisStore, TakeMode
from tests.support.model.cache_model import (
    EMPTY,
    CacheScripts,
    Db,
    Hash,
    Redis,
    RenewKeepsFirstRegistration,
    ScriptError,
    ZSet,
)
from tests.support.model.checker import drive
from tests.support.model.diff import AGE, ScriptFailed, model_reply

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("HYPERION_LOCK_DIFF_EXAMPLES", "100"))
SLACK_MS = 30_000
LEASE_MS = 250_000
LIVES = (150_000, 450_000)
IDENTS = {"k": ("t",), "k2": ("t", "u")}  # entry id -> its tags
TAGS = ("t", "u")
TOKENS = ("a", "b")
HOLDER = "holder"  # the token that holds the entry's lease in the model now ("a" if none)
NOW = "now"  # PUT with the namespace version the model holds now
SNAPSHOT = """
local t = redis.call('TIME')
local out = {t[1], t[2]}
for _, k in ipairs(KEYS) do
  local kind = redis.call('TYPE', k)['ok']
  local v = {}
  if kind == 'string' then v = {redis.call('GET', k)}
  elseif kind == 'hash' then v = redis.call('HGETALL', k)
  elseif kind == 'zset' then v = redis.call('ZRANGE', k, 0, -1, 'WITHSCORES') end
  table.insert(out, {kind, v, redis.call('PTTL', k)})
end
return out
"""
#: RENEW without its re-registration in the tag indexes (the half of 3feb107 that RenewKeepsFirstRegistration undoes)
RENEW_LINE = next(line for line in _store.RENEW.splitlines() if line.startswith("for i = 2, #KEYS do keep("))
_prefixes = itertools.count()


# -- the steps ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReadStep:
    token: str
    ident: str
    take: TakeMode


@dataclass(frozen=True)
class TakeStep:
    token: str
    ident: str


@dataclass(frozen=True)
class RenewStep:
    token: str
    ident: str


@dataclass(frozen=True)
class PutStep:
    token: str
    ident: str
    life_ms: int
    seen: int | str  # the namespace version the call says it read (NOW: the model's current one)


@dataclass(frozen=True)
class ReleaseStep:
    token: str
    ident: str


@dataclass(frozen=True)
class InvalidateKeyStep:
    ident: str


@dataclass(frozen=True)
class InvalidateTagStep:
    tag: str


@dataclass(frozen=True)
class InvalidateNamespaceStep:
    pass


@dataclass(frozen=True)
class AgeStep:
    ms: int


@dataclass(frozen=True)
class CorruptStep:
    """Someone wrote a string where the cache keeps a hash or a sorted set: READ drops a stray entry, PUT's retry
    check reads past it, and every script drops a stray tag or namespace index before using it."""

    kind: str  # "entry" (``name`` is its ident), "tag" (``name`` is the tag) or "index" (the namespace's)
    name: str


idents = st.sampled_from(sorted(IDENTS))
callers = st.sampled_from((HOLDER, HOLDER, *TOKENS))
steps = st.one_of(
    st.builds(ReadStep, st.sampled_from(TOKENS), idents, st.just(TakeMode.IF_MISSING)),  # the usual call, more often
    st.builds(ReadStep, st.sampled_from(TOKENS), idents, st.just(TakeMode.IF_MISSING)),  # the usual call, more often
    st.builds(ReadStep, st.sampled_from(TOKENS), idents, st.sampled_from(TakeMode)),
    st.builds(TakeStep, st.sampled_from(TOKENS), idents),
    st.builds(RenewStep, callers, idents),
    st.builds(PutStep, st.just(HOLDER), idents, st.sampled_from(LIVES), st.just(NOW)),  # the usual call, more often
    st.builds(PutStep, callers, idents, st.sampled_from(LIVES), st.sampled_from((NOW, NOW, 0, 1))),
    st.builds(ReleaseStep, callers, idents),
    st.builds(InvalidateKeyStep, idents),
    st.builds(InvalidateTagStep, st.sampled_from(TAGS)),
    st.just(InvalidateNamespaceStep()),
    st.builds(AgeStep, st.sampled_from((100_000, 100_000, 200_000, 300_000))),
    st.builds(CorruptStep, st.just("entry"), idents),
    st.builds(CorruptStep, st.just("tag"), st.sampled_from(TAGS)),
    st.builds(CorruptStep, st.just("index"), st.just("")),
)
sequences = st.lists(steps, min_size=8, max_size=24)


# -- the two sides ----------------------------------------------------------------------------------------------------
class TeeStore(RedisStore):
    """The library's store, each script call run by the real Redis (synchronously) and by the model, replies compared
    at once. ``mutate`` (from, to) edits the Lua text of RENEW the real server runs (a test-only broken rule)."""

    def __init__(self, client: redis.Redis, model: CacheScripts, mutate: tuple[str, str] | None = None) -> None:
        self.client = client
        self.model = model
        self.mutate = mutate
        self.db: Db = EMPTY
        self.published: list[str] = []
        self.step = ""

    def _register(self, keys: CacheKeys) -> None:
        return None  # the namespace registry is not a script's key

    async def _run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        what = f"{self.step}: {script_name(script)}"
        code = script.replace(*self.mutate) if self.mutate and script == _store.RENEW else script
        try:
            real = self.client.eval(code, len(keys), *keys, *args)
        except redis.ResponseError as exc:  # the script raised (and changed nothing): so must the model
            with pytest.raises(ScriptError):
                self.model.run(self.db, script, keys, args)
            raise ScriptFailed(f"{what} raised in Redis ({exc}) and in the model") from exc
        self.db, reply, published = model_reply(self.model, self.db, script, keys, args, real, what,
                                                (ScriptError, ValueError, KeyError, TypeError))
        self.published.extend(published)
        same_reply(real, reply, f"{what} reply", script)
        return real


def script_name(script: str) -> str:
    names = ("READ", "TAKE", "RENEW", "PUT", "RELEASE", "INVALIDATE_KEY", "INVALIDATE_TAG", "INVALIDATE_NAMESPACE")
    return next(n for n in names if getattr(_store, n) == script)


def text(value: Any) -> Any:
    """bytes as text, in lists too."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list):
        return [text(v) for v in value]
    return value


def same_ttl(real: int, model: int) -> bool:
    if real < 0 or model < 0:
        return real == model
    return abs(model - real) <= SLACK_MS


def same_reply(real: Any, model: Any, what: str, script: str) -> None:
    r, m = text(real), text(model)
    if script == _store.READ:  # [3] and [5] are PTTLs
        ok = (len(r) == len(m) == 7 and [r[i] for i in (0, 1, 3, 5, 6)] == [m[i] for i in (0, 1, 3, 5, 6)]
              and same_ttl(int(r[2]), int(m[2])) and same_ttl(int(r[4]), int(m[4])))
        assert ok, f"{what}: Redis {r!r}, model {m!r}"
        return
    assert r == m, f"{what}: Redis {r!r}, model {m!r}"


class Run:
    """One example: a fresh key prefix, the store, a subscriber to the namespace's channel."""

    def __init__(self, client: redis.Redis, model: CacheScripts, mutate: tuple[str, str] | None) -> None:
        self.client = client
        self.store = TeeStore(client, model, mutate)
        self.keys = CacheKeys(f"cdiff{os.getpid()}-{next(_prefixes)}", "ns")
        self.names = [self.keys.version, self.keys.index, *(self.keys.tag_index(t) for t in TAGS),
                      *(self.keys.entry(i) for i in IDENTS), *(self.keys.lease(i) for i in IDENTS)]

    def play(self, steps: list[Any]) -> None:
        pubsub = self.client.pubsub()
        pubsub.subscribe(self.keys.channel)
        self._messages(pubsub, "subscribed")
        try:
            for i, step in enumerate(steps):
                self.store.step = f"step {i} {step}"
                self.store.published = []
                with contextlib.suppress(ScriptFailed):  # raised in Redis and in the model alike
                    self.do(step)
                got = self._messages(pubsub, str(i))
                # sorted: a tag invalidation publishes in index order, and two scores equal in the model may differ
                # by the milliseconds that passed in Redis
                assert messages(got) == messages(self.store.published), (
                    f"{self.store.step}: published by Redis {got!r}, by the model {self.store.published!r}")
                self.same_keys()
        finally:
            pubsub.close()
            self.client.delete(*self.names)

    def token(self, token: str, ident: str) -> str:
        return (self.store.db.get(self.keys.lease(ident)) or "a") if token == HOLDER else token

    def do(self, step: Any) -> None:
        keys, s = self.keys, self.store
        if isinstance(step, ReadStep):
            drive(s.read(keys, step.ident, IDENTS[step.ident], step.token, LEASE_MS, step.take))
        elif isinstance(step, TakeStep):
            drive(s.take(keys, step.ident, IDENTS[step.ident], step.token, LEASE_MS))
        elif isinstance(step, RenewStep):
            drive(s.renew(keys, step.ident, IDENTS[step.ident], self.token(step.token, step.ident), LEASE_MS))
        elif isinstance(step, PutStep):
            token = self.token(step.token, step.ident)
            seen = int(s.db.get(keys.version) or "0") if step.seen == NOW else int(step.seen)
            head = Header(ttl_ms=step.life_ms, stale_ms=0, etag="e", codec="json", version=seen, owner=token)
            drive(s.put(keys, step.ident, IDENTS[step.ident], token, head, f"from {token}".encode(), seen))
        elif isinstance(step, ReleaseStep):
            drive(s.release(keys, step.ident, self.token(step.token, step.ident), Message(step.ident, "retry")))
        elif isinstance(step, InvalidateKeyStep):
            drive(s.invalidate_key(keys, step.ident))
        elif isinstance(step, InvalidateTagStep):
            drive(s.invalidate_tag(keys, step.tag))
        elif isinstance(step, InvalidateNamespaceStep):
            drive(s.invalidate_namespace(keys))
        else:
            self.environment(step)

    def environment(self, step: AgeStep | CorruptStep) -> None:
        if isinstance(step, AgeStep):
            self.client.eval(AGE, len(self.names), *self.names, step.ms)
            self.store.db = self.store.db.elapse(step.ms)
            return
        if step.kind == "entry":
            name = self.keys.entry(step.name)
        elif step.kind == "tag":
            name = self.keys.tag_index(step.name)
        else:
            name = self.keys.index
        self.client.set(name, "stray")
        scratch = Redis.of(self.store.db)
        scratch.data[name] = ("stray", None)
        self.store.db = scratch.freeze()

    def _messages(self, pubsub: Any, marker: str) -> list[str]:
        """Everything published on the channel since the last call: publish a marker, read up to it (bounded)."""
        self.client.publish(self.keys.channel, f"marker:{marker}")
        got: list[str] = []
        for _ in range(200):
            message = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
            if message is None:
                continue
            data = text(message["data"])
            if data == f"marker:{marker}":
                return got
            got.append(data)
        raise AssertionError(f"{self.store.step}: the marker {marker} never came back on the channel")

    def same_keys(self) -> None:
        snapshot = text(self.client.eval(SNAPSHOT, len(self.names), *self.names))
        now = int(snapshot[0]) * 1000 + int(snapshot[1]) // 1000
        for name, (kind, value, ttl) in zip(self.names, snapshot[2:], strict=True):
            where = f"{self.store.step}: {name}"
            model = self.store.db.value(name)
            model_ttl = self.store.db.pttl(name)
            assert kind == kind_of(model), f"{where} is a {kind} in Redis, {model!r} in the model"
            assert same_ttl(int(ttl), model_ttl), f"{where}: PTTL {ttl} in Redis, {model_ttl} in the model"
            if isinstance(model, str):
                assert value == [model], f"{where} is {value!r} in Redis, {model!r} in the model"
            elif isinstance(model, Hash):
                assert dict(zip(value[::2], value[1::2], strict=True)) == dict(model.fields), (
                    f"{where} is {value!r} in Redis, {model!r} in the model")
            elif isinstance(model, ZSet):
                real = {m: float(s) - now for m, s in zip(value[::2], value[1::2], strict=True)}
                modelled = dict(model.members)
                assert set(real) == set(modelled) and all(
                    abs(real[m] - modelled[m]) <= SLACK_MS for m in real
                ), f"{where} is {real!r} in Redis (scores from now), {modelled!r} in the model"


def messages(published: list[str]) -> list[Any]:
    """Messages parsed (cjson and Python's json spell an object differently), in a fixed order."""
    return sorted((json.loads(m) for m in published), key=str)


def kind_of(value: Any) -> str:
    if value is None:
        return "none"
    return {str: "string", Hash: "hash", ZSet: "zset"}[type(value)]


@pytest.fixture(scope="module")
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    try:
        yield c
    finally:
        c.close()


@settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(sequences)
def test_the_model_answers_as_the_cache_scripts_do(client: redis.Redis, steps: list[Any]) -> None:
    Run(client, CacheScripts(), None).play(steps)


def test_a_renew_that_does_not_re_register_is_noticed_and_matches_its_broken_model(client: redis.Redis) -> None:
    """The real RENEW edited (test-only) to extend the lease alone, as before 3feb107: against the intact model the
    sequences tell them apart (a tag index score); against ``RenewKeepsFirstRegistration``, the model variant the
    checker catches, they agree: that variant is the edited Lua, not a guess."""
    mutate = (RENEW_LINE, "")

    @settings(max_examples=300, deadline=None, database=None, phases=[Phase.explicit, Phase.generate])
    @given(sequences)
    # The shortest telling sequence, always tried first: random ones find it often but not always within 300
    # examples (one CI run did not), and a test must not rest on luck. A lease taken for k (tag t), aged, renewed:
    # the intact RENEW moves k's score in t's index, the edited one leaves it.
    @example([ReadStep("a", "k", TakeMode.IF_MISSING), AgeStep(100_000), RenewStep(HOLDER, "k")])
    def against_intact_model(steps: list[Any]) -> None:
        Run(client, CacheScripts(), mutate).play(steps)

    with pytest.raises(AssertionError, match=r"RENEW|:t:") as info:
        against_intact_model()
    print(info.value)

    @settings(max_examples=max(EXAMPLES // 2, 20), deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(sequences)
    def against_its_model(steps: list[Any]) -> None:
        Run(client, RenewKeepsFirstRegistration(), mutate).play(steps)

    against_its_model()
