"""One benchmark process: connects, reports ready, then runs the rounds the orchestrator sends on stdin.

    python -m benchmarks.worker --impl hyperion --url URL --ttl 2 --job-seconds 2 --log FILE --tag T

Rounds (one line each on stdin): ``floor CHANNEL`` (block on one pub/sub subscription until a message comes),
``release KEY`` (run-once with a job of ``--job-seconds``; with ``--workers N`` and ``--impl hyperion`` the job
then also waits until N processes listen to the job's channel, so that every waiter really waits when it ends),
``takeover KEY`` (run-once whose first leader sleeps until the orchestrator SIGKILLs it; a later leader runs a short
job), ``exit``. Every fact is appended to ``--log``
as one JSON line (``time.time()``; all processes share the host clock). With ``--impl hyperion`` the ``ready``
line carries ``module``, the resolved ``hyperion_lock.__file__`` this process imported (also printed to stderr).

Only the public API of hyperion_lock is used (``Coordinator``, ``Coordinator.run_once``, ``Outcome.ran_here``,
``JobKeys``), so the same worker drives the library before and after a rewrite of its core.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

IMPLS = ("hyperion", "polling", "redis-py-lock", "python-redis-lock")
# hyperion, release rounds: the leader's job ends only once this many processes listen to the job's channel (every
# call subscribes before its first probe), so set-up still running in a slow worker is not counted as release lag.
BARRIER = {"subscribers": 0}
LONG_JOB = 120.0  # the first leader of a takeover round sleeps this long; it is killed well before
SHORT_JOB = 0.1


class Log:
    def __init__(self, path: str, tag: str) -> None:
        self.path = path
        self.tag = tag

    def emit(self, event: str, **fields: Any) -> None:
        row = {"event": event, "pid": os.getpid(), "t": time.time(), "tag": self.tag, **fields}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")

    def led_before(self, round_key: str) -> bool:
        """Did another process lead this round before (the takeover round's killed leader)?"""
        with open(self.path) as fh:
            for line in fh:
                row = json.loads(line)
                if row["event"] == "lead" and row.get("key") == round_key and row["pid"] != os.getpid():
                    return True
        return False


def job_seconds(log: Log, kind: str, key: str, seconds: float) -> float:
    if kind == "release":
        return seconds
    return SHORT_JOB if log.led_before(key) else LONG_JOB


# -- the run-once flavours; each returns True when the job ran in this process ---------------------------------
def run_hyperion(log: Log, r: redis.Redis, url: str, key: str, ttl: float, secs: Callable[[], float]) -> bool:
    from hyperion_lock import Coordinator, JobKeys

    async def job() -> None:
        log.emit("lead", key=key)
        await asyncio.sleep(secs())
        if BARRIER["subscribers"]:
            await all_listening(log, r, JobKeys("bench", key).channel, key, BARRIER["subscribers"])
        log.emit("job-end", key=key)

    async def main() -> bool:
        coordinator = Coordinator(url, key_prefix="bench", generation="g1", lease_ttl=ttl, progress_interval=3600)
        outcome = await coordinator.run_once(key, job)
        # Inside a FastAPI lifespan the app proceeds right here; asyncio.run's teardown below is benchmark-only.
        log.emit("returned-in-loop", key=key, ran=outcome.ran_here)
        return outcome.ran_here

    return asyncio.run(main())


async def all_listening(log: Log, r: redis.Redis, channel: str, key: str, count: int) -> None:
    """Wait (at most 120 s) until ``count`` clients subscribe to ``channel``; log how long that held the job."""
    started = time.monotonic()
    seen = 0
    for _ in range(6000):
        reply = await asyncio.to_thread(r.pubsub_numsub, channel)
        seen = int(reply[0][1])
        if seen >= count:
            break
        await asyncio.sleep(0.02)
    log.emit("barrier", key=key, held=time.monotonic() - started, subscribers=seen)


def run_polling(log: Log, r: redis.Redis, url: str, key: str, ttl: float, secs: Callable[[], float]) -> bool:
    """The hand-made pattern from the issue: SET NX EX 120, an unlock key, waiters poll every second."""
    if r.set(f"{key}:lock", 1, nx=True, ex=120):
        log.emit("lead", key=key)
        time.sleep(secs())
        log.emit("job-end", key=key)
        r.set(f"{key}:unlock", 1, ex=60)
        return True
    for _ in range(600):
        if r.get(f"{key}:unlock") is not None:
            return False
        time.sleep(1.0)
    raise TimeoutError("gave up polling after 600 s")


def _renewing(every: float, renew: Callable[[], object]) -> Callable[[], None]:
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every):
            renew()

    threading.Thread(target=loop, daemon=True).start()
    return stop.set


def run_redis_py_lock(log: Log, r: redis.Redis, url: str, key: str, ttl: float, secs: Callable[[], float]) -> bool:
    """redis-py's Lock as run-once: blocking acquire (polls every 0.1 s), check a done key, renew by hand."""
    # thread_local=False: the renewal thread must see the token the main thread acquired with.
    lock = r.lock(f"{key}:lock", timeout=ttl, sleep=0.1, blocking=True, thread_local=False)
    lock.acquire()
    try:
        if r.get(f"{key}:done") is not None:
            return False
        stop = _renewing(ttl / 3, lock.reacquire)
        try:
            log.emit("lead", key=key)
            time.sleep(secs())
            log.emit("job-end", key=key)
            r.set(f"{key}:done", 1, ex=3600)
        finally:
            stop()
        return True
    finally:
        lock.release()


def run_python_redis_lock(
    log: Log, r: redis.Redis, url: str, key: str, ttl: float, secs: Callable[[], float]
) -> bool:
    """python-redis-lock as run-once: BLPOP-based blocking acquire, auto-renewal, check a done key."""
    import redis_lock

    lock = redis_lock.Lock(r, f"{key}:lock", expire=max(1, round(ttl)), auto_renewal=True)
    lock.acquire(blocking=True)
    try:
        if r.get(f"{key}:done") is not None:
            return False
        log.emit("lead", key=key)
        time.sleep(secs())
        log.emit("job-end", key=key)
        r.set(f"{key}:done", 1, ex=3600)
        return True
    finally:
        lock.release()


RUNNERS: dict[str, Callable[..., bool]] = {
    "hyperion": run_hyperion,
    "polling": run_polling,
    "redis-py-lock": run_redis_py_lock,
    "python-redis-lock": run_python_redis_lock,
}


def floor_round(log: Log, r: redis.Redis, channel: str) -> None:
    pubsub = r.pubsub()
    pubsub.subscribe(channel)
    confirmed = pubsub.get_message(timeout=10)
    log.emit("subscribed", key=channel, ok=bool(confirmed))
    for _ in range(1000):
        message = pubsub.get_message(timeout=60)
        if message is not None and message["type"] == "message":
            log.emit("woke", key=channel)
            break
    pubsub.close()
    log.emit("floor-done", key=channel)


def floor_async_round(log: Log, url: str, channel: str) -> None:
    """The floor for an asyncio worker (what a FastAPI lifespan runs in): redis.asyncio, one subscription."""
    import redis.asyncio as aredis

    async def wait() -> None:
        client = aredis.Redis.from_url(url, driver_info=None, protocol=2)
        pubsub = client.pubsub()
        await pubsub.subscribe(channel)
        confirmed = await pubsub.get_message(timeout=10)
        log.emit("subscribed", key=channel, ok=bool(confirmed))
        for _ in range(1000):
            message = await pubsub.get_message(timeout=60)
            if message is not None and message["type"] == "message":
                log.emit("woke", key=channel)
                break
        await pubsub.aclose()
        await client.aclose()

    asyncio.run(wait())
    log.emit("floor-done", key=channel)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--impl", choices=IMPLS, required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--ttl", type=float, default=2.0)
    parser.add_argument("--job-seconds", type=float, default=2.0)
    parser.add_argument("--log", required=True)
    parser.add_argument("--tag", default="")
    parser.add_argument("--jitter", type=float, default=0.0, help="random start delay, 0..JITTER s, per round")
    parser.add_argument("--workers", type=int, default=0,
                        help="hyperion release rounds: the job ends only once this many processes listen")
    args = parser.parse_args()
    loaded: dict[str, str] = {}
    if args.impl == "hyperion":
        import hyperion_lock  # import cost before the barrier, like the others

        # Which tree was imported (the compare mode puts a baseline tree first on PYTHONPATH): checked by run.py.
        loaded["module"] = str(Path(hyperion_lock.__file__ or "?").resolve())
        print(f"hyperion_lock loaded from {loaded['module']}", file=sys.stderr, flush=True)
    elif args.impl == "python-redis-lock":
        import redis_lock  # noqa: F401
    log = Log(args.log, args.tag)
    r = redis.Redis.from_url(args.url, driver_info=None)
    r.ping()
    log.emit("ready", **loaded)
    runner = RUNNERS[args.impl]
    for line in sys.stdin:
        parts = line.split()
        if not parts or parts[0] == "exit":
            break
        kind, key = parts[0], parts[1]
        if kind == "floor":
            floor_round(log, r, key)
            continue
        if kind == "floor-async":
            floor_async_round(log, args.url, key)
            continue
        BARRIER["subscribers"] = args.workers if kind == "release" else 0
        if args.jitter > 0:
            time.sleep(random.uniform(0, args.jitter))  # workers of a real boot do not start in lockstep
        log.emit("entered", key=key)
        ran = runner(log, r, args.url, key, args.ttl, lambda k=kind, c=key: job_seconds(log, k, c, args.job_seconds))
        log.emit("resumed", key=key, ran=ran)
    return 0


if __name__ == "__main__":
    sys.exit(main())
