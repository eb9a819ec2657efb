"""Cache key names and request identities, built in one place.

Every key of one namespace shares the hash tag ``{<namespace>}``, so each Lua call touches one slot (Redis
Cluster safe) and tag / namespace invalidation never needs KEYS or SCAN:

=========================================  ==================================================================
``<prefix>:cache:{<ns>}:e:<id>``           entry: HASH ``h`` (header JSON) + ``v`` (payload), PX = ttl + stale
``<prefix>:cache:{<ns>}:l:<id>``           compute lease: owner token, PX = lease TTL (renewed while computing)
``<prefix>:cache:{<ns>}:v``                namespace version: INCR drops every entry at once (fences writers)
``<prefix>:cache:{<ns>}:i``                ZSET id -> expiry (ms, Redis clock): live entries, for counts
``<prefix>:cache:{<ns>}:t:<tag>``          ZSET id -> expiry of the entries (and leases) carrying ``tag``
``<prefix>:cache:{<ns>}:s``                HASH of shared counters (hits, misses, ...), flushed by each process
``<prefix>:cache:{<ns>}:events``           pub/sub channel: a computation ended (ok / error / retry)
``<prefix>:cache:namespaces``              SET of namespace names (for ``hyperion-lock status``)
=========================================  ==================================================================

An ``<id>`` is readable: ``<endpoint>?<section>.<name>=<value>&...`` with names sorted, repeated values in their
order, every part percent-encoded, and only parts longer than 64 characters replaced by a hash, so a key still
names its endpoint and a namespace or endpoint prefix can be found by eye or by ``redis-cli --scan``.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import enum
import hashlib
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from ._errors import ConfigurationError
from ._settings import validate_name

LONG_PART = 64  # a part longer than this (after encoding) is replaced by a hash of it
LONG_ID = 400  # an identity longer than this keeps its endpoint and hashes its parameters
_SAFE = "-_.~!$'()*,;@:/{}"  # kept readable; '&', '=', '?', '|', '%', space and the rest are encoded


def digest(text: str, length: int = 24) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:length]


def part(text: str) -> str:
    """One readable, unambiguous key part: percent-encoded, hashed (``~<hex>``) only when long."""
    encoded = quote(text, safe=_SAFE)
    return encoded if len(encoded) <= LONG_PART else "~" + digest(text)


_SCALARS = (str, int, float, bool, type(None), uuid.UUID, decimal.Decimal, _dt.date, _dt.time, _dt.timedelta)


def canonical(value: Any) -> str | None:
    """A stable text for a value that can identify a call, or ``None`` when the value's type is not part of a
    call's identity (a session, a client, a request object): such arguments are left out of the key.

    Stable across processes, hosts and restarts: never ``repr()`` of an object or ``hash()``.
    """
    if isinstance(value, enum.Enum):
        return canonical(value.value)
    if isinstance(value, bool | type(None)):
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, _SCALARS):
        return value.isoformat() if isinstance(value, _dt.date | _dt.time) else str(value)
    if isinstance(value, list | tuple):
        items = [canonical(v) for v in value]
        return None if None in items else "[" + ",".join(quote(str(i), safe="") for i in items) + "]"
    if isinstance(value, set | frozenset):
        items = [canonical(v) for v in value]
        return None if None in items else "{" + ",".join(sorted(quote(str(i), safe="") for i in items)) + "}"
    if isinstance(value, Mapping):
        pairs = [(canonical(k), canonical(v)) for k, v in value.items()]
        if any(k is None or v is None for k, v in pairs):
            return None
        return "{" + ",".join(sorted(f"{quote(str(k), safe='')}:{quote(str(v), safe='')}" for k, v in pairs)) + "}"
    dump = getattr(value, "model_dump_json", None)  # a pydantic model given as a query object
    if callable(dump):
        return str(dump())
    return None


def identity(endpoint: str, params: Iterable[tuple[str, str, str]]) -> str:
    """``<endpoint>?<section>.<name>=<value>&...`` from (section, name, value) triples.

    Sections keep path, query, header and argument parameters apart (``p``, ``q``, ``h``, ``a``). Triples are
    sorted by (section, name); a name's repeated values keep the order they were given in (stable sort).
    """
    ordered = sorted(params, key=lambda t: (t[0], t[1]))
    query = "&".join(f"{section}.{part(name)}={part(value)}" for section, name, value in ordered)
    head = part(endpoint) if len(endpoint) > LONG_PART * 2 else quote(endpoint, safe=_SAFE)
    ident = f"{head}?{query}" if query else head
    if len(ident) > LONG_ID:
        ident = f"{head}?~{digest(query, 32)}"
    return ident


@dataclass(frozen=True)
class CacheKeys:
    """Names of one namespace's keys; see the module docstring."""

    prefix: str
    namespace: str

    def __post_init__(self) -> None:
        validate_name(self.prefix, "key prefix")
        validate_name(self.namespace, "cache namespace")
        if ":" in self.namespace:
            raise ConfigurationError(
                f"invalid cache namespace {self.namespace!r}: ':' separates key parts; use '.', '-' or '/' instead"
            )

    @property
    def base(self) -> str:
        return f"{self.prefix}:cache:{{{self.namespace}}}"

    def entry(self, ident: str) -> str:
        return f"{self.base}:e:{ident}"

    def lease(self, ident: str) -> str:
        return f"{self.base}:l:{ident}"

    @property
    def entry_prefix(self) -> str:
        return f"{self.base}:e:"

    @property
    def lease_prefix(self) -> str:
        return f"{self.base}:l:"

    @property
    def version(self) -> str:
        return f"{self.base}:v"

    @property
    def index(self) -> str:
        return f"{self.base}:i"

    def tag_index(self, tag: str) -> str:
        return f"{self.base}:t:{part(tag)}"

    @property
    def stats(self) -> str:
        return f"{self.base}:s"

    @property
    def channel(self) -> str:
        return f"{self.base}:events"

    @staticmethod
    def registry(prefix: str) -> str:
        return f"{prefix}:cache:namespaces"

    @staticmethod
    def probe(prefix: str) -> str:
        """A key written by the circuit breaker's recovery check (a write: an OOM server refuses it)."""
        return f"{prefix}:cache:probe"
