"""Clients for a Sentinel-managed primary, built with redis-py's own ``Sentinel.master_for``.

Failover is redis-py's: a ``SentinelConnectionPool`` asks the Sentinels for the primary's address whenever it opens
a connection, drops idle connections when that address changed, and turns a ``READONLY`` reply (a demoted primary
that still answers) into a ``ConnectionError`` after disconnecting. What this module adds:

* the client owns its Sentinel connections: closing it (``aclose``/``close``) closes its pool *and* the clients
  of the Sentinels, on every redis-py from 4.6 (where ``master_for`` clients do not own their pool) to 8.x;
* a ``MasterNotFoundError`` that says which case it is: no Sentinel answered, the Sentinels that answered do not
  know the service, or they know it but report no healthy primary (a failover under way). It stays a
  ``ConnectionError``, so the coordinator retries it within its budgets like any outage; a Sentinel that refused
  the credentials is an ``AuthenticationError`` instead (retrying cannot fix it).

Failure timeline, as seen by a caller: the primary dies -> commands fail with connection errors -> each reconnect
asks the Sentinels, which keep naming the dead primary until they agree it is down (``down-after-milliseconds``)
and promote a replica (a few seconds more) -> the next connect reaches the new primary. Writes acknowledged by the
old primary but not yet replicated are lost (replication is asynchronous). A manual failover that leaves the old
primary running is different: connections opened before it stay on the old primary, which keeps answering as a
primary until Sentinel reconfigures it (~10 s, Sentinel's INFO period), and whatever is written there meanwhile is
discarded then (measured in tests/integration/test_sentinel_failover.py).
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

import redis
import redis.asyncio as aredis
from redis import exceptions as rexc
from redis import sentinel as sync_sentinel
from redis.asyncio import sentinel as async_sentinel
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry as SyncRetry

from hyperion_lock.connection.urls import SentinelURL, host_text

_AUTH_FAILURE = re.compile(r"AuthenticationError|NOAUTH|WRONGPASS|invalid password|invalid username")


def _address(client: Any) -> str:
    kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {}) or {}
    return f"{host_text(str(kwargs.get('host', '?')))}:{kwargs.get('port', '?')}"


def master_not_found(
    service: str, sentinels: list[Any], error_text: str, reported_down: bool,
    not_found: type[Exception] = sync_sentinel.MasterNotFoundError,
) -> Exception:
    """The error for a failed primary lookup, in words an operator can act on.

    redis-py names each Sentinel that failed (``<its repr> - <error>``) in the ``MasterNotFoundError`` text; the
    others answered. Addresses only: neither that text nor the Sentinels' replies are quoted (no secrets).
    """
    failed = [s for s in sentinels if str(s) in error_text]
    answered = [_address(s) for s in sentinels if s not in failed]
    silent = ", ".join(_address(s) for s in failed)
    if failed and _AUTH_FAILURE.search(error_text) and not reported_down:
        return rexc.AuthenticationError(
            f"Sentinel at {silent} refused the credentials: give them as sentinel_username/sentinel_password in "
            "the URL's query (the user and password before '@' are for the data nodes)"
        )
    if reported_down:
        text = (f"Sentinel knows service {service!r} but reports no healthy primary for it (a failover may be "
                "under way, or too few Sentinels agree)")
    elif not answered:
        return not_found(
            f"no Sentinel at {silent} answered (connection refused, reset or timed out)"
        )
    else:
        text = (f"Sentinel at {', '.join(answered)} does not know service {service!r}: check the service name in "
                "the URL against SENTINEL MASTERS")
    return not_found(text + (f"; no answer from {silent}" if silent else ""))


class _Explained:
    """Records what the Sentinels said about a service during one lookup (``check_master_state`` is the hook
    redis-py calls for every Sentinel that knows the service)."""

    _down: set[str]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._down = set()

    def check_master_state(self, state: Any, service_name: str) -> bool:
        ok: bool = super().check_master_state(state, service_name)  # type: ignore[misc]
        if not ok:
            self._down.add(service_name)
        return ok


class SyncSentinel(_Explained, sync_sentinel.Sentinel):
    def discover_master(self, service_name: str) -> Any:
        self._down.discard(service_name)
        try:
            return super().discover_master(service_name)
        except sync_sentinel.MasterNotFoundError as exc:
            raise master_not_found(service_name, list(self.sentinels), str(exc),
                                   service_name in self._down) from None


class AsyncSentinel(_Explained, async_sentinel.Sentinel):
    async def discover_master(self, service_name: str) -> Any:
        self._down.discard(service_name)
        try:
            return await super().discover_master(service_name)
        except async_sentinel.MasterNotFoundError as exc:
            raise master_not_found(service_name, list(self.sentinels), str(exc), service_name in self._down,
                                   async_sentinel.MasterNotFoundError) from None


class AsyncSentinelRedis(aredis.Redis):
    """``redis.asyncio.Redis`` for a Sentinel-managed primary that also closes its pool and its Sentinel clients."""

    sentinel_clients: list[Any]

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        parent = getattr(super(), "aclose", None)
        try:
            if parent is not None:  # redis-py >= 5.0.1
                await parent(close_connection_pool=True)
            else:
                await super().close(close_connection_pool=True)
        finally:
            for client in getattr(self, "sentinel_clients", []):
                closer = getattr(client, "aclose", None) or client.close
                await closer()


class SyncSentinelRedis(redis.Redis):
    """``redis.Redis`` for a Sentinel-managed primary that also closes its pool and its Sentinel clients."""

    sentinel_clients: list[Any]

    def close(self) -> None:
        try:
            super().close()
            self.connection_pool.disconnect()  # redis-py < 5: a master_for client does not own its pool
        finally:
            for client in getattr(self, "sentinel_clients", []):
                client.close()


_Client = TypeVar("_Client", AsyncSentinelRedis, SyncSentinelRedis)


def _sentinel_client(target: SentinelURL, options: dict[str, Any], manager_class: type[AsyncSentinel | SyncSentinel],
                     retry_class: type[AsyncRetry | SyncRetry], redis_class: type[_Client]) -> _Client:
    """A ``redis_class`` client for ``target``'s primary, looked up by a ``manager_class``; the Sentinel queries
    and the client's commands get ``retry_class`` retries (see :func:`async_sentinel_client`)."""
    sentinel_kwargs = {**_sentinel_kwargs(target, options), "retry": retry_class(NoBackoff(), 0)}
    # Any: the sync and the asyncio master_for each take only their own side's redis_class.
    manager: Any = manager_class(list(target.sentinels), sentinel_kwargs=sentinel_kwargs)
    options = {"retry": retry_class(NoBackoff(), 1), **options}
    client = manager.master_for(target.service, redis_class=redis_class, **options, **target.data_kwargs())
    assert isinstance(client, redis_class)
    client.sentinel_clients = list(manager.sentinels)
    return client


def async_sentinel_client(target: SentinelURL, options: dict[str, Any]) -> AsyncSentinelRedis:
    """An asyncio client for ``target``'s primary. ``options`` (timeouts, handshake) apply to the Sentinels too;
    no connection is made here.

    Retries inside redis-py are cut down: none for a Sentinel query, one immediate retry of a command whose pooled
    connection died (a failover closes them all). redis-py's defaults (up to 3 retries with exponential backoff, each
    asking every Sentinel again) would multiply, and a first connect could outlast the caller's whole budget
    before reporting anything; the caller's own retry loop (``with_retries``, the renewal loop) paces the rest."""
    return _sentinel_client(target, options, AsyncSentinel, AsyncRetry, AsyncSentinelRedis)


def sync_sentinel_client(target: SentinelURL, options: dict[str, Any]) -> SyncSentinelRedis:
    """A sync client for ``target``'s primary (see :func:`async_sentinel_client`)."""
    return _sentinel_client(target, options, SyncSentinel, SyncRetry, SyncSentinelRedis)


def _sentinel_kwargs(target: SentinelURL, options: dict[str, Any]) -> dict[str, Any]:
    """The Sentinels' own connection options: the timeouts and handshake of the data connections (not pool or
    decoding options), and the Sentinel credentials. The Sentinels are spoken to in plain TCP."""
    own = {k: v for k, v in options.items() if k.startswith("socket_") or k in ("protocol", "driver_info",
                                                                                  "lib_name", "lib_version")}
    return {**own, **target.sentinel_auth()}


def is_sentinel_pool(pool: object) -> bool:
    return isinstance(pool, sync_sentinel.SentinelConnectionPool | async_sentinel.SentinelConnectionPool)


def describe_sentinel_pool(pool: Any, tls: bool) -> str:
    """``redis+sentinel://h1:26379,h2:26379/mymaster/0`` for a client made by ``master_for`` (no credentials)."""
    manager = getattr(pool, "sentinel_manager", None)
    addresses = ",".join(_address(s) for s in getattr(manager, "sentinels", []))
    db = (getattr(pool, "connection_kwargs", {}) or {}).get("db", 0)
    return f"{'rediss' if tls else 'redis'}+sentinel://{addresses}/{pool.service_name}/{db}"
