"""hyperion_lock: run database init and migrations exactly once when many web workers start.

Public API: the names in ``__all__`` (the ``hyperion_lock._*`` modules are private and may change; the reference
app in ``hyperion_lock.demo`` uses nothing else). Importing this package needs only ``redis``: FastAPI is
imported when ``OptionalRedis`` is first used (extra ``fastapi``), gunicorn never (the hooks only read the
objects gunicorn hands them), prometheus_client and OpenTelemetry when a run-once call starts or the cache sets up
an event loop, in the worker (redis-py 8 imports OpenTelemetry itself, when installed).
"""

from typing import TYPE_CHECKING, Any

from ._cache import Cache, CacheSettings, CacheStatus
from ._cache_errors import CacheComputeError, CacheError, CacheSerializationError, CacheValueTooLargeError
from ._compat import use_lock_for_workers
from ._core import Coordinator, current_lease
from ._errors import (
    ConfigurationError,
    CorruptStateError,
    HyperionLockError,
    JobFailedError,
    LeaseLostError,
    RedisAuthError,
    RedisDatabaseIndexError,
    RedisPermissionError,
    RedisTLSError,
    RedisUnavailableError,
    WaitInterruptedError,
    WaitTimeoutError,
)
from ._gunicorn import (
    gunicorn_bind,
    gunicorn_logconfig_dict,
    gunicorn_on_starting,
    gunicorn_post_fork,
    gunicorn_worker_count,
    gunicorn_workers,
    new_generation,
)
from ._keys import JobKeys
from ._metrics import gunicorn_child_exit, gunicorn_metrics_dir, render_metrics
from ._model import Holder, Lease, Outcome, Status
from ._settings import Settings, redact_url
from ._signals import stop_requested

__all__ = [
    "Cache",
    "CacheComputeError",
    "CacheError",
    "CacheSerializationError",
    "CacheSettings",
    "CacheStatus",
    "CacheValueTooLargeError",
    "ConfigurationError",
    "Coordinator",
    "CorruptStateError",
    "Holder",
    "HyperionLockError",
    "JobFailedError",
    "JobKeys",
    "Lease",
    "LeaseLostError",
    "OptionalRedis",
    "Outcome",
    "RedisAuthError",
    "RedisDatabaseIndexError",
    "RedisPermissionError",
    "RedisTLSError",
    "RedisUnavailableError",
    "Settings",
    "Status",
    "WaitInterruptedError",
    "WaitTimeoutError",
    "current_lease",
    "gunicorn_bind",
    "gunicorn_child_exit",
    "gunicorn_logconfig_dict",
    "gunicorn_metrics_dir",
    "gunicorn_on_starting",
    "gunicorn_post_fork",
    "gunicorn_worker_count",
    "gunicorn_workers",
    "new_generation",
    "redact_url",
    "render_metrics",
    "stop_requested",
    "use_lock_for_workers",
]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from ._fastapi import OptionalRedis


def __getattr__(name: str) -> Any:
    # FastAPI is imported only by code that asks for the dependency, keeping worker start-up and the CLI light.
    if name == "OptionalRedis":
        try:
            from ._fastapi import OptionalRedis
        except ModuleNotFoundError as exc:
            if exc.name != "fastapi" and not (exc.name or "").startswith("fastapi."):
                raise
            raise ImportError(
                "hyperion_lock.OptionalRedis needs FastAPI: pip install 'hyperion_lock[fastapi]'", name=exc.name
            ) from exc
        return OptionalRedis
    raise AttributeError(f"module 'hyperion_lock' has no attribute {name!r}")
