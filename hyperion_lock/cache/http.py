"""Caching FastAPI path operations: keys from the request, the same headers on every response, 304s.

    @app.get("/quotes/{symbol}", response_model=Quote)
    @cache.endpoint("quotes", ttl=30, tags=lambda symbol, **_: [f"symbol:{symbol}"])
    async def quote(symbol: str, range: str = "1d", db: Session = Depends(session)) -> Quote: ...

* Key (RFC 9111: the effective request URI plus what the answer varies on): the method, the Host header
  (``host=False``: not), the mount point and route template (``/v1/quotes/{symbol}``), the path parameters, the
  query parameters the route declares anywhere in its dependency tree (an omitted one as its default;
  ``query="all"`` takes every one) sorted by name with repeated values in their order, the declared header and
  cookie parameters and the ``vary`` headers (their values only as keyed hashes). Undeclared parameters
  (``?_=<cache buster>``) are not part of it; a body is refused.
* Credentials: a request carrying one (``Authorization``, a cookie, the cache's ``credential_headers``) that
  the key does not include is computed directly, neither served from nor stored in the shared cache
  (``BYPASS``); a ``fastapi.security`` scheme whose credential is not keyed is refused (``ConfigurationError``)
  unless ``shared=True``.
* Body: the value as FastAPI would send it (validated through the route's ``response_model`` or the return
  annotation, with its ``by_alias`` / ``exclude_*`` options; without either, ``jsonable_encoder`` rendered by
  the route's JSON response class), encoded once when computed. Every later response, in every worker, sends
  those stored bytes, so types and field order survive and the ETag (a hash of the bytes) is the same
  everywhere and across restarts. A body over ``max_size`` is served, not stored (``BYPASS``).
* What the endpoint sets on ``response: Response`` (status code, headers) is stored with the answer and sent
  with every hit; an answer that sets a cookie is served but never stored. What dependencies set there belongs
  to each request and is sent with its own response only. Returning a ``Response`` is refused at decoration
  when the return annotation says so (the cache builds the response itself).
* Headers, on the first (MISS) response as on every later one: ``ETag``, ``Cache-Control`` (``max-age`` = fresh
  seconds left; ``private`` when the key holds a credential; template ``cache_control``), ``Age``,
  ``X-Cache: HIT | MISS | STALE`` (``BYPASS`` when the response was computed directly), and ``Vary`` for the
  ``vary`` headers and declared header and cookie parameters. ``If-None-Match``
  with a matching ETag gets ``304 Not Modified``.
* A client's ``Cache-Control: no-cache`` is ignored unless ``allow_client_refresh=True``; then it recomputes,
  still once across all workers for concurrent such requests.
* An ``HTTPException`` raised by the computation reaches the waiting requests of every worker with its status
  code and detail at once; it is not cached unless ``cache_errors=True``.

This module imports FastAPI; ``hyperion_lock`` imports it only when ``Cache.endpoint`` is first used.
"""

from __future__ import annotations

import enum
import functools
import inspect
import json
import logging
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from fastapi import HTTPException, Request, Response
from fastapi.dependencies.utils import get_dependant
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from fastapi.security.base import SecurityBase
from fastapi.utils import is_body_allowed_for_status_code
from starlette.concurrency import run_in_threadpool

from hyperion_lock.cache.codec import JsonCodec
from hyperion_lock.cache.errors import CacheComputeError, CacheSerializationError
from hyperion_lock.cache.keys import identity, secret, text
from hyperion_lock.cache.policy import client_wants_fresh, etag_matches
from hyperion_lock.cache.types import Answer, CacheStatus, Result, Spec
from hyperion_lock.errors import ConfigurationError

if TYPE_CHECKING:  # the facade imports this module when an endpoint is first cached
    from hyperion_lock.cache.facade import Cache

F = TypeVar("F", bound=Callable[..., Any])
_REQUEST = "hyperion_cache_request"
_RESPONSE = "hyperion_cache_response"


@dataclass(frozen=True)
class KeyPlan:
    """What of a request goes into one route's key, and which credentials make it bypass the shared cache;
    worked out once per route from its dependency tree (:func:`plan_for`), applied per request."""

    query: frozenset[str] | None  # declared query names (``None``: every one)
    query_defaults: tuple[tuple[str, str], ...]  # (name, encoded default): an omitted value is its default
    secret_query: frozenset[str]  # query names whose values are credentials (APIKeyQuery): hashed
    headers: tuple[str, ...]  # header names (lower case) in the key, declared or in ``vary``: values hashed
    cookies: frozenset[str]  # declared cookie names in the key: values hashed
    host: bool  # the Host header is part of the key (tenants resolved from it)
    unkeyed: tuple[str, ...]  # credential headers the key does not include: a request with one bypasses
    cookies_keyed: bool  # the whole Cookie header is in the key (``vary=["Cookie"]``), or ``shared``
    private: bool  # the key holds a credential: one answer per credential, ``Cache-Control: private``
    vary: tuple[str, ...]  # the response's ``Vary``

    @property
    def hashed(self) -> bool:
        return bool(self.headers or self.cookies or self.secret_query)


def _walk(dependant: Any, depth: int = 0) -> Iterable[Any]:
    """A dependant and, recursively, its sub-dependencies (bounded depth)."""
    yield dependant
    if depth < 32:
        for sub in getattr(dependant, "dependencies", []):
            yield from _walk(sub, depth + 1)


def _names(param: Any, header: bool = False) -> set[str]:
    """Every name FastAPI may read a parameter under (alias, name, validation aliases; headers with ``-``);
    a parameter model (``Annotated[Model, Query()]``) stands for its fields."""
    annotation = getattr(param.field_info, "annotation", None)
    fields = getattr(annotation, "model_fields", None) if isinstance(annotation, type) else None
    if isinstance(fields, dict):
        found = set()
        for name, info in fields.items():
            found |= {name, getattr(info, "alias", None) or name}
            if isinstance(getattr(info, "validation_alias", None), str):
                found.add(info.validation_alias)
    else:
        found = {param.alias, param.name}
        choices = getattr(param.field_info, "validation_alias", None)
        if isinstance(choices, str):
            found.add(choices)
        found |= {c for c in getattr(choices, "choices", ()) if isinstance(c, str)}
    if header and getattr(param.field_info, "convert_underscores", True):
        found = {n.replace("_", "-") for n in found}
    return {n.lower() for n in found} if header else found


def _default_text(param: Any) -> str | None:
    """A query parameter's default as the text a client would send for it (``?range=1d`` and no ``range`` are
    one entry when the default is ``"1d"``); ``None`` for no default, or one without a single text form."""
    default = getattr(param.field_info, "default", None)
    if isinstance(default, enum.Enum):
        default = default.value
    if isinstance(default, bool):
        return text("true" if default else "false")
    if isinstance(default, str | int | float):
        return text(str(default))
    return None


def _credential_of(scheme: Any) -> tuple[str, str]:
    """Where a ``fastapi.security`` scheme reads its credential: ("header" | "cookie" | "query", name)."""
    model = getattr(scheme, "model", None)
    where = getattr(getattr(model, "in_", None), "value", None)
    if where in ("header", "cookie", "query"):
        name = str(getattr(model, "name", ""))
        return where, name.lower() if where == "header" else name
    return "header", "authorization"  # HTTPBearer/Basic/Digest, OAuth2*, OpenIdConnect


def _scheme(dependant: Any) -> Any:
    call = getattr(dependant, "call", None)
    while isinstance(call, functools.partial):
        call = call.func
    call = inspect.unwrap(call) if call is not None else None
    return call if isinstance(call, SecurityBase) else None


@dataclass
class _Inputs:
    query: set[str] | None
    defaults: dict[str, str]
    headers: set[str]
    cookies: set[str]
    schemes: list[tuple[Any, Any]]
    guarded: list[Any]  # Security(...) with scopes, or a SecurityScopes reader: it decides who may ask


def _inputs(dependant: Any, where: str, vary: tuple[str, ...], every_query: bool) -> _Inputs:
    found = _Inputs(None if every_query else set(), {}, {h.lower() for h in vary}, set(), [], [])
    for node in _walk(dependant):
        body = [p.name for p in getattr(node, "body_params", [])]
        if body:
            raise ConfigurationError(
                f"{where} reads a request body ({', '.join(body)}): a body is not part of a cache key, and only "
                "GET endpoints are cached; remove @cache.endpoint, or take the input from the path or the query"
            )
        for param in getattr(node, "query_params", []):
            if found.query is not None:
                found.query |= _names(param)
            default = _default_text(param)
            if default is not None:
                found.defaults.setdefault(param.alias, default)
        for param in getattr(node, "header_params", []):
            found.headers |= _names(param, header=True)
        for param in getattr(node, "cookie_params", []):
            found.cookies |= _names(param)
        scheme = _scheme(node)
        if scheme is not None:
            found.schemes.append((node, scheme))
        elif node is not dependant and (getattr(node, "own_oauth_scopes", None) or
                                        getattr(node, "security_scopes", None) or
                                        getattr(node, "security_scopes_param_name", None)):
            found.guarded.append(node)
    return found


def _keyed_schemes(found: _Inputs, where: str, shared: bool) -> set[str]:
    """Check that the key includes every security scheme's credential; returns the query names that carry one
    (keyed, hashed). Raises ``ConfigurationError`` naming the parameter otherwise (unless ``shared``)."""
    secret_query = set()
    for node, scheme in found.schemes:
        kind, name = _credential_of(scheme)
        if kind == "query":
            secret_query.add(name)
            if found.query is not None:
                found.query.add(name)
            continue
        keyed = name in found.headers if kind == "header" else "cookie" in found.headers or name in found.cookies
        if not (keyed or shared):
            opt_in = "Cookie" if kind == "cookie" else _title(name)
            raise ConfigurationError(
                f"{where}: parameter {getattr(node, 'name', None) or '?'!r} uses {type(scheme).__name__}, which "
                f"reads the {kind} {name!r}, and the cache key does not include it: every user would get the "
                f"first user's answer. Add vary=[{opt_in!r}] to @cache.endpoint (one entry per credential), or "
                "shared=True if the answer does not depend on who asks"
            )
    return secret_query


def _keyed_security(found: _Inputs, where: str, shared: bool, credentials: tuple[str, ...]) -> None:
    """A ``Security(...)`` dependency that reads the request itself: refused unless the key holds a credential
    (``vary``, a declared header or cookie) or the endpoint is ``shared``."""
    keyed = found.headers & set(credentials) or found.cookies
    if found.guarded and not (keyed or shared):
        node = found.guarded[0]
        raise ConfigurationError(
            f"{where}: parameter {getattr(node, 'name', None) or '?'!r} is a Security(...) dependency, and the cache "
            "key includes no credential: every user would get the first user's answer. Add the header it reads to "
            "vary (e.g. vary=['Authorization']: one entry per credential), or shared=True if the answer does not "
            "depend on who asks"
        )


def _title(header: str) -> str:
    return "-".join(w.capitalize() for w in header.split("-"))


def plan_for(dependant: Any, *, where: str, vary: Iterable[str], query: Literal["declared", "all"], host: bool,
             shared: bool, credentials: Iterable[str]) -> KeyPlan:
    """The key plan of a route (or of an endpoint function at decoration). Raises ``ConfigurationError`` for a
    request body (not part of a key), and for a ``fastapi.security`` scheme whose credential the key does not
    include without ``shared=True``."""
    vary = tuple(vary)
    found = _inputs(dependant, where, vary, query == "all")
    secret_query = _keyed_schemes(found, where, shared)
    creds = tuple(c.lower() for c in credentials)
    _keyed_security(found, where, shared, creds)
    keyed = tuple(sorted(found.headers))
    cookies_keyed = shared or "cookie" in found.headers
    unkeyed = () if shared else tuple(c for c in creds if c != "cookie" and c not in found.headers)
    shown = list(vary)
    for name in [*keyed, *(["cookie"] if found.cookies and not cookies_keyed else [])]:
        if name not in {v.lower() for v in shown}:
            shown.append(_title(name))
    private = not shared and bool(set(keyed) & set(creds) or found.cookies or secret_query)
    return KeyPlan(None if found.query is None else frozenset(found.query),
                   tuple(sorted(found.defaults.items())), frozenset(secret_query), keyed,
                   frozenset(found.cookies), host, unkeyed, cookies_keyed, private, tuple(shown))


def unkeyed_credential(request: Request, plan: KeyPlan) -> str | None:
    """The first credential the request carries that the key does not include (it must bypass), or ``None``."""
    headers = request.headers
    for name in plan.unkeyed:
        if name in headers:
            return name
    if not plan.cookies_keyed and "cookie" in headers and any(n not in plan.cookies for n in request.cookies):
        return "cookie"
    return None


def request_identity(request: Request, plan: KeyPlan, secret_key: bytes = b"") -> str:
    """The entry of a request: method, host, the full path template (mount point included), the path, declared
    query, header and cookie parameters, and the ``vary`` headers. Header and cookie values, and credentials
    given in the query, appear only as keyed hashes (``secret_key``)."""
    scope = request.scope
    route = scope.get("route")
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    endpoint = scope.get("root_path", "") + template if template else request.url.path
    method = "GET" if request.method == "HEAD" else request.method
    params = [("r", "method", text(method))]
    if plan.host:
        params.append(("r", "host", text(request.headers.get("host", "").lower())))
    params += [("p", k, text(str(v))) for k, v in request.path_params.items()]
    wanted, given = plan.query, request.query_params
    for k, v in given.multi_items():
        if wanted is None or k in wanted:
            params.append(("q", k, secret(v, secret_key) if k in plan.secret_query else text(v)))
    params += [("q", k, v) for k, v in plan.query_defaults if k not in given]
    headers = request.headers
    for h in plan.headers:
        params += [("h", h, secret(v, secret_key)) for v in headers.getlist(h)]
    if plan.cookies:
        jar = request.cookies
        params += [("c", c, secret(jar[c], secret_key)) for c in plan.cookies if c in jar]
    return identity(str(endpoint), params)


def response_for(result: Result, request: Request, *, cache_control: str, vary: Iterable[str],
                 status_code: int | None = None, sub: Response | None = None) -> Response:
    """The response of a cached answer. Its status is the one the endpoint set on ``response: Response`` (stored
    with the answer), else the one this request's dependencies set, else the route's ``status_code``, else 200,
    as FastAPI chooses it. Headers: the cache's, then the answer's stored ones (replacing a cache header of the
    same name: the endpoint's choice wins), then those this request's dependencies set (``sub``: they ran for this
    request, hit or miss, so a per-client ``Set-Cookie`` from a dependency reaches only its client)."""
    headers = {
        "ETag": result.etag,
        "Cache-Control": cache_control.format(max_age=result.max_age),
        "Age": str(result.age),
        "X-Cache": result.status.value,
    }
    vary = tuple(vary)
    if vary:
        headers["Vary"] = ", ".join(vary)
    status = result.status_code or (sub.status_code if sub is not None else None) or status_code or 200
    if status == 200 and etag_matches(request.headers.get("if-none-match"), result.etag):
        response = Response(status_code=304, headers=headers)
    else:
        content = result.payload if status == 200 or is_body_allowed_for_status_code(status) else b""
        response = Response(content=content, status_code=status, media_type="application/json", headers=headers)
    if result.headers:
        for name in {name.lower() for name, _ in result.headers} & {name.lower() for name in headers}:
            del response.headers[name]
        response.headers.raw.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in result.headers)
    if sub is not None and sub.headers.raw:
        response.headers.raw.extend(sub.headers.raw)
    return response


_NO_COOKIES = (
    "it sets a cookie on `response: Response` (Set-Cookie), which a shared cache would hand to every client; set "
    "per-client cookies in a dependency (it runs for every request, hits included) or leave the endpoint uncached"
)


async def _answer(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], sub: Response) -> Answer:
    """Run the endpoint. What it sets on ``response: Response`` while it runs (status, headers) is part of its
    answer: stored with the value and sent with every hit. What the request's dependencies set before belongs to
    the request: it is put back as it was, and sent with this request's response only. An answer that sets a
    cookie is not cached (served to the requests that waited for it, computed again for the next)."""
    before, status = list(sub.headers.raw), sub.status_code
    try:
        if inspect.iscoroutinefunction(fn):
            value = await fn(*args, **kwargs)
        else:
            value = await run_in_threadpool(fn, *args, **kwargs)
        added = list(sub.headers.raw)
        for pair in before:
            if pair in added:
                added.remove(pair)
        changed = sub.status_code if sub.status_code != status else None
    finally:
        sub.headers.raw[:] = before
        sub.status_code = status
    pairs = tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in added)
    cookie = any(name.lower() == "set-cookie" for name, _ in pairs)
    return Answer(value, changed or 0, pairs, _NO_COOKIES if cookie else "")


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


def _signature(fn: Callable[..., Any]) -> tuple[inspect.Signature, str | None, str | None]:
    """``fn``'s signature with resolved annotations, plus a ``Request`` and a ``Response`` parameter when it has
    none (FastAPI then passes the request, and the response its dependencies write headers to, in). Returns the
    names of ``fn``'s own ``Request`` and ``Response`` parameters, if any."""
    sig = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception:
        hints = {}
    params = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values()]
    own = next((p.name for p in params if p.annotation is Request), None)
    own_response = next((p.name for p in params if isinstance(p.annotation, type)
                         and issubclass(p.annotation, Response)), None)
    at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
    if own_response is None:
        params.insert(at, inspect.Parameter(_RESPONSE, inspect.Parameter.KEYWORD_ONLY, annotation=Response))
    if own is None:
        params.insert(at, inspect.Parameter(_REQUEST, inspect.Parameter.KEYWORD_ONLY, annotation=Request))
    return (sig.replace(parameters=params, return_annotation=hints.get("return", sig.return_annotation)), own,
            own_response)


def cached_endpoint(
    cache: Cache,
    namespace: str | None = None,
    *,
    ttl: float,
    tags: Iterable[str] | Callable[..., Iterable[str]] = (),
    vary: Iterable[str] = (),
    query: Literal["declared", "all"] = "declared",
    host: bool = True,
    shared: bool = False,
    cache_control: str | None = None,
    allow_client_refresh: bool = False,
    **options: Any,
) -> Callable[[F], F]:
    """Cache a FastAPI path operation; put it *under* ``@app.get(...)``. ``tags``: fixed, or a function of the
    endpoint's arguments (by name) returning them. ``options``: ``stale``, ``refresh_ahead``, ``refresh``,
    ``cache_errors``, ``error_ttl``, ``max_size``, ``lease_ttl`` (see :class:`~hyperion_lock.Cache`).

    The key holds every input the route declares (see :func:`request_identity`); ``host=False`` leaves the
    Host header out (single-tenant apps). A request carrying a credential (``Authorization``, ``Cookie``, the
    cache's ``credential_headers``) that the key does not include is computed directly (``BYPASS``), with one
    WARNING per endpoint: ``vary=["Authorization"]`` caches one answer per credential (``Cache-Control:
    private``), ``shared=True`` says the answer does not depend on who asks. A ``fastapi.security`` scheme
    whose credential is not keyed, or a request body, is refused with ``ConfigurationError`` at decoration
    (or, for dependencies given to the route or router, at the first request).

    ``refresh="background"`` (default) recomputes a stale entry after the response is sent, with the same
    arguments: use ``refresh="inline"`` when the endpoint takes request-scoped dependencies (a database session
    closed with the request); then the one request that wins the refresh computes it while the others are
    served the stale value.
    """
    vary = tuple(vary)
    if query not in ("declared", "all"):
        raise ValueError(f"query must be 'declared' or 'all', got {query!r}")
    if shared and vary:
        raise ConfigurationError("shared=True says the answer does not depend on who asks; vary says it does")

    def decorate(fn: F) -> F:
        sig, own_request, own_response = _signature(fn)
        returned = sig.return_annotation
        if isinstance(returned, type) and issubclass(returned, Response):
            raise ConfigurationError(
                f"{fn.__module__}.{fn.__qualname__} returns a {returned.__name__}: a cached endpoint returns data (a "
                "model, dict, list...) and the cache builds the response; set a status or headers on a "
                "`response: Response` parameter instead (they are cached with the answer)"
            )
        ns = namespace or fn.__name__
        cache._spec(ns, ttl=ttl, decode=False, **options)  # every duration and size checked now, not per request
        cached = _CachedEndpoint(
            cache, fn, ns, sig.return_annotation, tags, allow_client_refresh, cache_control, {"ttl": ttl, **options},
            functools.partial(plan_for, vary=vary, query=query, host=host, shared=shared,
                              credentials=cache.credential_headers),
        )

        @functools.wraps(fn)
        async def endpoint(*args: Any, **kwargs: Any) -> Response:
            request: Request = kwargs[own_request] if own_request else kwargs.pop(_REQUEST)
            sub: Response = kwargs[own_response] if own_response else kwargs.pop(_RESPONSE)
            return await cached.respond(request, sub, args, kwargs)

        endpoint.__signature__ = sig  # type: ignore[attr-defined]
        endpoint.cache_namespace = ns  # type: ignore[attr-defined]
        _check_at_decoration(endpoint, cached.plan, cached.name)
        return typing.cast(F, endpoint)

    return decorate


class _CachedEndpoint:
    """One decorated endpoint: its spec and key plan per route (worked out at the route's first request), and
    the steps of one request."""

    def __init__(self, cache: Cache, fn: Callable[..., Any], namespace: str, annotation: Any,
                 tags: Iterable[str] | Callable[..., Iterable[str]], allow_client_refresh: bool,
                 cache_control: str | None, options: dict[str, Any], plan: Callable[..., KeyPlan]) -> None:
        self.cache, self.fn, self.namespace, self.annotation = cache, fn, namespace, annotation
        self.tags, self.allow_client_refresh, self.cache_control, self.options = (tags, allow_client_refresh,
                                                                                  cache_control, options)
        self._plan = plan
        self.name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', namespace)}"
        self.per_route: dict[int, tuple[Spec, KeyPlan, str]] = {}

    def plan(self, dependant: Any, where: str) -> KeyPlan:
        return self._plan(dependant, where=where)

    def spec_for(self, route: Any, request: Request) -> tuple[Spec, KeyPlan, str]:
        found = self.per_route.get(id(route))
        if found is None:
            declared = set(getattr(route, "methods", None) or {"GET"})
            where = f"{'/'.join(sorted(declared))} {getattr(route, 'path', request.url.path)} ({self.name})"
            if declared - {"GET", "HEAD"}:
                raise ConfigurationError(f"{where}: only GET endpoints are cached (other methods change state or "
                                         "read a body, which is not part of the key)")
            codec = _route_codec(route, self.annotation)
            spec = self.cache._spec(self.namespace, ttl=self.options["ttl"], codec=codec, decode=False,
                                   name=getattr(route, "path", None) or self.name,
                                   **{k: v for k, v in self.options.items() if k != "ttl"})
            found = self.per_route[id(route)] = (spec, self.plan(getattr(route, "dependant", None), where), where)
        return found

    async def respond(self, request: Request, sub: Response, args: tuple[Any, ...],
                      kwargs: dict[str, Any]) -> Response:
        route = request.scope.get("route")
        spec, plan, where = self.spec_for(route, request)
        fn = self.fn
        status_code = getattr(route, "status_code", None)

        async def compute() -> Answer:
            return await _answer(fn, args, kwargs, sub)

        credential = unkeyed_credential(request, plan)
        secret_key = await self.cache.key_secret(self.namespace) if plan.hashed and credential is None else b""
        try:
            if credential is not None or secret_key is None:
                if credential is not None:
                    _warn_bypass(self.cache, where, credential)
                result = await self.cache._direct(spec, "", compute)
                return response_for(result, request, cache_control="private, no-store", vary=plan.vary,
                                    status_code=status_code, sub=sub)
            ident = request_identity(request, plan, secret_key)
            tag_list = tuple(self.tags(**kwargs) if callable(self.tags) else self.tags)
            force = self.allow_client_refresh and client_wants_fresh(request.headers.get("cache-control"),
                                                                     request.headers.get("pragma"))
            result = await self.cache._lookup(spec, ident, tag_list, compute, force=force)
        except CacheComputeError as exc:
            if exc.status_code is not None:
                raise HTTPException(exc.status_code, exc.detail) from exc
            raise
        control = self.cache_control or ("private, max-age={max_age}" if plan.private else "max-age={max_age}")
        return response_for(result, request, cache_control=control, vary=plan.vary, status_code=status_code,
                            sub=sub)


def _check_at_decoration(endpoint: Callable[..., Any], plan: Callable[[Any, str], KeyPlan], name: str) -> None:
    """Refuse, when the function is decorated, what its own signature already shows: a body, or a security
    scheme the key does not include. Dependencies given to the route or its router are checked at the first
    request."""
    try:
        dependant = get_dependant(path="", call=endpoint)
    except Exception:  # FastAPI itself reports an unusable signature when the route is added
        return
    plan(dependant, name)


def _warn_bypass(cache: Cache, where: str, credential: str) -> None:
    shown = _title(credential)
    cache._once(f"credential:{where}", logging.WARNING,
                "cache: %s received a %s header, which its cache key does not include: answered directly, neither "
                "served from nor stored in the shared cache (X-Cache: BYPASS). If the answer depends on who asks, "
                "add vary=[%r] to @cache.endpoint (one entry per credential%s); if it does not, shared=True",
                where, shown, shown, ", or declare the cookies it reads with Cookie()" if shown == "Cookie" else "")


__all__ = ["CacheStatus", "KeyPlan", "cached_endpoint", "plan_for", "request_identity", "response_for",
           "unkeyed_credential"]
