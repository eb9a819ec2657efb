"""Errors of the response cache; each is a :class:`~hyperion_lock.HyperionLockError` and says what to fix."""

from __future__ import annotations

from typing import Any

from hyperion_lock.errors import HyperionLockError


class CacheError(HyperionLockError):
    """Root of the cache's errors. ``key`` is ``<namespace>:<identity>`` of the entry involved."""


class CacheSerializationError(CacheError):
    """A value cannot be stored and read back as the same value (raised on first use, by the call that computed
    it): annotate the function's return type (or the route's ``response_model``) so JSON decodes back into it,
    return JSON-compatible data, or choose ``codec="pickle"`` with a ``signing_key``."""


class CacheValueTooLargeError(CacheError):
    """Kept for code that catches it: a value over ``max_size`` is now served uncached (with one WARNING per
    endpoint or function), not raised."""


class CacheComputeError(CacheError):
    """The computation failed in another worker while this one waited for it (errors are passed on at once,
    not cached unless ``cache_errors`` is set). ``status_code`` and ``detail`` carry an ``HTTPException``'s."""

    def __init__(
        self,
        message: str,
        *,
        key: str | None = None,
        error_type: str | None = None,
        error_message: str | None = None,
        status_code: int | None = None,
        detail: Any = None,
        runner: str | None = None,
    ) -> None:
        super().__init__(message, key=key)
        self.error_type = error_type
        self.error_message = error_message
        self.status_code = status_code
        self.detail = detail
        self.runner = runner
