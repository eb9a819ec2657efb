"""Every way a job ends is defined: whatever the job raises, other than the cancellation of the call itself, is a
recorded failure -- run once, the waiters raise JobFailedError at once, the leader re-raises the job's own error.

Real processes (``tests.support.proc_worker``), with Redis and with file locks.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest
import redis

from hyperion_lock import Coordinator, JobFailedError, JobKeys, Status
from tests.support import Workers

pytestmark = pytest.mark.integration

# job spec of tests.support.proc_worker -> the error the leader re-raises
ENDINGS = {
    "base": "JobAbort",  # a custom BaseException (as pytest's Failed, gevent's Timeout)
    "cancelled": "CancelledError",  # an async job's own CancelledError, the call itself not cancelled
    "syncbase:abort": "JobAbort",  # the same from a sync job (its worker thread)
    "syncbase:kbd": "KeyboardInterrupt",  # raised by a sync job's own code: no signal reaches its thread
}


@pytest.mark.parametrize("job", list(ENDINGS))
@pytest.mark.parametrize("mode", ["redis", "file"])
def test_a_job_raising_a_base_exception_runs_once_and_fails_everyone(
    mode: str, job: str, workers: Workers, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    gen = f"ending-{job}-{time.time_ns()}"
    where: dict[str, str] = (
        {"url": request.getfixturevalue("redis_url")} if mode == "redis" else {"lock_dir": str(tmp_path / "locks")}
    )
    workers.spawn(4, job=job, generation=gen, failure_hold=300, **where)
    codes = workers.join()
    ran = workers.events("ran")
    assert len(ran) == 1, f"the job ran {len(ran)} times: {ran}"
    leader_code = 130 if ENDINGS[job] == "KeyboardInterrupt" else 3  # tests.support.proc_worker's exit codes
    assert sorted(codes) == sorted([3, 3, 3, leader_code]), workers.exited_outputs()
    raised = {r["pid"]: r["error"] for r in workers.events("raised")}
    assert raised.pop(ran[0]["pid"]) == ENDINGS[job]  # the leader re-raises what its job raised
    assert sorted(raised.values()) == ["JobFailedError"] * 3
    # Recorded as a failure: a worker that starts now (within the failure hold) fails at once, without a run.
    workers.spawn(1, job="sleep:0", generation=gen, failure_hold=300, **where)
    assert workers.join()[4:] == [3]
    assert len(workers.events("ran")) == 1
    assert workers.events("raised")[-1]["error"] == "JobFailedError"
    assert ENDINGS[job] in workers.events("raised")[-1]["message"]  # the recorded error type is named


def test_the_failure_is_recorded_with_the_job_s_error_type(redis_url: str, workers: Workers) -> None:
    gen = f"ending-recorded-{time.time_ns()}"
    workers.spawn(1, url=redis_url, job="base", generation=gen)
    assert workers.join() == [3]
    stored = redis.Redis.from_url(redis_url).get(JobKeys("hyperion_lock", "migrate").outcome(gen))
    assert stored is not None
    recorded = json.loads(stored)
    assert (recorded["status"], recorded["error_type"]) == ("failed", "JobAbort")


async def test_keyboard_interrupt_in_the_main_thread_is_an_interruption(redis_url: str) -> None:
    """SIGINT arrives as KeyboardInterrupt in the main thread: the process is being stopped, the job did not fail.
    Nothing is recorded, the lease is handed on at once, and the next call runs the job."""
    assert threading.current_thread() is threading.main_thread()
    gen = f"ending-sigint-{time.time_ns()}"
    coordinator = Coordinator(redis_url, generation=gen, lease_ttl=30)

    async def interrupted() -> None:
        await asyncio.sleep(0)
        raise KeyboardInterrupt

    async def fine() -> None:
        pass

    with pytest.raises(KeyboardInterrupt):
        await coordinator.run_once("sigint", interrupted)
    keys = JobKeys("hyperion_lock", "sigint")
    client = redis.Redis.from_url(redis_url)
    assert client.get(keys.outcome(gen)) is None and client.get(keys.lease) is None  # nothing recorded, handed on
    outcome = await coordinator.run_once("sigint", fine)
    assert outcome.ran_here and outcome.status is Status.DONE


async def test_a_cancelled_call_is_not_a_failure(redis_url: str) -> None:
    """The cancellation of the call itself (a timeout around it) is the one ending that records nothing."""
    gen = f"ending-cancel-{time.time_ns()}"
    coordinator = Coordinator(redis_url, generation=gen, lease_ttl=30)
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(coordinator.run_once("cancel", forever))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    client = redis.Redis.from_url(redis_url)
    keys = JobKeys("hyperion_lock", "cancel")
    assert client.get(keys.outcome(gen)) is None and client.get(keys.lease) is None
    with pytest.raises(_Abort):  # whereas a BaseException of the job's own is recorded, and final
        await coordinator.run_once("cancel", _raise_abort)
    with pytest.raises(JobFailedError, match="_Abort"):
        await coordinator.run_once("cancel", forever)


class _Abort(BaseException):
    pass


async def _raise_abort() -> None:
    raise _Abort("abort")
