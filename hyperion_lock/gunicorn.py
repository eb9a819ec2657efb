"""Helpers for ``gunicorn.conf.py``: worker count, bind address, the master's ``on_starting`` hook, logging.

Boot timeline under gunicorn >= 22 with ``uvicorn_worker.UvicornWorker``:

1. The master reads the config and runs :func:`gunicorn_on_starting` once, before forking: it sets
   ``HYPERION_LOCK_GENERATION`` (unless already set) to ``host:masterpid:start-time`` and
   ``HYPERION_LOCK_WORKERS`` to the worker count. Every worker inherits both, so all workers of one master
   share one generation without guessing from the process tree; a new master start is a new generation.
2. Each worker imports the app and runs its ASGI lifespan; the run-once jobs happen there.
3. The worker heartbeats gunicorn only once the lifespan finished. gunicorn >= 22 does not apply ``timeout``
   before the first heartbeat, so a long migration is never killed for being slow — and a hung one is never
   reaped either (the lease's progress logs show it). gunicorn <= 21 timed out the boot and killed slow
   starters in a loop: do not use it.
4. A lifespan that raises makes the worker exit with code 3; the master then halts: SIGTERM to every worker, SIGKILL
   after ``graceful_timeout``, a non-zero exit status (3 or 1: a race in gunicorn's halt path ends some halts with a
   ``HaltServer`` traceback and 1, with or without ``--preload``; match non-zero, not 3). Waiting workers end their
   wait at once on the failure outcome (or on that SIGTERM), so the halt takes seconds, not ``graceful_timeout``.

Nothing here imports gunicorn: the hooks receive its objects and only read documented attributes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, MutableMapping
from typing import Any

from hyperion_lock.errors import ConfigurationError
from hyperion_lock.settings import ENV_PREFIX, generation_of, validate_name

logger = logging.getLogger(__name__)

GENERATION_ENV = ENV_PREFIX + "GENERATION"
WORKERS_ENV = ENV_PREFIX + "WORKERS"
DEFAULT_WORKERS = 4
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
LOG_FORMAT = "%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s"

__all__ = [
    "gunicorn_bind",
    "gunicorn_logconfig_dict",
    "gunicorn_on_starting",
    "gunicorn_post_fork",
    "gunicorn_worker_count",
    "gunicorn_workers",
    "new_generation",
]


def _env_int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigurationError(f"{name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigurationError(f"{name} must be between {low} and {high}, got {value}")
    return value


def gunicorn_workers(environ: Mapping[str, str] | None = None) -> int:
    """Worker count from ``WEB_CONCURRENCY`` (default 4)."""
    return _env_int(os.environ if environ is None else environ, "WEB_CONCURRENCY", DEFAULT_WORKERS, 1, 1024)


def gunicorn_worker_count(environ: Mapping[str, str] | None = None) -> int | None:
    """In a worker: how many workers its master runs, as :func:`gunicorn_on_starting` handed it down in
    ``HYPERION_LOCK_WORKERS``; ``None`` when the process was not started by such a master."""
    env = os.environ if environ is None else environ
    if not env.get(WORKERS_ENV, "").strip():
        return None
    return _env_int(env, WORKERS_ENV, DEFAULT_WORKERS, 1, 1024)


def gunicorn_bind(environ: Mapping[str, str] | None = None) -> str:
    """``HOST:PORT`` from ``HOST`` (default 127.0.0.1; use 0.0.0.0 in a container) and ``PORT`` (default 8000)."""
    env = os.environ if environ is None else environ
    host = env.get("HOST", "").strip() or DEFAULT_HOST
    port = _env_int(env, "PORT", DEFAULT_PORT, 1, 65535)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal
    return f"{host}:{port}"


def new_generation(pid: int | None = None, now: float | None = None, host: str | None = None) -> str:
    """``host:pid:start-time``: unique per master start (a valid key name: other characters become '-')."""
    stamp = int((time.time() if now is None else now) * 1000)
    return validate_name(generation_of(pid or os.getpid(), stamp, host or None), "generation")


def prepare_master_env(workers: int, environ: MutableMapping[str, str] | None = None) -> str:
    """Set the generation (unless set) and the worker count for the workers to inherit; return the generation."""
    env = os.environ if environ is None else environ
    generation = env.get(GENERATION_ENV, "").strip()
    if generation:
        validate_name(generation, "generation")
    else:
        generation = new_generation()
        env[GENERATION_ENV] = generation
    env[WORKERS_ENV] = str(workers)
    return generation


def gunicorn_on_starting(server: Any) -> None:
    """gunicorn ``on_starting`` hook (runs once in the master before any fork)."""
    workers = int(server.cfg.workers)
    generation = prepare_master_env(workers)
    server.log.info("hyperion_lock: master pid %d, generation %s, %d worker(s)", os.getpid(), generation, workers)


def gunicorn_post_fork(server: Any, worker: Any) -> None:
    """gunicorn ``post_fork`` hook: say which pid is which worker (the jobs' logs carry the same pid)."""
    server.log.info("hyperion_lock: worker pid %d forked (generation %s)", worker.pid, os.environ.get(GENERATION_ENV))


def gunicorn_logconfig_dict(level: str | None = None) -> dict[str, Any]:
    """``logconfig_dict`` that sends the app's and this library's logs to stderr with the pid on every line,
    so the log shows which worker ran which job. ``LOG_LEVEL`` (default INFO) sets the level."""
    lvl = (level or os.environ.get("LOG_LEVEL", "") or "INFO").upper()
    if lvl not in logging.getLevelNamesMapping():
        raise ConfigurationError(f"LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, got {lvl!r}")
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"pid": {"format": LOG_FORMAT}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "pid", "stream": "ext://sys.stderr"}},
        "root": {"level": lvl, "handlers": ["stderr"]},
        "loggers": {
            "gunicorn.error": {"level": lvl, "handlers": ["stderr"], "propagate": False},
            "gunicorn.access": {"level": "WARNING", "handlers": ["stderr"], "propagate": False},
            "alembic": {"level": lvl},
            "alembic.runtime.plugins": {"level": "WARNING"},
            "sqlalchemy": {"level": "WARNING"},
        },
    }
