"""Drop-in replacement for the hand-made ``use_lock_for_workers`` many FastAPI projects carry."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

from hyperion_lock.runonce.coordinator import Coordinator, RedisLike
from hyperion_lock.settings import Settings


async def use_lock_for_workers(
    job_function: Callable[..., Any],
    key: str,
    redis_client: RedisLike | None,
    number_of_workers: int,
    logger: logging.Logger,
    unlock_key: str | None = None,
    *args: Any,
    **kwargs: Any,
) -> None:
    """Run ``job_function(*args, **kwargs)`` once across ``number_of_workers`` workers.

    Same signature as the hand-made version, without its failure modes: the lease is renewed while the job
    runs, a killed runner is replaced after the lease TTL, a failed job makes every waiter raise
    :class:`JobFailedError`, and "done" is scoped to the deployment generation (``HYPERION_LOCK_GENERATION``,
    by default the gunicorn master that forked this worker).

    * ``number_of_workers <= 1`` runs the job directly, with no coordination at all, as the hand-made helper
      did (tests rely on it). The coordinated path for any worker count is :class:`Coordinator`.
    * ``redis_client`` may be a ``redis.Redis``, a ``redis.asyncio.Redis`` or ``None``. With ``None`` and no
      ``HYPERION_LOCK_REDIS_URL`` the workers of this host coordinate through file locks.
    * With ``unlock_key`` every caller returns only after the job succeeded somewhere; without it the workers
      that did not run the job return as soon as they know another worker runs it (it still runs once).
      ``unlock_key`` names the done marker in the hand-made version; here the marker is built from ``key``
      and the generation, so its value only selects the behaviour.
    """
    if number_of_workers <= 1:
        logger.info("%s: one worker: running the job directly", key)
        result = job_function(*args, **kwargs)
        if inspect.isawaitable(result):
            await result
        return
    settings = Settings.from_env()
    coordinator = Coordinator(redis_client, settings=settings, logger=logger)
    if not coordinator.uses_redis:
        logger.debug(
            "%s: no Redis configured; coordinating the %d workers of this host through file locks in %s "
            "(one host only: set HYPERION_LOCK_REDIS_URL for several hosts)",
            key, number_of_workers, settings.lock_dir,
        )
    if unlock_key is None:
        await coordinator.try_run_once(key, job_function, *args, **kwargs)
    else:
        await coordinator.run_once(key, job_function, *args, **kwargs)
