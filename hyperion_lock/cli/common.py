"""What every ``hyperion-lock`` command shares: the exit codes, the settings and client it works
with, and how it says that Redis or the lock directory could not be used."""

from __future__ import annotations

import argparse
import fcntl
import os
import sys
from pathlib import Path

import redis

from hyperion_lock.connection.clients import sync_client_from_url
from hyperion_lock.errors import ConfigurationError
from hyperion_lock.settings import Settings

EXIT_OK, EXIT_FAILED, EXIT_RUNNING, EXIT_UNREACHABLE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 3, 64, 130


def settings_of(args: argparse.Namespace) -> Settings:
    return Settings.from_env(redis_url=args.url, key_prefix=args.prefix)


def client_of(settings: Settings) -> redis.Redis:
    assert settings.redis_url
    return sync_client_from_url(settings.redis_url, connect_timeout=settings.connect_timeout,
                                socket_timeout=settings.connect_timeout)


def unreachable(settings: Settings, exc: Exception) -> int:
    where = settings.describe_target()
    print(f"hyperion-lock: cannot use Redis at {where}: {type(exc).__name__}: {exc}",
          file=sys.stderr)
    return EXIT_UNREACHABLE


def file_unusable(settings: Settings, exc: OSError | ConfigurationError) -> int:
    """The lock directory could not be read or changed (or was refused): say which file and why; exit 3."""
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        message = f"cannot use the file locks in {settings.lock_dir}: {where}{exc.strerror or exc}"
    else:
        message = str(exc)
    print(f"hyperion-lock: {message}", file=sys.stderr)
    return EXIT_UNREACHABLE


# The lock directory is verified (private to this user) before anything in it is read or removed; every error
# reading it is raised, never taken for "no jobs".
def lock_held(path: Path) -> bool:
    """Whether a process holds the lock file ``path`` (a runner of the job on this host)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops our shared lock, if we got it
    return False
