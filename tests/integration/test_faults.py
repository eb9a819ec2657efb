"""Fault injection: real redis-server, real OS processes (tests.support.proc_worker), one fault per case.

Every case asserts "one run, no hang, clear outcome" and prints a one-line report ``fault -> outcome -> time``.
The times are measured and reported, never asserted (the machines are noisy): a case asserts behaviour, and the
order of events where the scenario depends on it. Faults are injected once the processes reported (events file,
Redis ``CLIENT LIST``, the lease in Redis) that they reached the state the fault is meant to hit, not after a sleep.
All waits are bounded in time; lease TTLs are ~1 s and jobs short so the whole file runs in a few minutes.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from hyperion_lock import JobKeys
from hyperion_lock.testing import RedisServer, free_port
from tests.support import Workers, wait_until
from tests.support.deploy import waiting_on_redis
from tests.support.faults import EVENT_TIMEOUT, KEY, wait_heartbeat

pytestmark = [pytest.mark.fault, pytest.mark.integration]

TTL = 1.0
# Bound on waits for events that take a fraction of a second: only there so that a hang fails the test.


@pytest.fixture
def report(capsys: pytest.CaptureFixture[str]) -> Iterator[Any]:
    """Prints ``FAULT <fault> -> <outcome> -> <time>`` past pytest's capture, so CI logs show the matrix."""
    lines: list[str] = []

    def emit(fault: str, outcome: str, seconds: float | None) -> None:
        timing = "-" if seconds is None else f"{seconds:.2f} s"
        lines.append(f"FAULT {fault} -> {outcome} -> {timing}")

    yield emit
    with capsys.disabled():
        for line in lines:
            print("\n" + line, end="")
        if lines:
            print()


def by_pid(rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {int(r["pid"]): r for r in rows}


def assert_exit(w: Workers, codes: list[int], expected: set[int]) -> None:
    bad = [(p.pid, c) for p, c in zip(w.procs, codes, strict=True) if c not in expected]
    if bad:
        dump = "\n".join(f"--- pid {pid} (exit {code}):\n{w.outputs.get(pid, '')[-3000:]}" for pid, code in bad)
        raise AssertionError(f"unexpected exit codes {bad}; events {w.events()}\n{dump}")


def wait_waiting(url: str, pids: Iterable[int], timeout: float = EVENT_TIMEOUT) -> float:
    """Wait until every process in ``pids`` subscribed to Redis and probed the job (it is waiting, or leading);
    return the time (``time.time()``) it was seen."""
    wanted = set(pids)
    wait_until(lambda: wanted <= waiting_on_redis(url, wanted), f"workers {sorted(wanted)} waiting on Redis", timeout)
    return time.time()




def spawn_leader_then_waiters(w: Workers, n: int, *, leader_job: str, waiter_job: str,
                              **opts: Any) -> tuple[subprocess.Popen[str], dict[str, Any], list[subprocess.Popen[str]]]:
    """One worker that leads (its "ran" event seen), then ``n`` more that wait for it (seen waiting on Redis).
    The waiters' job runs only if one of them takes over; returns (leader, its "ran" event, waiters)."""
    leader = w.spawn(1, job=leader_job, **opts)[0]
    ran = w.wait_for("ran", 1, timeout=EVENT_TIMEOUT)[0]
    assert int(ran["pid"]) == leader.pid, ran
    waiters = w.spawn(n, job=waiter_job, **opts)
    wait_waiting(opts["url"], [p.pid for p in waiters])
    return leader, ran, waiters


def job_intervals(w: Workers) -> list[tuple[float, float, int]]:
    finished = by_pid(w.events("job-finished"))
    out = []
    for ran in w.events("ran"):
        pid = int(ran["pid"])
        end = finished[pid]["t"] if pid in finished else float("inf")
        out.append((float(ran["t"]), float(end), pid))
    return sorted(out)


def test_leader_sigkill_mid_job(workers: Workers, redis_server: RedisServer, report: Any) -> None:
    # The leader's job outlasts the test: only a takeover can finish it.
    leader, first, _ = spawn_leader_then_waiters(workers, 3, url=redis_server.url, ttl=TTL, leader_job="sleep:600",
                                                 waiter_job="sleep:1")
    wait_heartbeat(redis_server.url)  # mid-job, after at least one renewal
    leader.kill()
    killed_at = time.time()
    second = workers.wait_for("ran", 2, timeout=EVENT_TIMEOUT)[1]
    codes = workers.join(timeout=EVENT_TIMEOUT)
    takeover = second["t"] - killed_at
    ran = workers.events("ran")
    returned = workers.events("returned")
    report("leader SIGKILL mid-job (ttl 1 s)", f"{len(ran) - 1} takeover, {len(returned)}/3 proceed", takeover)
    assert len(ran) == 2, ran
    assert second["t"] > killed_at, "a waiter took the job over while its leader was alive"
    assert second["fence"] > first["fence"]
    assert sorted(codes) == [-signal.SIGKILL, 0, 0, 0]
    assert len(returned) == 3 and all(r["fence"] == second["fence"] for r in returned)


def test_job_raises(workers: Workers, redis_server: RedisServer, report: Any) -> None:
    # A lease so long that a waiter could not end its wait by looking again after a silent TTL: within the join
    # bound (half the TTL) only the published failure can end it. The failure takes milliseconds to arrive.
    ttl = 60.0
    # The leader is stopped as soon as it leads (no renewal is missed within this TTL) until the 3 others wait for
    # it, so the failure is recorded while they wait (one recorded before a call began would be an earlier attempt).
    runner = workers.spawn(1, url=redis_server.url, ttl=ttl, job="fail:2")[0]
    workers.wait_for("ran", 1, timeout=EVENT_TIMEOUT)
    runner.send_signal(signal.SIGSTOP)
    try:
        assert not workers.events("job-failing"), "the job failed before the leader could be held"
        waiters = workers.spawn(3, url=redis_server.url, ttl=ttl, job="fail:2")
        wait_waiting(redis_server.url, [p.pid for p in waiters])
    finally:
        runner.send_signal(signal.SIGCONT)
    codes = workers.join(timeout=ttl / 2)
    assert_exit(workers, codes, {3})
    raised = workers.events("raised")
    ran = workers.events("ran")
    assert len(ran) == 1, ran
    assert int(ran[0]["pid"]) == runner.pid
    leader = by_pid(raised)[runner.pid]
    assert leader["error"] == "ValueError"
    followers = [r for r in raised if int(r["pid"]) != int(ran[0]["pid"])]
    assert len(followers) == 3 and all(r["error"] == "JobFailedError" for r in followers), followers
    assert all("migration 0002 exploded" in r["message"] for r in followers)
    failing = workers.events("job-failing")
    failed_at = failing[0]["t"] if failing else leader["t"]  # the moment the job raised (older workers: re-raise)
    lag = max(r["t"] for r in followers) - failed_at
    report("job raises", "leader ValueError, 3/3 waiters JobFailedError (lag from the raise)", lag)


def test_redis_killed_and_restarted_mid_job(workers: Workers, redis_server: RedisServer, report: Any) -> None:
    leader, first, _ = spawn_leader_then_waiters(workers, 3, url=redis_server.url, ttl=TTL, leader_job="sleep:4",
                                                 waiter_job="sleep:1")
    redis_server.kill()
    t0 = time.time()
    time.sleep(0.5)  # the fault: Redis stays down for 0.5 s, then comes back empty
    redis_server.start()
    codes = workers.join(timeout=60)
    took = max(r["t"] for r in workers.events("returned")) - t0
    ran = workers.events("ran")
    report("Redis SIGKILL + restart mid-job (no persistence)", f"{len(ran)} run(s), exits {sorted(codes)}", took)
    assert_exit(workers, codes, {0})
    assert len(ran) == 1, f"the job ran {len(ran)} times: {ran}"
    finished = by_pid(workers.events("job-finished"))[leader.pid]
    assert finished["t"] > t0, "the job had finished before Redis was killed: the fault hit nothing"
    assert all(r["fence"] == first["fence"] for r in workers.events("returned")), workers.events()


def test_redis_paused_longer_than_lease(workers: Workers, redis_server: RedisServer, report: Any) -> None:
    """Redis frozen (SIGSTOP) until the lease has expired in it and every waiter's silent TTL ran out. Waiters' looks
    sent into the frozen Redis answer slowly, so they give the leader TTL/3 before taking anything; the leader's
    renewal, queued in Redis, re-asserts its lease as soon as Redis runs again. One run, everyone returns."""
    ttl = 2.0  # TTL/3 = 0.67 s: the head start the waiters give the leader after the pause
    url = redis_server.url
    leader, first, _ = spawn_leader_then_waiters(workers, 2, url=url, ttl=ttl, leader_job="check:8",
                                                 waiter_job="check:1")
    client = redis.Redis.from_url(url)
    try:
        lease_left = client.pttl(JobKeys("hyperion_lock", KEY).lease) / 1000
    finally:
        client.close()
    assert lease_left > 0, "no live lease to outlast"
    redis_server.pause()
    t0 = time.time()
    try:
        # Nothing can report progress while Redis is frozen: the length of the fault comes from the lease's own
        # remaining time (read above) plus one TTL, by which every waiter's silence window has run out.
        time.sleep(lease_left + ttl)
    finally:
        redis_server.resume()
    resumed = time.time()
    codes = workers.join(timeout=60)
    took = max(r["t"] for r in workers.events() if r["event"] in ("returned", "raised")) - t0
    ran = workers.events("ran")
    outcome = _stored_outcome(url)
    report(
        f"Redis SIGSTOP {resumed - t0:.1f} s (lease left {lease_left:.1f} s of {ttl} s) then SIGCONT",
        f"{len(ran)} run(s), fences {[r['fence'] for r in ran]}, exits {sorted(codes)}",
        took,
    )
    assert_exit(workers, codes, {0})
    assert len(ran) == 1, f"a waiter took over from the live leader after the pause: {ran}"
    assert all(r["fence"] == first["fence"] for r in workers.events("returned")), workers.events()
    assert outcome is not None and outcome["status"] == "done" and outcome["fencing_token"] == first["fence"]
    # The fault really hit a running job: the leader was still running it when Redis came back.
    assert by_pid(workers.events("job-finished"))[leader.pid]["t"] > resumed, workers.events()


def test_redis_unreachable_at_boot(workers: Workers, monkeypatch: pytest.MonkeyPatch, report: Any) -> None:
    connect_timeout = 1.5
    monkeypatch.setenv("HYPERION_LOCK_CONNECT_TIMEOUT", str(connect_timeout))
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    workers.spawn(2, url=url, ttl=TTL, job="sleep:0")
    # They give up after connect_timeout; the bound (20 x connect_timeout, half the reconnect timeout of 60 s) only
    # catches a worker that hangs or waits for the reconnect timeout instead.
    codes = workers.join(timeout=30)
    assert_exit(workers, codes, {3})
    started = by_pid(workers.events("started"))
    raised = workers.events("raised")
    took = max(r["t"] - started[int(r["pid"])]["t"] for r in raised)
    report("Redis unreachable at boot", f"{len(raised)}/2 RedisUnavailableError", took)
    assert not workers.events("ran")
    assert all(r["error"] == "RedisUnavailableError" for r in raised), raised


def test_128_concurrent_workers(workers: Workers, redis_server: RedisServer, report: Any) -> None:
    n = 128
    # A generous TTL: 128 interpreters starting on 2 cores starve the leader's renewals for a while.
    workers.spawn(n, url=redis_server.url, ttl=5, job="sleep:1")
    t0 = time.time()
    codes = workers.join(timeout=150)
    took = max(r["t"] for r in workers.events("returned")) - t0
    ran = workers.events("ran")
    report(f"{n} concurrent workers", f"{len(ran)} run, {codes.count(0)}/{n} proceed", took)
    assert_exit(workers, codes, {0})
    assert len(ran) == 1, ran
    assert sum(1 for r in workers.events("returned") if r["ran_here"]) == 1


def test_job_ten_times_the_lease(workers: Workers, redis_server: RedisServer, report: Any) -> None:
    ttl = 0.4
    workers.spawn(4, url=redis_server.url, ttl=ttl, job=f"check:{10 * ttl}")
    codes = workers.join(timeout=60)
    ran = workers.events("ran")
    took = max(r["t"] for r in workers.events("returned")) - ran[0]["t"]
    report(f"job {10 * ttl:.0f} s = 10x the lease ({ttl} s)", f"{len(ran)} run, exits {sorted(codes)}", took)
    assert_exit(workers, codes, {0})
    assert len(ran) == 1, ran


def test_respawn_same_generation_skips(workers: Workers, redis_server: RedisServer, report: Any) -> None:
    workers.spawn(3, url=redis_server.url, ttl=TTL, job="sleep:0.5", generation="g1")
    assert_exit(workers, workers.join(timeout=30), {0})
    assert len(workers.events("ran")) == 1
    before = len(workers.events("returned"))
    respawned = workers.spawn(1, url=redis_server.url, ttl=TTL, job="sleep:0.5", generation="g1")[0]
    assert_exit(workers, workers.join(timeout=30), {0})
    row = by_pid(workers.events("returned"))[respawned.pid]
    took = row["t"] - by_pid(workers.events("started"))[respawned.pid]["t"]
    report("worker respawn, same generation", f"skipped (ran_here={row['ran_here']})", took)
    assert len(workers.events("returned")) == before + 1
    assert len(workers.events("ran")) == 1 and row["ran_here"] is False


def test_redeploy_new_generation_runs_again(workers: Workers, redis_server: RedisServer, report: Any) -> None:
    workers.spawn(3, url=redis_server.url, ttl=TTL, job="sleep:0.5", generation="g1")
    assert_exit(workers, workers.join(timeout=30), {0})
    t0 = time.time()
    workers.spawn(3, url=redis_server.url, ttl=TTL, job="sleep:0.5", generation="g2")
    assert_exit(workers, workers.join(timeout=30), {0})
    ran = workers.events("ran")
    gens = sorted(r["generation"] for r in workers.events("returned"))
    report("redeploy, new generation", f"{len(ran)} runs (one per generation)", time.time() - t0)
    assert len(ran) == 2 and ran[1]["fence"] > ran[0]["fence"]
    assert gens == ["g1"] * 3 + ["g2"] * 3


def test_wrong_password(workers: Workers, monkeypatch: pytest.MonkeyPatch, report: Any) -> None:
    real, wrong = "r3al-Secret-pw-71", "wr0ng-Secret-pw-42"
    # An auth error is final at once: were it retried like an unreachable server, the worker would still be
    # retrying (for this connect timeout) when the join bound below, a quarter of it, runs out.
    monkeypatch.setenv("HYPERION_LOCK_CONNECT_TIMEOUT", "120")
    with RedisServer(password=real) as server:
        url = server.url.replace(real, wrong)
        workers.spawn(1, url=url, ttl=TTL, job="sleep:0")
        codes = workers.join(timeout=30)
    assert_exit(workers, codes, {3})
    raised = workers.events("raised")
    took = raised[0]["t"] - workers.events("started")[0]["t"]
    report("wrong Redis password", f"{raised[0]['error']}", took)
    assert raised[0]["error"] == "RedisAuthError"
    output = "".join(workers.outputs.values())
    for secret in (real, wrong):
        assert secret not in raised[0]["message"]
        assert secret not in output, "a password leaked into the worker's log"


def test_second_deploy_while_first_migrates(workers: Workers, redis_server: RedisServer, report: Any,
                                           tmp_path: Path) -> None:
    """g2's workers start while g1's job runs; g1's job ends only once they are seen waiting (a gate file, not a
    sleep: on a loaded machine a 3 s job once ended before g2's workers were up, and the test proved nothing)."""
    gate = tmp_path / "g1-may-finish"
    workers.spawn(3, url=redis_server.url, ttl=TTL, job=f"file:{gate}", generation="g1")
    workers.wait_for("ran", 1, timeout=EVENT_TIMEOUT)
    second = workers.spawn(3, url=redis_server.url, ttl=TTL, job="sleep:1", generation="g2")
    g2_waiting = wait_waiting(redis_server.url, [p.pid for p in second])
    gate.touch()
    codes = workers.join(timeout=60)
    assert_exit(workers, codes, {0})
    ran = workers.events("ran")
    intervals = job_intervals(workers)
    gens = {int(r["pid"]): r["generation"] for r in workers.events("returned")}
    gap = intervals[1][0] - intervals[0][1] if len(intervals) > 1 else float("nan")
    report("second deploy (g2) starts while g1 migrates", f"{len(ran)} runs, g2 started {gap:.3f} s after g1 ended",
           gap)
    assert len(ran) == 2, ran
    assert sorted(gens[pid] for _, _, pid in intervals) == ["g1", "g2"]
    (_s1, e1, _p1), (s2, _e2, _p2) = intervals
    assert g2_waiting < e1, "g1 had finished before the g2 workers started waiting: the deploys did not overlap"
    assert s2 >= e1, f"job intervals overlap: {intervals}"
    assert ran[1]["fence"] > ran[0]["fence"]


def _stored_outcome(url: str, key: str = KEY, generation: str = "g1") -> dict[str, Any] | None:
    client = redis.Redis.from_url(url)
    try:
        raw = client.get(JobKeys("hyperion_lock", key).outcome(generation))
    finally:
        client.close()
    return dict(json.loads(raw)) if raw else None


def _stall_leader(workers: Workers, url: str, *, old_job: str, successor_job: str) -> tuple[Any, float]:
    """Start a leader, two waiters (seen waiting), then SIGSTOP the leader; returns (leader, time it was stopped)."""
    old, _, _ = spawn_leader_then_waiters(workers, 2, url=url, ttl=TTL, leader_job=old_job,
                                          waiter_job=successor_job)
    old.send_signal(signal.SIGSTOP)
    return old, time.time()


def _after_stall(workers: Workers, url: str) -> tuple[list[int], list[dict[str, Any]], dict[int, dict[str, Any]],
                                                     dict[str, Any] | None]:
    codes = workers.join(timeout=60)
    return codes, workers.events("ran"), by_pid(workers.events("raised")), _stored_outcome(url)


def test_leader_paused_while_successor_runs(workers: Workers, redis_server: RedisServer, report: Any) -> None:
    """The leader process stalls (SIGSTOP: GC pause, VM freeze) longer than the lease; a successor takes over and
    is still running when the old leader wakes up. The old leader must see LeaseLostError; everyone else must
    proceed on the successor's outcome (nobody may fail because of the stale leader)."""
    old, stopped = _stall_leader(workers, redis_server.url, old_job="check:4", successor_job="check:3")
    try:
        workers.wait_for("ran", 2, timeout=EVENT_TIMEOUT)
    finally:
        old.send_signal(signal.SIGCONT)
    woken = time.time()
    codes, ran, raised, outcome = _after_stall(workers, redis_server.url)
    report(f"leader SIGSTOP {woken - stopped:.1f} s (> lease), successor still running on SIGCONT",
           f"{len(ran)} runs fences {[r['fence'] for r in ran]}; raised "
           f"{ {p: r['error'] for p, r in raised.items()} }; stored fence {outcome and outcome['fencing_token']}",
           time.time() - stopped)
    assert len(ran) == 2 and ran[1]["fence"] > ran[0]["fence"], ran
    successor = int(ran[1]["pid"])
    assert by_pid(workers.events("job-finished"))[successor]["t"] > woken, (
        f"the successor had finished before the old leader woke up: not this scenario; {workers.events()}"
    )
    assert raised.get(old.pid, {}).get("error") == "LeaseLostError", workers.events()
    assert old.pid not in by_pid(workers.events("job-finished")), "the stale leader's job passed ensure_held()"
    others = [(p.pid, c) for p, c in zip(workers.procs, codes, strict=True) if p.pid != old.pid]
    assert all(c == 0 for _, c in others), (
        f"workers failed because the stale leader gave up while the successor ran: {others}; {workers.events()}"
    )
    assert outcome is not None and outcome["status"] == "done" and outcome["fencing_token"] == ran[1]["fence"]


def test_leader_paused_until_successor_finished(workers: Workers, redis_server: RedisServer, report: Any) -> None:
    """Like above, but the successor has finished (lease deleted, outcome recorded) before the old leader wakes.
    The old leader must still learn that it lost the lease (the fencing counter moved past its token)."""
    old, stopped = _stall_leader(workers, redis_server.url, old_job="check:6", successor_job="check:1")
    try:
        workers.wait_for("returned", 2, timeout=EVENT_TIMEOUT)
    finally:
        old.send_signal(signal.SIGCONT)
    codes, ran, raised, outcome = _after_stall(workers, redis_server.url)
    report("leader SIGSTOP until the successor finished, then SIGCONT",
           f"{len(ran)} runs fences {[r['fence'] for r in ran]}; old leader "
           f"{raised.get(old.pid, {}).get('error', 'returned normally')}; stored fence "
           f"{outcome and outcome['fencing_token']}",
           time.time() - stopped)
    assert len(ran) == 2 and ran[1]["fence"] > ran[0]["fence"], ran
    others = [c for p, c in zip(workers.procs, codes, strict=True) if p.pid != old.pid]
    assert others == [0, 0], workers.events()
    assert raised.get(old.pid, {}).get("error") == "LeaseLostError", (
        f"the stale leader (fence {ran[0]['fence']}) was not told it lost the lease: {workers.events()}"
    )
    assert outcome is not None and outcome["fencing_token"] == ran[1]["fence"], outcome
