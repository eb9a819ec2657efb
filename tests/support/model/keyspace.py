"""The key and TTL commands both Redis models (``redis_model.py``, run-once; ``cache_model.py``, the cache) build on.

A :class:`KeySpace` is a mutable scratch copy of a model's frozen ``Db`` that one script runs on: each key's value and
its remaining time to live in milliseconds (``None``: no expiry), and the messages the script publishes. What a value
is (a string; or a string, hash or sorted set) and the commands that read or write values are the model's own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

V = TypeVar("V")  # what a key holds
K = TypeVar("K", bound="KeySpace[Any]")
Rows = tuple[tuple[str, V, int | None], ...]  # a frozen ``Db``: ``(name, value, pttl_ms or None)`` sorted by name


def value_in(rows: Rows[V], key: str) -> V | None:
    """The value of ``key`` in a frozen ``Db``'s rows (``None``: no such key)."""
    for name, value, _ in rows:
        if name == key:
            return value
    return None


def pttl_in(rows: Rows[V], key: str) -> int:
    """``PTTL key`` on a frozen ``Db``'s rows: -2 no such key, -1 no expiry."""
    for name, _, ttl in rows:
        if name == key:
            return -1 if ttl is None else ttl
    return -2


@dataclass
class KeySpace(Generic[V]):
    data: dict[str, tuple[V, int | None]]
    published: list[tuple[str, str]] = field(default_factory=list)

    def rows(self) -> Rows[V]:
        """Every key as ``(name, value, pttl_ms or None)``, sorted by name: what a frozen ``Db`` holds."""
        return tuple(sorted(((name, value, ttl) for name, (value, ttl) in self.data.items()), key=lambda r: r[0]))

    def delete(self, *keys: str) -> int:
        n = 0
        for key in keys:
            if self.data.pop(key, None) is not None:
                n += 1
        return n

    def pexpire(self, key: str, ms: int) -> int:
        if key not in self.data:
            return 0
        if ms <= 0:
            del self.data[key]
        else:
            self.data[key] = (self.data[key][0], ms)
        return 1

    def pttl(self, key: str) -> int:
        entry = self.data.get(key)
        if entry is None:
            return -2
        return -1 if entry[1] is None else entry[1]

    def publish(self, channel: str, message: str) -> None:
        self.published.append((channel, message))


def run_script(transcriptions: Mapping[str, Callable[[K, list[str], list[str]], Any]], r: K, script: str,
               keys: Sequence[Any], args: Sequence[Any]) -> Any:
    """Run the transcription of ``script`` (a Lua text) on ``r``, keys and arguments stringified as redis-py sends
    them; its reply. ``KeyError``: the model has no transcription of that script."""
    fn = transcriptions.get(script)
    if fn is None:
        raise KeyError(f"the model has no transcription of this script:\n{script}")
    return fn(r, [str(k) for k in keys], [redis_arg(a) for a in args])


def redis_arg(value: Any) -> str:
    """An argument as redis-py sends it (ints and floats as their text; bytes as UTF-8)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, float):
        return repr(value)
    return str(value)
