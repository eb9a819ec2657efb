"""The model of the Lua scripts (``tests/model/redis_model.py``) is held to the real scripts: random sequences of
script calls run against a real redis-server, through the library's own script-calling code
(:class:`~hyperion_lock.runonce.redis_backend.RedisBackend` over ``AsyncOps``), and against the model, and must give the
same replies, the same keys (value and TTL) and the same published messages, step by step.

Time is the one thing the two do not share: the model's clock only moves in ``age`` steps, which shift every TTL in
the real Redis by the same amount (a test-only script). Ages are multiples of 100 s against a 300 s lease, a 250 s
failure hold and a 1000 s result TTL, so the time that really passes during an example (seconds at most, on a
loaded machine) never decides anything; a real TTL may be lower than the model's by that much (``SLACK_MS``).

``HYPERION_LOCK_DIFF_EXAMPLES`` selects more examples than the suite's 100.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
import redis.asyncio as aredis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from hyperion_lock.errors import CorruptStateError
from hyperion_lock.runonce import scripts as _scripts
from hyperion_lock.runonce.keys import JobKeys
from hyperion_lock.runonce.model import Holder, Lease, Outcome, Status
from hyperion_lock.runonce.redis_backend import AsyncOps, RedisBackend
from hyperion_lock.settings import Settings
from tests.support.model.diff import AGE, ScriptFailed, model_reply
from tests.support.model.redis_model import EMPTY, Db, FinishIgnoresToken, Redis, ScriptError, Scripts

pytestmark = pytest.mark.integration

GENS = ("g0", "g1")
TOKENS = ("a", "b")
SLACK_MS = 30_000
EXAMPLES = int(os.environ.get("HYPERION_LOCK_DIFF_EXAMPLES", "100"))
_prefixes = itertools.count()


# -- the steps ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProbeStep:
    token: str
    gen: int
    take: bool
    seen_fence: int
    with_counter: bool


@dataclass(frozen=True)
class RenewStep:
    token: str  # HOLDER: the token and fencing token of the lease the model holds now (the usual caller)
    gen: int
    fence: int


@dataclass(frozen=True)
class FinishStep:
    token: str  # as for RenewStep
    gen: int
    fence: int
    status: str  # done, failed, or "" (give the lease up without an outcome)


@dataclass(frozen=True)
class ResetStep:
    gen: int
    force: bool


@dataclass(frozen=True)
class AgeStep:
    seconds: int


@dataclass(frozen=True)
class RestartStep:
    """Redis restarted without persistence: every key is gone."""


@dataclass(frozen=True)
class CorruptStep:
    """Someone wrote a value the scripts did not (a stray ``SET``, another tool sharing the prefix): both sides must
    then fail, or cope, alike."""

    key: str  # lease, fence or outcome (of generation 0)
    value: str


HOLDER = "holder"
tokens, gens, fences = st.sampled_from(TOKENS), st.sampled_from((0, 0, 0, 1)), st.integers(0, 4)
callers = st.sampled_from((HOLDER, HOLDER, *TOKENS))
steps = st.one_of(
    st.builds(ProbeStep, tokens, gens, st.just(True), st.just(0), st.just(False)),  # the common case, more often
    st.builds(ProbeStep, tokens, gens, st.booleans(), fences, st.booleans()),
    st.builds(RenewStep, callers, gens, fences),
    st.builds(FinishStep, callers, gens, fences, st.sampled_from(("done", "failed", "failed", ""))),
    st.builds(AgeStep, st.sampled_from((100, 100, 200, 300))),
    st.builds(ResetStep, gens, st.booleans()),
    st.just(RestartStep()),
    st.builds(CorruptStep, st.sampled_from(("lease", "fence", "outcome")), st.sampled_from(("not json", "[1]", "7"))),
)
sequences = st.lists(steps, min_size=8, max_size=24)


# -- the two sides ----------------------------------------------------------------------------------------------------
class TeeOps(AsyncOps):
    """The library's asyncio operations, each script call also run by the model; replies compared at once.
    ``mutate`` (from, to) edits the Lua text the real server runs (a test-only broken rule)."""

    def __init__(self, client: aredis.Redis, scripts: Scripts, mutate: tuple[str, str] | None = None) -> None:
        super().__init__(client, owned=False)
        self.model = scripts
        self.mutate = mutate
        self.db: Db = EMPTY
        self.published: list[str] = []
        self.step = ""

    def _code(self, script: str) -> str:  # type: ignore[override]
        return script.replace(*self.mutate) if self.mutate else script

    async def run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        what = f"{self.step}: {script_name(script)}"
        try:
            real = await super().run(script, keys, args)
        except redis.ResponseError as exc:  # the script raised (and changed nothing): so must the model
            with pytest.raises((ScriptError, ValueError, KeyError, TypeError)) as model_error:
                self.model.run(self.db, script, keys, args)
            if isinstance(model_error.value, ScriptError):  # an error reply of its own: the same words
                assert str(model_error.value) in str(exc), f"{what}: Redis said {exc}, the model {model_error.value}"
            raise ScriptFailed(f"{what} raised in Redis ({exc}) and in the model") from exc
        self.db, reply, published = model_reply(self.model, self.db, script, keys, args, real, what,
                                                (ScriptError, ValueError, KeyError, TypeError))
        self.published.extend(published)
        same_reply(real, reply, f"{what} reply")
        return real


def script_name(script: str) -> str:
    return next(n for n in ("PROBE", "RENEW", "FINISH", "RESET") if getattr(_scripts, n) == script)


def norm(value: Any) -> Any:
    """bytes as text, JSON objects parsed (cjson and Python's json spell them differently)."""
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, list):
        return [norm(v) for v in value]
    if isinstance(value, str) and value.startswith("{"):
        return json.loads(value)
    return value


def same_ttl(real: int, model: int) -> bool:
    if real < 0 or model < 0:
        return real == model
    return 0 <= model - real <= SLACK_MS


def same_reply(real: Any, model: Any, what: str) -> None:
    r, m = norm(real), norm(model)
    if isinstance(r, list) and len(r) == 5 and isinstance(m, list) and len(m) == 5:  # PROBE: [5] is a PTTL
        assert r[:4] == m[:4] and same_ttl(int(r[4]), int(m[4])), f"{what}: Redis {r!r}, model {m!r}"
        return
    assert r == m, f"{what}: Redis {r!r}, model {m!r}"


@dataclass
class Harness:
    loop: asyncio.AbstractEventLoop
    client: aredis.Redis

    def run(self, steps: list[Any], scripts: Scripts, mutate: tuple[str, str] | None = None) -> None:
        self.loop.run_until_complete(Run(self.client, scripts, mutate).play(steps))


class Run:
    """One example: a fresh key prefix, a backend per generation sharing one TeeOps, a subscriber to the channel."""

    def __init__(self, client: aredis.Redis, scripts: Scripts, mutate: tuple[str, str] | None) -> None:
        self.client = client
        self.ops = TeeOps(client, scripts, mutate)
        self.keys = JobKeys(f"diff{os.getpid()}-{next(_prefixes)}", "job")
        self.backends = [
            RedisBackend(self.ops, self.keys, Settings(
                generation=g, key_prefix=self.keys.prefix, lease_ttl=300, result_ttl=1000, failure_hold=250,
                lock_dir="/nonexistent"), "diff")
            for g in GENS
        ]
        self.names = [self.keys.lease, self.keys.fence, *(self.keys.outcome(g) for g in GENS)]
        self.corrupted = False  # a CorruptStep wrote a value the library may fail to read (that is not checked here)

    async def play(self, steps: list[Any]) -> None:
        pubsub = self.client.pubsub()
        await pubsub.subscribe(self.keys.channel)
        await self._messages(pubsub, "subscribed")
        try:
            for i, step in enumerate(steps):
                self.ops.step = f"step {i} {step}"
                self.ops.published = []
                await self.do(step)
                got = await self._messages(pubsub, str(i))
                assert norm(got) == norm(self.ops.published), (
                    f"{self.ops.step}: published by Redis {got!r}, by the model {self.ops.published!r}")
                await self.same_keys()
        finally:
            await pubsub.aclose() if hasattr(pubsub, "aclose") else await pubsub.close()
            await self.client.delete(*self.names)

    async def do(self, step: Any) -> None:
        try:
            await self._do(step)
        except ScriptFailed:
            pass  # the script raised in Redis and in the model alike
        except (CorruptStateError, ValueError, TypeError, KeyError, AttributeError):
            # The library could not read a reply the script and the model agreed on: a stray value written before.
            if not self.corrupted:
                raise

    async def _do(self, step: Any) -> None:
        if isinstance(step, ProbeStep):
            await self.backends[step.gen].probe(step.token, take=step.take, seen_fence=step.seen_fence,
                                                with_counter=step.with_counter)
        elif isinstance(step, RenewStep):
            await self.backends[step.gen].renew(self.lease(step.token, step.gen, step.fence))
        elif isinstance(step, FinishStep):
            lease = self.lease(step.token, step.gen, step.fence)
            await self.backends[step.gen].finish(lease, self.outcome(step, lease.fencing_token))
        elif isinstance(step, ResetStep):
            release = json.dumps({"status": "released", "generation": GENS[step.gen], "host": "cli", "pid": 1,
                                  "fence": 0, "since": 0})
            await self.ops.run(_scripts.RESET, [self.keys.lease, self.keys.outcome(GENS[step.gen]), self.keys.channel],
                               ["1" if step.force else "0", release])
        elif isinstance(step, AgeStep):
            await self.client.eval(AGE, len(self.names), *self.names, step.seconds * 1000)
            self.ops.db = self.ops.db.elapse(step.seconds * 1000)
        elif isinstance(step, CorruptStep):
            self.corrupted = True
            name = {"lease": self.keys.lease, "fence": self.keys.fence, "outcome": self.keys.outcome(GENS[0])}[step.key]
            await self.client.set(name, step.value)
            scratch = Redis.of(self.ops.db)
            scratch.set(name, step.value)
            self.ops.db = scratch.freeze()
        else:
            await self.client.delete(*self.names)
            self.ops.db = EMPTY

    def lease(self, token: str, gen: int, fence: int) -> Lease:
        """The lease a call presents; for HOLDER, that of the lease the model holds now (if any)."""
        current = self.ops.db.get(self.keys.lease)
        if token == HOLDER:
            data: dict[str, Any] = json.loads(current) if current else {"token": "a", "fence": fence}
            token, fence = str(data["token"]), int(data["fence"])
        holder = Holder(host="h", pid=7, generation=GENS[gen], fencing_token=fence, since=0.0)
        return Lease(key=self.keys.key, generation=GENS[gen], token=token, holder=holder)

    def outcome(self, step: FinishStep, fence: int) -> Outcome | None:
        if not step.status:
            return None
        failed = step.status == "failed"
        return Outcome(key=self.keys.key, generation=GENS[step.gen], status=Status(step.status),
                       fencing_token=fence, runner_host="h", runner_pid=7, started_at=0.0, finished_at=1.0,
                       error_type="RuntimeError" if failed else None, error_message="boom" if failed else None)

    async def _messages(self, pubsub: Any, marker: str) -> list[str]:
        """Everything published on the channel since the last call: publish a marker, read up to it."""
        await self.client.publish(self.keys.channel, f"marker:{marker}")
        got: list[str] = []
        async with asyncio.timeout(10):
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is None:
                    continue
                data = message["data"].decode() if isinstance(message["data"], bytes) else message["data"]
                if data == f"marker:{marker}":
                    return got
                got.append(data)

    async def same_keys(self) -> None:
        pipe = self.client.pipeline(transaction=True)
        for name in self.names:
            pipe.get(name)
            pipe.pttl(name)
        replies = await pipe.execute()
        for i, name in enumerate(self.names):
            value, ttl = replies[2 * i], replies[2 * i + 1]
            model_value, model_ttl = self.ops.db.get(name), self.ops.db.pttl(name)
            assert norm(value) == norm(model_value), f"{self.ops.step}: {name} is {value!r} in Redis, " \
                                                     f"{model_value!r} in the model"
            assert same_ttl(int(ttl), model_ttl), f"{self.ops.step}: PTTL {name} is {ttl} in Redis, {model_ttl} " \
                                                  f"in the model"


@pytest.fixture(scope="module")
def harness(redis_url: str) -> Iterator[Harness]:
    loop = asyncio.new_event_loop()
    client = aredis.Redis.from_url(redis_url)
    try:
        yield Harness(loop, client)
    finally:
        loop.run_until_complete(client.aclose() if hasattr(client, "aclose") else client.close())
        loop.close()


@settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(sequences)
def test_the_model_answers_as_the_lua_scripts_do(harness: Harness, steps: list[Any]) -> None:
    harness.run(steps, Scripts())


def test_a_finish_that_ignores_the_owner_token_is_noticed(harness: Harness) -> None:
    """The real FINISH edited (test-only) to take any lease for the caller's own, the model left right: the
    sequences tell them apart."""
    mutate = (FinishIgnoresToken.LUA_FROM, FinishIgnoresToken.LUA_TO)
    assert mutate[0] in _scripts.FINISH

    @settings(max_examples=300, deadline=None, database=None, phases=[Phase.generate])
    @given(sequences)
    def against_broken_lua(steps: list[Any]) -> None:
        harness.run(steps, Scripts(), mutate)

    with pytest.raises(AssertionError, match=r"FINISH|published|lease") as info:
        against_broken_lua()
    print(info.value)
