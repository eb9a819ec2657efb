"""End-to-end on several hosts: three network namespaces ("hosts"), each running ``gunicorn -c gunicorn.conf.py``
with 4 workers of the reference app, one release (same HYPERION_LOCK_GENERATION) against one Redis and one
PostgreSQL (see tests/_netns.py for the network). Root only: without it the tests fail with the reason.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from hyperion_lock import JobKeys
from tests.support import wait_until
from tests.support.deploy import HEAD, assert_same_jobs
from tests.support.netns import HostGunicorn, NetnsPostgres, NetnsRedis, Network, several_hosts

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

HOSTS = ("a", "b", "c")
Cluster = tuple[Network, NetnsRedis, NetnsPostgres]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Callable[[], Cluster]]:
    """Builds the hosts' network and servers when the test calls it, so that a machine which cannot (not root, no
    ``ip``) fails the test itself with the reason; removed at teardown in any case."""
    with contextlib.ExitStack() as stack:
        yield lambda: stack.enter_context(several_hosts(tmp_path, HOSTS))


@contextlib.contextmanager
def hosts(net: Network, tmp_path: Path, **env_by_host: dict[str, str]) -> Iterator[dict[str, HostGunicorn]]:
    """One (not yet started) gunicorn per host; every one stopped (its whole session killed) on exit."""
    made = {h: HostGunicorn(net, h, tmp_path, **env) for h, env in env_by_host.items()}
    try:
        yield made
    finally:
        for g in made.values():
            g.stop()


def worker_pids(g: HostGunicorn) -> set[int]:
    return {int(pid) for pid in re.findall(r"Booting worker with pid: (\d+)", g.log())}


def lease_holder_pid(store: NetnsRedis, key: str) -> int | None:
    def read(client: redis.Redis) -> Any:
        return client.get(JobKeys("hyperion_lock", key).lease)
    raw = store.call(read)
    return int(json.loads(raw)["pid"]) if raw else None


def test_three_hosts_twelve_workers_run_each_job_once(tmp_path: Path, cluster: Callable[[], Cluster]) -> None:
    net, store, db = cluster()
    env = {"DATABASE_URL": db.url, "HYPERION_LOCK_REDIS_URL": store.url, "HYPERION_LOCK_GENERATION": "release-7"}
    with hosts(net, tmp_path, **{h: env for h in HOSTS}) as gs:
        for g in gs.values():  # together: the three masters and their 12 workers race for the same jobs
            g.start()
        reports: dict[int, Any] = {}
        for h, g in gs.items():
            seen = g.startup_reports(4)  # /health 200 and /startup through this host's own address
            assert set(seen) <= worker_pids(g), (h, sorted(seen), sorted(worker_pids(g)))
            reports.update(seen)
        assert len(reports) == 12
        jobs = assert_same_jobs(reports)  # every worker of every host reports the same runner and token
        logs = {h: g.log() for h, g in gs.items()}
        for name in ("migrate", "seed"):
            runner = jobs[name]["runner_pid"]
            ran = [h for h, log in logs.items() if f"worker pid {runner}: job '{name}' ran here" in log]
            assert len(ran) == 1 and runner in worker_pids(gs[ran[0]]), (name, runner, ran)
            assert sum(log.count(f"job '{name}' ran here") for log in logs.values()) == 1
            assert sum(log.count(f"job '{name}' was done by another worker") for log in logs.values()) == 11
            print(f"\njob {name!r}: ran once, by pid {runner} on host {ran[0]} "
                  f"(fencing token {jobs[name]['fencing_token']}); 11 workers waited for it")
        # Once, as the database itself records it.
        assert db.query("SELECT count(*) FROM migration_audit") == [(1,)]
        assert db.query("SELECT version_num FROM alembic_version") == [(HEAD,)]
        seed_token = jobs["seed"]["fencing_token"]
        assert db.query("SELECT count(*), max(fencing_token) FROM seed_runs") == [(1, seed_token)]
        assert db.query("SELECT fencing_token, pid FROM job_fences WHERE name = 'seed'") == [
            (seed_token, jobs["seed"]["runner_pid"])]
        assert db.query("SELECT count(*) FROM items") == [(3,)]


def test_leader_host_cut_off_mid_job_is_taken_over_and_its_late_write_refused(
    tmp_path: Path, cluster: Callable[[], Cluster]
) -> None:
    """Host a leads the seed job and is slow (HYPERION_DEMO_SEED_GATE: it waits for a file before its fenced
    write); its bridge port goes down. b or c takes over after the lease TTL and seeds with a higher fencing token;
    b's and c's 8 workers serve. The link comes back, then the test opens a's gate: its write, with the old token,
    is refused by the database's fence (job_fences), and nothing ran twice."""
    net, store, db = cluster()
    gate = tmp_path / "seed-of-a.go"
    common = {"DATABASE_URL": db.url, "HYPERION_LOCK_REDIS_URL": store.url, "HYPERION_LOCK_GENERATION": "release-8",
              "HYPERION_LOCK_LEASE_TTL": "2"}
    with hosts(net, tmp_path, a={**common, "HYPERION_DEMO_SEED_GATE": str(gate)}, b=common, c=common) as gs:
        a, b, c = gs["a"], gs["b"], gs["c"]
        a.start()  # first, so that the slow host is the one leading
        sleeping = a.wait_log(r"seed: pid (\d+) waiting for \S+ with fencing token (\d+)")[0]
        old_leader, old_token = int(sleeping.group(1)), int(sleeping.group(2))
        assert old_leader in worker_pids(a)
        assert lease_holder_pid(store, "seed") == old_leader
        b.start()
        c.start()
        for g in (b, c):  # their workers are up and in run_once: migrate already done, seed held by a
            g.wait_log(r"job 'migrate' was done by another worker", count=4)

        net.cut("a")
        cut_at = time.monotonic()
        new = wait_until(lambda: [m for g in (b, c) for m in re.finditer(
            r"seed: pid (\d+) inserted (\d+) item\(s\) with fencing token (\d+)", g.log())],
            "a worker of b or c takes the seed over", timeout=60)
        took_over = time.monotonic() - cut_at
        assert len(new) == 1, new
        new_leader, inserted, new_token = (int(x) for x in new[0].groups())
        assert new_token > old_token and inserted == 3
        serving: dict[int, Any] = {}
        for g in (b, c):
            serving.update(g.startup_reports(4))
        all_ready = time.monotonic() - cut_at
        assert len(serving) == 8
        jobs = assert_same_jobs(serving)
        assert jobs["seed"]["runner_pid"] == new_leader and jobs["seed"]["fencing_token"] == new_token
        assert new_leader in worker_pids(b) | worker_pids(c)
        # a's job still waits for its gate: it has not written anything.
        assert "refusing to write" not in a.log()
        assert db.query("SELECT fencing_token, pid FROM job_fences WHERE name = 'seed'") == [(new_token, new_leader)]

        net.restore("a")
        restored_at = time.monotonic()
        gate.touch()
        refused = a.wait_log(r"refusing to write: fencing token (\d+) \(pid (\d+).*with token (\d+) began",
                             timeout=60)[0]
        assert (int(refused.group(1)), int(refused.group(2)), int(refused.group(3))) == (
            new_token, new_leader, old_token)
        refused_after = time.monotonic() - restored_at
        started = took_over - float(jobs["seed"]["duration_s"])  # its job's own run time is reported
        print(f"\ncut host a (leader pid {old_leader}, fencing token {old_token}) mid-seed; pid {new_leader} "
              f"started the job with token {new_token} ~{started:.1f} s after the cut (lease TTL 2 s) and finished "
              f"it {took_over:.1f} s after; 8 workers of b and c served {all_ready:.1f} s after the cut; a's late "
              f"write (token {old_token}) refused by job_fences {refused_after:.1f} s after the link came back")
        # Nothing ran twice: one migration, one seed run (the new leader's), the rows inserted once.
        assert db.query("SELECT count(*) FROM migration_audit") == [(1,)]
        assert db.query("SELECT version_num FROM alembic_version") == [(HEAD,)]
        assert db.query("SELECT count(*), min(fencing_token), max(pid) FROM seed_runs") == [(1, new_token, new_leader)]
        assert db.query("SELECT fencing_token, pid FROM job_fences WHERE name = 'seed'") == [(new_token, new_leader)]
        assert db.query("SELECT count(*), min(seeded_with_token), max(seeded_with_token) FROM items") == [
            (3, new_token, new_token)]
        # Host a: none of its workers ran the job; the refused job fails its worker's boot, which halts a's master
        # (a failed boot is a failed deploy of that host: it takes its other workers down with it).
        code = a.wait_exit(timeout=60)
        log = a.log()
        assert code != 0, log
        assert "job 'seed' ran here" not in log and f"worker pid {old_leader}: startup failed" in log
        saw = log.count(f"job 'seed' was done by another worker (runner {jobs['seed']['runner_host']}:{new_leader}")
        print(f"host a: its master exited {code} after the refused write; {saw} of its 3 waiting workers had seen "
              f"the seed done by pid {new_leader} once the link came back")
