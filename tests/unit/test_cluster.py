"""redis+cluster:// URLs: parsing, validation, redaction (no server), then a real Redis Cluster (ClusterSet).

With a redis-py older than 8.0 (no sharded pub/sub in its asyncio cluster client) every cluster test asserts the
ConfigurationError that names the version needed instead of running the cluster scenario.
"""


from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote

import pytest
import redis

from hyperion_lock import (
    ConfigurationError,
    Coordinator,
    OptionalRedis,
    Settings,
    redact_url,
)
from hyperion_lock.cache.store.redis import _Listener
from hyperion_lock.connection.clients import async_client_from_url, is_transient, sync_client_from_url
from hyperion_lock.connection.cluster import MIN_REDIS_PY
from hyperion_lock.connection.urls import parse_cluster_url
from hyperion_lock.testing import free_port
from tests.support import refusals
from tests.support.cluster import PW, SUPPORTED, _refused
from tests.support.secrets import AT_COLON, SLASHY, assert_no_secret

FORM = "redis+cluster://[[user]:password@]host:port[,host:port...]"


def test_full_cluster_url_is_parsed() -> None:
    url = (f"rediss+cluster://app:{quote(SLASHY, safe='')}@10.0.0.1:7000,[::1]:7001,n3?ssl_ca_certs=/ca.pem"
           "&ssl_certfile=/c.pem&ssl_keyfile=/k.pem&ssl_cert_reqs=optional&ssl_check_hostname=false")
    target = parse_cluster_url(url)
    assert target.nodes == (("10.0.0.1", 7000), ("::1", 7001), ("n3", 6379))
    assert (target.username, target.password, target.tls) == ("app", SLASHY, True)
    assert target.node_kwargs() == {
        "username": "app", "password": SLASHY, "ssl": True, "ssl_ca_certs": "/ca.pem", "ssl_certfile": "/c.pem",
        "ssl_keyfile": "/k.pem", "ssl_cert_reqs": "optional", "ssl_check_hostname": False,
    }
    assert_no_secret(repr(target), SLASHY)


@pytest.mark.parametrize(
    ("url", "tls", "password"),
    [
        ("redis+cluster://h:7000", False, None),
        ("redis+cluster://:pw@h1:1,h2:2/", False, "pw"),
        ("redis+cluster://h/0?ssl=true", True, None),
        ("REDIS+CLUSTER://h?ssl=no", False, None),
    ],
)
def test_cluster_url_forms(url: str, tls: bool, password: str | None) -> None:
    target = parse_cluster_url(url)
    assert (target.tls, target.password) == (tls, password)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+cluster://h:7000/1", "only database 0"),
        ("redis+cluster://h:7000/m", "only database 0"),
        ("redis+cluster://h:0", "port"),
        ("redis+cluster://h:99999", "port"),
        ("redis+cluster://h:1,,h:2", "no host"),
        ("redis+cluster:///", "no cluster node address"),
        ("redis+cluster://h?db=2", "unknown query parameter(s) 'db'"),
        ("redis+cluster://h?password=x", "unknown query parameter(s) 'password'"),
        ("redis+cluster://h?ssl_ca_certs=/ca.pem", "need TLS"),
        ("rediss+cluster://h?ssl_cert_reqs=maybe", "none, optional, required"),
        ("redis+cluster://h?ssl=perhaps", "true or false"),
        ("redis+cluster://:Ab1/Cd2@h", "percent-encoded"),
        ("redis+cluster://h#frag", "percent-encoded"),
        ("cluster://h", "the scheme must be"),
    ],
)
def test_bad_cluster_urls_are_configuration_errors_naming_the_forms(url: str, says: str) -> None:
    for text in refusals(url):
        assert says in text, text
        assert FORM in text and "redis+sentinel://" in text, text
        assert "Ab1" not in text and "Cd2" not in text  # no piece of a badly encoded password


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (f"redis+cluster://:{quote(SLASHY, safe='')}@h1:1,h2:2", "redis+cluster://:***@h1:1,h2:2"),
        (f"rediss+cluster://app:{quote(AT_COLON, safe='')}@[::1]", "rediss+cluster://app:***@[::1]:6379"),
        (f"redis+cluster://app:{quote(AT_COLON, safe='')}@h:7000?ssl=true&ssl_ca_certs=/ca.pem",
         "rediss+cluster://app:***@h:7000"),
        ("redis+cluster://app@h", "redis+cluster://***@h:6379"),
        (f"redis+cluster://:{SLASHY}@h1:1",
         "redis+cluster://<unparseable URL: percent-encode special characters in the password>"),
    ],
)
def test_cluster_password_is_redacted_everywhere(url: str, expected: str) -> None:
    assert redact_url(url) == expected
    if "unparseable" in expected:  # refused when the setting is made, without the secret
        with pytest.raises(ConfigurationError, match="must be percent-encoded") as info:
            Settings(redis_url=url, generation="g")
        assert_no_secret(str(info.value), SLASHY, AT_COLON)
        return
    settings = Settings(redis_url=url, generation="g")
    for text in (repr(settings), settings.describe_target()):
        assert_no_secret(text, SLASHY, AT_COLON)
    if "unparseable" not in expected and SUPPORTED:
        assert repr(Coordinator(url, generation="g")) == f"Coordinator({expected!r}, generation='g')"
        assert_no_secret(repr(OptionalRedis(url)), SLASHY, AT_COLON)


def test_cluster_errors_during_a_failover_are_transient() -> None:
    for exc in (redis.exceptions.ClusterDownError("CLUSTERDOWN The cluster is down"),
                redis.exceptions.TryAgainError("TRYAGAIN"),
                redis.exceptions.SlotNotCoveredError("Slot 5 is not covered by the cluster."),
                redis.exceptions.RedisClusterException("Redis Cluster cannot be connected. Please provide at least "
                                                       "one reachable node: None")):
        assert is_transient(exc), exc
    assert not is_transient(redis.exceptions.RedisClusterException("No way to dispatch this command"))


def test_old_redis_py_is_refused_with_the_version_it_needs() -> None:
    """redis-py < 8.0 has no sharded pub/sub in its asyncio cluster client: refused, with the version to install;
    redis-py >= 8.0 builds redis-py's own RedisCluster clients."""
    url = f"redis+cluster://:{quote(PW, safe='')}@127.0.0.1:7000,127.0.0.1:7001"
    if SUPPORTED:
        client: Any = async_client_from_url(url, connect_timeout=1, socket_timeout=1)
        assert type(client).__module__ == "redis.asyncio.cluster" and type(client).__name__ == "RedisCluster"
        assert [(n.host, n.port) for n in client.nodes_manager.startup_nodes.values()] == [
            ("127.0.0.1", 7000), ("127.0.0.1", 7001)]
        return
    for make in (lambda: Coordinator(url), lambda: OptionalRedis(url),
                 lambda: sync_client_from_url(url, connect_timeout=1, socket_timeout=1)):
        with pytest.raises(ConfigurationError) as info:
            make()
        assert f"redis+cluster:// needs redis-py >= {MIN_REDIS_PY}" in str(info.value)
        assert_no_secret(str(info.value), PW)


def test_min_replicas_is_refused_on_a_cluster_when_the_coordinator_is_made() -> None:
    url = f"redis+cluster://127.0.0.1:{free_port()}"  # nothing listens: the refusal needs no connection
    if _refused(url):
        return
    with pytest.raises(ConfigurationError, match=r"min_replicas\) is not supported with redis\+cluster://"):
        Coordinator(url, generation="g", min_replicas=1)


class _OrphanedShardedPubSub:
    """redis-py's cluster pub/sub after SSUBSCRIBE to a channel whose slot no node owns (a failover under way): no
    node connection, and get_sharded_message returns None at once, without awaiting anything."""

    def __init__(self) -> None:
        self.node_pubsub_mapping: dict[str, Any] = {}

    async def ssubscribe(self, channel: str) -> None:
        return None

    async def get_sharded_message(self, **_: Any) -> None:
        return None

    async def aclose(self) -> None:
        return None


class _OrphanClient:
    def pubsub(self) -> _OrphanedShardedPubSub:
        return _OrphanedShardedPubSub()


async def test_a_sharded_cache_subscription_without_a_node_is_a_broken_connection_not_a_busy_loop() -> None:
    """Before, the cache's listener looped on the immediate None without ever yielding: the event loop hung."""
    async def slot_map_loaded() -> None:
        return None

    listener = _Listener(_OrphanClient(), cluster_ready=slot_map_loaded)  # type: ignore[arg-type]
    async with asyncio.timeout(10):
        with pytest.raises(ConnectionError, match="no node of the cluster owns the slot of ns:events"):
            await listener.subscribe("ns:events")




def test_a_cluster_client_handed_over_is_refused_with_what_to_do() -> None:
    if not SUPPORTED:
        return  # no cluster client without sharded pub/sub (test_old_redis_py_is_refused_with_the_version_it_needs)
    from redis.asyncio.cluster import RedisCluster

    client = RedisCluster(host="127.0.0.1", port=free_port())
    with pytest.raises(ConfigurationError, match="redis\\+cluster://host:port"):
        Coordinator(client)  # type: ignore[arg-type]

