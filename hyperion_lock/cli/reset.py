"""``hyperion-lock reset``: clear a job's recorded outcome(s) in Redis or in the lock directory."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import redis

from hyperion_lock.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    client_of,
    file_unusable,
    lock_held,
    settings_of,
    unreachable,
)
from hyperion_lock.connection.clients import as_text
from hyperion_lock.connection.cluster import is_cluster_client, sharded_script
from hyperion_lock.errors import ConfigurationError
from hyperion_lock.runonce import scripts as _scripts
from hyperion_lock.runonce.file_backend import FileLayout, verify_lock_dir
from hyperion_lock.runonce.keys import JobKeys
from hyperion_lock.runonce.model import Holder, Status
from hyperion_lock.settings import validate_name


def redis_reset(client: redis.Redis, prefix: str, key: str, generation: str | None, force: bool) -> tuple[bool, str]:
    """Clear ``key``'s outcome(s) (and with ``force`` a live lease) with the RESET script; (refused, message)."""
    keys = JobKeys(prefix, key)
    if generation is not None:
        outcome_keys = [keys.outcome(generation)]
    else:
        outcome_keys = [as_text(k) or "" for k in client.scan_iter(match=f"{keys.base}:outcome:*", count=500)]
    script = client.register_script(sharded_script(_scripts.RESET) if is_cluster_client(client) else _scripts.RESET)
    release = json.dumps({"status": str(Status.RELEASED), "generation": generation or "", "host": "hyperion-lock",
                          "pid": os.getpid(), "fence": 0, "since": int(time.time() * 1000)})
    deleted = 0
    for okey in outcome_keys or [keys.outcome(generation or "-")]:
        done, lease = script(keys=[keys.lease, okey, keys.channel],
                             args=["1" if force else "0", release])
        if as_text(lease):  # RESET returns only a lease that is a JSON object (it clears a corrupt one)
            holder = Holder.from_mapping(json.loads(as_text(lease) or "{}"))
            return True, (f"refused: {key} is running in {holder.runner} (generation {holder.generation}, fencing "
                          f"token {holder.fencing_token}); wait for it, or use --force if that process is gone")
        deleted += int(done)
    return False, f"{key}: cleared {deleted} key(s)" if deleted else f"{key}: nothing to clear"


def file_reset(lock_dir: Path, prefix: str, key: str, generation: str | None, force: bool) -> tuple[bool, str]:
    if not verify_lock_dir(lock_dir, create=False):
        return False, f"{key}: nothing to clear"
    files = FileLayout(lock_dir, prefix, key)
    if lock_held(files.lock) and not force:
        return True, f"refused: {key} is running on this host (its lock file is held); wait, or use --force"
    removed = 0
    for path in lock_dir.glob(files.outcome_glob(generation)):
        path.unlink(missing_ok=True)
        removed += 1
    return False, f"{key}: removed {removed} outcome file(s)" if removed else f"{key}: nothing to clear"


def cmd_reset(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    key = validate_name(args.job_key, "job key")
    generation = args.generation and validate_name(args.generation, "generation")
    try:
        if settings.redis_url:
            client = client_of(settings)
            try:
                refused, message = redis_reset(client, settings.key_prefix, key, generation, args.force)
            finally:
                client.close()
        else:
            try:
                refused, message = file_reset(Path(settings.lock_dir), settings.key_prefix, key, generation,
                                              args.force)
            except (OSError, ConfigurationError) as exc:
                return file_unusable(settings, exc)
    except (redis.RedisError, redis.exceptions.RedisClusterException, OSError) as exc:
        return unreachable(settings, exc)
    print(message, file=sys.stderr if refused else sys.stdout)
    return EXIT_FAILED if refused else EXIT_OK
