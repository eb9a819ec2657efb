"""Caching FastAPI path operations: keys from the request, the same headers on every response, 304s.

    @app.get("/quotes/{symbol}", response_model=Quote)
    @cache.endpoint("quotes", ttl=30, tags=lambda symbol, **_: [f"symbol:{symbol}"])
    async def quote(symbol: str, range: str = "1d", db: Session = Depends(session)) -> Quote: ...

* Key: the route template (``/quotes/{symbol}``), the path parameters, the query parameters the route declares
  (anywhere in its dependencies; ``query="all"`` takes every one) sorted by name with repeated values in their
  order, and the ``vary`` headers. Dependencies, the body and undeclared parameters (``?_=<cache buster>``) are
  not part of it.
* Body: the value as FastAPI would send it (validated through the route's ``response_model`` or the return
  annotation, with its ``by_alias`` / ``exclude_*`` options), encoded once when computed. Every later response,
  in every worker, sends those stored bytes, so types and field order survive and the ETag (a hash of the
  bytes) is the same everywhere and across restarts.
* Headers, on the first (MISS) response as on every later one: ``ETag``, ``Cache-Control`` (``max-age`` = fresh
  seconds left; template ``cache_control``), ``Age``, ``X-Cache: HIT | MISS | STALE`` (``BYPASS`` when Redis is
  unavailable and the response was computed directly), and ``Vary`` for the ``vary`` headers. ``If-None-Match``
  with a matching ETag gets ``304 Not Modified``.
* A client's ``Cache-Control: no-cache`` is ignored unless ``allow_client_refresh=True``; then it recomputes,
  still once across all workers for concurrent such requests.
* An ``HTTPException`` raised by the computation reaches the waiting requests of every worker with its status
  code and detail at once; it is not cached unless ``cache_errors=True``.

This module imports FastAPI; ``hyperion_lock`` imports it only when ``Cache.endpoint`` is first used.
"""

from __future__ import annotations

import functools
import inspect
import json
import typing
from collections.abc import Callable, Iterable
from typing import Any, Literal, TypeVar

from fastapi import HTTPException, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ._cache import Cache, CacheStatus, Result, Spec
from ._cache_codec import JsonCodec
from ._cache_errors import CacheComputeError, CacheSerializationError
from ._cache_keys import identity
from ._cache_policy import client_wants_fresh, etag_matches

F = TypeVar("F", bound=Callable[..., Any])
_REQUEST = "hyperion_cache_request"


def declared_query_names(route: Any) -> frozenset[str] | None:
    """Names of the query parameters a route reads (its own and its dependencies'); ``None``: take them all (a
    query-parameter model, or no FastAPI route)."""
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return None
    names = set()
    for param in _query_params(dependant):
        annotation = getattr(param.field_info, "annotation", None)
        if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
            return None  # Annotated[Model, Query()]: the model's fields are the parameters
        names.add(param.alias)
    return frozenset(names)


def _query_params(dependant: Any, depth: int = 0) -> list[Any]:
    """The query parameter fields of a dependant and, recursively, of its sub-dependencies."""
    found = list(getattr(dependant, "query_params", []))
    if depth < 32:
        for sub in getattr(dependant, "dependencies", []):
            found += _query_params(sub, depth + 1)
    return found


def request_identity(request: Request, vary: Iterable[str], query: Literal["declared", "all"],
                     names: frozenset[str] | None) -> str:
    route = request.scope.get("route")
    endpoint = getattr(route, "path_format", None) or getattr(route, "path", None) or request.url.path
    params = [("p", k, str(v)) for k, v in request.path_params.items()]
    wanted = None if query == "all" else names
    params += [("q", k, v) for k, v in request.query_params.multi_items() if wanted is None or k in wanted]
    params += [("h", h.lower(), ",".join(request.headers.getlist(h))) for h in vary]
    return identity(str(endpoint), params)


def response_for(result: Result, request: Request, *, cache_control: str, vary: tuple[str, ...]) -> Response:
    headers = {
        "ETag": result.etag,
        "Cache-Control": cache_control.format(max_age=result.max_age),
        "Age": str(result.age),
        "X-Cache": result.status.value,
    }
    if vary:
        headers["Vary"] = ", ".join(vary)
    if etag_matches(request.headers.get("if-none-match"), result.etag):
        return Response(status_code=304, headers=headers)
    return Response(content=result.payload, media_type="application/json", headers=headers)


class _ResponseCodec(JsonCodec):
    """JSON through the route's response model; refuses a ``Response`` (it cannot be cached as data)."""

    def encode(self, value: Any) -> bytes:
        if isinstance(value, Response):
            raise CacheSerializationError(
                f"a cached endpoint must return data (a model, dict, list...), not a {type(value).__name__}: the "
                "cache builds the response itself"
            )
        return super().encode(value)


class _EncoderCodec(_ResponseCodec):
    """No response model (no ``response_model``, no return annotation, or ``response_model=None``): the bytes
    FastAPI itself would send, ``jsonable_encoder`` rendered by the route's JSON response class, so a cached answer
    is byte for byte the uncached one (an unannotated endpoint used to answer 500: no pydantic schema for
    ``inspect._empty``)."""

    def __init__(self, response_class: type[Response]) -> None:
        super().__init__(Any, check=False)
        self.response_class = response_class

    def _dump(self, value: Any) -> bytes:
        return bytes(self.response_class(jsonable_encoder(value)).body)

    def decode(self, data: bytes) -> Any:
        return json.loads(data)


def _json_response_class(route: Any) -> type[Response]:
    """The route's response class when it renders JSON (``JSONResponse``, ``ORJSONResponse``...), else FastAPI's
    default ``JSONResponse``."""
    chosen = getattr(route, "response_class", None)
    chosen = getattr(chosen, "value", chosen)  # FastAPI's DefaultPlaceholder
    if isinstance(chosen, type) and issubclass(chosen, JSONResponse):
        return chosen
    return JSONResponse


def _route_codec(route: Any, annotation: Any) -> JsonCodec:
    if route is not None and hasattr(route, "response_model"):
        model = route.response_model  # FastAPI's own choice: the annotation, unless response_model= says otherwise
    else:
        model = None if annotation is inspect.Signature.empty else annotation
    if model is None:
        return _EncoderCodec(_json_response_class(route))
    options: dict[str, Any] = {}
    for ours, theirs in (("by_alias", "response_model_by_alias"), ("exclude_unset", "response_model_exclude_unset"),
                         ("exclude_defaults", "response_model_exclude_defaults"),
                         ("exclude_none", "response_model_exclude_none"), ("include", "response_model_include"),
                         ("exclude", "response_model_exclude")):
        value = getattr(route, theirs, None)
        if value is not None:
            options[ours] = value
    return _ResponseCodec(model, check=False, **options)


def _signature(fn: Callable[..., Any]) -> tuple[inspect.Signature, str | None]:
    """``fn``'s signature with resolved annotations, plus a ``Request`` parameter when it has none (FastAPI then
    passes the request in). Returns the name of ``fn``'s own ``Request`` parameter, if any."""
    sig = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception:
        hints = {}
    params = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values()]
    own = next((p.name for p in params if p.annotation is Request), None)
    if own is None:
        extra = inspect.Parameter(_REQUEST, inspect.Parameter.KEYWORD_ONLY, annotation=Request)
        at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
        params.insert(at, extra)
    return sig.replace(parameters=params, return_annotation=hints.get("return", sig.return_annotation)), own


def cached_endpoint(
    cache: Cache,
    namespace: str | None = None,
    *,
    ttl: float,
    tags: Iterable[str] | Callable[..., Iterable[str]] = (),
    vary: Iterable[str] = (),
    query: Literal["declared", "all"] = "declared",
    cache_control: str = "max-age={max_age}",
    allow_client_refresh: bool = False,
    **options: Any,
) -> Callable[[F], F]:
    """Cache a FastAPI path operation; put it *under* ``@app.get(...)``. ``tags``: fixed, or a function of the
    endpoint's arguments (by name) returning them. ``options``: ``stale``, ``refresh_ahead``, ``refresh``,
    ``cache_errors``, ``error_ttl``, ``max_size``, ``lease_ttl`` (see :class:`~hyperion_lock.Cache`).

    ``refresh="background"`` (default) recomputes a stale entry after the response is sent, with the same
    arguments: use ``refresh="inline"`` when the endpoint takes request-scoped dependencies (a database session
    closed with the request); then the one request that wins the refresh computes it while the others are
    served the stale value.
    """
    vary = tuple(vary)
    if query not in ("declared", "all"):
        raise ValueError(f"query must be 'declared' or 'all', got {query!r}")

    def decorate(fn: F) -> F:
        sig, own_request = _signature(fn)
        ns = namespace or fn.__name__
        cache.spec(ns, ttl=ttl, decode=False, **options)  # every duration and size checked now, not per request
        per_route: dict[int, tuple[Spec, frozenset[str] | None]] = {}

        def spec_for(route: Any) -> tuple[Spec, frozenset[str] | None]:
            found = per_route.get(id(route))
            if found is None:
                codec = _route_codec(route, sig.return_annotation)
                name = getattr(route, "path", None) or f"{fn.__module__}.{fn.__qualname__}"
                spec = cache.spec(ns, ttl=ttl, codec=codec, decode=False, name=name, **options)
                found = per_route[id(route)] = (spec, declared_query_names(route))
            return found

        @functools.wraps(fn)
        async def endpoint(*args: Any, **kwargs: Any) -> Response:
            request: Request = kwargs[own_request] if own_request else kwargs.pop(_REQUEST)
            spec, names = spec_for(request.scope.get("route"))
            ident = request_identity(request, vary, query, names)
            tag_list = tuple(tags(**kwargs) if callable(tags) else tags)
            force = allow_client_refresh and client_wants_fresh(request.headers.get("cache-control"),
                                                                request.headers.get("pragma"))

            async def compute() -> Any:
                if inspect.iscoroutinefunction(fn):
                    return await fn(*args, **kwargs)
                return await run_in_threadpool(fn, *args, **kwargs)

            try:
                result = await cache.lookup(spec, ident, tag_list, compute, force=force)
            except CacheComputeError as exc:
                if exc.status_code is not None:
                    raise HTTPException(exc.status_code, exc.detail) from exc
                raise
            return response_for(result, request, cache_control=cache_control, vary=vary)

        endpoint.__signature__ = sig  # type: ignore[attr-defined]
        endpoint.cache_namespace = ns  # type: ignore[attr-defined]
        return typing.cast(F, endpoint)

    return decorate


__all__ = ["CacheStatus", "cached_endpoint", "declared_query_names", "request_identity", "response_for"]
