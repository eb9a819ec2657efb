"""Fault-injection helpers: the job key the worker processes use, and waiting for a leader's heartbeat."""

from __future__ import annotations

import time

import redis

from hyperion_lock import JobKeys

KEY = "migrate"  # proc_worker's default job key


EVENT_TIMEOUT = 30.0


def wait_heartbeat(url: str, key: str = KEY, timeout: float = EVENT_TIMEOUT) -> None:
    """Wait for a message on the job's channel: mid-job, only the leader's renewal heartbeat is published there."""
    client = redis.Redis.from_url(url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    try:
        pubsub.subscribe(JobKeys("hyperion_lock", key).channel)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pubsub.get_message(timeout=0.5) is not None:
                return
        raise AssertionError(f"no heartbeat on {key!r}'s channel within {timeout} s")
    finally:
        pubsub.close()
        client.close()

