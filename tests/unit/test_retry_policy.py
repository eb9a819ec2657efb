"""``with_retries`` driven by a fake clock: the backoff schedule, where the budget is counted from,
what is retried, and what the errors say (no server, no real waiting)."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

import pytest
from redis import exceptions as rexc

from hyperion_lock.connection.clients import RedisCall, RetryPolicy, with_retries
from hyperion_lock.errors import RedisAuthError, RedisUnavailableError

CALL = RedisCall(
    "connect for job 'migrate'", "redis://127.0.0.1:6379/0", key="migrate", generation="g7"
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(round(seconds, 6))
        self.now += seconds


def failing(
    errors: list[BaseException], cost: float = 0.0, clock: FakeClock | None = None
) -> Callable[[], Awaitable[str]]:
    """An action that raises ``errors`` one per call (each taking ``cost`` seconds), then returns
    "ok"."""
    pending = list(errors)

    async def action() -> str:
        if clock is not None:
            clock.now += cost
        if pending:
            raise pending.pop(0)
        return "ok"

    return action


def policy(clock: FakeClock, budget: float = 10.0, **kw: object) -> RetryPolicy:
    return RetryPolicy(budget, clock=clock, sleep=clock.sleep, **kw)  # type: ignore[arg-type]


async def test_transient_failures_back_off_exponentially_up_to_the_cap() -> None:
    clock = FakeClock()
    seen: list[int] = []
    errors: list[BaseException] = [rexc.ConnectionError("refused")] * 7
    result = await with_retries(
        failing(errors),
        CALL,
        policy(clock, max_backoff=0.5),
        on_retry=lambda exc, n: seen.append(n),
    )
    assert result == "ok"
    assert clock.slept == [0.05, 0.1, 0.2, 0.4, 0.5, 0.5, 0.5]
    assert seen == [1, 2, 3, 4, 5, 6, 7]


async def test_the_budget_counts_from_the_first_failure() -> None:
    clock = FakeClock()
    action = failing([rexc.ConnectionError("refused")] * 100, cost=1.0, clock=clock)
    with pytest.raises(RedisUnavailableError) as info:
        await with_retries(action, CALL, policy(clock, budget=3.0))
    # the first failure at 101 starts the budget; failures at 102.05, 103.15, then 104.35: past it
    assert clock.slept == [0.05, 0.1, 0.2]
    text = str(info.value)
    assert re.search(
        r"could not connect for job 'migrate': .* did not answer for 3\.[34] s", text
    ), text
    assert "(4 attempts; last error ConnectionError: refused)" in text
    assert (info.value.key, info.value.generation) == ("migrate", "g7")


async def test_overall_counts_from_the_start_of_the_call() -> None:
    clock = FakeClock()
    action = failing([rexc.ConnectionError("refused")] * 100, cost=1.0, clock=clock)
    with pytest.raises(RedisUnavailableError, match=r"\(3 attempts; last error ConnectionError"):
        await with_retries(action, CALL, policy(clock, budget=3.0, overall=True))
    assert clock.slept == [
        0.05,
        0.1,
    ]  # the call started at 100: the failure at 103.15 is past the budget


async def test_the_last_wait_is_cut_to_what_is_left_of_the_budget() -> None:
    clock = FakeClock()
    action = failing([rexc.ConnectionError("refused")] * 100, cost=0.25, clock=clock)
    with pytest.raises(RedisUnavailableError, match=r"\(4 attempts"):
        await with_retries(action, CALL, policy(clock, budget=0.8))
    assert clock.slept == [
        0.05,
        0.1,
        0.15,
    ]  # failures at 100.25, 100.55, 100.9: 0.15 s of the budget left


async def test_a_failure_retrying_cannot_fix_raises_its_own_error_at_once() -> None:
    clock = FakeClock()
    with pytest.raises(RedisAuthError, match="refused the credentials"):
        await with_retries(failing([rexc.AuthenticationError("WRONGPASS")]), CALL, policy(clock))
    assert clock.slept == []


async def test_what_is_not_transient_is_raised_as_it_is() -> None:
    clock = FakeClock()
    with pytest.raises(ValueError, match="bug"):
        await with_retries(failing([ValueError("bug")]), CALL, policy(clock))
    assert clock.slept == []


async def test_the_policy_says_what_is_transient() -> None:
    clock = FakeClock()
    only_value_errors = policy(clock, transient=lambda exc: isinstance(exc, ValueError))
    assert await with_retries(failing([ValueError("blip")]), CALL, only_value_errors) == "ok"
    with pytest.raises(rexc.ConnectionError):
        await with_retries(failing([rexc.ConnectionError("refused")]), CALL, only_value_errors)
    assert clock.slept == [0.05]
