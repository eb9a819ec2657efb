"""redis+sentinel:// URLs: parsing, validation, redaction (no server), then real Sentinels (SentinelSet)."""


from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from urllib.parse import quote

import pytest
import redis.asyncio as aredis

from hyperion_lock import (
    Cache,
    ConfigurationError,
    Coordinator,
    JobKeys,
    OptionalRedis,
    RedisAuthError,
    RedisUnavailableError,
    Settings,
    use_lock_for_workers,
)
from hyperion_lock.connection.clients import (
    aclose,
    async_client_from_url,
    sync_client_from_url,
)
from hyperion_lock.testing import RedisServer, SentinelSet, free_port
from tests.support import ROOT, Workers, noop
from tests.support.caching import Waits, computed_once
from tests.support.secrets import assert_no_secret

PW = "Data8/Pw?Ok"


SPW = "Sent9@Pw:Ok"


@pytest.fixture(scope="module")
def sentinel_set() -> Iterator[SentinelSet]:
    with SentinelSet(password=PW, sentinel_password=SPW) as sset:
        yield sset


def _url(sset: SentinelSet, **kw: str) -> str:
    return sset.url(password=quote(kw.get("password", PW), safe=""),
                    sentinel_password=quote(kw.get("sentinel_password", SPW), safe=""))


@pytest.mark.integration
def test_four_processes_run_the_job_once_through_sentinel(sentinel_set: SentinelSet, workers: Workers) -> None:
    gen = f"sentinel-{time.time_ns()}"
    # A 10 s lease: a leader stalled by a loaded machine must not lose it (that case is test_faults' business).
    workers.spawn(4, url=_url(sentinel_set), ttl=10, job="sleep:0.5", generation=gen)
    assert workers.join() == [0] * 4, workers.outputs
    assert len(workers.events("ran")) == 1
    returned = workers.events("returned")
    assert len(returned) == 4 and sum(r["ran_here"] for r in returned) == 1
    for out in workers.outputs.values():
        assert_no_secret(out, PW, SPW)


@pytest.mark.integration
async def test_async_sync_and_optional_redis_clients_close_their_sentinel_connections(
    sentinel_set: SentinelSet,
) -> None:
    url = _url(sentinel_set)
    client = async_client_from_url(url, connect_timeout=2, socket_timeout=2)
    assert await client.set("k", "v") and await client.get("k") == b"v"
    await aclose(client)
    sync = sync_client_from_url(url, connect_timeout=2, socket_timeout=2)
    assert sync.get("k") == b"v"
    sync.close()
    optional = OptionalRedis(url)
    async with optional.lifespan(None) as connected:
        assert connected is not None and await connected.get("k") == b"v"
    assert_no_secret(repr(optional), PW, SPW)
    outcome = await Coordinator(url, generation=f"a-{time.time_ns()}").run_once("job", noop)
    assert outcome.ran_here


@pytest.mark.integration
async def test_use_lock_for_workers_with_a_sentinel_url_in_the_environment(
    sentinel_set: SentinelSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``redis_client=None`` coordinates through HYPERION_LOCK_REDIS_URL, here a Sentinel URL: four concurrent
    callers (separate clients), one run."""
    monkeypatch.setenv("HYPERION_LOCK_REDIS_URL", _url(sentinel_set))
    monkeypatch.setenv("HYPERION_LOCK_GENERATION", f"compat-{time.time_ns()}")
    runs: list[int] = []

    async def job() -> None:
        runs.append(1)
        await asyncio.sleep(0.3)

    log = logging.getLogger("test")
    await asyncio.gather(*(use_lock_for_workers(job, "init_db", None, 4, log, "init_db_done") for _ in range(4)))
    assert runs == [1]


@pytest.mark.integration
def test_cli_status_through_sentinel(sentinel_set: SentinelSet) -> None:
    url = _url(sentinel_set)
    gen = f"cli-{time.time_ns()}"
    Coordinator(url, generation=gen).run_once_sync("migrate", noop)
    done = subprocess.run([sys.executable, "-m", "hyperion_lock.cli.main", "status", "--url", url, "--generation", gen,
                           "--key", "migrate"], capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "migrate" in done.stdout and "done" in done.stdout
    assert_no_secret(done.stdout + done.stderr, PW, SPW)


@pytest.mark.integration
def test_no_sentinel_answering_is_named(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    url = f"redis+sentinel://:{quote(PW, safe='')}@127.0.0.1:{port}/mymaster"
    caplog.set_level(logging.DEBUG)
    with pytest.raises(RedisUnavailableError) as info:
        Coordinator(url, connect_timeout=1, generation="x").run_once_sync("migrate", noop)
    text = str(info.value)
    assert f"no Sentinel at 127.0.0.1:{port} answered" in text, text
    assert "SENTINEL get-master-addr-by-name mymaster" in text and "rediss://" not in text
    assert_no_secret(text + caplog.text, PW)


@pytest.mark.integration
def test_unknown_service_is_named(sentinel_set: SentinelSet) -> None:
    url = _url(sentinel_set).replace(f"/{sentinel_set.service}/", "/nosuchservice/")
    with pytest.raises(RedisUnavailableError) as info:
        Coordinator(url, connect_timeout=1, generation="x").run_once_sync("migrate", noop)
    assert "does not know service 'nosuchservice'" in str(info.value), str(info.value)
    assert_no_secret(str(info.value), PW, SPW)


@pytest.mark.integration
@pytest.mark.parametrize("wrong", ["password", "sentinel_password"])
def test_wrong_password_is_an_auth_error_naming_neither(
    sentinel_set: SentinelSet, wrong: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = _url(sentinel_set, **{wrong: "Wrong7/Pw?Zz"})
    caplog.set_level(logging.DEBUG)
    with pytest.raises(RedisAuthError) as info:
        Coordinator(url, connect_timeout=5, generation="x").run_once_sync("migrate", noop)
    if wrong == "sentinel_password":
        assert "sentinel_username/sentinel_password" in str(info.value)
    assert_no_secret(str(info.value) + repr(info.value) + caplog.text, PW, SPW, "Wrong7/Pw?Zz")


async def _renewal_heartbeats(host: str, port: int, key: str, count: int, timeout: float = 30.0) -> int:
    """Until ``count`` renewal heartbeats ("running") were published on ``key``'s channel; how many were seen.
    Subscribed after the job started: mid-job, only the leader's renewals publish there."""
    client = aredis.Redis(host=host, port=port, password=PW, socket_timeout=5)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    seen = 0
    try:
        await pubsub.subscribe(JobKeys("hyperion_lock", key).channel)
        async with asyncio.timeout(timeout):
            while seen < count:
                message = await pubsub.get_message(timeout=1.0)
                if message is not None and json.loads(message["data"]).get("status") == "running":
                    seen += 1
    except TimeoutError:
        raise AssertionError(f"{seen} of {count} renewal heartbeats on {key!r}'s channel within {timeout} s") from None
    finally:
        await aclose(pubsub)  # redis-py 4.6 to 8: close() or aclose()
        await aclose(client)
    return seen


@pytest.mark.integration
@pytest.mark.parametrize(("wanted", "ttl", "warned", "renewals"), [(1, 10.0, False, 1), (2, 0.3, True, 3)])
async def test_min_replicas_waits_and_warns_once(
    sentinel_set: SentinelSet, wanted: int, ttl: float, warned: bool, renewals: int, caplog: pytest.LogCaptureFixture
) -> None:
    """One replica: WAIT 1 is met (within 1 s, the WAIT timeout of a 10 s lease), at the take and at a renewal;
    WAIT 2 cannot be, which is logged once, not again at each of the (at least 3) renewals the job waits for, and
    the job still runs. The job ends on the renewal heartbeats seen on the job's channel, not after a sleep."""
    caplog.set_level(logging.WARNING, logger="hyperion_lock")
    coordinator = Coordinator(_url(sentinel_set), generation=f"w-{time.time_ns()}", min_replicas=wanted,
                              lease_ttl=ttl)
    host, port = sentinel_set.primary_address()
    seen: list[int] = []

    async def job() -> None:
        seen.append(await _renewal_heartbeats(host, port, "replicated", renewals))

    assert (await coordinator.run_once("replicated", job)).ran_here
    assert seen and seen[0] >= renewals, seen
    warnings = [r for r in caplog.records if "replica(s) within" in r.getMessage()]
    assert len(warnings) == (1 if warned else 0), caplog.text
    if warned:
        assert "reached 1 of 2 replica(s)" in warnings[0].getMessage()


@pytest.mark.integration
def test_plain_url_at_a_replica_reports_read_only() -> None:
    """A redis:// URL that points at a replica: READONLY is retried (it passes when a failover makes that node the
    primary), and the error at the end of the budget says what it means."""
    with (
        RedisServer() as primary,
        RedisServer(extra_args=("--replicaof", "127.0.0.1", str(primary.port))) as replica,
        pytest.raises(RedisUnavailableError) as info,
    ):
        Coordinator(replica.url, connect_timeout=1, generation="x").run_once_sync("migrate", noop)
    text = str(info.value)
    assert "ReadOnlyError" in text and "it is a replica" in text and "redis+sentinel://" in text, text


@pytest.mark.integration
async def test_the_cache_through_sentinel_computes_once_for_two_workers(sentinel_set: SentinelSet,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two caches (two workers) on a redis+sentinel:// URL: the second waits for the first's computation and
    both serve the value; a Sentinel client handed over instead of the URL is refused with what to do."""
    url = _url(sentinel_set)
    settings = Settings(redis_url=None, key_prefix=f"s{time.time_ns()}")
    workers = [Cache(url, settings=settings, op_timeout=2) for _ in range(2)]  # not the breaker's test
    try:
        async with asyncio.timeout(30):
            runs, results = await computed_once(workers, Waits(monkeypatch), "q", "k", "through sentinel", ttl=30)
        assert (runs, results) == (1, ["through sentinel"] * 4)
        assert sum(w.stats()["q"]["misses"] for w in workers) == 1
    finally:
        for w in workers:
            await w.aclose()

    async def compute() -> str:
        raise AssertionError("a refused cache computed")

    client = async_client_from_url(url, connect_timeout=1, socket_timeout=1)
    try:
        with pytest.raises(ConfigurationError, match=r"give it the redis\+sentinel:// URL"):
            await Cache(client, settings=settings).get_or_compute("q", "k2", compute, ttl=30)
    finally:
        await aclose(client)

