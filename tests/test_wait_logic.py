"""Unit tests of the waiting state machine with a scripted backend and an injected clock (no real time passes)."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Any

import pytest

from hyperion_lock import Coordinator, JobFailedError, Settings, Status, WaitTimeoutError
from hyperion_lock._model import Event, Holder, Lease, Outcome, Probe


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)  # let other tasks run, as a real sleep would


def holder(fence: int = 1) -> Holder:
    return Holder(host="h", pid=99, generation="g", fencing_token=fence, since=0.0)


def outcome(status: Status, fence: int = 1) -> Outcome:
    return Outcome(key="k", generation="g", status=status, fencing_token=fence, runner_host="h", runner_pid=99,
                   started_at=0.0, finished_at=1.0, error_type="ValueError" if status is Status.FAILED else None,
                   error_message="boom" if status is Status.FAILED else None)


@dataclass
class ScriptedBackend:
    """Plays back a list of (delay, event) for waits; probes answer from the current state."""

    clock: FakeClock
    events: list[tuple[float, Event | None]]
    grace: float = 1.0
    state_outcome: Outcome | None = None
    state_holder: Holder | None = field(default_factory=holder)
    probe_latency: float = 0.0
    probes: list[tuple[float, bool]] = field(default_factory=list)
    generation: str = "g"

    @property
    def holder_grace(self) -> float:
        return self.grace

    def describe(self) -> str:
        return "scripted"

    async def open(self) -> None: ...
    async def reopen(self) -> None: ...
    async def prepare(self) -> None: ...
    async def close(self) -> None: ...

    async def probe(self, token: str, *, try_acquire: bool, **_: Any) -> tuple[Probe, str | None]:
        self.clock.now += self.probe_latency
        self.probes.append((self.clock.now, try_acquire))
        if try_acquire and self.state_holder is None and not (
            self.state_outcome and self.state_outcome.status is Status.DONE
        ):
            self.state_holder = holder(fence=7)
            return Probe(self.state_outcome, self.state_holder, acquired=True), "{}"
        return Probe(self.state_outcome, self.state_holder), None

    async def next_event(self, timeout: float) -> Event | None:
        if not self.events:
            self.clock.now += timeout
            return None
        delay, event = self.events[0]
        if delay > timeout:
            self.clock.now += timeout
            self.events[0] = (delay - timeout, event)
            return None
        self.clock.now += delay
        self.events.pop(0)
        return event

    async def renew(self, lease: Lease, record: str) -> int:
        return 1

    async def finish(self, lease: Lease, outcome: Outcome | None) -> int:
        return 1


def coordinator(clock: FakeClock, **overrides: Any) -> Coordinator:
    settings = Settings(generation="g", lease_ttl=1.0, progress_interval=5.0, lock_dir="/nonexistent")
    return Coordinator(settings=settings, clock=clock, sleep=clock.sleep, **overrides)


async def run(c: Coordinator, backend: ScriptedBackend) -> Outcome | None:
    ran: list[int] = []

    async def job() -> None:
        ran.append(1)

    result = await c._coordinate(backend, "k", "scripted", job, (), {})
    if result is not None and result.ran_here:
        assert ran == [1]
    return result


def heartbeat() -> Event:
    return Event(Status.RUNNING, "g", holder=holder())


async def test_waiter_never_takes_over_while_heartbeats_arrive():
    clock = FakeClock()
    # 600 heartbeats, every 0.33 s: ~200 s of a live holder, 200x the lease TTL; then the outcome.
    events: list[tuple[float, Event | None]] = [(0.33, heartbeat()) for _ in range(600)]
    events.append((0.1, Event(Status.DONE, "g", outcome=outcome(Status.DONE))))
    backend = ScriptedBackend(clock, events)
    result = await run(coordinator(clock), backend)
    assert result is not None and result.status is Status.DONE and not result.ran_here
    assert len(backend.probes) == 1  # no polling: one probe at the start, then only messages
    assert clock.now - 1000.0 == pytest.approx(600 * 0.33 + 0.1)


async def test_takeover_after_a_silent_ttl_looks_first_then_takes():
    clock = FakeClock()
    backend = ScriptedBackend(clock, [(0.3, heartbeat())])
    backend_holder_gone_at = 1000.3 + 1.0

    class Vanishing(ScriptedBackend):
        async def probe(self, token: str, *, try_acquire: bool, **_: Any) -> tuple[Probe, str | None]:
            if self.clock.now >= backend_holder_gone_at:
                self.state_holder = None
            return await super().probe(token, try_acquire=try_acquire, **_)

    backend = Vanishing(clock, [(0.3, heartbeat())])
    result = await run(coordinator(clock), backend)
    assert result is not None and result.ran_here and result.fencing_token == 7
    # first probe (may take, holder alive), then after TTL of silence: a look, then the take.
    assert [take for _, take in backend.probes] == [True, False, True]
    assert backend.probes[1][0] == pytest.approx(1000.3 + 1.0)


async def test_slow_redis_gives_the_holder_time_to_reassert():
    clock = FakeClock()

    class Stalled(ScriptedBackend):
        async def probe(self, token: str, *, try_acquire: bool, **_: Any) -> tuple[Probe, str | None]:
            if len(self.probes) == 1:  # the look after the silence: Redis was paused, the lease expired
                self.state_holder = None
                self.probe_latency = 2.0
            elif len(self.probes) == 2:  # Redis is back: the holder re-asserted its lease
                self.probe_latency = 0.0
                self.state_holder = holder()
            return await super().probe(token, try_acquire=try_acquire, **_)

    done = Event(Status.DONE, "g", outcome=outcome(Status.DONE))
    events: list[tuple[float, Event | None]] = [(5.0, None), (0.1, done)]
    backend = Stalled(clock, events)
    result = await run(coordinator(clock), backend)
    assert result is not None and not result.ran_here
    takes = [take for _, take in backend.probes]
    assert takes[:2] == [True, False] and takes[2] is False  # did not grab the lease right after the stall


async def test_failure_seen_at_start_is_retried_new_failure_is_final():
    clock = FakeClock()
    backend = ScriptedBackend(clock, [], state_outcome=outcome(Status.FAILED, fence=3), state_holder=None)
    result = await run(coordinator(clock), backend)
    assert result is not None and result.ran_here  # an earlier attempt failed: this start runs it again

    clock = FakeClock()
    failure = Event(Status.FAILED, "g", outcome=outcome(Status.FAILED, fence=4))
    backend = ScriptedBackend(clock, [(0.2, heartbeat()), (0.5, failure)],
                              state_outcome=outcome(Status.FAILED, fence=3))
    with pytest.raises(JobFailedError) as info:
        await run(coordinator(clock), backend)
    assert info.value.fencing_token == 4 and info.value.error_type == "ValueError"
    assert info.value.key == "k" and info.value.generation == "g"


async def test_other_generation_outcome_means_the_lease_is_free():
    clock = FakeClock()
    backend = ScriptedBackend(clock, [(0.2, Event(Status.DONE, "old", outcome=outcome(Status.DONE)))])
    original_probe = backend.probe

    async def probe(token: str, *, try_acquire: bool, **_: Any) -> tuple[Probe, str | None]:
        if backend.probes:
            backend.state_holder = None  # the old deployment's leader released it
        return await original_probe(token, try_acquire=try_acquire)

    backend.probe = probe  # type: ignore[method-assign]
    result = await run(coordinator(clock), backend)
    assert result is not None and result.ran_here
    assert backend.probes[1][0] == pytest.approx(1000.2)  # at once, not after a TTL


async def test_optional_wait_timeout():
    clock = FakeClock()
    backend = ScriptedBackend(clock, [(0.3, heartbeat()) for _ in range(1000)])
    with pytest.raises(WaitTimeoutError, match="wait_timeout=10"):
        await run(coordinator(clock, wait_timeout=10), backend)
    assert clock.now - 1000.0 == pytest.approx(10.0, abs=0.5)


async def test_file_backend_style_infinite_grace_waits_for_release():
    clock = FakeClock()
    backend = ScriptedBackend(clock, [(100.0, Event(Status.RELEASED, "g"))], grace=math.inf)
    original_probe = backend.probe

    async def probe(token: str, *, try_acquire: bool, **_: Any) -> tuple[Probe, str | None]:
        if backend.probes:
            backend.state_holder = None
        return await original_probe(token, try_acquire=try_acquire)

    backend.probe = probe  # type: ignore[method-assign]
    result = await run(coordinator(clock), backend)
    assert result is not None and result.ran_here
    assert len(backend.probes) == 2


async def test_redis_data_loss_gives_the_holder_a_ttl_to_reassert():
    """After a restart without persistence the lease and the counter are gone; the waiter must not grab the lease
    before the (live) holder had a whole TTL to re-create it, and a later takeover continues the token sequence."""
    clock = FakeClock()
    seen: list[dict[str, Any]] = []

    class Restarted(ScriptedBackend):
        async def probe(self, token: str, *, try_acquire: bool, **kw: Any) -> tuple[Probe, str | None]:
            seen.append({"t": self.clock.now, "take": try_acquire, **kw})
            if len(seen) == 1:  # before the restart: holder with token 5 alive
                return Probe(None, holder(fence=5)), None
            if len(seen) == 2:  # after the restart: nothing left, counter 0
                return Probe(None, None, fence_counter=0 if kw.get("with_counter") else None), None
            # the holder never came back: the waiter takes over, continuing from token 5
            return await super().probe(token, try_acquire=try_acquire)

    backend = Restarted(clock, [], state_holder=None)
    result = await run(coordinator(clock), backend)
    assert result is not None and result.ran_here
    assert seen[1]["with_counter"] and not seen[1]["take"]
    takes = [row for row in seen[1:] if row["take"]]
    assert takes and all(row.get("seen_fence") == 5 for row in takes), seen
    # the take after the loss came at least one TTL (1 s) after the look that detected it
    assert takes[-1]["t"] - seen[1]["t"] >= 1.0
