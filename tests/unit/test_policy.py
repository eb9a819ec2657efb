"""The pure wait/takeover policy: every decision from its inputs, with a fake clock and no backend."""

from __future__ import annotations

import math

import pytest

from hyperion_lock import Status
from hyperion_lock.runonce.model import Event, Holder, Outcome, Probe
from hyperion_lock.runonce.policy import Act, Next, Notice, WaitPolicy

T0 = 1000.0
GRACE = 3.0


def holder(fence: int = 1) -> Holder:
    return Holder(host="h", pid=99, generation="g", fencing_token=fence, since=0.0)


def outcome(status: Status, fence: int = 1, generation: str = "g") -> Outcome:
    return Outcome(key="k", generation=generation, status=status, fencing_token=fence, runner_host="h",
                   runner_pid=99, started_at=0.0, finished_at=1.0)


def policy(**kw: object) -> WaitPolicy:
    args: dict[str, object] = {"now": T0, "generation": "g", "grace": GRACE, "progress_interval": 1e9}
    args.update(kw)
    return WaitPolicy(**args)  # type: ignore[arg-type]


def busy(fence: int = 1) -> Probe:
    return Probe(outcome=None, holder=holder(fence))


def heartbeat(fence: int = 1) -> Event:
    return Event(Status.RUNNING, "g", holder=holder(fence))


def test_first_step_probes_and_may_take() -> None:
    assert policy().start() == Next(Act.PROBE, take=True)


def test_free_lease_taken_leads() -> None:
    p = policy()
    nxt = p.on_probe(T0, Probe(outcome=None, holder=holder(7), acquired=True))
    assert nxt.act is Act.LEAD and nxt.holder is not None and nxt.holder.fencing_token == 7


def test_done_returns_at_once_whoever_holds() -> None:
    done = outcome(Status.DONE)
    assert policy().on_probe(T0, Probe(outcome=done, holder=holder())) == Next(Act.RETURN, outcome=done)


def test_busy_waits_one_grace_then_looks_before_taking() -> None:
    p = policy()
    nxt = p.on_probe(T0, busy())
    assert nxt.act is Act.WAIT and nxt.until == T0 + GRACE and nxt.notice is Notice.NEW_HOLDER
    assert p.on_event(T0 + GRACE - 0.01, None).act is Act.WAIT  # woke early (progress tick): wait again
    assert p.on_event(T0 + GRACE, None).act is Act.LOOK


def test_heartbeats_keep_a_waiter_waiting_forever() -> None:
    p = policy()
    p.on_probe(T0, busy())
    now = T0
    for _ in range(10_000):  # ~ an hour of heartbeats every GRACE/3
        now += GRACE / 3
        nxt = p.on_event(now, heartbeat())
        assert nxt.act is Act.WAIT and nxt.until == pytest.approx(now + GRACE) and nxt.notice is None


def test_look_finding_the_holder_waits_again() -> None:
    p = policy()
    p.on_probe(T0, busy())
    assert p.on_look(T0 + GRACE, busy(), latency=0.001) == Next(Act.WAIT, until=T0 + 2 * GRACE, holder=holder())


def test_look_finding_nothing_takes() -> None:
    p = policy()
    p.on_probe(T0, busy())
    free = Probe(outcome=None, holder=None, fence_counter=1)
    assert p.on_look(T0 + GRACE, free, latency=0.001) == Next(Act.PROBE, take=True)
    assert p.seen_fence == 1  # the take continues the token sequence after the holder it saw


def test_slow_look_gives_the_holder_a_third_of_a_grace() -> None:
    p = policy()
    p.on_probe(T0, busy())
    now = T0 + GRACE
    nxt = p.on_look(now, Probe(outcome=None, holder=None, fence_counter=1), latency=GRACE / 4 + 0.01)
    assert nxt.act is Act.WAIT and nxt.until == pytest.approx(now + GRACE / 3) and nxt.notice is Notice.SLOW_STORE
    assert p.on_event(now + GRACE / 3, None).act is Act.LOOK


def test_data_loss_grants_one_extra_grace_per_holder() -> None:
    p = policy()
    p.on_probe(T0, busy(fence=5))
    lost = Probe(outcome=None, holder=None, fence_counter=0)  # the counter went down: Redis lost its data
    now = T0 + GRACE
    nxt = p.on_look(now, lost, latency=0.0)
    assert nxt.act is Act.WAIT and nxt.until == now + GRACE and nxt.notice is Notice.DATA_LOSS
    # Still nothing after that grace: the holder really is gone; no second grace for the same holder.
    assert p.on_look(now + GRACE, lost, latency=0.0) == Next(Act.PROBE, take=True)
    assert p.seen_fence == 5


def test_release_or_other_generation_outcome_means_free_now() -> None:
    for event in (Event(Status.RELEASED, "g", holder=holder()),
                  Event(Status.DONE, "other", outcome=outcome(Status.DONE, generation="other"))):
        p = policy()
        p.on_probe(T0, busy())
        assert p.on_event(T0 + 0.5, event) == Next(Act.PROBE, take=True)


def test_outcome_event_of_our_generation_ends_the_wait() -> None:
    p = policy()
    p.on_probe(T0, busy())
    done = outcome(Status.DONE)
    assert p.on_event(T0 + 1, Event(Status.DONE, "g", outcome=done)) == Next(Act.RETURN, outcome=done)
    p = policy()
    p.on_probe(T0, busy())
    failed = outcome(Status.FAILED, fence=2)
    assert p.on_event(T0 + 1, Event(Status.FAILED, "g", outcome=failed)) == Next(Act.FAIL, outcome=failed)


@pytest.mark.parametrize(("age", "final"), [(0.0, True), (299.9, True), (300.0, False), (None, False)])
def test_failure_found_by_the_first_probe_is_final_within_the_hold(age: float | None, final: bool) -> None:
    failed = outcome(Status.FAILED, fence=3)
    p = policy(failure_hold=300.0)
    nxt = p.on_probe(T0, Probe(outcome=failed, holder=None, acquired=not final, outcome_age=age))
    if final:
        assert nxt == Next(Act.FAIL, outcome=failed)
    else:  # an earlier attempt's failure (or one of unknown age): run the job again, and say so
        assert nxt.act is Act.LEAD and nxt.notice is Notice.STALE_FAILURE and p.stale == failed


def test_stale_failure_seen_again_is_ignored_but_a_new_one_is_final() -> None:
    old = outcome(Status.FAILED, fence=3)
    p = policy(failure_hold=10.0)
    nxt = p.on_probe(T0, Probe(outcome=old, holder=holder(4), outcome_age=11.0))
    assert nxt.act is Act.WAIT and nxt.notice is Notice.NEW_HOLDER
    assert p.on_probe(T0 + 1, Probe(outcome=old, holder=holder(4), outcome_age=12.0)).act is Act.WAIT
    new = outcome(Status.FAILED, fence=4)
    assert p.on_event(T0 + 2, Event(Status.FAILED, "g", outcome=new)) == Next(Act.FAIL, outcome=new)


def test_later_probe_failure_is_final_even_when_old() -> None:
    p = policy(failure_hold=10.0)
    p.on_probe(T0, busy())
    failed = outcome(Status.FAILED, fence=1)
    # Recorded while we were cut off from the channel, long ago by now: still final for this call.
    assert p.on_probe(T0 + 100, Probe(outcome=failed, holder=None, outcome_age=99.0)).act is Act.FAIL


def test_reconnect_reads_the_state_again_and_restarts_the_takeover_clock() -> None:
    p = policy()
    p.on_probe(T0, busy())
    assert p.on_reconnect(T0 + 2.9) == Next(Act.PROBE, take=False)
    nxt = p.on_probe(T0 + 3.0, busy())
    assert nxt.act is Act.WAIT and nxt.until == pytest.approx(T0 + 3.0 + GRACE)


def test_try_run_once_gives_up_when_busy_but_returns_done() -> None:
    p = policy(wait=False)
    assert p.on_probe(T0, busy()) == Next(Act.GIVE_UP, holder=holder())
    done = outcome(Status.DONE)
    assert policy(wait=False).on_probe(T0, Probe(outcome=done, holder=None)).act is Act.RETURN


def test_wait_timeout_bounds_every_wait() -> None:
    p = policy(wait_timeout=2.0)
    nxt = p.on_probe(T0, busy())
    assert nxt.act is Act.WAIT and nxt.until == T0 + 2.0
    assert p.on_event(T0 + 1.0, heartbeat()).until == T0 + 2.0
    assert p.on_event(T0 + 2.0, None) == Next(Act.TIME_OUT, holder=holder())


def test_a_file_lock_never_looks_it_waits_for_the_kernel() -> None:
    p = policy(grace=math.inf, progress_interval=5.0)
    nxt = p.on_probe(T0, Probe(outcome=None, holder=None))  # busy lock, holder not known yet
    assert nxt.act is Act.WAIT and nxt.until == T0 + 5.0
    assert p.on_event(T0 + 1e6, None).act is Act.WAIT
    assert p.on_event(T0 + 1e6, Event(Status.RELEASED, "g")) == Next(Act.PROBE, take=True)


def test_progress_lines_back_off() -> None:
    p = policy(progress_interval=5.0)
    due = [t for t in range(0, 400) if p.progress_due(T0 + t)]
    assert due == [5, 15, 35, 75, 135, 195, 255, 315, 375]  # 5, 10, 20, 40, then every 60 s


def test_a_waiter_that_may_not_lead_never_takes_and_keeps_looking() -> None:
    p = policy(lead=False)
    assert p.start() == Next(Act.PROBE, take=False)
    assert p.on_probe(T0, Probe(outcome=None, holder=None)).act is Act.WAIT  # nobody runs it yet
    nxt = p.on_event(T0 + GRACE, None)
    assert nxt.act is Act.LOOK
    free = Probe(outcome=None, holder=None, fence_counter=0)
    nxt = p.on_look(T0 + GRACE, free, latency=0.0)
    assert nxt.act is Act.WAIT and nxt.until == T0 + 2 * GRACE  # looks again later, never takes
    assert p.on_event(T0 + GRACE + 1, Event(Status.RELEASED, "g")) == Next(Act.PROBE, take=False)
    done = outcome(Status.DONE)
    assert p.on_event(T0 + 5, Event(Status.DONE, "g", outcome=done)) == Next(Act.RETURN, outcome=done)
