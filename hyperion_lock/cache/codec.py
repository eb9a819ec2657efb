"""Turning values into stored bytes and back: JSON by default, decoded through the declared type.

* :class:`JsonCodec` encodes with pydantic's ``TypeAdapter`` of the function's return annotation (or the route's
  ``response_model``) when pydantic is installed, so a ``datetime``, ``UUID``, ``Decimal``, model or dataclass
  comes back as itself; without pydantic, with the standard ``json`` module. With ``check=True`` (the function
  API) every computed value is decoded again at once and compared: a value JSON would silently change (a
  ``datetime`` without an annotation, a tuple, NaN) raises :class:`CacheSerializationError` on first use
  instead of turning into another type on the first cache hit.
* :class:`PickleCodec` only when chosen explicitly, and only signed (HMAC-SHA256 with a key of at least 32
  bytes): a payload whose signature does not match is never unpickled (anyone who can write to Redis could
  otherwise run code in every worker).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import pickle
import types
import typing
from collections.abc import Callable
from functools import cache
from typing import Any, Protocol

from hyperion_lock.cache.errors import CacheSerializationError
from hyperion_lock.errors import ConfigurationError


class Codec(Protocol):
    name: str

    def encode(self, value: Any) -> bytes: ...

    def decode(self, data: bytes) -> Any: ...


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or repr(annotation)


@cache
def _pydantic() -> Any:
    try:
        import pydantic
    except ImportError:  # the core install needs only redis
        return None
    return pydantic


class JsonCodec:
    """JSON through the declared type. ``dump_options`` are pydantic's (``by_alias``, ``exclude_none``, ...)."""

    name = "json"

    def __init__(self, annotation: Any = Any, *, check: bool = True, **dump_options: Any) -> None:
        self.annotation = annotation
        self.check = check
        self.dump_options = dump_options
        pydantic = _pydantic()
        self._adapter = pydantic.TypeAdapter(annotation) if pydantic is not None else None

    def encode(self, value: Any) -> bytes:
        try:
            data = self._dump(value)
        except CacheSerializationError:
            raise
        except Exception as exc:
            raise CacheSerializationError(
                f"cannot encode a {type(value).__name__} as JSON ({type(exc).__name__}: {exc}); return "
                f"JSON-compatible data or a model, annotate the return type, or choose codec='pickle' with a "
                f"signing_key"
            ) from None
        if self.check and not self._survives(value, data):
            raise CacheSerializationError(
                f"a {type(value).__name__} does not survive JSON as the declared type {_type_name(self.annotation)} "
                f"(it would come back changed on the first cache hit); annotate the return type precisely (e.g. "
                f"-> datetime, -> list[Quote], -> tuple[int, ...]) or return JSON-native data"
            )
        return data

    def _dump(self, value: Any) -> bytes:
        if self._adapter is None:
            return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
        typed = self.annotation is not Any and isinstance(self.annotation, type)  # Any is a class since 3.11
        if not (typed and isinstance(value, self.annotation)):
            value = self._adapter.validate_python(value)  # a dict for a model, as FastAPI does
        data: bytes = self._adapter.dump_json(value, **self.dump_options)
        return data

    def _survives(self, value: Any, data: bytes) -> bool:
        try:
            back = self.decode(data)
        except Exception:
            return False
        return bool(back == value) and type(back) is type(value)

    def decode(self, data: bytes) -> Any:
        if self._adapter is None:
            return json.loads(data)
        return self._adapter.validate_json(data)


class PickleCodec:
    """Signed pickle: ``HMAC-SHA256(key, body) || body``; a wrong signature raises, nothing is unpickled."""

    name = "pickle"
    _SIG = 32

    def __init__(self, signing_key: bytes | str | None) -> None:
        key = signing_key.encode() if isinstance(signing_key, str) else signing_key
        if not key or len(key) < 32:
            raise ConfigurationError(
                "codec='pickle' needs signing_key= of at least 32 bytes (e.g. secrets.token_bytes(32), shared by "
                "every worker): unsigned pickle from Redis would let anyone who can write to it run code here"
            )
        self._key = key

    def _sign(self, body: bytes) -> bytes:
        return hmac.new(self._key, body, hashlib.sha256).digest()

    def encode(self, value: Any) -> bytes:
        try:
            body = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise CacheSerializationError(f"cannot pickle a {type(value).__name__}: {exc}") from None
        return self._sign(body) + body

    def decode(self, data: bytes) -> Any:
        sig, body = data[: self._SIG], data[self._SIG :]
        if len(sig) != self._SIG or not hmac.compare_digest(sig, self._sign(body)):
            raise CacheSerializationError(
                "refusing to unpickle a cache entry whose signature does not match: written with another "
                "signing_key, or not by this application"
            )
        return pickle.loads(body)  # signed by a key only the application holds


def etag_of(payload: bytes) -> str:
    """A strong ETag from the content alone: the same bytes give the same tag in every worker, host and restart."""
    return '"' + hashlib.sha256(payload).hexdigest()[:32] + '"'


def return_type(fn: Callable[..., Any]) -> Any:
    """``fn``'s resolved return annotation (``Any`` when it has none or it cannot be resolved: the value is then
    checked to survive plain JSON on first use). Resolved on its own, so an unresolvable parameter annotation (a
    class local to a function) does not lose it."""
    annotation = getattr(fn, "__annotations__", {}).get("return", Any)
    if not isinstance(annotation, str):
        return annotation
    holder = types.SimpleNamespace(__annotations__={"return": annotation})
    try:
        return typing.get_type_hints(holder, globalns=getattr(fn, "__globals__", None)).get("return", Any)
    except Exception:
        return Any
