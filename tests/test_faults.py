"""Fault injection: real redis-server, real OS processes (tests.proc_worker), one fault per case.

Every case asserts "one run, no hang, clear outcome" and prints a one-line report ``fault -> outcome -> time``.
All waits are bounded in time; lease TTLs are ~1 s and jobs short so the whole file runs in a few minutes.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from hyperion_lock.testing import RedisServer, free_port

from .conftest import Workers

pytestmark = [pytest.mark.fault, pytest.mark.integration]

TTL = 1.0
MARGIN = 0.5  # the target: takeover within lease TTL + 0.5 s


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


def job_intervals(w: Workers) -> list[tuple[float, float, int]]:
    finished = by_pid(w.events("job-finished"))
    out = []
    for ran in w.events("ran"):
        pid = int(ran["pid"])
        end = finished[pid]["t"] if pid in finished else float("inf")
        out.append((float(ran["t"]), float(end), pid))
    return sorted(out)


def test_leader_sigkill_mid_job(workers: Workers, redis_server: RedisServer, report: Any) -> None:
    workers.spawn(4, url=redis_server.url, ttl=TTL, job="sleep:3")
    first = workers.wait_for("ran", 1, timeout=30)[0]
    workers.wait_for("started", 4, timeout=30)
    time.sleep(0.8)  # mid-job, after at least one heartbeat
    os.kill(int(first["pid"]), signal.SIGKILL)
    killed_at = time.time()
    second = workers.wait_for("ran", 2, timeout=TTL + 10)[1]
    codes = workers.join(timeout=30)
    takeover = second["t"] - killed_at
    ran = workers.events("ran")
    returned = workers.events("returned")
    report("leader SIGKILL mid-job (ttl 1 s)", f"{len(ran) - 1} takeover, {len(returned)}/3 proceed", takeover)
    assert len(ran) == 2, ran
    assert second["fence"] > first["fence"]
    assert sorted(codes) == [-signal.SIGKILL, 0, 0, 0]
    assert len(returned) == 3 and all(r["fence"] == second["fence"] for r in returned)
    assert takeover <= TTL + MARGIN, f"takeover took {takeover:.2f} s (> lease TTL {TTL} + {MARGIN} s)"


def test_job_raises(workers: Workers, redis_server: RedisServer, report: Any) -> None:
    workers.spawn(4, url=redis_server.url, ttl=TTL, job="fail:2")
    codes = workers.join(timeout=30)
    assert_exit(workers, codes, {3})
    raised = workers.events("raised")
    ran = workers.events("ran")
    assert len(ran) == 1, ran
    leader = by_pid(raised)[int(ran[0]["pid"])]
    assert leader["error"] == "ValueError"
    followers = [r for r in raised if int(r["pid"]) != int(ran[0]["pid"])]
    assert len(followers) == 3 and all(r["error"] == "JobFailedError" for r in followers), followers
    assert all("migration 0002 exploded" in r["message"] for r in followers)
    failing = workers.events("job-failing")
    failed_at = failing[0]["t"] if failing else leader["t"]  # the moment the job raised (older workers: re-raise)
    lag = max(r["t"] for r in followers) - failed_at
    report("job raises", "leader ValueError, 3/3 waiters JobFailedError (lag from the raise)", lag)
    assert lag < 0.5, f"waiters raised {lag:.2f} s after the failure"


def test_redis_killed_and_restarted_mid_job(workers: Workers, redis_server: RedisServer, report: Any) -> None:
    workers.spawn(4, url=redis_server.url, ttl=TTL, job="sleep:3")
    workers.wait_for("ran", 1, timeout=30)
    workers.wait_for("started", 4, timeout=30)
    time.sleep(0.5)
    redis_server.kill()
    t0 = time.time()
    time.sleep(0.5)
    redis_server.start()
    codes = workers.join(timeout=60)
    took = max(r["t"] for r in workers.events("returned")) - t0
    ran = workers.events("ran")
    report("Redis SIGKILL + restart mid-job (no persistence)", f"{len(ran)} run(s), exits {sorted(codes)}", took)
    assert_exit(workers, codes, {0})
    assert len(ran) == 1, f"the job ran {len(ran)} times: {ran}"


def test_redis_paused_longer_than_lease(workers: Workers, redis_server: RedisServer, report: Any) -> None:
    workers.spawn(3, url=redis_server.url, ttl=TTL, job="check:4")
    first = workers.wait_for("ran", 1, timeout=30)[0]
    workers.wait_for("started", 3, timeout=30)
    time.sleep(0.5)
    redis_server.pause()
    t0 = time.time()
    try:
        time.sleep(2.5 * TTL)
    finally:
        redis_server.resume()
    codes = workers.join(timeout=60)
    took = max(r["t"] for r in workers.events() if r["event"] in ("returned", "raised")) - t0
    ran = workers.events("ran")
    raised = workers.events("raised")
    old_leader = int(first["pid"])
    second_run = len(ran) > 1
    report(
        f"Redis SIGSTOP {2.5 * TTL:.1f} s (> lease {TTL} s) then SIGCONT",
        f"second run: {'yes' if second_run else 'no'}; fences {[r['fence'] for r in ran]}; "
        f"raised {[r['error'] for r in raised]}",
        took,
    )
    assert len(ran) <= 2, ran
    if second_run:
        assert ran[1]["fence"] > ran[0]["fence"], "fencing token must grow with the second leadership"
        lost = by_pid(raised).get(old_leader)
        assert lost is not None and lost["error"] == "LeaseLostError", (
            f"the old leader lost its lease but did not see LeaseLostError: {workers.events()}"
        )
        # Everyone else proceeds on the successor's outcome.
        others = [c for p, c in zip(workers.procs, codes, strict=True) if p.pid != old_leader]
        assert others == [0] * len(others), workers.events()
    else:
        assert_exit(workers, codes, {0})


def test_redis_unreachable_at_boot(workers: Workers, monkeypatch: pytest.MonkeyPatch, report: Any) -> None:
    connect_timeout = 1.5
    monkeypatch.setenv("HYPERION_LOCK_CONNECT_TIMEOUT", str(connect_timeout))
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    workers.spawn(2, url=url, ttl=TTL, job="sleep:0")
    codes = workers.join(timeout=30)
    assert_exit(workers, codes, {3})
    started = by_pid(workers.events("started"))
    raised = workers.events("raised")
    took = max(r["t"] - started[int(r["pid"])]["t"] for r in raised)
    report("Redis unreachable at boot", f"{len(raised)}/2 RedisUnavailableError", took)
    assert not workers.events("ran")
    assert all(r["error"] == "RedisUnavailableError" for r in raised), raised
    assert took <= connect_timeout + 1.0, f"gave up after {took:.2f} s with connect_timeout={connect_timeout}"


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
    assert took < 1.0


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


def test_wrong_password(workers: Workers, report: Any) -> None:
    real, wrong = "r3al-Secret-pw-71", "wr0ng-Secret-pw-42"
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
    assert took < 2.0


def test_second_deploy_while_first_migrates(workers: Workers, redis_server: RedisServer, report: Any) -> None:
    workers.spawn(3, url=redis_server.url, ttl=TTL, job="sleep:2", generation="g1")
    workers.wait_for("ran", 1, timeout=30)
    workers.spawn(3, url=redis_server.url, ttl=TTL, job="sleep:1", generation="g2")
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
    assert s2 >= e1, f"job intervals overlap: {intervals}"
    assert ran[1]["fence"] > ran[0]["fence"]


def _stored_outcome(url: str, key: str = "migrate", generation: str = "g1") -> dict[str, Any] | None:
    import json

    import redis

    raw = redis.Redis.from_url(url).get(f"hyperion_lock:{{{key}}}:outcome:{generation}")
    return json.loads(raw) if raw else None


def _stall_leader(workers: Workers, url: str, *, old_job: str, successor_job: str) -> tuple[Any, float]:
    """Start a leader, two waiters, then SIGSTOP the leader; returns (leader process, time it was stopped)."""
    old = workers.spawn(1, url=url, ttl=TTL, job=old_job)[0]
    workers.wait_for("ran", 1, timeout=30)
    workers.spawn(2, url=url, ttl=TTL, job=successor_job)
    workers.wait_for("started", 3, timeout=30)
    time.sleep(0.3)
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
        workers.wait_for("ran", 2, timeout=TTL + 10)
        time.sleep(max(0.0, stopped + 2.5 - time.time()))
    finally:
        old.send_signal(signal.SIGCONT)
    codes, ran, raised, outcome = _after_stall(workers, redis_server.url)
    report("leader SIGSTOP 2.5 s (> lease), successor still running on SIGCONT",
           f"{len(ran)} runs fences {[r['fence'] for r in ran]}; raised "
           f"{ {p: r['error'] for p, r in raised.items()} }; stored fence {outcome and outcome['fencing_token']}",
           time.time() - stopped)
    assert len(ran) == 2 and ran[1]["fence"] > ran[0]["fence"], ran
    assert raised.get(old.pid, {}).get("error") == "LeaseLostError", workers.events()
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
        workers.wait_for("returned", 2, timeout=TTL + 15)
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
