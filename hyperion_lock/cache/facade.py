"""``Cache``, the public object: caching functions, endpoints and explicit keys across workers; invalidation,
counts and the worker's lifecycle. It checks and turns its arguments into a :class:`Spec` and an entry's
identity, and hands the lookup to its :class:`~hyperion_lock.cache.engine.Engine` (what happens on a hit, a
miss, a wait or a Redis failure is told there and in :mod:`.lookup`).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import re
import time
import typing
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import fields, replace
from typing import Any, Literal, TypeVar, overload

import redis as _redis
import redis.asyncio as aredis

from hyperion_lock.cache.codec import Codec, JsonCodec, PickleCodec, return_type
from hyperion_lock.cache.engine import Engine
from hyperion_lock.cache.keys import CacheKeys, identity, key_identity, typed
from hyperion_lock.cache.store import client_for_cache
from hyperion_lock.cache.types import (
    _UNSET,
    CacheSettings,
    Result,
    Spec,
)
from hyperion_lock.errors import ConfigurationError
from hyperion_lock.settings import ENV_PREFIX, Settings, name_part

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])
RedisLike = aredis.Redis | _redis.Redis

log = logging.getLogger(__name__)  # every line of a Cache, its engine's too, unless it is given a logger


class Cache:
    """Caches results of functions and endpoints across every worker and host sharing a Redis.

    ``redis`` is a URL, a ``redis.asyncio.Redis`` or ``redis.Redis`` (its connection settings are used for
    private per-event-loop clients), or ``None``: then ``settings.redis_url`` (``HYPERION_LOCK_REDIS_URL``), and
    without one this process's memory. Keyword ``overrides`` replace :class:`CacheSettings` fields.

    ``key_secret`` (``HYPERION_LOCK_CACHE_KEY_SECRET``, >= 16 bytes) keys the hashes that stand for header, cookie
    and credential values in key names (default: a random key per namespace, kept in Redis).
    ``credential_headers`` (``HYPERION_LOCK_CACHE_CREDENTIAL_HEADERS``) names headers that identify who asks,
    besides ``Authorization``, ``Proxy-Authorization`` and ``Cookie``: a request carrying one is never answered
    from the shared cache by an endpoint whose key does not include it.
    """

    def __init__(
        self,
        redis: RedisLike | str | None = None,
        *,
        settings: Settings | None = None,
        cache_settings: CacheSettings | None = None,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
        key_secret: bytes | str | None = None,
        credential_headers: Iterable[str] | None = None,
        **overrides: Any,
    ) -> None:
        self.settings = settings if settings is not None else Settings.from_env()
        base = cache_settings if cache_settings is not None else CacheSettings.from_env()
        overrides = {k: v for k, v in overrides.items() if v is not None}  # None: keep the setting
        unknown = set(overrides) - {f.name for f in fields(CacheSettings)}
        if unknown:
            raise ConfigurationError(f"unknown cache setting(s): {', '.join(sorted(unknown))}")
        self.cache_settings = replace(base, **overrides) if overrides else base
        if redis is not None and not isinstance(redis, str | aredis.Redis | _redis.Redis):
            raise ConfigurationError(
                f"redis must be a URL, a redis.asyncio.Redis, a redis.Redis or None, not {type(redis).__name__}"
            )
        self._source: RedisLike | str | None = redis if redis is not None else self.settings.redis_url
        if isinstance(self._source, str):
            client_for_cache(self._source, 1.0)  # validate the URL now (no connection is made)
        self.log = logger or log
        self._engine = Engine(self._source, self.settings, self.cache_settings, self.log, clock,
                              _key_secret(key_secret))
        self.credential_headers = _credential_headers(credential_headers)

    # -- description ----------------------------------------------------------------------------------------------
    @property
    def uses_redis(self) -> bool:
        return self._source is not None

    def describe(self) -> str:
        return self._engine.describe()

    def __repr__(self) -> str:
        return f"Cache({self.describe()!r})"

    def _keys(self, namespace: str) -> CacheKeys:
        return self._engine.keys(namespace)

    def _spec(self, namespace: str, *, ttl: float, codec: Codec | None = None, **options: Any) -> Spec:
        unknown = set(options) - {f.name for f in fields(Spec)}
        if unknown:
            raise ConfigurationError(f"unknown cache option(s) for {namespace!r}: {', '.join(sorted(unknown))}")
        return Spec(self._keys(namespace), ttl=ttl, codec=codec or JsonCodec(), **options)

    # -- explicit API -----------------------------------------------------------------------------------------------
    @overload
    async def get_or_compute(
        self, namespace: str, key: str | Mapping[str, Any], compute: Callable[[], Awaitable[T]], *, ttl: float,
        tags: Iterable[str] = (), returns: Any = Any, **options: Any,
    ) -> T: ...

    @overload
    async def get_or_compute(
        self, namespace: str, key: str | Mapping[str, Any], compute: Callable[[], T], *, ttl: float,
        tags: Iterable[str] = (), returns: Any = Any, **options: Any,
    ) -> T: ...

    async def get_or_compute(
        self,
        namespace: str,
        key: str | Mapping[str, Any],
        compute: Callable[[], Any],
        *,
        ttl: float,
        tags: Iterable[str] = (),
        returns: Any = Any,
        **options: Any,
    ) -> Any:
        """The cached value of ``key`` in ``namespace``, computing it with ``compute()`` (async or sync, run in a
        thread) in one caller across all workers when it is missing. ``returns`` is the value's type, for
        decoding hits back into it. ``options``: the fields of :class:`Spec` (``stale``, ``refresh_ahead``,
        ``cache_errors``, ``max_size``, ``codec``...)."""
        spec = self._spec(namespace, ttl=ttl, codec=options.pop("codec", None) or JsonCodec(returns), **options)
        result = await self._lookup(spec, key_identity(key), tuple(tags), _as_async(compute))
        return self._value_of(spec, result)

    def get_or_compute_sync(
        self,
        namespace: str,
        key: str | Mapping[str, Any],
        compute: Callable[[], T],
        *,
        ttl: float,
        tags: Iterable[str] = (),
        returns: Any = Any,
        **options: Any,
    ) -> T:
        """Blocking twin of :meth:`get_or_compute` for sync code: ``compute`` runs in the calling thread."""
        spec = self._spec(namespace, ttl=ttl, codec=options.pop("codec", None) or JsonCodec(returns), **options)
        result = self._lookup_sync(spec, key_identity(key), tuple(tags), compute)
        return typing.cast(T, self._value_of(spec, result))

    def _value_of(self, spec: Spec, result: Result) -> Any:
        return result.value if result.value is not _UNSET else spec.codec.decode(result.payload)

    # -- decorator --------------------------------------------------------------------------------------------------
    def cached(
        self,
        namespace: str | None = None,
        *,
        ttl: float,
        tags: Iterable[str] | Callable[..., Iterable[str]] = (),
        key_args: Iterable[str] | None = None,
        exclude: Iterable[str] = (),
        codec: Literal["json", "pickle"] = "json",
        signing_key: bytes | str | None = None,
        **options: Any,
    ) -> Callable[[F], F]:
        """Cache an async or sync function. Its key is its module and name plus its arguments by name (defaults
        applied), each with its type (``f(1)`` and ``f("1")`` are two entries); arguments whose values cannot
        identify a call (a session, a request, a client) are left out, and so are those in ``exclude``;
        ``key_args`` names the only ones to use. ``tags``: fixed tags or a function of the arguments (by name)
        returning them. Hits are decoded through the return annotation. ``fn.invalidate(*args, **kwargs)``
        drops the entry of exactly that call (awaitable for an async function, blocking for a sync one)."""

        def decorate(fn: F) -> F:
            spec, ident_of, tags_of = self._function_spec(fn, namespace, ttl, tags, key_args, exclude, codec,
                                                          signing_key, options)
            if inspect.iscoroutinefunction(fn):
                @functools.wraps(fn)
                async def wrapper(*args: Any, **kwargs: Any) -> Any:
                    bound = ident_of(args, kwargs)
                    result = await self._lookup(spec, bound[0], tags_of(bound[1]), lambda: fn(*args, **kwargs))
                    return self._value_of(spec, result)

                async def invalidate(*args: Any, **kwargs: Any) -> int:
                    ident = ident_of(args, kwargs)[0]
                    return await self._engine.admin(lambda s: s.invalidate_key(spec.keys, ident), spec.namespace, ident)
            else:
                @functools.wraps(fn)
                def wrapper(*args: Any, **kwargs: Any) -> Any:
                    bound = ident_of(args, kwargs)
                    result = self._lookup_sync(spec, bound[0], tags_of(bound[1]), lambda: fn(*args, **kwargs))
                    return self._value_of(spec, result)

                def invalidate(*args: Any, **kwargs: Any) -> int:  # type: ignore[misc]
                    ident = ident_of(args, kwargs)[0]
                    return self._engine.run_bg(
                        self._engine.admin(lambda s: s.invalidate_key(spec.keys, ident), spec.namespace, ident))
            wrapper.cache_spec = spec  # type: ignore[attr-defined]
            wrapper.invalidate = invalidate  # type: ignore[attr-defined]
            return typing.cast(F, wrapper)

        return decorate

    def _function_spec(
        self, fn: Callable[..., Any], namespace: str | None, ttl: float,
        tags: Iterable[str] | Callable[..., Iterable[str]], key_args: Iterable[str] | None, exclude: Iterable[str],
        codec: str, signing_key: bytes | str | None, options: dict[str, Any],
    ) -> tuple[Spec, Callable[[tuple[Any, ...], dict[str, Any]], tuple[str, dict[str, Any]]],
               Callable[[dict[str, Any]], tuple[str, ...]]]:
        sig = inspect.signature(fn)
        returns = return_type(fn)
        chosen: Codec = PickleCodec(signing_key) if codec == "pickle" else JsonCodec(returns)
        endpoint = f"{fn.__module__}.{fn.__qualname__}"
        ns = namespace or name_part(fn.__qualname__, 200, keep="/")
        spec = self._spec(ns, ttl=ttl, codec=chosen, name=endpoint, **options)
        only, skip = (set(key_args) if key_args is not None else None), set(exclude)
        unknown = ((only or set()) | skip) - set(sig.parameters)
        if unknown:
            raise ConfigurationError(f"{endpoint} has no parameter(s) {', '.join(sorted(unknown))} (key_args/exclude)")

        def ident_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            return self._call_identity(endpoint, bound.arguments, only, skip), bound.arguments

        def tags_of(arguments: dict[str, Any]) -> tuple[str, ...]:
            return tuple(tags(**arguments) if callable(tags) else tags)

        return spec, ident_of, tags_of

    def _call_identity(self, endpoint: str, arguments: Mapping[str, Any], only: set[str] | None,
                       skip: set[str]) -> str:
        params = []
        for name, value in arguments.items():
            if name in skip or (only is not None and name not in only):
                continue
            value_part = typed(value)
            if value_part is None:
                if only is not None:
                    raise ConfigurationError(
                        f"argument {name!r} of {endpoint} ({type(value).__name__}) cannot be part of a cache key: "
                        "use str, numbers, dates, UUIDs, enums, models or lists/dicts of them"
                    )
                self._engine.once(f"skip:{endpoint}:{name}", logging.DEBUG, "cache key of %s leaves out argument "
                                  "%r (%s): not part of a call's identity", endpoint, name, type(value).__name__)
                continue
            params.append(("a", name, value_part))
        return identity(endpoint, params)

    def endpoint(self, namespace: str | None = None, *, ttl: float, **options: Any) -> Callable[[F], F]:
        """Cache a FastAPI path operation (see :func:`hyperion_lock.cache.http.cached_endpoint`)."""
        from hyperion_lock.cache.http import cached_endpoint

        return cached_endpoint(self, namespace, ttl=ttl, **options)

    # -- invalidation -----------------------------------------------------------------------------------------------
    async def invalidate(self, namespace: str, key: str | Mapping[str, Any]) -> int:
        """Drop one entry: ``key`` exactly as given to ``get_or_compute`` (a string or a mapping), whatever
        characters it holds. A decorated function's entry: ``fn.invalidate(*args, **kwargs)``."""
        ident = key_identity(key)
        return await self._engine.admin(lambda s: s.invalidate_key(self._keys(namespace), ident), namespace, ident)

    async def invalidate_tag(self, namespace: str, tag: str) -> int:
        """Drop every entry of ``namespace`` carrying ``tag``; returns how many were dropped."""
        return await self._engine.admin(lambda s: s.invalidate_tag(self._keys(namespace), tag), namespace)

    async def invalidate_namespace(self, namespace: str) -> int:
        """Drop every entry of ``namespace`` in O(1); returns how many live entries it had."""
        return await self._engine.admin(lambda s: s.invalidate_namespace(self._keys(namespace)), namespace)

    def invalidate_sync(self, namespace: str, key: str | Mapping[str, Any]) -> int:
        """Blocking twin of :meth:`invalidate`, for sync code."""
        return self._engine.run_bg(self.invalidate(namespace, key))

    def invalidate_tag_sync(self, namespace: str, tag: str) -> int:
        """Blocking twin of :meth:`invalidate_tag`."""
        return self._engine.run_bg(self.invalidate_tag(namespace, tag))

    def invalidate_namespace_sync(self, namespace: str) -> int:
        """Blocking twin of :meth:`invalidate_namespace`."""
        return self._engine.run_bg(self.invalidate_namespace(namespace))


    # -- statistics and lifecycle ------------------------------------------------------------------------------------
    def stats(self) -> dict[str, dict[str, float]]:
        """This process's counts per namespace: hits, misses, stale, bypass, errors, computations,
        compute_seconds. ``hyperion-lock status`` shows the sum over every process (flushed every few seconds)."""
        return self._engine.stats()

    async def connect(self, budget: float = 1.0) -> bool:
        """Warm this worker up (call it from the lifespan, after the fork): connect to Redis and load the scripts,
        so the first burst of requests does not pay for it. Fails open: returns False (logged) when Redis does not
        answer within ``budget`` seconds; requests are then computed directly until it does."""
        return await self._engine.connect(budget)

    async def aclose(self) -> None:
        """Flush the counts and close this loop's connections (call it from the app's lifespan exit)."""
        await self._engine.aclose()

    def close(self) -> None:
        """Stop the private event loop of the sync API (if it was started)."""
        self._engine.close()

    async def key_secret(self, namespace: str) -> bytes | None:
        """The key of ``namespace``'s keyed hashes (header, cookie and credential values in key names): derived
        from ``key_secret`` (``HYPERION_LOCK_CACHE_KEY_SECRET``) when one is configured, else a random key the
        first worker stores in Redis (``:k``) and every worker reads (again each minute, so a Redis that lost it
        is followed); without Redis, a random key of this process. ``None`` when the store cannot give it now:
        the request is then computed directly (``BYPASS``)."""
        return await self._engine.key_secret(namespace)

    # -- the plumbing of cache/http.py: internal types (Spec, Result), an entry's identity made by the caller ------
    def _lookup(self, spec: Spec, ident: str, tags: tuple[str, ...], compute: Callable[[], Awaitable[Any]], *,
                force: bool = False) -> Awaitable[Result]:
        """The entry ``ident`` of ``spec``, served or computed (:meth:`Engine.lookup`): the engine's coroutine
        itself, so a hit pays for no second one."""
        return self._engine.lookup(spec, ident, tags, compute, force=force)

    def _direct(self, spec: Spec, ident: str, compute: Callable[[], Awaitable[Any]]) -> Awaitable[Result]:
        """Compute without the store: neither served from nor written to it (``BYPASS``)."""
        return self._engine.direct(spec, ident, compute)

    def _lookup_sync(self, spec: Spec, ident: str, tags: tuple[str, ...], compute: Callable[[], Any],
                     *, force: bool = False) -> Result:
        return self._engine.lookup_sync(spec, ident, tags, compute, force=force)

    def _once(self, what: str, level: int, message: str, *args: Any) -> None:
        self._engine.once(what, level, message, *args)


def _as_async(compute: Callable[[], Any]) -> Callable[[], Awaitable[Any]]:
    """A computation as a coroutine function; a sync one runs in a worker thread (the loop keeps serving)."""

    async def run() -> Any:
        if inspect.iscoroutinefunction(compute) or inspect.iscoroutinefunction(type(compute).__call__):
            return await compute()
        result = await asyncio.to_thread(compute)
        if inspect.isawaitable(result):
            return await result
        return result

    return run


def _key_secret(given: bytes | str | None) -> bytes | None:
    raw = given if given is not None else os.environ.get(f"{ENV_PREFIX}CACHE_KEY_SECRET", "").strip() or None
    if raw is None:
        return None
    key = raw.encode() if isinstance(raw, str) else bytes(raw)
    if len(key) < 16:
        raise ConfigurationError("the cache key_secret (HYPERION_LOCK_CACHE_KEY_SECRET) must be at least 16 bytes")
    return key


DEFAULT_CREDENTIALS = ("authorization", "proxy-authorization", "cookie")


def _credential_headers(given: Iterable[str] | None) -> tuple[str, ...]:
    """Request headers that identify who asks: a request carrying one is never answered from (or stored in)
    the shared cache by an endpoint whose key does not include it. ``Authorization``, ``Proxy-Authorization``
    and ``Cookie`` always; more from ``credential_headers`` or ``HYPERION_LOCK_CACHE_CREDENTIAL_HEADERS``
    (comma-separated, e.g. ``X-Api-Key``)."""
    if given is None:
        given = os.environ.get(f"{ENV_PREFIX}CACHE_CREDENTIAL_HEADERS", "").split(",")
    elif isinstance(given, str):
        given = given.split(",")
    extra = [h.strip().lower() for h in given if h.strip()]
    for name in extra:
        if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9a-z-]+", name):
            raise ConfigurationError(f"invalid credential header name {name!r}")
    return tuple(dict.fromkeys([*DEFAULT_CREDENTIALS, *extra]))


__all__ = ["Cache"]
