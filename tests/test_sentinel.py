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
import redis
import redis.asyncio as aredis
from redis import exceptions as rexc

from hyperion_lock import (
    Cache,
    ConfigurationError,
    Coordinator,
    JobKeys,
    OptionalRedis,
    RedisAuthError,
    RedisUnavailableError,
    Settings,
    redact_url,
    use_lock_for_workers,
)
from hyperion_lock.connection.clients import (
    aclose,
    async_client_from_url,
    describe_client,
    is_transient,
    sync_client_from_url,
)
from hyperion_lock.connection.sentinel import master_not_found
from hyperion_lock.connection.sentinel_url import parse_sentinel_url
from hyperion_lock.runonce.redis_backend import replicas_short
from hyperion_lock.settings import replica_wait_ms
from hyperion_lock.testing import RedisServer, SentinelSet, free_port

from ._caching import Waits, computed_once
from .conftest import ROOT, Workers, noop, refusals
from .test_secrets import AT_COLON, SLASHY, assert_no_secret


# --- parsing -----------------------------------------------------------------------------------------------------
def test_full_sentinel_url_is_parsed() -> None:
    url = (f"rediss+sentinel://app:{quote(SLASHY, safe='')}@10.0.0.1:26379,[::1]:26380,s3/my%20service/4"
           f"?sentinel_username=sen&sentinel_password={quote(AT_COLON, safe='')}&ssl_ca_certs=/ca.pem"
           "&ssl_certfile=/c.pem&ssl_keyfile=/k.pem&ssl_cert_reqs=optional&ssl_check_hostname=false")
    target = parse_sentinel_url(url)
    assert target.sentinels == (("10.0.0.1", 26379), ("::1", 26380), ("s3", 26379))
    assert (target.service, target.db, target.username, target.password) == ("my service", 4, "app", SLASHY)
    assert (target.sentinel_username, target.sentinel_password) == ("sen", AT_COLON)
    assert target.data_kwargs() == {
        "db": 4, "username": "app", "password": SLASHY, "ssl": True, "ssl_ca_certs": "/ca.pem",
        "ssl_certfile": "/c.pem", "ssl_keyfile": "/k.pem", "ssl_cert_reqs": "optional", "ssl_check_hostname": False,
    }
    assert target.sentinel_auth() == {"username": "sen", "password": AT_COLON}
    assert_no_secret(repr(target), SLASHY, AT_COLON)


@pytest.mark.parametrize(
    ("url", "tls", "db", "password"),
    [
        ("redis+sentinel://h:26379/mymaster", False, 0, None),
        ("redis+sentinel://:pw@h1:1,h2:2/mymaster/3", False, 3, "pw"),
        ("redis+sentinel://h/mymaster?db=2&ssl=true", True, 2, None),
        ("REDIS+SENTINEL://h/mymaster?ssl=no", False, 0, None),
    ],
)
def test_sentinel_url_forms(url: str, tls: bool, db: int, password: str | None) -> None:
    target = parse_sentinel_url(url)
    assert (target.tls, target.db, target.password) == (tls, db, password)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+sentinel://h:26379", "/service_name"),
        ("redis+sentinel://h:26379/", "/service_name"),
        ("redis+sentinel://h:26379/m/x", "is not a number"),
        ("redis+sentinel://h:26379/m/1/2", "/service_name"),
        ("redis+sentinel://h:0/m", "port"),
        ("redis+sentinel://h:99999/m", "port"),
        ("redis+sentinel://h:1,,h:2/m", "no host"),
        ("redis+sentinel:///m", "no Sentinel address"),
        ("redis+sentinel://h/m?sentinel_pasword=x", "unknown query parameter(s) 'sentinel_pasword'"),
        ("redis+sentinel://h/m?password=x", "unknown query parameter(s) 'password'"),
        ("redis+sentinel://h/m?ssl_ca_certs=/ca.pem", "need TLS"),
        ("rediss+sentinel://h/m?ssl_cert_reqs=maybe", "none, optional, required"),
        ("redis+sentinel://h/m?ssl=perhaps", "true or false"),
        ("redis+sentinel://h/m/1?db=2", "database once"),
        ("redis+sentinel://:Ab1/Cd2@h/m", "percent-encoded"),
        ("redis+sentinel://h/m#frag", "percent-encoded"),
        ("sentinel://h/m", "the scheme must be"),
        ("redis+clustr://h/m", "the scheme must be"),
    ],
)
def test_bad_urls_are_configuration_errors_naming_the_forms(url: str, says: str) -> None:
    for text in refusals(url):
        assert says in text, text
        assert "redis+sentinel://[[user]:password@]host:port[,host:port...]/service_name[/db]" in text
        assert "Ab1" not in text and "Cd2" not in text  # no piece of a badly encoded password


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis://h/0?sockettimeout=1", "'sockettimeout' for redis://"),
        ("redis://h/0?ssl_ca_certs=/ca.pem", "ssl_* parameters need rediss://"),
        ("unix:///run/redis.sock?ssl_certfile=/c", "ssl_* parameters need rediss://"),
        ("rediss://h/0?ssl_cert_reqs=sometimes", "none, optional, required"),
        ("rediss://h/0?ssl_check_hostname=perhaps", "true or false"),
    ],
)
def test_unknown_query_parameters_of_plain_urls_are_refused(url: str, says: str) -> None:
    for text in refusals(url):
        assert says in text and "rediss+sentinel://" in text, text


def test_known_query_parameters_of_plain_urls_still_work() -> None:
    url = ("rediss://h/0?ssl_ca_certs=/ca.pem&ssl_certfile=/c.pem&ssl_keyfile=/k.pem&ssl_cert_reqs=none"
           "&socket_timeout=2&client_name=app&health_check_interval=10")
    client = sync_client_from_url(url, connect_timeout=1, socket_timeout=1)
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["ssl_ca_certs"], kwargs["ssl_certfile"], kwargs["ssl_keyfile"]) == ("/ca.pem", "/c.pem", "/k.pem")
    assert kwargs["ssl_cert_reqs"] == "none"
    client.close()


# --- redaction ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (f"redis+sentinel://:{quote(SLASHY, safe='')}@h1:1,h2:2/mymaster/3"
         f"?sentinel_password={quote(AT_COLON, safe='')}",
         "redis+sentinel://:***@h1:1,h2:2/mymaster/3?sentinel_password=***"),
        (f"rediss+sentinel://app:{quote(AT_COLON, safe='')}@[::1]/m?sentinel_username=sen&sentinel_password=x1y2z3",
         "rediss+sentinel://app:***@[::1]:26379/m/0?sentinel_username=sen&sentinel_password=***"),
        ("redis+sentinel://h/m?ssl=true", "rediss+sentinel://h:26379/m/0"),
        (f"redis+sentinel://:{SLASHY}@h1:1/m",
         "redis+sentinel://<unparseable URL: percent-encode special characters in the password>"),
    ],
)
def test_both_passwords_are_redacted_everywhere(url: str, expected: str) -> None:
    assert redact_url(url) == expected
    if "unparseable" in expected:  # refused when the setting is made, without the secret
        with pytest.raises(ConfigurationError, match="must be percent-encoded") as info:
            Settings(redis_url=url, generation="g")
        assert_no_secret(str(info.value), SLASHY, AT_COLON, "x1y2z3")
        return
    settings = Settings(redis_url=url, generation="g")
    for text in (repr(settings), settings.describe_target()):
        assert_no_secret(text, SLASHY, AT_COLON, "x1y2z3")
    if "unparseable" not in expected:
        assert repr(Coordinator(url, generation="g")) == f"Coordinator({expected!r}, generation='g')"


def test_describe_client_of_a_sentinel_client_names_no_secret() -> None:
    url = f"rediss+sentinel://:{quote(SLASHY, safe='')}@h1:1,h2:2/m/5?sentinel_password=x1y2z3"
    client = sync_client_from_url(url, connect_timeout=1, socket_timeout=1)
    assert describe_client(client) == "rediss+sentinel://h1:1,h2:2/m/5"
    client.close()


# --- words for failures ------------------------------------------------------------------------------------------
def test_master_not_found_wordings() -> None:
    one, two = redis.Redis(host="10.0.0.1", port=1), redis.Redis(host="10.0.0.2", port=2)
    refused = f"No master found for 'm' : {one} - ConnectionError('refused'), {two} - TimeoutError('t')"
    assert str(master_not_found("m", [one, two], refused, False)) == (
        "no Sentinel at 10.0.0.1:1, 10.0.0.2:2 answered (connection refused, reset or timed out)")
    unknown = master_not_found("m", [one, two], f"No master found for 'm' : {two} - ConnectionError('x')", False)
    assert str(unknown).startswith("Sentinel at 10.0.0.1:1 does not know service 'm'")
    assert str(unknown).endswith("; no answer from 10.0.0.2:2")
    down = master_not_found("m", [one, two], "No master found for 'm'", True)
    assert "knows service 'm' but reports no healthy primary" in str(down)
    auth = master_not_found("m", [one], f"No master found for 'm' : {one} - AuthenticationError('NOAUTH')", False)
    assert isinstance(auth, rexc.AuthenticationError) and "sentinel_password" in str(auth)
    for err in (unknown, down):
        assert is_transient(err)
    one.close()
    two.close()


def test_read_only_reply_is_transient() -> None:
    assert is_transient(rexc.ReadOnlyError("You can't write against a read only replica."))


# --- HYPERION_LOCK_MIN_REPLICAS ----------------------------------------------------------------------------------
def test_min_replicas_setting() -> None:
    assert Settings(generation="g").min_replicas == 0
    assert Settings.from_env({"HYPERION_LOCK_MIN_REPLICAS": "2"}, generation="g").min_replicas == 2
    for bad in ("-1", "101", "two", "1.5"):
        with pytest.raises(ConfigurationError, match="min_replicas"):
            Settings.from_env({"HYPERION_LOCK_MIN_REPLICAS": bad}, generation="g")
    assert (replica_wait_ms(15), replica_wait_ms(1), replica_wait_ms(0.1)) == (1000, 100, 10)


@pytest.mark.parametrize(
    ("wanted", "acked", "wrote", "short"),
    [(0, None, True, False), (1, 1, True, False), (2, 1, True, True), (2, 0, False, False), (1, None, True, False)],
)
def test_replicas_short_decision(wanted: int, acked: int | None, wrote: bool, short: bool) -> None:
    assert replicas_short(wanted, acked, wrote) is short


# --- real Sentinels ----------------------------------------------------------------------------------------------
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
