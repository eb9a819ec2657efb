"""Integration tests of the coordinator: real redis-server, real OS processes."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aredis

from hyperion_lock import Coordinator, JobKeys, Status, current_lease, use_lock_for_workers
from hyperion_lock.connection.clients import aclose
from hyperion_lock.testing import RedisServer
from tests.support import Workers

pytestmark = pytest.mark.integration


def _one_run(workers: Workers, n: int) -> dict[str, Any]:
    ran = workers.events("ran")
    assert len(ran) == 1, f"job ran {len(ran)} times: {ran}"
    returned = workers.events("returned")
    assert len(returned) == n
    finished = workers.events("job-finished")
    assert len(finished) == 1
    # Every caller returned after the job completed, and all agree who ran it.
    assert all(r["t"] >= finished[0]["t"] for r in returned)
    assert {r["runner_pid"] for r in returned} == {ran[0]["pid"]}
    assert sum(r["ran_here"] for r in returned) == 1
    return ran[0]


@pytest.mark.parametrize("client", ["url", "async", "sync"])
def test_sixteen_processes_run_the_job_once(redis_url: str, workers: Workers, client: str) -> None:
    workers.spawn(16, url=redis_url, job="sleep:1.5", generation=f"once-{client}", client=client)
    assert workers.join() == [0] * 16
    _one_run(workers, 16)


def test_sync_api_and_sync_job(redis_url: str, workers: Workers) -> None:
    workers.spawn(8, url=redis_url, job="syncsleep:1", generation="sync-api", client="sync", sync_api=True)
    assert workers.join() == [0] * 8
    _one_run(workers, 8)


def test_lease_is_renewed_for_a_job_many_times_the_ttl(redis_url: str, workers: Workers) -> None:
    workers.spawn(6, url=redis_url, job="check:3", ttl=0.5, generation="long-job")
    assert workers.join() == [0] * 6
    _one_run(workers, 6)


def test_leader_sigkill_one_takeover_all_proceed(redis_url: str, workers: Workers) -> None:
    ttl = 1.0
    procs = workers.spawn(16, url=redis_url, job="sleep:3", ttl=ttl, generation="kill-leader")
    first = workers.wait_for("ran")[0]
    leader = next(p for p in procs if p.pid == first["pid"])
    time.sleep(0.3)
    leader.kill()
    killed_at = time.time()
    codes = workers.join()
    assert codes.count(0) == 15 and codes.count(-signal.SIGKILL) == 1
    ran = workers.events("ran")
    assert len(ran) == 2, ran  # the killed leader, and exactly one successor
    successor = ran[1]
    assert successor["fence"] == first["fence"] + 1
    # The successor started within one lease TTL (plus process scheduling slack) of the kill.
    assert successor["t"] - killed_at < ttl + 1.0
    returned = workers.events("returned")
    assert len(returned) == 15 and {r["runner_pid"] for r in returned} == {successor["pid"]}


def test_job_raises_every_waiter_raises_promptly(redis_url: str, workers: Workers) -> None:
    workers.spawn(16, url=redis_url, job="fail:1.5", generation="failing")
    codes = workers.join()
    assert codes == [3] * 16
    failing = workers.wait_for("job-failing")
    assert len(failing) == 1 and len(workers.events("ran")) == 1
    raised = workers.events("raised")
    assert len(raised) == 16
    waiters = [r for r in raised if r["pid"] != failing[0]["pid"]]
    assert {r["error"] for r in waiters} == {"JobFailedError"}
    assert all("migration 0002 exploded" in r["message"] and "ValueError" in r["message"] for r in waiters)
    # Raised on the failure itself, not after a TTL or a timeout (the lag is measured in the benchmarks).
    assert all(r["t"] >= failing[0]["t"] for r in waiters)
    leader = next(r for r in raised if r["pid"] == failing[0]["pid"])
    assert leader["error"] == "ValueError"  # the leader re-raises the job's own exception


def test_failure_is_recorded_and_a_new_generation_runs_again(redis_url: str, workers: Workers) -> None:
    workers.spawn(3, url=redis_url, job="fail:0.5", generation="failed-gen")
    assert workers.join() == [3, 3, 3]
    # The next deploy (a new generation) runs the job again instead of failing forever.
    workers.spawn(3, url=redis_url, job="sleep:0.2", generation="fixed-gen")
    assert workers.join()[3:] == [0, 0, 0]
    assert len(workers.events("job-finished")) == 1


def test_same_generation_skips_new_generation_reruns(redis_url: str, workers: Workers) -> None:
    workers.spawn(4, url=redis_url, job="sleep:0.3", generation="gen-a")
    assert workers.join() == [0] * 4
    workers.spawn(4, url=redis_url, job="sleep:0.3", generation="gen-a")  # respawned workers
    workers.spawn(4, url=redis_url, job="sleep:0.3", generation="gen-b")  # a new deployment
    assert workers.join() == [0] * 12
    ran = workers.events("ran")
    assert len(ran) == 2
    fences = [r["fence"] for r in ran]
    assert fences[1] > fences[0]
    returned = workers.events("returned")
    assert {r["generation"] for r in returned} == {"gen-a", "gen-b"}


def test_redis_restart_mid_job_completes_with_one_runner(workers: Workers) -> None:
    """Waiters that find the lease gone after the restart give the leader a third of the TTL to re-create it at its
    next renewal. With a 2 s TTL that head start (0.67 s) was shorter than a late renewal on a loaded CI machine
    once: a waiter took over, the leader exited 3 (the takeover the protocol allows). 6 s gives it 2 s."""
    with RedisServer() as server:
        workers.spawn(8, url=server.url, job="sleep:10", ttl=6.0, generation="restart")
        workers.wait_for("ran")
        time.sleep(0.5)
        server.restart()  # no persistence: the lease and the fencing counter are gone
        assert workers.join(timeout=60) == [0] * 8
        ran = workers.events("ran")
        assert len(ran) == 1, ran
        assert len(workers.events("returned")) == 8
        # The leader re-asserted its lease and fencing counter in the new server.
        client = redis.Redis.from_url(server.url)
        keys = JobKeys("hyperion_lock", "migrate")
        assert int(client.get(keys.fence) or 0) >= ran[0]["fence"]
        assert client.get(keys.outcome("restart")) is not None
        client.close()


def test_file_lock_single_host_runs_once_across_four_processes(workers: Workers, tmp_path: Path) -> None:
    workers.spawn(4, job="sleep:1", lock_dir=str(tmp_path / "locks"), generation="local")
    assert workers.join() == [0] * 4
    _one_run(workers, 4)


def test_file_lock_leader_killed_next_takes_over_at_once(workers: Workers, tmp_path: Path) -> None:
    procs = workers.spawn(4, job="sleep:3", lock_dir=str(tmp_path / "locks"), generation="local-kill")
    first = workers.wait_for("ran")[0]
    time.sleep(0.2)
    next(p for p in procs if p.pid == first["pid"]).kill()
    killed_at = time.time()
    codes = workers.join()
    assert sorted(codes) == [-signal.SIGKILL, 0, 0, 0]
    ran = workers.events("ran")
    assert len(ran) == 2
    assert ran[1]["t"] - killed_at < 1.0  # the kernel frees the flock: no TTL to wait for
    assert ran[1]["fence"] == first["fence"] + 1


def test_file_lock_failure_propagates(workers: Workers, tmp_path: Path) -> None:
    workers.spawn(4, job="fail:0.5", lock_dir=str(tmp_path / "locks"), generation="local-fail")
    assert workers.join() == [3] * 4
    assert len(workers.events("ran")) == 1
    assert sorted(r["error"] for r in workers.events("raised")) == ["JobFailedError"] * 3 + ["ValueError"]


def test_sigterm_ends_a_wait_promptly(redis_url: str, workers: Workers) -> None:
    procs = workers.spawn(3, url=redis_url, job="sleep:20", generation="sigterm")
    first = workers.wait_for("ran")[0]
    waiters = [p for p in procs if p.pid != first["pid"]]
    time.sleep(0.5)
    sent = time.time()
    for p in waiters:
        p.send_signal(signal.SIGTERM)
    for p in waiters:
        p.wait(5)
    assert time.time() - sent < 3
    raised = workers.events("raised")
    assert {r["error"] for r in raised} == {"WaitInterruptedError"}


async def test_async_api_with_async_client_and_fencing(redis_url: str) -> None:
    client = aredis.Redis.from_url(redis_url)
    seen: list[int] = []

    async def job() -> None:
        lease = current_lease()
        assert lease is not None
        lease.ensure_held()
        seen.append(lease.fencing_token)

    try:
        c1 = Coordinator(client, generation="fence-1", lease_ttl=1)
        c2 = Coordinator(client, generation="fence-2", lease_ttl=1)
        o1 = await c1.run_once("fencing", job)
        o2 = await c2.run_once("fencing", job)
        again = await c1.run_once("fencing", job)  # same generation: skipped
    finally:
        await aclose(client)
    assert o1.ran_here and o2.ran_here and not again.ran_here
    assert o1.status is Status.DONE and again.fencing_token == o1.fencing_token
    assert seen == [o1.fencing_token, o2.fencing_token] and seen[1] == seen[0] + 1
    assert current_lease() is None


async def test_sync_client_does_not_block_the_event_loop(redis_url: str) -> None:
    """A waiter with a sync redis.Redis keeps the loop responsive (ticks keep coming while it waits)."""
    sync_client = redis.Redis.from_url(redis_url)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    async def slow_job() -> None:
        await asyncio.sleep(1.0)

    leader = Coordinator(redis_url, generation="nonblocking", lease_ttl=1)
    follower = Coordinator(sync_client, generation="nonblocking", lease_ttl=1)
    tick_task = asyncio.create_task(ticker())
    try:
        lead = asyncio.create_task(leader.run_once("nonblocking", slow_job))
        await asyncio.sleep(0.2)
        outcome = await follower.run_once("nonblocking", slow_job)
        await lead
    finally:
        tick_task.cancel()
        sync_client.close()
    assert not outcome.ran_here
    assert ticks >= 10  # ~80 ticks in 0.8 s when the loop never blocks; ~1 if the wait blocked it


async def test_use_lock_for_workers_seed_signature(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import logging

    log = logging.getLogger("seed")
    calls: list[tuple[int, str]] = []

    def job(x: int, label: str = "") -> None:
        calls.append((x, label))

    monkeypatch.setenv("HYPERION_LOCK_GENERATION", "seed-compat")
    client = aredis.Redis.from_url(redis_url)
    try:
        await use_lock_for_workers(job, "seed-job", client, 4, log, "seed-job-unlock", 7, label="a")
        await use_lock_for_workers(job, "seed-job", client, 4, log, "seed-job-unlock", 7, label="a")
        # Without unlock_key a non-leader returns at once while the holder still runs.
        started = asyncio.Event()

        async def slow() -> None:
            started.set()
            await asyncio.sleep(1.0)

        holder = asyncio.create_task(use_lock_for_workers(slow, "no-unlock", client, 4, log))
        await started.wait()
        await use_lock_for_workers(slow, "no-unlock", client, 4, log)
        assert not holder.done()  # returned while the holder still ran: it did not wait
        await holder
    finally:
        await aclose(client)
    assert calls == [(7, "a")]
    # Dev mode: no Redis, one worker: run directly.
    monkeypatch.setenv("HYPERION_LOCK_LOCK_DIR", str(tmp_path))
    await use_lock_for_workers(job, "dev", None, 1, log, None, 1)
    assert calls[-1] == (1, "")


def test_process_pid_is_reported(redis_url: str) -> None:
    outcome = Coordinator(redis_url, generation="pid-check").run_once_sync("pid", lambda: None)
    assert outcome.runner_pid == os.getpid() and outcome.ran_here
    assert Path("/proc").exists()


def test_sigterm_while_leading_keeps_its_default_meaning(tmp_path: Path) -> None:
    """In a plain script (SIGTERM at its default action) a SIGTERM during the job still terminates the process."""
    import subprocess
    import sys

    code = (
        "import time\n"
        "from hyperion_lock import Coordinator\n"
        f"c = Coordinator(None, generation='g', lock_dir={str(tmp_path)!r})\n"
        "c.run_once_sync('k', lambda: (print('leading', flush=True), time.sleep(30)))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        # The job itself says it runs: the signal arrives while this process leads.
        assert proc.stdout is not None and proc.stdout.readline().strip() == "leading"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == -signal.SIGTERM
    finally:
        proc.kill()
        proc.communicate()


async def test_sync_twin_called_from_a_running_loop(tmp_path: Path) -> None:
    """From inside an event loop the sync API runs the same coroutine on a loop of its own."""
    coordinator = Coordinator(None, generation="in-loop", lock_dir=str(tmp_path))
    ran: list[int] = []
    outcome = coordinator.run_once_sync("in-loop", lambda: ran.append(os.getpid()))
    assert outcome.ran_here and ran == [os.getpid()]
    assert not coordinator.run_once_sync("in-loop", lambda: ran.append(0)).ran_here
    assert ran == [os.getpid()]
