"""hyperion_lock: run database init and migrations exactly once when many web workers start.

Public API: the names in ``__all__``, and per audience ``hyperion_lock.fastapi`` (``OptionalRedis``),
``hyperion_lock.gunicorn`` (config hooks), ``hyperion_lock.metrics`` (Prometheus) and ``hyperion_lock.testing``
(the pytest plugin). The layers below them are internal and may change: ``runonce`` and ``cache`` (the two
products, which never import each other), ``connection`` (the Redis layer they share), ``errors`` and ``settings``
(the foundation), and ``cli`` (the ``hyperion-lock`` command, which nothing imports). The reference app (``demo/``
in the repository, not in the wheel) uses the public API only.

Importing this package needs only ``redis``: FastAPI is imported when ``OptionalRedis`` is first used (extra
``fastapi``), gunicorn never (the hooks only read the objects gunicorn hands them), prometheus_client and
OpenTelemetry when a run-once call starts or the cache sets up an event loop, in the worker (redis-py 8 imports
OpenTelemetry itself, when installed).
"""

from typing import TYPE_CHECKING, Any

from hyperion_lock._version import __version__ as __version__
from hyperion_lock.cache.errors import CacheComputeError, CacheError, CacheSerializationError, CacheValueTooLargeError
from hyperion_lock.cache.facade import Cache
from hyperion_lock.cache.types import CacheSettings, CacheStatus
from hyperion_lock.connection.urls import redact_url
from hyperion_lock.errors import (
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
from hyperion_lock.gunicorn import (
    gunicorn_bind,
    gunicorn_logconfig_dict,
    gunicorn_on_starting,
    gunicorn_post_fork,
    gunicorn_worker_count,
    gunicorn_workers,
    new_generation,
)
from hyperion_lock.metrics import gunicorn_child_exit, gunicorn_metrics_dir, render_metrics
from hyperion_lock.runonce.coordinator import Coordinator, current_lease
from hyperion_lock.runonce.dropin import use_lock_for_workers
from hyperion_lock.runonce.keys import JobKeys
from hyperion_lock.runonce.model import Holder, Lease, Outcome, Status
from hyperion_lock.runonce.signals import stop_requested
from hyperion_lock.settings import Settings

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

if TYPE_CHECKING:
    from hyperion_lock.fastapi import OptionalRedis


def __getattr__(name: str) -> Any:
    # FastAPI is imported only by code that asks for the dependency, keeping worker start-up and the CLI light.
    if name == "OptionalRedis":
        try:
            from hyperion_lock.fastapi import OptionalRedis
        except ModuleNotFoundError as exc:
            if exc.name != "fastapi" and not (exc.name or "").startswith("fastapi."):
                raise
            raise ImportError(
                "hyperion_lock.OptionalRedis needs FastAPI: pip install 'hyperion_lock[fastapi]'", name=exc.name
            ) from exc
        return OptionalRedis
    raise AttributeError(f"module 'hyperion_lock' has no attribute {name!r}")
