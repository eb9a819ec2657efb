"""Drop-in replacement for the hand-made ``use_lock_for_workers`` many FastAPI projects carry."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ._core import Coordinator, RedisLike, invoke
from ._settings import Settings


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

    * ``redis_client`` may be a ``redis.Redis``, a ``redis.asyncio.Redis`` or ``None``. With ``None`` (or one
      worker) and no ``HYPERION_LOCK_REDIS_URL``, one worker runs the job: directly when
      ``number_of_workers <= 1``, else through a file lock shared by the workers of this host.
    * With ``unlock_key`` every caller returns only after the job succeeded somewhere; without it the workers
      that did not run the job return as soon as they know another worker runs it (it still runs once).
      ``unlock_key`` names the done marker in the hand-made version; here the marker is built from ``key``
      and the generation, so its value only selects the behaviour.
    """
    settings = Settings.from_env()
    if number_of_workers <= 1 and redis_client is None and not settings.redis_url:
        logger.info("%s: single worker and no Redis: running the job directly", key)
        await invoke(job_function, args, kwargs)
        return
    coordinator = Coordinator(redis_client, settings=settings, logger=logger)
    if not coordinator.uses_redis:
        logger.info(
            "%s: no Redis configured; coordinating the %d workers of this host through file locks in %s "
            "(one host only: set HYPERION_LOCK_REDIS_URL for several hosts)",
            key, number_of_workers, settings.lock_dir,
        )
    if unlock_key is None:
        await coordinator.try_run_once(key, job_function, *args, **kwargs)
    else:
        await coordinator.run_once(key, job_function, *args, **kwargs)
