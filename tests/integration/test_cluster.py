"""redis+cluster:// URLs: parsing, validation, redaction (no server), then a real Redis Cluster (ClusterSet).

With a redis-py older than 8.0 (no sharded pub/sub in its asyncio cluster client) every cluster test asserts the
ConfigurationError that names the version needed instead of running the cluster scenario.
"""


from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import redis

from hyperion_lock import (
    Cache,
    ConfigurationError,
    Coordinator,
    OptionalRedis,
    RedisUnavailableError,
    Settings,
    use_lock_for_workers,
)
from hyperion_lock.connection.clients import aclose, async_client_from_url
from hyperion_lock.connection.cluster import MIN_REDIS_PY
from hyperion_lock.runonce.keys import JobKeys
from hyperion_lock.testing import ClusterSet, free_port
from tests.support import ROOT, Workers, noop
from tests.support.caching import Waits, computed_once
from tests.support.cluster import PW, SUPPORTED, _refused
from tests.support.secrets import assert_no_secret

NOWHERE = "redis+cluster://127.0.0.1:1"  # enough for the refusal on an old redis-py: no server is started for it




@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterSet]:
    with ClusterSet(password=PW) as cset:
        yield cset


def _url(cset: ClusterSet) -> str:
    return cset.url(password=quote(PW, safe=""))


def _shard_subscribers(cset: ClusterSet, port: int, channel: str) -> int:
    reply = cset.call(port, "PUBSUB", "SHARDNUMSUB", channel)
    return int(reply[1]) if isinstance(reply, list) else int(dict(reply).get(channel.encode(), 0))


def _wait_subscribers(cset: ClusterSet, channel: str, count: int, port: int | None = None,
                      timeout: float = 60.0) -> int:
    """Until ``count`` waiters listen on ``channel`` on the node owning its slot (or ``port``); that node's port."""
    deadline = time.monotonic() + timeout
    seen = -1
    while time.monotonic() < deadline:
        try:
            where = port if port is not None else cset.owner(cset.slot_of(channel))
            seen = _shard_subscribers(cset, where, channel)
        except (redis.RedisError, LookupError, OSError):
            seen = -1
        if seen >= count:
            return where
        time.sleep(0.05)
    raise AssertionError(f"{count} sharded subscribers to {channel} expected, saw {seen}")


def _job_running(cset: ClusterSet, workers: Workers, tmp_path: Path, key: str) -> tuple[Path, str, int]:
    """8 workers on ``key``: one runs a job that waits for a gate file, and all 8 listen on the job's shard channel
    (the leader subscribed before it won). Returns (the gate, the channel, the port of the node owning its slot)."""
    gate = tmp_path / f"{key}.go"
    # A 120 s lease: a waiter woken by the lease running out, not by the sharded channel, would take >= 120 s,
    # twice the bound of _finish_and_join.
    workers.spawn(8, url=_url(cset), key=key, ttl=120, job=f"file:{gate}", generation=f"{key}-{time.time_ns()}")
    workers.wait_for("ran")
    channel = JobKeys("hyperion_lock", key).channel
    return gate, channel, _wait_subscribers(cset, channel, 8)


def _finish_and_join(workers: Workers, gate: Path, n: int = 8) -> list[dict[str, Any]]:
    gate.touch()
    codes = workers.join(timeout=60)  # half the lease: only the sharded channel can have woken the waiters
    assert codes == [0] * n, (workers.events("raised"), workers.outputs)
    returned = workers.events("returned")
    assert len(returned) == n
    return returned


def _reconnected(workers: Workers) -> int:
    """How many workers logged the waiter's "lost the connection ... reconnecting" warning."""
    return sum("lost the connection" in out for out in workers.outputs.values())


def _wake_latency(workers: Workers) -> float:
    finished = workers.events("job-finished")[-1]["t"]
    return float(max(r["t"] for r in workers.events("returned"))) - float(finished)


@pytest.mark.integration
def test_eight_processes_run_the_job_once_woken_by_the_sharded_channel(
    cluster: ClusterSet, workers: Workers, tmp_path: Path
) -> None:
    if _refused(_url(cluster)):
        return
    gate, channel, owner = _job_running(cluster, workers, tmp_path, "cl-once")
    assert int(cluster.call(owner, "PUBSUB", "NUMSUB", channel)[1]) == 0  # nobody uses broadcast pub/sub
    returned = _finish_and_join(workers, gate)
    assert len(workers.events("ran")) == 1 and sum(r["ran_here"] for r in returned) == 1
    print(f"8 workers, 1 run, last waiter returned {_wake_latency(workers):.3f} s after the job finished")
    for out in workers.outputs.values():
        assert_no_secret(out, PW)


@pytest.mark.integration
def test_master_failover_mid_job(workers: Workers, tmp_path: Path) -> None:
    """SIGKILL the master owning the job's slot while the job runs and 7 waiters listen there; its replica takes
    over; every waiter re-subscribes on it and every worker returns."""
    if _refused(NOWHERE):
        return
    with ClusterSet(password=PW) as cset:
        gate, channel, old = _job_running(cset, workers, tmp_path, "cl-failover")
        slot = cset.slot_of(channel)
        killed = time.monotonic()
        cset.node_at(old).kill()
        new = cset.wait_failover(slot, old)
        failover_s = time.monotonic() - killed
        _wait_subscribers(cset, channel, 7, port=new)  # the waiters; the leader does not listen while it runs
        returned = _finish_and_join(workers, gate)
        ran = workers.events("ran")
        # Replication is asynchronous: a lease the old master had not yet passed on can be lost, and a waiter may
        # then run the job a second time -- always with a higher fencing token.
        assert len(ran) in (1, 2), ran
        if len(ran) == 2:
            assert ran[1]["fence"] > ran[0]["fence"], ran
        assert {r["fence"] for r in returned} <= {r["fence"] for r in ran}
        assert _reconnected(workers) == 7  # each waiter saw its subscription break and re-subscribed
        print(f"failover: slot {slot} {old} -> {new} in {failover_s:.2f} s; runs: {len(ran)}; "
              f"{_reconnected(workers)} waiters reported a lost connection; "
              f"last waiter returned {_wake_latency(workers):.3f} s after the job finished")


@pytest.mark.integration
def test_waiters_follow_their_slot_when_it_moves(workers: Workers, tmp_path: Path) -> None:
    """Migrate the job's slot to another master while 7 waiters listen: the old owner drops their sharded
    subscriptions (sunsubscribe), they re-subscribe on the new owner, the leader's FINISH follows MOVED there and
    its SPUBLISH wakes them."""
    if _refused(NOWHERE):
        return
    with ClusterSet(password=PW) as cset:
        gate, channel, old = _job_running(cset, workers, tmp_path, "cl-moved")
        slot = cset.slot_of(channel)
        target = next(n.port for n in cset.nodes if n.port != old
                      and cset.call(n.port, "INFO", "replication").get("role") == "master")
        cset.migrate_slot(slot, target)
        assert cset.owner(slot, via=old) == target
        _wait_subscribers(cset, channel, 7, port=target)
        returned = _finish_and_join(workers, gate)
        assert len(workers.events("ran")) == 1 and sum(r["ran_here"] for r in returned) == 1
        assert _reconnected(workers) == 7  # each waiter saw its subscription dropped and re-subscribed
        print(f"slot {slot} moved {old} -> {target}; {_reconnected(workers)} waiters reported a lost subscription; "
              f"last waiter returned {_wake_latency(workers):.3f} s after the job finished")


@pytest.mark.integration
def test_cli_run_wait_status_and_reset_through_the_cluster(cluster: ClusterSet) -> None:
    url = _url(cluster)
    gen = f"cli-{time.time_ns()}"
    cli = [sys.executable, "-m", "hyperion_lock.cli.main"]
    if not SUPPORTED:
        done = subprocess.run([*cli, "status", "--url", url], capture_output=True, text=True, timeout=60,
                              check=False, cwd=ROOT)
        assert done.returncode != 0 and f"needs redis-py >= {MIN_REDIS_PY}" in done.stderr, done.stderr
        return
    ran = subprocess.run([*cli, "run", "--url", url, "--generation", gen, "--key", "migrate", "--", "true"],
                         capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    waited = subprocess.run([*cli, "wait", "--url", url, "--generation", gen, "--key", "migrate", "--timeout", "20"],
                            capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)
    assert waited.returncode == 0 and "done" in waited.stdout, waited.stdout + waited.stderr
    for key in ("seed", "warm"):  # three hash tags: in general on different masters
        Coordinator(url, generation=gen).run_once_sync(key, noop)
    done = subprocess.run([*cli, "status", "--url", url, "--generation", gen, "--json"], capture_output=True,
                          text=True, timeout=60, check=False, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    states = {j["key"]: j["state"] for j in report["jobs"]}
    assert {states.get(k) for k in ("migrate", "seed", "warm")} == {"done"}, report
    assert report["where"].startswith("redis+cluster://:***@")
    reset = subprocess.run([*cli, "reset", "--url", url, "--generation", gen, "seed"], capture_output=True,
                           text=True, timeout=60, check=False, cwd=ROOT)
    assert reset.returncode == 0 and "cleared 1 key" in reset.stdout, reset.stdout + reset.stderr
    again = subprocess.run([*cli, "status", "--url", url, "--generation", gen, "--key", "seed"],
                           capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)
    assert again.returncode != 0 and "seed" in again.stdout, again.stdout + again.stderr
    assert_no_secret(done.stdout + done.stderr + reset.stdout + reset.stderr + again.stdout + again.stderr
                     + ran.stdout + ran.stderr + waited.stdout + waited.stderr, PW)


@pytest.mark.integration
async def test_use_lock_for_workers_and_optional_redis_with_a_cluster_url(
    cluster: ClusterSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = _url(cluster)
    if _refused(url):
        return
    monkeypatch.setenv("HYPERION_LOCK_REDIS_URL", url)
    monkeypatch.setenv("HYPERION_LOCK_GENERATION", f"compat-{time.time_ns()}")
    runs: list[int] = []

    async def job() -> None:
        runs.append(1)
        await asyncio.sleep(0.3)

    log = logging.getLogger("test")
    await asyncio.gather(*(use_lock_for_workers(job, "init_db", None, 4, log, "init_db_done") for _ in range(4)))
    assert runs == [1]
    optional = OptionalRedis(url)
    async with optional.lifespan(None) as connected:
        assert connected is not None and await connected.set("k", "v") and await connected.get("k") == b"v"
    assert_no_secret(repr(optional), PW)
    client = async_client_from_url(url, connect_timeout=2, socket_timeout=2)
    assert await client.get("k") == b"v"
    await aclose(client)


@pytest.mark.integration
def test_no_cluster_node_answering_is_named() -> None:
    url = f"redis+cluster://:{quote(PW, safe='')}@127.0.0.1:{free_port()}"
    if _refused(url):
        return
    with pytest.raises(RedisUnavailableError) as info:
        Coordinator(url, connect_timeout=1, generation="x").run_once_sync("migrate", noop)
    text = str(info.value)
    assert "CLUSTER INFO" in text and "redis+cluster://:***@" in text, text
    assert_no_secret(text, PW)


@pytest.mark.integration
async def test_the_cache_on_a_cluster_computes_once_and_wakes_waiters_on_the_shard_channel(
        cluster: ClusterSet, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two caches (two workers) on a redis+cluster:// URL, three namespaces (three slots): concurrent misses
    compute once per namespace. The lease is 30 s and the test's bound 20 s, so the other worker's waiters can
    only have been woken by the namespace's shard channel (SSUBSCRIBE on the node owning its slot). Tag
    invalidation, and the CLI's cache section, work across the nodes."""
    url = _url(cluster)
    settings = Settings(redis_url=None, key_prefix=f"c{time.time_ns()}")
    if not SUPPORTED:
        with pytest.raises(ConfigurationError, match=rf"needs redis-py >= {MIN_REDIS_PY}"):
            await Cache(url, settings=settings).get_or_compute("alpha", "k", lambda: "v", ttl=30)
        return
    # A generous op_timeout: what is tested is routing and wake-ups, not the breaker of a busy machine.
    workers = [Cache(url, settings=settings, lease_ttl=30, op_timeout=2) for _ in range(2)]
    namespaces = ("alpha", "beta", "gamma")
    waits = Waits(monkeypatch)
    try:
        async with asyncio.timeout(20):
            assert all(await asyncio.gather(*[w.connect(budget=10) for w in workers]))  # as a lifespan does
            for ns in namespaces:
                # Worker 0 computes; its computation ends only once worker 1's callers wait for it.
                runs, results = await computed_once(workers, waits, ns, "k", f"value of {ns}", ttl=60, tags=["t"])
                assert (runs, results) == (1, [f"value of {ns}"] * 4)
            assert await workers[1].invalidate_tag("alpha", "t") == 1
            again, results = await computed_once(workers, waits, "alpha", "k", "again", ttl=60)
            assert (again, results) == (1, ["again"] * 4)
    finally:
        for w in workers:
            await w.aclose()
    slots = {cluster.owner(cluster.slot_of(f"{settings.key_prefix}:cache:{{{ns}}}:events")) for ns in namespaces}
    print(f"cache on a cluster: {len(namespaces)} namespaces on {len(slots)} node(s), one computation each")
    out = subprocess.run([sys.executable, "-m", "hyperion_lock.cli.main", "status", "--json", "--url", url,  # noqa: ASYNC221
                          "--prefix", settings.key_prefix], capture_output=True, text=True, timeout=60,
                         check=False, cwd=ROOT)
    assert out.returncode in (0, 2), out.stdout + out.stderr
    rows = {r["namespace"]: r for r in json.loads(out.stdout)["cache"]}
    assert set(rows) == set(namespaces) and rows["alpha"]["keys"] == 1 and rows["beta"]["computations"] == 1

