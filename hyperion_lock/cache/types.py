"""The cache's value types and settings: what a caller passes (:class:`Spec`, :class:`CacheSettings`) and gets back
(:class:`Result`, :class:`CacheStatus`), shared by the facade (:mod:`.facade`) and the HTTP layer (:mod:`.http`).
Every duration and size is checked against its documented range when the object is made, never later."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from typing import Any, Literal

from hyperion_lock.cache.codec import Codec, JsonCodec
from hyperion_lock.cache.keys import CacheKeys
from hyperion_lock.cache.policy import default_refresh_ahead
from hyperion_lock.errors import ConfigurationError
from hyperion_lock.settings import DAY, DURATION_BOUNDS, ENV_PREFIX, HOUR, MINUTE, YEAR, bounded_seconds


class CacheStatus(StrEnum):
    HIT = "HIT"  # served from the cache (also: delivered by another caller's computation)
    MISS = "MISS"  # computed by this call, and stored
    STALE = "STALE"  # past its TTL, served within the stale period while one worker refreshes it
    BYPASS = "BYPASS"  # computed directly, not stored: the store is unavailable, or the value is over max_size


MIB = 1 << 20
MAX_VALUE_SIZE = 512 * MIB  # the largest string Redis stores
MAX_TTL = YEAR  # of an entry (``ttl``, ``stale``): Cache-Control and Redis PX stay far from any overflow

#: (lowest, highest) of each :class:`CacheSettings` field: durations in seconds (a lowest of 0 means "> 0"), sizes
#: and counts as whole numbers (inclusive). Documented in docs/caching.md ("Settings").
CACHE_SETTING_BOUNDS: dict[str, tuple[float, float]] = {
    "op_timeout": (0.0, MINUTE),
    "op_timeout_max": (0.0, MINUTE),
    "lease_ttl": DURATION_BOUNDS["lease_ttl"],
    "wait_timeout": (0.0, DAY),
    "max_size": (1, MAX_VALUE_SIZE),
    "breaker_failures": (1, 1000),
    "breaker_retry": (0.0, HOUR),
    "breaker_max_retry": (0.0, DAY),
    "stats_interval": (0.0, DAY),
    "memory_max_entries": (1, 100_000_000),
    "near_max_entries": (0, 10_000_000),
    "near_max_bytes": (1, MAX_VALUE_SIZE),
}


def whole_number(value: Any, what: str, low: float, high: float) -> int:
    """A size or count: a whole number in ``[low, high]`` (a string from the environment is parsed first)."""
    number = value
    if isinstance(value, str):
        try:
            number = float(value.strip()) if any(c in value for c in ".eE") else int(value.strip())
        except ValueError:
            raise ConfigurationError(f"{what} must be a whole number, got {value!r}") from None
    if isinstance(number, float) and math.isfinite(number) and number == int(number):
        number = int(number)
    if isinstance(number, bool) or not isinstance(number, int) or not low <= number <= high:
        raise ConfigurationError(f"{what} must be a whole number from {int(low)} to {int(high)}, got {value!r}")
    return number


def seconds_in(value: Any, what: str, low: float, high: float, *, zero: bool = False) -> float:
    """A duration in ``(0, high]`` (``[low, high]`` when ``low`` > 0; ``0`` itself too when ``zero``): a finite
    number of seconds, never a bool. Refused here, a value never reaches Redis (``PX`` overflows) or a timer."""
    if isinstance(value, bool):
        raise ConfigurationError(f"{what} must be a number of seconds, got {value!r}")
    if not zero:
        return bounded_seconds(value, what, low, high)
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"{what} must be a number of seconds, got {value!r}") from None
    if not (math.isfinite(seconds) and 0 <= seconds <= high):
        raise ConfigurationError(f"{what} must be a finite number of seconds from 0 to {high:g}, got {value!r}")
    return seconds


@dataclass(frozen=True)
class CacheSettings:
    """Tunables shared by every cached function of one :class:`Cache`, from ``HYPERION_LOCK_CACHE_*``.

    - ``op_timeout`` (0.05 s) / ``op_timeout_max`` (1 s): floor and ceiling of the store-call timeout, which is
      4 x the 95th percentile of the last 64 reply times in between (the ceiling before the first reply; an
      ``op_timeout`` above ``op_timeout_max`` is a fixed timeout); the event loop's own lateness is not counted.
    - ``lease_ttl`` (3 s): a computing worker that dies is taken over after at most this long.
    - ``wait_timeout`` (30 s): a waiter computes directly after waiting this long in total.
    - ``max_size`` (1 MiB): largest encoded value; a larger one is served, not stored.
    - ``breaker_failures`` (2): store failures in a row that open the circuit breaker;
      ``breaker_retry`` (0.5 s) first recovery check after a refused one, doubling up to ``breaker_max_retry``
      (10 s); a check that is not answered waits up to 2 s, so a resumed Redis is seen at once.
    - ``stats_interval`` (5 s): how often this process adds its counts to the shared ones in Redis.
    - ``memory_max_entries`` (10000): per namespace, without Redis.
    - ``near_max_entries`` (1000, 0: none) / ``near_max_bytes`` (16 MiB): the per-worker near cache of fresh
      entries read from Redis, served with no Redis call until the namespace's channel says they changed
      (:mod:`._cache_near`).

    Every value must lie in its range (:data:`CACHE_SETTING_BOUNDS`), else :class:`ConfigurationError` here, when
    the :class:`Cache` is made: a value that is refused later (by Redis, or a timer) would fail every request.
    """

    op_timeout: float = 0.05
    op_timeout_max: float = 1.0
    lease_ttl: float = 3.0
    wait_timeout: float = 30.0
    max_size: int = MIB
    breaker_failures: int = 2
    breaker_retry: float = 0.5
    breaker_max_retry: float = 10.0
    stats_interval: float = 5.0
    memory_max_entries: int = 10_000
    near_max_entries: int = 1000
    near_max_bytes: int = 16 * MIB

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            what = f"cache setting {f.name} ({ENV_PREFIX}CACHE_{f.name.upper()})"
            low, high = CACHE_SETTING_BOUNDS.get(f.name, (0.0, DAY))
            if f.type in ("int", int):
                value = whole_number(value, what, low, high)
            else:
                value = seconds_in(value, what, low, high)
            object.__setattr__(self, f.name, value)
        if self.breaker_retry > self.breaker_max_retry:
            raise ConfigurationError(f"cache setting breaker_retry ({self.breaker_retry:g} s) must be at most "
                                     f"breaker_max_retry ({self.breaker_max_retry:g} s)")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> CacheSettings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"{ENV_PREFIX}CACHE_{f.name.upper()}", "").strip()
            if raw:
                values[f.name] = raw
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigurationError(f"unknown cache setting(s): {', '.join(sorted(unknown))}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass(frozen=True)
class Spec:
    """How one function or endpoint is cached."""

    keys: CacheKeys
    ttl: float
    stale: float = 0.0
    refresh_ahead: float | None = None
    codec: Codec = field(default_factory=JsonCodec)
    cache_errors: bool = False
    error_ttl: float = 5.0
    max_size: int | None = None
    lease_ttl: float | None = None
    refresh: Literal["background", "inline"] = "background"
    decode: bool = True  # decode hits (functions); the HTTP layer serves the stored bytes as they are
    name: str = ""  # the endpoint or function, for messages

    def __post_init__(self) -> None:
        """Every duration and size checked against its documented range now (at decoration, or when
        ``get_or_compute`` is called), never later: ``stale=float("inf")`` once passed here and then raised
        ``OverflowError`` while storing, with the lease held; ``stale=1e300`` was refused by Redis and opened
        the circuit breaker of the whole worker."""
        where = f" (cache {self.keys.namespace!r})"
        ttl = seconds_in(self.ttl, "ttl" + where, 0.0, MAX_TTL)
        checked: dict[str, Any] = {
            "ttl": ttl,
            "stale": seconds_in(self.stale, "stale" + where, 0.0, MAX_TTL, zero=True),
            "error_ttl": seconds_in(self.error_ttl, "error_ttl" + where, 0.0, MAX_TTL),
        }
        if self.refresh_ahead is not None:
            checked["refresh_ahead"] = seconds_in(self.refresh_ahead, "refresh_ahead" + where, 0.0, ttl, zero=True)
        if self.lease_ttl is not None:
            checked["lease_ttl"] = seconds_in(self.lease_ttl, "lease_ttl" + where, *DURATION_BOUNDS["lease_ttl"])
        if self.max_size is not None:
            checked["max_size"] = whole_number(self.max_size, "max_size" + where, 1, MAX_VALUE_SIZE)
        for name, value in checked.items():
            object.__setattr__(self, name, value)
        if self.refresh not in ("background", "inline"):
            raise ConfigurationError(f"refresh must be 'background' or 'inline', got {self.refresh!r}")

    @property
    def namespace(self) -> str:
        return self.keys.namespace

    @property
    def refresh_ahead_ms(self) -> int:
        ahead = default_refresh_ahead(self.ttl) if self.refresh_ahead is None else self.refresh_ahead
        return int(ahead * 1000)


_UNSET: Any = object()


@dataclass(frozen=True)
class Result:
    """One lookup's answer: the stored bytes and their ETag, how it was served, and its freshness."""

    payload: bytes
    etag: str
    status: CacheStatus
    max_age: int
    age: int
    value: Any = _UNSET  # the decoded (or computed) value, for the caller that got it first
    status_code: int = 0  # HTTP status and headers the endpoint set on ``response: Response`` (stored with it)
    headers: tuple[tuple[str, str], ...] = ()

    def shared(self) -> Result:
        """The same answer for a caller that joined this process's flight: served, not computed, by it."""
        status = CacheStatus.HIT if self.status is CacheStatus.MISS else self.status
        return replace(self, status=status, value=_UNSET)


@dataclass(frozen=True)
class Answer:
    """A computed value with what its endpoint set on ``response: Response``: a status code and headers, stored with
    the value and sent with every hit. ``uncacheable`` says why it must not be stored at all (a ``Set-Cookie``):
    it is then served to the callers that waited for it and computed again for the next."""

    value: Any
    status_code: int = 0
    headers: tuple[tuple[str, str], ...] = ()
    uncacheable: str = ""


@dataclass
class NamespaceStats:
    hits: int = 0
    misses: int = 0
    stale: int = 0
    bypass: int = 0
    errors: int = 0
    computations: int = 0
    compute_seconds: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
