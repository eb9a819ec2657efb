"""Turning a URL or a ready client into something the coordinator can use, and naming what went wrong."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any, TypeVar

import redis
import redis.asyncio as aredis
from redis import connection as rconn
from redis import exceptions as rexc

from hyperion_lock.connection.cluster import (
    async_cluster_client,
    cluster_support_problem,
    is_cluster_client,
    sync_cluster_client,
)
from hyperion_lock.connection.sentinel import (
    async_sentinel_client,
    describe_sentinel_pool,
    is_sentinel_pool,
    sync_sentinel_client,
)
from hyperion_lock.connection.urls import (
    CLUSTER_SCHEMES,
    SENTINEL_SCHEMES,
    URL_FORMS,
    is_cluster_url,
    is_sentinel_url,
    parse_cluster_url,
    parse_sentinel_url,
    redact_url,
    redis_url_problem,
)
from hyperion_lock.errors import (
    ConfigurationError,
    HyperionLockError,
    RedisAuthError,
    RedisDatabaseIndexError,
    RedisPermissionError,
    RedisTLSError,
    RedisUnavailableError,
)

T = TypeVar("T")

#: Errors after which trying again later can succeed (server restarting, network blip, paused server, a failover:
#: ``READONLY`` from a primary demoted to a replica -- a Sentinel-managed client also drops that connection and asks
#: the Sentinels again; a plain URL may point at an address that moves to the new primary).
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    rexc.ConnectionError,
    rexc.ReadOnlyError,
    rexc.TimeoutError,
    rexc.BusyLoadingError,
    rexc.ClusterDownError,  # CLUSTERDOWN: a master of the cluster failed and no replica was promoted yet
    rexc.TryAgainError,  # TRYAGAIN: a slot being migrated
    rexc.SlotNotCoveredError,  # redis-py's slot map names no node for the slot (a failover under way)
    ConnectionError,
    TimeoutError,
    OSError,
)

#: OpenSSL reasons meaning "the other side does not speak TLS" (rediss:// against a plain port).
_NOT_TLS_REASONS = frozenset({
    "WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "UNKNOWN_PROTOCOL", "HTTP_REQUEST",
})
_ACL_COMMANDS = "+evalsha +eval +script +subscribe +unsubscribe +publish +ping +get +set +del +incr +pexpire +pttl"


def as_text(value: Any) -> str | None:
    """A Redis reply as text, whether the client decodes responses or not."""
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def _server(where: str) -> str:
    """``Redis at <where>``, whether or not the caller's description already starts with "Redis at"."""
    return where if where.startswith("Redis at ") else f"Redis at {where}"


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it was raised from or during (redis-py wraps ssl and socket errors that way)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 10:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def is_auth_error(exc: BaseException) -> bool:
    if isinstance(exc, rexc.AuthenticationError | rexc.AuthenticationWrongNumberOfArgsError):
        return True
    text = str(exc)
    return isinstance(exc, rexc.ResponseError) and (
        text.startswith(("NOAUTH", "WRONGPASS"))
        or "invalid password" in text
        or "invalid username" in text
        or "unauthenticated" in text  # Redis 7 cuts off long commands from clients that did not AUTH
    )


def is_permission_error(exc: BaseException) -> bool:
    """The server's ``NOPERM`` reply (redis-py >= 4.x raises NoPermissionError; older ones a ResponseError)."""
    no_permission = getattr(rexc, "NoPermissionError", ())
    return isinstance(exc, no_permission) or (isinstance(exc, rexc.ResponseError) and str(exc).startswith("NOPERM"))


def is_db_index_error(exc: BaseException) -> bool:
    """``SELECT n`` refused: ``DB index is out of range`` (Redis), ``invalid DB index`` (older servers, proxies)."""
    text = str(exc).lower()
    return isinstance(exc, rexc.ResponseError | rexc.ConnectionError) and (
        "db index is out of range" in text or "invalid db index" in text or "invalid database" in text
    )


def tls_problem(exc: BaseException) -> str | None:
    """``"certificate"`` when the server's certificate was refused, ``"not-tls"`` when the other side does not
    speak TLS, None when no TLS failure is involved (or one that may pass, like a handshake cut by a restart)."""
    if not isinstance(exc, TRANSIENT_ERRORS):
        return None
    for cause in _causes(exc):
        if isinstance(cause, ssl.SSLCertVerificationError):
            return "certificate"
        if isinstance(cause, ssl.SSLError) and (getattr(cause, "reason", None) or "") in _NOT_TLS_REASONS:
            return "not-tls"
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return "certificate"
    return "not-tls" if any(reason in text for reason in _NOT_TLS_REASONS) else None


def auth_error(exc: BaseException, where: str, key: str | None, generation: str | None) -> RedisAuthError:
    return RedisAuthError(
        f"{_server(where)} refused the credentials ({type(exc).__name__}: {exc}); "
        "check the password and user in HYPERION_LOCK_REDIS_URL",
        key=key,
        generation=generation,
    )


def _db_index_of(where: str) -> str | None:
    match = re.search(r"[?&]db=(\d+)|/(\d+)$", where)
    return (match.group(1) or match.group(2)) if match else None


def db_index_error(
    exc: BaseException, where: str, key: str | None, generation: str | None
) -> RedisDatabaseIndexError:
    index = _db_index_of(where)
    which = f"database {index}" if index is not None else "the database number in the URL"
    return RedisDatabaseIndexError(
        f"{_server(where)} has no {which} (SELECT refused: {exc}); use a database index below the server's "
        "'databases' setting (16 by default, so 0-15; Redis Cluster only has 0) in HYPERION_LOCK_REDIS_URL",
        key=key,
        generation=generation,
    )


def _missing_permission(text: str, prefix: str) -> str:
    command = re.search(r"'([^']+)' command", text)
    if command:
        return f"the command {command.group(1).upper()} (grant +{command.group(1).lower()})"
    if "channel" in text:
        return f"the pub/sub channels {prefix}:* (grant &{prefix}:*; Redis 7 users start with resetchannels)"
    if "key" in text:
        return f"the keys {prefix}:* (grant ~{prefix}:*)"
    return "a command, key or channel"


def permission_error(
    exc: BaseException, where: str, key: str | None, generation: str | None, prefix: str | None = None
) -> RedisPermissionError:
    p = prefix or "<key prefix>"
    return RedisPermissionError(
        f"{_server(where)} denied the ACL user {_missing_permission(str(exc), p)} ({exc}). The user needs "
        f"keys ~{p}:*, channels &{p}:* and the commands EVALSHA, EVAL, SCRIPT, SUBSCRIBE, UNSUBSCRIBE, PUBLISH, "
        f"PING and, inside the Lua scripts, GET SET DEL INCR PEXPIRE PTTL: "
        f"ACL SETUSER <user> ~{p}:* &{p}:* {_ACL_COMMANDS}",
        key=key,
        generation=generation,
    )


def tls_error(
    exc: BaseException, problem: str, where: str, key: str | None, generation: str | None
) -> RedisTLSError:
    if problem == "certificate":
        detail = next((c.verify_message for c in _causes(exc) if isinstance(c, ssl.SSLCertVerificationError)), exc)
        text = (
            f"TLS with {_server(where)} failed: the server's certificate was not accepted ({detail}). Check the CA "
            "file (add ?ssl_ca_certs=/path/to/ca.pem to the rediss:// URL if the server's certificate is not "
            "signed by a system-trusted CA) and that the host name in the URL is one the certificate names"
        )
    else:
        text = (
            f"TLS with {_server(where)} failed: that port does not speak TLS ({exc}). Use redis:// for a plain "
            "server, or the server's tls-port for rediss://"
        )
    return RedisTLSError(text, key=key, generation=generation)


def redis_error(
    exc: BaseException,
    *,
    where: str,
    key: str | None,
    generation: str | None,
    prefix: str | None = None,
) -> HyperionLockError | None:
    """The clear, specific error for a Redis failure that retrying cannot fix, or None when it may be transient.

    Wrong credentials -> :class:`RedisAuthError`; a missing ACL permission -> :class:`RedisPermissionError`; a
    database index the server does not have -> :class:`RedisDatabaseIndexError`; an untrusted certificate or TLS
    spoken to a plain port -> :class:`RedisTLSError`. Anything else (refused or reset connections, timeouts,
    a server still loading) returns None: the caller decides whether to retry or re-raise; so does an error
    of this package (already specific).
    """
    if isinstance(exc, HyperionLockError):
        return None
    if is_auth_error(exc):
        return auth_error(exc, where, key, generation)
    if is_permission_error(exc):
        return permission_error(exc, where, key, generation, prefix)
    if is_db_index_error(exc):
        return db_index_error(exc, where, key, generation)
    problem = tls_problem(exc)
    if problem is not None:
        return tls_error(exc, problem, where, key, generation)
    return None


def is_transient(exc: BaseException) -> bool:
    """A network-level failure that may pass; the configuration errors :func:`redis_error` names are not."""
    if isinstance(exc, rexc.RedisClusterException) and _CLUSTER_UNREACHABLE.search(str(exc)):
        return True
    return isinstance(exc, TRANSIENT_ERRORS) and redis_error(exc, where="", key=None, generation=None) is None


#: redis-py's cluster client when no startup node answered (a plain ``RedisClusterException``, not a connection
#: error): as transient as a refused connection.
_CLUSTER_UNREACHABLE = re.compile(r"cannot be connected|reachable node|failed to resolve")


@cache
def _handshake_kwargs() -> dict[str, Any]:
    """Connection options that skip handshake round trips, for the redis-py version installed.

    redis-py >= 5 sends CLIENT SETINFO on every new connection unless told not to (``driver_info=None`` since 7,
    ``lib_name=None, lib_version=None`` before) and accepts ``protocol``; 4.6 has neither and sends nothing.
    """
    connection_class = getattr(rconn, "AbstractConnection", rconn.Connection)
    params = inspect.signature(connection_class.__init__).parameters
    kwargs: dict[str, Any] = {}
    if "driver_info" in params:
        kwargs["driver_info"] = None
    elif "lib_name" in params:
        kwargs.update(lib_name=None, lib_version=None)
    if "protocol" in params:
        kwargs["protocol"] = 2  # RESP2: no HELLO handshake per connection (pub/sub has its own connection)
    return kwargs


def client_kwargs(connect_timeout: float, socket_timeout: float | None) -> dict[str, Any]:
    """Client options: ``socket_connect_timeout`` bounds the TCP (and TLS) connect, ``socket_timeout`` every
    read; ``None`` means no read timeout (only sensible under an outer deadline)."""
    return {"socket_connect_timeout": connect_timeout, "socket_timeout": socket_timeout, **_handshake_kwargs()}


_URL_FORMS = URL_FORMS


def _from_url(
    factory: Callable[..., T], url: str, connect_timeout: float, socket_timeout: float | None, options: dict[str, Any]
) -> T:
    # Never put the parser's own message in the error: urllib quotes the "port" it could not read, and with an
    # unencoded '/' in the password that port is a piece of the password.
    problem = redis_url_problem(url)
    if problem is not None:
        raise ConfigurationError(f"invalid Redis URL {redact_url(url)!r}: {problem}. {_URL_FORMS}")
    try:
        return factory(url, **client_kwargs(connect_timeout, socket_timeout), **options)
    except ConfigurationError:  # already says what is wrong (a redis-py too old for the URL)
        raise
    except (ValueError, TypeError) as exc:
        option = re.search(r"keyword argument '(\w+)'", str(exc))
        reason = f"unknown option {option.group(1)!r}" if option else f"redis-py refused it ({type(exc).__name__})"
        raise ConfigurationError(f"invalid Redis URL {redact_url(url)!r}: {reason}. {_URL_FORMS}") from None


def _cluster_target(url: str) -> Any:
    """The parsed ``redis+cluster://`` URL; ConfigurationError when this redis-py cannot serve it."""
    problem = cluster_support_problem()
    if problem is not None:
        raise ConfigurationError(f"{problem} (URL {redact_url(url)!r})")
    return parse_cluster_url(url)


def _factory(url: str, sentinel: Callable[..., Any], cluster: Callable[..., Any],
             plain: Callable[..., Any]) -> Callable[..., Any]:
    """The client builder for ``url``'s scheme (Sentinel, Cluster or a plain redis-py URL), called as
    ``factory(url, **options)``; the same choice for the sync and the asyncio flavour."""
    if is_sentinel_url(url):
        return lambda u, **kw: sentinel(parse_sentinel_url(u), kw)
    if is_cluster_url(url):
        return lambda u, **kw: cluster(_cluster_target(u), kw)
    return plain


def async_client_from_url(
    url: str, *, connect_timeout: float, socket_timeout: float | None, **options: Any
) -> aredis.Redis:
    """An asyncio client for ``url``; a malformed URL raises :class:`ConfigurationError` (password redacted).

    ``redis+sentinel://`` / ``rediss+sentinel://`` URLs give a client of the primary the Sentinels name, built by
    redis-py's ``Sentinel.master_for`` (see :mod:`.sentinel`); closing it closes the Sentinel connections too.
    ``redis+cluster://`` / ``rediss+cluster://`` URLs give redis-py's ``redis.asyncio.cluster.RedisCluster`` of
    the startup nodes (see :mod:`.cluster`; it is not a ``redis.asyncio.Redis`` but has the same commands).
    ``options`` are further client options (``retry``, ``decode_responses``, ``max_connections``, ...).
    """
    factory = _factory(url, async_sentinel_client, async_cluster_client, aredis.Redis.from_url)
    return _from_url(factory, url, connect_timeout, socket_timeout, options)  # type: ignore[no-any-return]


def sync_client_from_url(
    url: str, *, connect_timeout: float, socket_timeout: float | None, **options: Any
) -> redis.Redis:
    """A sync client for ``url`` (see :func:`async_client_from_url`)."""
    factory = _factory(url, sync_sentinel_client, sync_cluster_client, redis.Redis.from_url)
    return _from_url(factory, url, connect_timeout, socket_timeout, options)  # type: ignore[no-any-return]


def describe_client(client: object) -> str:
    """A password-free description of a client's server, for logs."""
    if is_cluster_client(client):
        nodes = getattr(getattr(client, "nodes_manager", None), "startup_nodes", {}) or {}
        return f"redis+cluster://{','.join(nodes) or '?'}"
    pool = getattr(client, "connection_pool", None)
    kwargs: dict[str, Any] = getattr(pool, "connection_kwargs", {}) or {}
    if "path" in kwargs:
        return f"unix://{kwargs['path']}?db={kwargs.get('db', 0)}"
    if is_sentinel_pool(pool):
        return describe_sentinel_pool(pool, _uses_tls(pool))
    scheme = "rediss" if _uses_tls(pool) else "redis"
    return f"{scheme}://{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"


def _uses_tls(pool: object) -> bool:
    connection_class = getattr(pool, "connection_class", None)
    return isinstance(connection_class, type) and "SSL" in connection_class.__name__


def _scheme_in(where: str) -> str | None:
    match = re.search(r"\b(rediss?\+(?:sentinel|cluster)|rediss|redis|unix)://", where)
    return match.group(1) if match else None


def _sentinel_hints(where: str) -> str:
    match = re.search(r"sentinel://(?:[^@/]*@)?([^/?]*)/([^/?]*)", where)
    addresses, service = (match.group(1), match.group(2)) if match else ("<sentinels>", "<service>")
    first = addresses.split(",")[0]
    port = first.rpartition(":")[2] if ":" in first else "26379"
    return (
        f"Check that the Sentinels at {addresses} answer and monitor the service {service!r} "
        f"(redis-cli -p {port} SENTINEL get-master-addr-by-name {service}), that the primary they name is reachable "
        "from here (its announced address), and, during a failover, that a replica could be promoted"
    )


def _cluster_hints(where: str) -> str:
    match = re.search(r"cluster://(?:[^@/]*@)?([^/?]*)", where)
    addresses = match.group(1) if match else "<nodes>"
    first = addresses.split(",")[0]
    return (
        f"Check that the startup nodes {addresses} answer and that the cluster is healthy (redis-cli -h "
        f"{first.rpartition(':')[0] or first} -p {first.rpartition(':')[2]} CLUSTER INFO: cluster_state:ok), that the "
        "addresses the nodes announce (CLUSTER NODES) are reachable from here, and, during a failover, that the "
        "failed master has a replica that could be promoted"
    )


def unreachable_hints(where: str) -> str:
    """What to check when a server at ``where`` does not answer; the TLS hint depends on the scheme used, and a
    Sentinel URL gets the Sentinel's own checks."""
    scheme = _scheme_in(where)
    if scheme in SENTINEL_SCHEMES:
        return _sentinel_hints(where)
    if scheme in CLUSTER_SCHEMES:
        return _cluster_hints(where)
    if scheme == "rediss":
        tls = "a plain (non-TLS) Redis never answers a TLS handshake: use redis:// for it"
    elif scheme == "unix":
        tls = "the socket path and its permissions"
    else:
        tls = "a TLS-only server (tls-port) drops plain connections: use rediss:// for it"
    return f"Check the host and port, a paused, overloaded or non-Redis server at that address, and TLS vs plain: {tls}"


def _read_only_hint(last: BaseException | None) -> str:
    if not isinstance(last, rexc.ReadOnlyError):
        return ""
    return (" The server answered READONLY: it is a replica. Point the URL at the primary, or use "
            "redis+sentinel://host:port/service_name so that the client follows the primary. ")


def _unavailable(
    call: RedisCall, waited: float, attempts: int, last: BaseException | None, *, timed_out: bool
) -> RedisUnavailableError:
    last_text = f"last error {type(last).__name__}: {last}" if last is not None else ""
    if timed_out:
        last_text = "no reply to the last attempt" + (f"; before it, {last_text}" if last_text else "")
    return RedisUnavailableError(
        f"could not {call.what}: {_server(call.where)} did not answer for {waited:.1f} s "
        f"({attempts} attempt{'' if attempts == 1 else 's'}; {last_text}).{_read_only_hint(last) or ' '}"
        f"{unreachable_hints(call.where)}",
        key=call.key,
        generation=call.generation,
    )


#: With less than this left of an overall budget, no further attempt is started (the backoff sleep ends at the
#: deadline, and an attempt given a few microseconds would only report a misleading "no reply").
_MIN_ATTEMPT = 0.01


class _BudgetSpent(Exception):
    """The attempt in flight was cancelled because the overall budget ran out."""


async def _attempt(action: Callable[[], Awaitable[T]], remaining: float | None) -> T:
    if remaining is None:
        return await action()
    deadline = asyncio.timeout(remaining)
    try:
        async with deadline:
            return await action()
    except TimeoutError:
        if deadline.expired():
            raise _BudgetSpent from None
        raise


@dataclass(frozen=True)
class RedisCall:
    """What :func:`with_retries` tries, against which server, for which job: the words of the errors
    it raises.

    ``where`` is a password-free description of the server (a redacted URL); ``prefix`` (the key
    prefix) only makes an ACL error name the exact key and channel patterns to grant.
    """

    what: str
    where: str
    key: str | None = None
    generation: str | None = None
    prefix: str | None = None


@dataclass(frozen=True)
class RetryPolicy:
    """How long :func:`with_retries` keeps trying, and which failures it retries.

    ``budget`` seconds, counted from the first failure or, with ``overall``, from the call's start
    (and then also bounding the attempt in flight); backoff from 0.05 s doubling up to
    ``max_backoff``; ``transient`` says which failures may pass (the rest raise at once); ``clock``
    and ``sleep`` are injected for tests.
    """

    budget: float
    overall: bool = False
    max_backoff: float = 2.0
    transient: Callable[[BaseException], bool] = is_transient
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep


async def with_retries(
    action: Callable[[], Awaitable[T]],
    call: RedisCall,
    policy: RetryPolicy,
    on_retry: Callable[[BaseException, int], None] | None = None,
) -> T:
    """Run ``action`` until it succeeds, retrying transient Redis errors with capped exponential
    backoff.

    Timeline: a failure that retrying cannot fix (see :func:`redis_error`: credentials, ACL,
    database index, TLS) raises its specific error at once; any other failure that is not
    ``policy.transient`` is re-raised as it is. Transient failures are retried after 0.05 s, 0.1 s,
    ... up to ``policy.max_backoff`` (``on_retry(error, attempt)`` is called before each wait).
    :class:`RedisUnavailableError` (naming ``call.where`` and what to check) ends it once
    ``policy.budget`` seconds have passed -- counted from the first failure, or with
    ``policy.overall`` from this call's start, and then also bounding the attempt in flight (it is
    cancelled when the budget runs out), so a server that accepts connections and never answers
    costs ``budget`` seconds, not the socket timeout times the attempts.
    """
    budget, clock = policy.budget, policy.clock
    started = clock()
    first_failure: float | None = started if policy.overall else None
    delay = 0.05
    attempt = 0
    last: BaseException | None = None
    while True:
        remaining = budget - (clock() - started) if policy.overall else None
        if remaining is not None and remaining < _MIN_ATTEMPT and last is not None:
            raise _unavailable(call, clock() - started, attempt, last, timed_out=False)
        attempt += 1
        try:
            return await _attempt(action, remaining)
        except _BudgetSpent:
            raise _unavailable(call, clock() - started, attempt, last, timed_out=True) from None
        except Exception as exc:
            error = redis_error(exc, where=call.where, key=call.key, generation=call.generation,
                                prefix=call.prefix)
            if error is not None:
                raise error from None
            if not policy.transient(exc):
                raise
            last = exc
        now = clock()
        first_failure = now if first_failure is None else first_failure
        if now - first_failure >= budget:
            raise _unavailable(call, now - first_failure, attempt, last, timed_out=False) from None
        if on_retry is not None:
            on_retry(last, attempt)
        await policy.sleep(min(delay, max(0.0, budget - (now - first_failure))))
        delay = min(delay * 2, policy.max_backoff)


def async_closer(resource: Any) -> Callable[[], Awaitable[object]]:
    """The coroutine function that closes a ``redis.asyncio`` pub/sub, or a client its caller owns (made from a
    URL) together with its connection pool, whichever redis-py is installed.

    redis-py >= 5.0.1 has ``aclose`` (``close`` is a deprecated alias there, and warns) and a client made by
    ``from_url`` closes its own pool; before, only ``close`` exists and such a client leaves its pool, and so
    its sockets, open unless told ``close_connection_pool=True``.
    """
    closer = getattr(resource, "aclose", None)
    if callable(closer):
        return closer  # type: ignore[no-any-return]
    if isinstance(resource, aredis.Redis):
        return functools.partial(resource.close, close_connection_pool=True)
    return resource.close  # type: ignore[no-any-return]


async def aclose(resource: Any) -> None:
    """Close a ``redis.asyncio`` pub/sub, or a client the caller owns with its pool (see :func:`async_closer`)."""
    await async_closer(resource)()


async def close_quietly(closer: Callable[[], Awaitable[object]]) -> None:
    """Close a client or pub/sub; errors of a dead connection do not matter any more. (redis-py bounds the wait
    for a closing socket by its socket timeouts, so no extra timeout task is needed here.)"""
    with contextlib.suppress(Exception):
        await closer()
