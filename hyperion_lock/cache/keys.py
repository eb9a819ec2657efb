"""Cache key names and request identities, built in one place.

Every key of one namespace shares the hash tag ``{<namespace>}``, so each Lua call touches one slot (Redis
Cluster safe) and tag / namespace invalidation never needs KEYS or SCAN:

=========================================  ==================================================================
``<prefix>:cache:{<ns>}:e2:<id>``          entry: HASH ``h`` (header JSON) + ``v`` (payload), PX = ttl + stale
``<prefix>:cache:{<ns>}:l2:<id>``          compute lease: owner token, PX = lease TTL (renewed while computing)
``<prefix>:cache:{<ns>}:k``                random key of the namespace's keyed hashes (unless one is configured)
``<prefix>:cache:{<ns>}:v``                namespace version: INCR drops every entry at once (fences writers)
``<prefix>:cache:{<ns>}:i``                ZSET id -> expiry (ms, Redis clock): live entries, for counts
``<prefix>:cache:{<ns>}:t:<tag>``          ZSET id -> expiry of the entries (and leases) carrying ``tag``
``<prefix>:cache:{<ns>}:s``                HASH of shared counters (hits, misses, ...), flushed by each process
``<prefix>:cache:{<ns>}:events``           pub/sub channel: a computation ended (ok / error / retry)
``<prefix>:cache:namespaces``              SET of namespace names (for ``hyperion-lock status``)
=========================================  ==================================================================

An ``<id>`` is readable: ``<endpoint>?<section>.<name>=<value>&...`` with names sorted, repeated values in their
order, so a key still names its endpoint and a namespace or endpoint prefix can be found by eye or by
``redis-cli --scan``. It is also unambiguous (two different inputs never give one id):

* a text is percent-encoded, and the marker characters ``~ ! [ ] { } , = & ? %`` are always encoded in it;
* a value that is not a text is type-tagged with ``!`` (``!int.1``, ``!float.1.0``, ``!true``, ``!null``,
  ``![...]`` for a list...), so ``1``, ``"1"``, ``1.0``, ``True``, ``None`` and ``"null"`` are six entries;
* a hashed part starts with ``~``, which no literal part can: ``~<hex>`` (SHA-256) replaces a part longer than
  64 characters, ``~s<hex>`` (HMAC-SHA256 with the namespace's secret) every header and cookie value and every
  value of a credential, so a bearer token or session cookie never appears in a key name.

``KEY_FORMAT`` is part of the entry and lease names: a release that changes what an id means bumps it, and the
entries of the older format are simply never read again (they expire).
"""

from __future__ import annotations

import datetime as _dt
import decimal
import enum
import hashlib
import hmac
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from hyperion_lock.errors import ConfigurationError
from hyperion_lock.settings import validate_name

KEY_FORMAT = 2  # in the entry and lease names (``:e2:``, ``:l2:``): bumped when the meaning of an id changes
LONG_PART = 64  # a part longer than this (after encoding) is replaced by a hash of it
LONG_ID = 400  # an identity longer than this keeps its endpoint and hashes its parameters
_SAFE = "-_.:/@;*'()$+"  # kept readable in a text; markers (~ ! [ ] { } , = & ? %), space and the rest are encoded
_HEAD_SAFE = _SAFE + "{}!,=&[]"  # the endpoint ends at the first '?', so only '?', '%' and '~' matter there


def digest(text: str, length: int = 24) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:length]


_PLAIN = re.compile(r"[A-Za-z0-9" + re.escape(_SAFE) + r"]*").fullmatch  # nothing to encode (the usual case)


def text(value: str, safe: str = _SAFE) -> str:
    """A text as a key part: percent-encoded; ``~`` too (``quote`` keeps it), so only hashes start with it."""
    if safe is _SAFE and _PLAIN(value):
        return value
    return quote(value, safe=safe, errors="surrogatepass").replace("~", "%7E")


def part(encoded: str) -> str:
    """An encoded part as it goes into a key: itself, or ``~<hex>`` when longer than ``LONG_PART``."""
    return encoded if len(encoded) <= LONG_PART else "~" + digest(encoded)


def secret(value: str, key: bytes) -> str:
    """A value that must not be readable (a header, a cookie, a credential): ``~s`` + HMAC-SHA256 with ``key``."""
    mac = hmac.new(key, value.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()
    return "~s" + mac[:32]


_ATOMS: tuple[tuple[type, str], ...] = (
    (int, "int"), (float, "float"), (decimal.Decimal, "dec"), (uuid.UUID, "uuid"), (_dt.datetime, "datetime"),
    (_dt.date, "date"), (_dt.time, "time"), (_dt.timedelta, "timedelta"),
)


def _atom(value: Any) -> str | None:
    if value is None or isinstance(value, bool):
        return {True: "!true", False: "!false", None: "!null"}[value]
    for kind, tag in _ATOMS:
        if isinstance(value, kind):
            if isinstance(value, _dt.timedelta):
                shown = f"{value.days}d{value.seconds}s{value.microseconds}us"
            elif isinstance(value, _dt.date | _dt.time):
                shown = value.isoformat()
            else:
                shown = repr(value) if isinstance(value, float) else str(value)
            return f"!{tag}.{text(shown, safe='-_.:')}"
    return None


def typed(value: Any) -> str | None:
    """A value as a key part that keeps its type: a text as :func:`text`, anything else tagged with ``!``.
    ``None`` when the value's type is not part of a call's identity (a session, a client, a request object):
    such arguments are left out of the key.

    Stable across processes, hosts and restarts: never ``repr()`` of an object or ``hash()``.
    """
    if isinstance(value, enum.Enum):
        inner = typed(value.value)
        return None if inner is None else f"!enum.{text(type(value).__name__, safe='_')}({inner})"
    if isinstance(value, str):
        return text(value) if value else '!""'  # "" in a list must differ from nothing: [""] is not []
    atom = _atom(value)
    if atom is not None:
        return atom
    if isinstance(value, list | tuple | set | frozenset):
        items = [typed(v) for v in value]
        present = [i for i in items if i is not None]
        if len(present) < len(items):
            return None
        if isinstance(value, set | frozenset):
            return "!set{" + ",".join(sorted(present)) + "}"
        return ("!tuple[" if isinstance(value, tuple) else "![") + ",".join(present) + "]"
    if isinstance(value, Mapping):
        pairs = [(typed(k), typed(v)) for k, v in value.items()]
        if any(k is None or v is None for k, v in pairs):
            return None
        return "!{" + ",".join(sorted(f"{k}={v}" for k, v in pairs)) + "}"
    dump = getattr(value, "model_dump_json", None)  # a pydantic model given as a query object
    if callable(dump):
        return f"!model.{text(type(value).__name__, safe='_')}({text(str(dump()))})"
    return None


def identity(endpoint: str, params: Iterable[tuple[str, str, str]]) -> str:
    """``<endpoint>?<section>.<name>=<value>&...`` from (section, name, encoded value) triples: the value is
    already a key part (:func:`text`, :func:`typed` or :func:`secret`); names are encoded here.

    Sections keep the kinds of input apart (``r`` request: method and host; ``p`` path, ``q`` query, ``h``
    header, ``c`` cookie, ``a`` argument). Triples are sorted by (section, name); a name's repeated values keep
    the order they were given in (stable sort).
    """
    ordered = sorted(params, key=lambda t: (t[0], t[1]))
    query = "&".join(f"{section}.{part(text(name))}={part(value)}" for section, name, value in ordered)
    head = text(endpoint, _HEAD_SAFE)
    if len(head) > LONG_PART * 2:
        head = "~" + digest(head)
    ident = f"{head}?{query}" if query else head
    if len(ident) > LONG_ID:
        ident = f"{head}?~{digest(query, 32)}"
    return ident


def key_identity(key: str | Mapping[str, Any]) -> str:
    """The identity of an explicit key: a string as it is (encoded), a mapping by its sorted items (typed)."""
    if isinstance(key, str):
        return identity(key, [])
    params = []
    for name, value in key.items():
        value_part = typed(value)
        if value_part is None:
            raise ConfigurationError(f"key item {name!r} ({type(value).__name__}) cannot be part of a cache key")
        params.append(("a", str(name), value_part))
    return identity("", params)


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
        return f"{self.entry_prefix}{ident}"

    def lease(self, ident: str) -> str:
        return f"{self.lease_prefix}{ident}"

    @property
    def entry_prefix(self) -> str:
        return f"{self.base}:e{KEY_FORMAT}:"

    @property
    def lease_prefix(self) -> str:
        return f"{self.base}:l{KEY_FORMAT}:"

    @property
    def secret(self) -> str:
        """The namespace's random key for hashing header, cookie and credential values (made once, kept)."""
        return f"{self.base}:k"

    @property
    def version(self) -> str:
        return f"{self.base}:v"

    @property
    def index(self) -> str:
        return f"{self.base}:i"

    def tag_index(self, tag: str) -> str:
        return f"{self.base}:t:{part(text(tag))}"

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
