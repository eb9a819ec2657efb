"""A real OS process that runs one job through the coordinator, for the integration tests and benchmarks.

    python -m tests.support.proc_worker --url URL --key K --generation G --ttl 1 --job sleep:2 --log FILE

Writes JSON lines to ``--log`` (appends, one ``open``/``write`` per line, safe across processes):
``{"event": "ran", ...}`` when the job body starts here, ``{"event": "returned", ...}`` when ``run_once``
returned, ``{"event": "raised", "error": ...}`` when it raised. Exit code 0 on return, 3 when it raised.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from typing import Any

from hyperion_lock import Coordinator, HyperionLockError, current_lease

GATE_TIMEOUT = 120.0  # the longest a ``file:`` job waits for its gate file; a test that never creates it fails


def emit(path: str, **fields: Any) -> None:
    fields.setdefault("pid", os.getpid())
    fields.setdefault("t", time.time())
    with open(path, "a") as fh:
        fh.write(json.dumps(fields) + "\n")


class JobAbort(BaseException):
    """A BaseException that is not an Exception, as pytest's ``Failed`` or gevent's ``Timeout`` are."""


#: ``--job base`` / ``cancelled`` (async) and ``syncbase:abort`` / ``syncbase:kbd`` (sync, in the worker thread)
#: raise these at once: a custom BaseException, a CancelledError of the job's own, a KeyboardInterrupt.
RAISES: dict[str, type[BaseException]] = {
    "base": JobAbort, "cancelled": asyncio.CancelledError, "abort": JobAbort, "kbd": KeyboardInterrupt,
}


def make_job(spec: str, log: str) -> Any:
    kind, _, arg = spec.partition(":")

    async def job() -> None:
        lease = current_lease()
        emit(log, event="ran", fence=lease.fencing_token if lease else None)
        if kind in RAISES:
            emit(log, event="job-failing")
            raise RAISES[kind]("raised by the job")
        if kind == "sleep":
            await asyncio.sleep(float(arg or 0))
        elif kind == "fail":
            await asyncio.sleep(float(arg or 0))
            emit(log, event="job-failing")
            raise ValueError("migration 0002 exploded")
        elif kind == "file":  # run until the test creates the file ``arg`` (the test decides when the job ends)
            deadline = time.monotonic() + GATE_TIMEOUT
            while not await asyncio.to_thread(os.path.exists, arg):  # polled: the test has no other way to signal
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"gate file {arg!r} did not appear within {GATE_TIMEOUT:g} s")
                await asyncio.sleep(0.02)
        elif kind == "check":  # sleep, then verify the lease is still ours before "writing"
            await asyncio.sleep(float(arg or 0))
            assert lease is not None
            lease.ensure_held()
        emit(log, event="job-finished")

    def sync_job() -> None:
        lease = current_lease()
        emit(log, event="ran", fence=lease.fencing_token if lease else None)
        if kind == "exit":  # what alembic.config.main() and click's standalone mode do
            emit(log, event="job-failing")
            sys.exit(int(arg or 1))
        if kind == "syncbase":  # what the sync job's own code raises, in its worker thread
            emit(log, event="job-failing")
            raise RAISES[arg]("raised by the job")
        time.sleep(float(arg or 0))
        emit(log, event="job-finished")

    return sync_job if kind in ("syncsleep", "exit", "syncbase") else job


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default=None)
    parser.add_argument("--key", default="migrate")
    parser.add_argument("--generation", default="g1")
    parser.add_argument("--ttl", type=float, default=1.0)
    parser.add_argument("--job", default="sleep:1")
    parser.add_argument("--log", required=True)
    parser.add_argument("--client", choices=["url", "async", "sync"], default="url")
    parser.add_argument("--lock-dir", default=None)
    parser.add_argument("--wait-timeout", type=float, default=None)
    parser.add_argument("--sync-api", action="store_true", help="use run_once_sync instead of run_once")
    parser.add_argument("--failure-hold", type=float, default=None)
    parser.add_argument("--call-timeout", type=float, default=None, help="wrap run_once in asyncio.wait_for")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s pid={os.getpid()} %(name)s %(message)s")

    overrides: dict[str, Any] = {"generation": args.generation, "lease_ttl": args.ttl, "progress_interval": 1.0}
    if args.lock_dir:
        overrides["lock_dir"] = args.lock_dir
    if args.wait_timeout:
        overrides["wait_timeout"] = args.wait_timeout
    if args.failure_hold:
        overrides["failure_hold"] = args.failure_hold
    client: Any = args.url
    if args.url and args.client == "async":
        import redis.asyncio as aredis

        client = aredis.Redis.from_url(args.url)
    elif args.url and args.client == "sync":
        import redis

        client = redis.Redis.from_url(args.url)
    coordinator = Coordinator(client, **overrides)
    job = make_job(args.job, args.log)
    emit(args.log, event="started")
    try:
        if args.sync_api:
            outcome = coordinator.run_once_sync(args.key, job)
        elif args.call_timeout:
            outcome = asyncio.run(asyncio.wait_for(coordinator.run_once(args.key, job), args.call_timeout))
        else:
            outcome = asyncio.run(coordinator.run_once(args.key, job))
    except KeyboardInterrupt:
        emit(args.log, event="raised", error="KeyboardInterrupt", message="")
        return 130
    except HyperionLockError as exc:
        emit(args.log, event="raised", error=type(exc).__name__, message=str(exc))
        return 3
    except BaseException as exc:  # the leader re-raises what its job raised, whatever it is
        emit(args.log, event="raised", error=type(exc).__name__, message=str(exc))
        return 3
    emit(args.log, event="returned", ran_here=outcome.ran_here, runner_pid=outcome.runner_pid,
         fence=outcome.fencing_token, generation=outcome.generation)
    return 0


if __name__ == "__main__":
    sys.exit(main())
