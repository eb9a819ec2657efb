"""Clients for a Redis Cluster, built with redis-py's own ``RedisCluster`` (``startup_nodes``).

Routing is redis-py's: the client reads the slot map from the first startup node that answers, sends each command
to the master that owns its keys' slot, follows ``MOVED``/``ASK`` and re-reads the map after a connection error (a
master that died). All keys of one job share a hash tag (see ``runonce.keys``), so each Lua script runs on one node.

Wake-ups use sharded pub/sub (``SPUBLISH``/``SSUBSCRIBE``, Redis >= 7): the message goes only to the node owning
the job's slot, and a waiter listens there (see ``ClusterOps`` in ``runonce.redis_backend``). redis-py has sharded
pub/sub in its asyncio cluster client since 8.0; an older redis-py is refused with :class:`ConfigurationError`
naming that version rather than falling back to broadcast ``PUBLISH`` that a sharded subscriber would never see.

Failure timeline, as seen by a caller: the master of the job's slot dies -> commands and the waiters' subscription
fail with connection errors -> the cluster marks it failed after ``cluster-node-timeout`` and promotes its replica
(a second or two more) -> the next command, after redis-py re-read the slot map, reaches the new master; a waiter
re-subscribes there. Until then the cluster answers ``CLUSTERDOWN``/``TRYAGAIN`` or the slot is not covered:
those count as transient (retried within the caller's budgets). Writes the old master acknowledged but had not yet
replicated are lost (replication is asynchronous), as with Sentinel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import redis
import redis.asyncio.cluster as async_cluster
import redis.cluster as sync_cluster
from redis import exceptions as rexc

from hyperion_lock.connection.urls import ClusterURL

#: The first redis-py whose asyncio cluster client has sharded pub/sub (``ClusterPubSub.ssubscribe``).
MIN_REDIS_PY = "8.0"


def cluster_support_problem() -> str | None:
    """Why this redis-py cannot serve a ``redis+cluster://`` URL (safe to print), or None."""
    pubsub = getattr(async_cluster, "ClusterPubSub", None)
    if pubsub is not None and hasattr(pubsub, "ssubscribe") and hasattr(pubsub, "get_sharded_message"):
        return None
    return (f"redis+cluster:// needs redis-py >= {MIN_REDIS_PY} (sharded pub/sub, SSUBSCRIBE, in "
            f"redis.asyncio.cluster); this is redis-py {redis.__version__}: pip install 'redis>={MIN_REDIS_PY}'")


_Cluster = TypeVar("_Cluster", async_cluster.RedisCluster, sync_cluster.RedisCluster)


def _cluster_client(target: ClusterURL, options: dict[str, Any], node_class: Callable[[str, int], Any],
                    cluster_class: Callable[..., _Cluster]) -> _Cluster:
    """A ``cluster_class`` client for ``target``'s startup nodes (``node_class`` each); no connection is made here."""
    nodes = [node_class(host, port) for host, port in target.nodes]
    return cluster_class(startup_nodes=nodes, **options, **target.node_kwargs())


def async_cluster_client(target: ClusterURL, options: dict[str, Any]) -> async_cluster.RedisCluster:
    """An asyncio ``RedisCluster`` for ``target``'s startup nodes; no connection is made here."""
    return _cluster_client(target, options, async_cluster.ClusterNode, async_cluster.RedisCluster)


def sync_cluster_client(target: ClusterURL, options: dict[str, Any]) -> sync_cluster.RedisCluster:
    """A sync ``RedisCluster`` for ``target``'s startup nodes (see :func:`async_cluster_client`)."""
    return _cluster_client(target, options, sync_cluster.ClusterNode, sync_cluster.RedisCluster)


def is_cluster_client(client: object) -> bool:
    return isinstance(client, async_cluster.RedisCluster | sync_cluster.RedisCluster)


# -- sharded pub/sub, for the coordinator and the cache alike --------------------------------------------------------
def sharded_script(script: str) -> str:
    """``script`` as a Redis Cluster runs it: its wake-ups use ``SPUBLISH`` (which reaches the subscribers on the
    node owning the channel's slot; a broadcast ``PUBLISH`` would never reach a sharded subscriber)."""
    return script.replace("redis.call('PUBLISH'", "redis.call('SPUBLISH'")


_PLAIN_KIND = {"ssubscribe": "subscribe", "smessage": "message"}


async def sharded_subscribe(pubsub: Any, channel: str) -> None:
    """``SSUBSCRIBE`` on the node owning ``channel``'s slot. redis-py skips a channel whose slot no node owns (a
    failover under way): that is a ``ConnectionError``, retried like any broken connection."""
    await pubsub.ssubscribe(channel)
    if not pubsub.node_pubsub_mapping:
        raise ConnectionError(f"no node of the cluster owns the slot of {channel} (a failover under way?)")


async def next_sharded(pubsub: Any, timeout: float) -> dict[str, Any] | None:
    """The next message of a sharded subscription as a plain pub/sub one (type ``subscribe`` or ``message``), or
    None when none came within ``timeout``.

    A broken subscription is a ``ConnectionError``, whatever the sign: no node behind it any more (redis-py would
    then return None at once, and a reading loop would never yield), the node dropping it (``sunsubscribe``: its
    slot moved, or a failover demoted it), or ``MOVED``/``ASK`` in reply to the subscribe (an outdated slot map).
    The caller re-reads the slot map and subscribes again."""
    if not pubsub.node_pubsub_mapping:
        raise ConnectionError("the sharded subscription was dropped: no node serves it any more")
    try:
        message = await pubsub.get_sharded_message(ignore_subscribe_messages=False, timeout=max(0.0, timeout))
    except rexc.ResponseError as exc:
        if isinstance(exc, rexc.AskError) or str(exc).startswith(("MOVED", "ASK")):  # MovedError is an AskError
            raise ConnectionError(f"the sharded subscription was refused: its slot moved ({exc})") from None
        raise
    if message is None:
        return None
    kind = message.get("type")
    kind = kind.decode() if isinstance(kind, bytes) else kind
    if kind == "sunsubscribe":
        raise ConnectionError("the node dropped the sharded subscription (its slot moved to another node)")
    return {**message, "type": _PLAIN_KIND.get(kind, kind)}
