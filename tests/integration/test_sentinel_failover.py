"""A Sentinel-managed Redis (hyperion_lock.testing.SentinelSet: primary, replica, three Sentinels), real processes.

The primary is SIGKILLed while a leader runs its job. What can happen is decided by replication and the lease TTL:

* the lease and fencing counter reached the replica before the kill (the test waits until the replica has the
  lease), so the promoted replica holds them. If the failover ends before the lease's TTL, the leader's next
  renewal finds its own lease and goes on: the job runs once (``TTL = 10 s``, failover ~2-3 s here).
* if the failover takes longer than the TTL, the lease has expired on the new primary. Then the leader's renewal
  (which re-creates a vanished lease for its own fencing token) and a waiter's takeover (fencing token + 1) race;
  whichever comes first wins, and the fencing token tells them apart (``TTL = 1 s``).

Events, not sleeps: the kill follows the leader's "ran" event (or its first renewal heartbeat) and the lease seen on
the replica; the failover is read from the Sentinels. Times are measured and printed (``FAILOVER ...`` lines),
never asserted.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from hyperion_lock import JobKeys
from hyperion_lock.testing import SentinelSet, _redis_call
from tests.support import Workers, wait_until
from tests.support.faults import wait_heartbeat

pytestmark = [pytest.mark.integration, pytest.mark.fault]

KEY = "migrate"  # proc_worker's job key
EVENT_TIMEOUT = 60.0


@pytest.fixture
def sentinels() -> Iterator[SentinelSet]:
    with SentinelSet() as sset:
        yield sset


@pytest.fixture
def report(capsys: pytest.CaptureFixture[str]) -> Iterator[Any]:
    lines: list[str] = []
    yield lines.append
    with capsys.disabled():
        for line in lines:
            print("\n" + line, end="")
        if lines:
            print()


def _lease_on(port: int) -> dict[str, Any] | None:
    raw = _redis_call(port, "GET", JobKeys("hyperion_lock", KEY).lease)
    return json.loads(raw) if raw else None


def _kill_primary_mid_job(
    sset: SentinelSet, w: Workers, ttl: float, job: str, *, after_renewal: bool = False
) -> tuple[dict[str, Any], float, int]:
    """8 workers on the Sentinel URL; once one runs the job and the replica has its lease (and, with
    ``after_renewal``, once the leader's first renewal was published: ``ttl / 3`` into the job), SIGKILL the primary.
    Returns (the first "ran" event, seconds from the kill until every Sentinel names the new primary, its port)."""
    gen = f"failover-{time.time_ns()}"
    w.spawn(8, url=sset.url(), ttl=ttl, job=job, generation=gen)
    first = w.wait_for("ran", 1, timeout=EVENT_TIMEOUT)[0]
    old_port = sset.primary_address()[1]
    replica_port = next(node.port for node in sset.nodes if node.port != old_port)
    if after_renewal:
        wait_heartbeat(f"redis://127.0.0.1:{old_port}/0", KEY, timeout=EVENT_TIMEOUT)
    wait_until(lambda: (_lease_on(replica_port) or {}).get("fence", 0) >= first["fence"], "the lease on the replica")
    killed = sset.kill_primary()
    killed_at = time.monotonic()
    assert killed.port == old_port
    new_port = sset.wait_failover(old_port, timeout=EVENT_TIMEOUT)
    return first, time.monotonic() - killed_at, new_port


@pytest.mark.parametrize("after_renewal", [False, True], ids=["at-job-start", "after-first-renewal"])
def test_primary_killed_mid_job_the_leader_keeps_its_lease(sentinels: SentinelSet, workers: Workers,
                                                           report: Any, after_renewal: bool) -> None:
    """Lease TTL 10 s > failover time: the job runs once, all 8 return. Killed at the job's start, the leader renews
    on the new primary; killed after its first renewal (~3.3 s into the 5 s job), the job ends before the
    failover does, and recording the outcome is retried until the new primary takes it."""
    first, failover_s, new_port = _kill_primary_mid_job(sentinels, workers, ttl=10.0, job="sleep:5",
                                                        after_renewal=after_renewal)
    codes = workers.join(timeout=EVENT_TIMEOUT)
    ran, returned = workers.events("ran"), workers.events("returned")
    when = "after the first renewal (~3.3 s into the job)" if after_renewal else "at the job's start"
    report(f"FAILOVER ttl 10 s: primary SIGKILLed {when} -> new primary after {failover_s:.2f} s -> "
           f"job ran {len(ran)}x, {len(returned)}/8 returned, fences {sorted({r['fence'] for r in returned})}")
    assert codes == [0] * 8, workers.outputs
    assert len(ran) == 1, ran
    assert len(returned) == 8 and {r["fence"] for r in returned} == {first["fence"]}
    assert sum(r["ran_here"] for r in returned) == 1
    assert _lease_on(new_port) is None  # released on the new primary when the outcome was recorded
    assert _outcome_on(new_port, returned[0]["generation"])  # the old primary is dead: nothing went there


def test_primary_killed_mid_job_with_a_short_lease(sentinels: SentinelSet, workers: Workers, report: Any) -> None:
    """Lease TTL 1 s < failover time: the lease expired on the new primary before anyone could renew it there.
    Either the leader re-created it first (job ran once) or a waiter took over with a higher fencing token (job ran
    twice, the first run's outcome discarded, its worker raises LeaseLostError). Every worker ends either way."""
    first, failover_s, _ = _kill_primary_mid_job(sentinels, workers, ttl=1.0, job="sleep:5", after_renewal=True)
    codes = workers.join(timeout=EVENT_TIMEOUT)
    ran, returned, raised = workers.events("ran"), workers.events("returned"), workers.events("raised")
    fences = [r["fence"] for r in ran]
    recreated = sum("had vanished" in out for out in workers.outputs.values())
    report(f"FAILOVER ttl 1 s: primary SIGKILLed after the first renewal (~0.33 s into the job), new primary after "
           f"{failover_s:.2f} s -> job ran {len(ran)}x (fences {fences}), "
           f"{len(returned)}/8 returned, raised {[r['error'] for r in raised]}, lease re-created by the leader: "
           f"{bool(recreated)}")
    code_of = {proc.pid: code for proc, code in zip(workers.procs, codes, strict=True)}  # join: in spawn order
    if len(ran) == 1:
        assert codes == [0] * 8, workers.outputs
        assert {r["fence"] for r in returned} == {first["fence"]}
        return
    assert len(ran) == 2, ran
    assert fences[1] > fences[0] == first["fence"]
    # The superseded leader learns it: its outcome is discarded and it raises LeaseLostError, which proc_worker
    # turns into exit code 3; the 7 others (the second runner among them) return and exit 0.
    assert [r["error"] for r in raised] == ["LeaseLostError"] and int(raised[0]["pid"]) == int(first["pid"])
    assert code_of == {pid: 3 if pid == int(first["pid"]) else 0 for pid in code_of}, (code_of, workers.outputs)
    assert len(returned) == 7 and {r["fence"] for r in returned} == {fences[1]}


def _role(port: int) -> str:
    return str(_redis_call(port, "ROLE")[0], "ascii")


def _outcome_on(port: int, generation: str) -> bool:
    return _redis_call(port, "GET", JobKeys("hyperion_lock", KEY).outcome(generation)) is not None


def test_graceful_failover_mid_job_keeps_writing_to_the_old_primary(sentinels: SentinelSet, workers: Workers,
                                                                    report: Any) -> None:
    """``SENTINEL FAILOVER`` mid-job: the Sentinels name the new primary within ~1 s, but the old one stays up and
    keeps answering as a primary until Sentinel reconfigures it (~10 s here, its INFO period). Connections opened
    before stay on it, so the leader renews and records the outcome there and the waiters, subscribed there, get
    it: the job runs once and every worker returns, with no READONLY reply. When the old primary is demoted its
    writes made after the switch are discarded: the outcome is then missing on the new primary (which still has
    the lease as replicated before the switch, until its TTL). The test asserts that it is one or the other --
    the outcome on the new primary, or no outcome and no newer leader -- and reports which."""
    gen = f"graceful-{time.time_ns()}"
    workers.spawn(8, url=sentinels.url(), ttl=10.0, job="sleep:4", generation=gen)
    first = workers.wait_for("ran", 1, timeout=EVENT_TIMEOUT)[0]
    old_port = sentinels.primary_address()[1]
    replica_port = next(node.port for node in sentinels.nodes if node.port != old_port)
    wait_until(lambda: (_lease_on(replica_port) or {}).get("fence", 0) >= first["fence"], "the lease on the replica")
    started = time.monotonic()
    assert sentinels.sentinel(0, "SENTINEL", "FAILOVER", sentinels.service)
    new_port = sentinels.wait_failover(old_port, timeout=EVENT_TIMEOUT)
    switched = time.monotonic() - started
    codes = workers.join(timeout=EVENT_TIMEOUT)
    ran, returned = workers.events("ran"), workers.events("returned")
    readonly = sum(out.count("READONLY") + out.count("ReadOnlyError") + out.count("now a slave")
                   for out in workers.outputs.values())
    wait_until(lambda: _role(old_port) == "slave", "the old primary demoted by Sentinel", timeout=EVENT_TIMEOUT)
    demoted = time.monotonic() - started
    kept = _outcome_on(new_port, gen)
    lease = _lease_on(new_port)
    report(f"FAILOVER graceful (SENTINEL FAILOVER), ttl 10 s: Sentinels named the new primary after {switched:.2f} s, "
           f"the old one was demoted after {demoted:.2f} s -> job ran {len(ran)}x, {len(returned)}/8 returned, "
           f"READONLY mentions in logs: {readonly}, outcome on the new primary: {'kept' if kept else 'LOST'}")
    assert codes == [0] * 8, workers.outputs
    assert len(ran) == 1 and {r["fence"] for r in returned} == {first["fence"]}
    assert readonly <= 8, readonly  # at most one per worker, never a storm
    assert kept or lease is None or lease["fence"] == first["fence"]  # lost, but nobody newer leads
