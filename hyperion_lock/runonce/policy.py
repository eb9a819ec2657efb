"""The waiting and takeover policy of one run-once call, as pure code: inputs in, the next action out.

:class:`WaitPolicy` never does I/O and never reads a clock: the caller passes ``now`` (monotonic seconds) with
every reply it got from the backend, and performs the :class:`Next` action it gets back. That makes every
timing decision testable with a fake clock (``tests/unit/test_policy.py``).

Timeline of a waiter, and what happens if the holder dies at each point:

* The first probe may take the lease at once (free, not done, no fresh failure): ``LEAD``.
* A live holder heartbeats every TTL/3. Each heartbeat (or a probe that sees the holder) pushes the takeover
  time to ``now + grace`` (one lease TTL). A holder that dies stops heartbeating; its lease expires after
  one TTL, and the waiter's takeover time arrives about then.
* At the takeover time the waiter first only *looks* (``LOOK``). If the lease is still there, the holder was
  alive after all (a heartbeat was lost): wait again. If the lease is gone but the fencing counter is below the
  holder's token, Redis lost its data (restart without persistence) while the holder may be alive: give it one
  more grace to re-assert its lease, once per holder. If the look itself was slow (Redis stalled, and so did
  everyone's renewals), give the holder a third of a grace to re-assert. Otherwise ``PROBE`` with take.
* A release, or an outcome of another generation, means the lease is free now: probe and take at once.
* An outcome of our generation ends the call: ``RETURN`` (done) or ``FAIL`` (failed).

Failures are final within a hold period: a failure that the *first* probe finds and that is younger than
``failure_hold`` (by the store's clock) ends the call with ``FAIL``, so a start of N workers runs a failing
job once. An older one belongs to an earlier attempt: the call runs the job again. Any failure that appears
after the first probe is final.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from hyperion_lock.runonce.model import Event, Holder, Outcome, Probe, Status


class Act(Enum):
    PROBE = "probe"  # look at the job; take the lease if ``Next.take``
    LOOK = "look"  # look without taking, also reading the fencing counter; report the latency
    WAIT = "wait"  # wait for an event until ``Next.until``
    LEAD = "lead"  # this call holds the lease (``Next.holder``): run the job
    RETURN = "return"  # the job is done for this generation (``Next.outcome``)
    FAIL = "fail"  # the job failed for this generation (``Next.outcome``)
    GIVE_UP = "give_up"  # someone else runs it and the caller does not wait
    TIME_OUT = "time_out"  # ``wait_timeout`` passed


class Notice(Enum):
    """Something worth a log line, decided by the policy and worded by the caller."""

    NEW_HOLDER = "new_holder"
    STALE_FAILURE = "stale_failure"
    DATA_LOSS = "data_loss"
    SLOW_STORE = "slow_store"


@dataclass(frozen=True)
class Next:
    act: Act
    take: bool = False
    until: float = 0.0
    holder: Holder | None = None
    outcome: Outcome | None = None
    notice: Notice | None = None


TERMINAL = frozenset({Act.LEAD, Act.RETURN, Act.FAIL, Act.GIVE_UP, Act.TIME_OUT})


class WaitPolicy:
    """State of one call's wait. ``grace`` is how long a holder may stay silent (``math.inf`` when the backend
    itself tells when the holder is gone, as a file lock does)."""

    def __init__(
        self,
        *,
        now: float,
        generation: str,
        grace: float,
        wait: bool = True,
        lead: bool = True,
        wait_timeout: float | None = None,
        failure_hold: float = 300.0,
        progress_interval: float = 5.0,
        progress_cap: float = 60.0,
    ) -> None:
        self.started = now
        self.generation = generation
        self.grace = grace
        self.wait = wait
        self.lead = lead  # False: only wait for the outcome (``hyperion-lock wait``), never take the lease
        self.wait_timeout = wait_timeout
        self.failure_hold = failure_hold
        self.may_take_at = now
        self.holder: Holder | None = None
        self.first = True
        self.stale: Outcome | None = None  # a failure of an earlier attempt, found by the first probe
        self.loss_granted = 0  # fencing token of the holder already given a grace after data loss
        self._progress_every = progress_interval
        self._progress_cap = max(progress_cap, progress_interval)
        self._progress_at = now + progress_interval

    # -- inputs -----------------------------------------------------------------------------------------------
    def start(self) -> Next:
        return Next(Act.PROBE, take=self.lead)

    @property
    def seen_fence(self) -> int:
        """Highest fencing token seen, so a taken lease continues the sequence even after data loss."""
        return self.holder.fencing_token if self.holder is not None else 0

    def on_probe(self, now: float, probe: Probe) -> Next:
        stale = self.stale
        verdict = self._judge(probe.outcome, probe.outcome_age)
        self.first = False
        if verdict is not None:
            return verdict
        if probe.acquired:
            return Next(Act.LEAD, holder=probe.holder, notice=Notice.STALE_FAILURE if self.stale != stale else None)
        notice = self._see(now, probe.holder) or (Notice.STALE_FAILURE if self.stale != stale else None)
        if not self.lead and probe.holder is None:  # nothing to take over: look again after a grace
            self.may_take_at = max(self.may_take_at, now + self.grace)
        if not self.wait:
            return Next(Act.GIVE_UP, holder=self.holder)
        return self._wait(now, notice)

    def on_look(self, now: float, look: Probe, latency: float) -> Next:
        verdict = self._judge(look.outcome, look.outcome_age)
        if verdict is not None:
            return verdict
        if look.holder is not None:
            return self._wait(now, self._see(now, look.holder))
        if self._lost_state(look):
            assert self.holder is not None
            self.loss_granted = self.holder.fencing_token
            self.may_take_at = now + self.grace
            return self._wait(now, Notice.DATA_LOSS)
        if latency > self.grace / 4:
            self.may_take_at = now + self.grace / 3
            return self._wait(now, Notice.SLOW_STORE)
        if not self.lead:  # nobody runs it now: look again after another grace, until an outcome or a timeout
            self.may_take_at = now + self.grace
            return self._wait(now)
        return Next(Act.PROBE, take=True)

    def on_event(self, now: float, event: Event | None) -> Next:
        """``event`` is ``None`` when the wait ended without one (its deadline, or a progress tick)."""
        if event is None:
            return self._wait(now)
        if event.status is Status.RUNNING:
            notice = self._see(now, event.holder)
            return self._wait(now, notice)
        if event.generation == self.generation and event.outcome is not None:
            verdict = self._judge(event.outcome, 0.0)
            if verdict is not None:
                return verdict
        # Released, or finished for another generation: the lease is free now.
        self.may_take_at = now
        return Next(Act.PROBE, take=self.lead)

    def on_reconnect(self, now: float) -> Next:
        """The wake-up channel was lost: messages may have been missed (read the state again), and the silence
        proves nothing about the holder (restart the takeover clock)."""
        self.may_take_at = max(self.may_take_at, now + self.grace)
        return Next(Act.PROBE, take=False)

    def progress_due(self, now: float) -> bool:
        """Whether a "still waiting" line is due; the interval doubles up to ``progress_cap``."""
        if now < self._progress_at:
            return False
        self._progress_every = min(self._progress_every * 2, self._progress_cap)
        self._progress_at = now + self._progress_every
        return True

    # -- decisions --------------------------------------------------------------------------------------------
    def _judge(self, outcome: Outcome | None, age: float | None) -> Next | None:
        if outcome is None:
            return None
        if outcome.status is Status.DONE:
            return Next(Act.RETURN, outcome=outcome)
        if outcome.status is not Status.FAILED or (self.stale and outcome.fencing_token == self.stale.fencing_token):
            return None
        if self.first and (age is None or age >= self.failure_hold):
            self.stale = outcome
            return None
        return Next(Act.FAIL, outcome=outcome)

    def _see(self, now: float, holder: Holder | None) -> Notice | None:
        if holder is None:
            return None
        new = self.holder is None or self.holder.fencing_token != holder.fencing_token
        self.holder = holder
        self.may_take_at = max(self.may_take_at, now + self.grace)
        return Notice.NEW_HOLDER if new else None

    def _lost_state(self, look: Probe) -> bool:
        """The counter never goes down: below the holder's token, Redis lost its data under a live holder."""
        h = self.holder
        return (
            h is not None
            and look.fence_counter is not None
            and look.fence_counter < h.fencing_token
            and self.loss_granted != h.fencing_token
        )

    def _deadline(self) -> float | None:
        return None if self.wait_timeout is None else self.started + self.wait_timeout

    def _wait(self, now: float, notice: Notice | None = None) -> Next:
        deadline = self._deadline()
        if deadline is not None and now >= deadline:
            return Next(Act.TIME_OUT, holder=self.holder, notice=notice)
        until = self._progress_at if deadline is None else min(self._progress_at, deadline)
        if math.isfinite(self.grace):  # else the backend itself reports the holder gone, as an event
            if now >= self.may_take_at:
                return Next(Act.LOOK, notice=notice)
            until = min(until, self.may_take_at)
        return Next(Act.WAIT, until=until, holder=self.holder, notice=notice)
