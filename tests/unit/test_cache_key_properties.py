"""Property tests of cache keys: two calls or requests that differ in any declared input never share an entry;
equal inputs (reordered query, defaults written out or not, undeclared parameters) always do.

The entry a call or request is served from is exactly its identity (``Cache.lookup`` takes it as given), so the
properties are checked on the identities the real code computes, over inputs hypothesis chooses adversarially
(marker characters, values in the form of hashes, long values that get hashed).
"""

from __future__ import annotations

import datetime as dt
import decimal
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import Cookie, Depends, FastAPI, Header, Query
from fastapi.routing import APIRoute
from hypothesis import example, given, settings
from hypothesis import strategies as st
from starlette.requests import Request

from hyperion_lock import Cache, Settings
from hyperion_lock.cache.http import KeyPlan, plan_for, request_identity
from hyperion_lock.cache.keys import digest, key_identity

CACHE = Cache(None, settings=Settings(redis_url=None, key_prefix="props"))
SECRET = b"s" * 32

# -- function arguments ----------------------------------------------------------------------------------------
markers = st.sampled_from(["~", "!", "[", "]", "{", "}", ",", "=", "&", "?", "%", "%7E", "!int.1", "null", "!null",
                           "true", "1", "1.0", "", " "])
texts = st.one_of(st.text(max_size=12), markers, st.text(min_size=60, max_size=90),
                  st.text(max_size=80).map(lambda t: "~" + digest(t)))
atoms = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=False, width=32), texts,
                  st.decimals(allow_nan=False, allow_infinity=False, places=2, min_value=-5, max_value=5),
                  st.dates(min_value=dt.date(2026, 1, 1), max_value=dt.date(2026, 1, 3)))
values = st.recursive(atoms, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.lists(inner, max_size=3).map(tuple),
    st.dictionaries(texts, inner, max_size=3), st.frozensets(st.one_of(st.integers(-3, 3), texts), max_size=3)),
    max_leaves=8)


def shape(value: Any) -> Any:
    """What a value is, type included: two arguments are the same call exactly when their shapes are equal."""
    if isinstance(value, dict):
        return ("dict", frozenset((shape(k), shape(v)) for k, v in value.items()))
    if isinstance(value, frozenset | set):
        return ("set", frozenset(shape(v) for v in value))
    if isinstance(value, list | tuple):
        return (type(value).__name__, tuple(shape(v) for v in value))
    if isinstance(value, float | decimal.Decimal):
        return (type(value).__name__, repr(value))
    return (type(value).__name__, value)


def call_identity(**arguments: Any) -> str:
    return CACHE._call_identity("app.module.fn", arguments, None, set())


@settings(max_examples=400, deadline=None)
@given(values, values)
@example(frozenset(), frozenset({""})).via("found by hypothesis: an empty text in a container was nothing")
def test_two_calls_share_an_entry_exactly_when_their_arguments_are_equal_with_their_types(a: Any, b: Any) -> None:
    same = shape(a) == shape(b)
    assert (call_identity(x=a) == call_identity(x=b)) is same, (a, b)
    assert (key_identity({"x": a}) == key_identity({"x": b})) is same, (a, b)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(texts, values, min_size=1, max_size=3), st.dictionaries(texts, values, min_size=1, max_size=3))
def test_argument_names_and_values_cannot_be_confused(a: dict[str, Any], b: dict[str, Any]) -> None:
    same = shape(a) == shape(b)
    assert (key_identity(a) == key_identity(b)) is same, (a, b)
    assert (key_identity(a) == key_identity(dict(reversed(list(a.items()))))), a  # order of names: one entry


# -- requests ----------------------------------------------------------------------------------------------------
def tenant(x_tenant: Annotated[str, Header()] = "main") -> str:  # a dependency's declared header
    return x_tenant


app = FastAPI()


@app.get("/quotes/{symbol}")
async def quote(symbol: str, who: Annotated[str, Depends(tenant)], range: str = "1d",
                tag: Annotated[list[str] | None, Query()] = None,
                session: Annotated[str | None, Cookie()] = None) -> None: ...


ROUTE = next(r for r in app.routes if isinstance(r, APIRoute))
PLAN: KeyPlan = plan_for(ROUTE.dependant, where="test", vary=["Authorization"], query="declared", host=True,
                         shared=False, credentials=CACHE.credential_headers)

header_text = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=12)
cookie_text = st.text(st.sampled_from("abcXYZ019-_~%"), min_size=1, max_size=8)
inputs = st.fixed_dictionaries({
    "host": st.sampled_from(["a.example", "b.example", "a.example:8000"]),
    "root": st.sampled_from(["", "/v1", "/v2"]),
    "symbol": texts,
    "range": st.one_of(st.none(), st.just("1d"), texts),
    "tags": st.lists(texts, max_size=3),
    "tenant": st.one_of(st.none(), header_text),
    "authorization": st.one_of(st.none(), header_text.map(lambda t: "Bearer " + t)),
    "session": st.one_of(st.none(), cookie_text),
})


def normal(i: dict[str, Any]) -> tuple[Any, ...]:
    """The inputs the endpoint declares, with defaults applied: what its answer may depend on."""
    return (i["host"], i["root"], i["symbol"], "1d" if i["range"] is None else i["range"], tuple(i["tags"]),
            i["tenant"], i["authorization"], i["session"])


def request(i: dict[str, Any], *, reorder: bool = False, junk: bool = False, default_written: bool = False) -> Request:
    query: list[tuple[str, str]] = [("tag", t) for t in i["tags"]]
    if i["range"] is not None or default_written:
        query.append(("range", "1d" if i["range"] is None else i["range"]))
    if junk:
        query += [("_", "123"), ("utm_source", "x")]
    if reorder:
        query = [q for q in query if q[0] != "tag"][::-1] + [q for q in query if q[0] == "tag"]
    headers = [(b"host", i["host"].encode())]
    if i["tenant"] is not None:
        headers.append((b"x-tenant", i["tenant"].encode()))
    if i["authorization"] is not None:
        headers.append((b"authorization", i["authorization"].encode()))
    if i["session"] is not None:
        headers.append((b"cookie", f"session={i['session']}".encode()))
    scope = {"type": "http", "method": "GET", "path": f"{i['root']}/quotes/x", "root_path": i["root"],
             "query_string": urlencode(query).encode(), "headers": headers, "route": ROUTE,
             "path_params": {"symbol": i["symbol"]}}
    return Request(scope)


@settings(max_examples=400, deadline=None)
@given(inputs, inputs, st.booleans(), st.booleans(), st.booleans())
def test_two_requests_share_an_entry_exactly_when_their_declared_inputs_are_equal(
        a: dict[str, Any], b: dict[str, Any], reorder: bool, junk: bool, default_written: bool) -> None:
    first = request_identity(request(a), PLAN, SECRET)
    assert (first == request_identity(request(b), PLAN, SECRET)) is (normal(a) == normal(b)), (a, b)
    # The same inputs written differently: reordered, with undeclared parameters, the default written out.
    again = request(a, reorder=reorder, junk=junk, default_written=default_written)
    assert request_identity(again, PLAN, SECRET) == first
    # No header or cookie value is readable in the key. Checked with values no other input produces and no hash
    # can hold (letters outside hex): a drawn value can also be the symbol's, or a run of hex digits.
    marked = dict(a, tenant="SekretQzTenant", authorization="Bearer SekretQzToken", session="SekretQzSession")
    assert "SekretQz" not in request_identity(request(marked), PLAN, SECRET)
    # And each is a keyed hash in its section (unless the whole parameter list was long enough to be hashed).
    params = first.split("?", 1)[1] if "?" in first else ""
    if not params.startswith("~"):
        hashed = [p.split("=", 1)[1] for p in params.split("&") if p.startswith(("h.", "c."))]
        assert len(hashed) == sum(a[k] is not None for k in ("authorization", "tenant", "session")), first
        assert all(v.startswith("~s") for v in hashed), first


@settings(max_examples=100, deadline=None)
@given(inputs, st.sampled_from(["host", "root", "symbol", "range", "tags", "tenant", "authorization", "session"]),
       st.data())
def test_changing_any_one_declared_input_changes_the_entry(i: dict[str, Any], name: str, data: Any) -> None:
    changed = dict(i, **{name: data.draw(inputs)[name]})
    if normal(changed) != normal(i):
        assert request_identity(request(changed), PLAN, SECRET) != request_identity(request(i), PLAN, SECRET)
