"""Regression tests of the core on its cancellation, failure, retry and signal paths (real Redis, real processes)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

import pytest
import redis
import redis.asyncio as aredis

from hyperion_lock import ConfigurationError, Coordinator, JobKeys, Status
from hyperion_lock.connection.clients import aclose
from hyperion_lock.runonce.scripts import FINISH, PROBE
from tests.support import ROOT, Workers

pytestmark = pytest.mark.integration


def _sha(script: str) -> str:
    return hashlib.sha1(script.encode()).hexdigest()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hyperion_lock.cli.main", *args], capture_output=True, text=True,
                          check=False, timeout=60, cwd=ROOT)


# -- 1. a cancelled leader keeps its lease until its sync job really stopped ------------------------------------
@pytest.mark.parametrize("how", ["sigint", "call-timeout"])
def test_cancelled_leader_of_a_sync_job_keeps_the_lease_until_it_returned(
    redis_url: str, workers: Workers, how: str
) -> None:
    gen = f"cancel-{how}-{time.time_ns()}"
    opts: dict[str, Any] = {"url": redis_url, "job": "syncsleep:2.5", "ttl": 1.0, "generation": gen}
    if how == "call-timeout":
        opts["call_timeout"] = 0.5
    [leader] = workers.spawn(1, **opts)
    workers.wait_for("ran")
    workers.spawn(2, url=redis_url, job="syncsleep:0.1", ttl=1.0, generation=gen)
    workers.wait_for("started", 3)
    if how == "sigint":
        leader.send_signal(signal.SIGINT)  # Ctrl-C under asyncio.run: the main task is cancelled
    codes = workers.join()
    ran = workers.events("ran")
    assert len(ran) == 1, f"the job ran twice: {ran}"
    # The thread finished its work, so its outcome was recorded and the waiters did not run it again.
    assert [r["pid"] for r in workers.events("job-finished")] == [leader.pid]
    assert [r["ran_here"] for r in workers.events("returned")] == [False, False]
    assert codes[1:] == [0, 0]
    expected = {"sigint": ("KeyboardInterrupt", 130), "call-timeout": ("TimeoutError", 3)}[how]
    [raised] = workers.events("raised")
    assert (raised["pid"], raised["error"], codes[0]) == (leader.pid, *expected)


# -- 2. SystemExit from the job is a failure -------------------------------------------------------------------
def test_system_exit_from_the_job_is_a_recorded_failure(redis_url: str, workers: Workers) -> None:
    gen = f"sysexit-{time.time_ns()}"
    workers.spawn(4, url=redis_url, job="exit:2", generation=gen)
    assert workers.join() == [3] * 4
    assert len(workers.events("ran")) == 1  # nobody took over to run it again
    assert {r["error"] for r in workers.events("raised")} == {"JobFailedError"}
    stored = redis.Redis.from_url(redis_url).get(JobKeys("hyperion_lock", "migrate").outcome(gen))
    assert stored is not None and json.loads(stored)["status"] == "failed"


def test_system_exit_zero_is_success(redis_url: str) -> None:
    outcome = Coordinator(redis_url, generation=f"exit0-{time.time_ns()}").run_once_sync("k", lambda: sys.exit(0))
    assert outcome.ran_here and outcome.status is Status.DONE


# -- 3. a failing job runs once per start ----------------------------------------------------------------------
def test_failure_is_final_within_the_hold_and_reset_retries_at_once(redis_url: str, workers: Workers) -> None:
    gen = f"hold-{time.time_ns()}"
    workers.spawn(4, url=redis_url, job="fail:0.3", generation=gen)
    assert workers.join() == [3] * 4
    # Workers of the same start that arrive after the failure (late, or respawned) fail at once, without a run.
    workers.spawn(4, url=redis_url, job="sleep:0.1", generation=gen)
    assert workers.join()[4:] == [3] * 4
    assert len(workers.events("ran")) == 1
    errors = sorted(r["error"] for r in workers.events("raised"))
    assert errors == ["JobFailedError"] * 7 + ["ValueError"]  # only the leader re-raises the job's own error
    reset = _cli("reset", "migrate", "--generation", gen, "--url", redis_url)
    assert reset.returncode == 0, reset.stdout + reset.stderr
    workers.spawn(4, url=redis_url, job="sleep:0.1", generation=gen)
    assert workers.join()[8:] == [0] * 4
    assert len(workers.events("ran")) == 2


def test_after_the_hold_a_new_call_retries(redis_url: str, workers: Workers) -> None:
    gen = f"hold-expiry-{time.time_ns()}"
    workers.spawn(2, url=redis_url, job="fail:0.1", generation=gen, failure_hold=1.0)
    assert workers.join() == [3, 3]
    client = redis.Redis.from_url(redis_url)
    key = JobKeys("hyperion_lock", "migrate").outcome(gen)
    recorded = json.loads(client.get(key) or b"{}")
    deadline = time.monotonic() + 30
    while recorded["ttl_ms"] - client.pttl(key) < 1000:  # by Redis's clock, as the library measures it
        assert time.monotonic() < deadline
        time.sleep(0.05)
    workers.spawn(2, url=redis_url, job="sleep:0.1", generation=gen, failure_hold=1.0)
    assert workers.join()[2:] == [0, 0]
    assert len(workers.events("ran")) == 2


# -- 4. every script is idempotent for its own token -----------------------------------------------------------
class LosingReplies(aredis.Redis):
    """A real client whose next reply to the named scripts is lost after Redis executed them."""

    lose: set[str]

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        result = await super().evalsha(sha, numkeys, *keys_and_args)
        if sha in self.lose:
            self.lose.discard(sha)
            raise redis.exceptions.ConnectionError("reply lost")
        return result


async def test_lost_replies_to_probe_and_finish_continue_as_if_they_had_arrived(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = cast(LosingReplies, LosingReplies.from_url(redis_url))  # from_url is typed to return a plain Redis
    client.lose = {_sha(PROBE), _sha(FINISH)}
    gen = f"lost-reply-{time.time_ns()}"
    ran: list[int] = []
    caplog.set_level(logging.DEBUG, logger="hyperion_lock")
    try:
        outcome = await Coordinator(client, generation=gen, lease_ttl=2.0).run_once(
            "lost", lambda: ran.append(1))
    finally:
        await aclose(client)
    assert not client.lose  # both replies were really lost
    assert outcome.ran_here and ran == [1]
    assert outcome.fencing_token == 1  # the retried probe recognised its own lease: no second leadership
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "retrying" not in r.getMessage()]
    sync = redis.Redis.from_url(redis_url)
    keys = JobKeys("hyperion_lock", "lost")
    assert sync.get(keys.lease) is None and int(sync.get(keys.fence) or 0) == 1


# -- 5. signals ------------------------------------------------------------------------------------------------
def _run_script(code: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **env})


def _read_until(proc: subprocess.Popen[str], marker: str, count: int = 1) -> list[str]:
    lines: list[str] = []
    assert proc.stdout is not None
    while sum(marker in line for line in lines) < count:
        line = proc.stdout.readline()
        assert line, f"process ended before {marker!r}: {''.join(lines)}"
        lines.append(line)
    return lines


SIGNAL_IN_PROBE = """
import asyncio, hashlib, os, signal, sys
import redis.asyncio as aredis
from hyperion_lock import Coordinator, WaitInterruptedError
from hyperion_lock.connection.clients import aclose
from hyperion_lock.runonce.scripts import PROBE

class SignalDuringProbe(aredis.Redis):
    async def evalsha(self, sha, numkeys, *args):
        result = await super().evalsha(sha, numkeys, *args)
        if sha == hashlib.sha1(PROBE.encode()).hexdigest() and result[2] == 1:
            os.kill(os.getpid(), signal.SIG)  # arrives while the winning reply is on its way
            await asyncio.sleep(0.2)
        return result

async def main():
    client = SignalDuringProbe.from_url(sys.argv[1] if len(sys.argv) > 1 else os.environ["URL"])
    try:
        await Coordinator(client, generation=os.environ["GEN"], lease_ttl=30).run_once("probe-sig", print)
        print("ran")
    except WaitInterruptedError as exc:
        print("interrupted", exc)
    finally:
        await aclose(client)

asyncio.run(main())
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_while_the_winning_probe_is_in_flight_hands_the_lease_on(redis_url: str, sig: str) -> None:
    gen = f"probe-signal-{sig}-{time.time_ns()}"
    proc = _run_script(SIGNAL_IN_PROBE.replace("signal.SIG)", f"signal.{sig})"), URL=redis_url, GEN=gen)
    out, _ = proc.communicate(timeout=60)
    assert "interrupted" in out and "ran" not in out.split(), out
    keys = JobKeys("hyperion_lock", "probe-sig")
    client = redis.Redis.from_url(redis_url)
    assert client.get(keys.lease) is None  # handed on: the next worker need not wait out the 30 s lease


WAIT_PRELUDE = """
import asyncio, logging, os, signal, sys
from hyperion_lock import Coordinator, WaitInterruptedError

class Marker(logging.Handler):  # says when a wait began (the library logs it at DEBUG)
    def emit(self, record):
        if "waiting" in record.getMessage():
            print("waiting", flush=True)

logging.getLogger("hyperion_lock").addHandler(Marker())
logging.getLogger("hyperion_lock").setLevel(logging.DEBUG)

def handlers():
    return [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)]
"""

OVERLAPPING_WAITS = WAIT_PRELUDE + """

async def main():
    before = handlers()
    c = Coordinator(os.environ["URL"], generation=os.environ["GEN"], lease_ttl=5)
    results = await asyncio.gather(*(c.run_once("overlap", print) for _ in range(3)), return_exceptions=True)
    print("results", sorted(type(r).__name__ for r in results))
    print("restored", handlers() == before)

before = handlers()
asyncio.run(main())
print("restored-after-run", handlers() == before)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_overlapping_waits_all_end_on_a_signal_and_handlers_come_back(
    redis_url: str, workers: Workers, sig: signal.Signals
) -> None:
    gen = f"overlap-{sig.name}-{time.time_ns()}"
    workers.spawn(1, url=redis_url, key="overlap", job="sleep:20", ttl=5.0, generation=gen)
    workers.wait_for("ran")
    proc = _run_script(OVERLAPPING_WAITS, URL=redis_url, GEN=gen)
    try:
        _read_until(proc, "waiting", 3)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert "results ['WaitInterruptedError', 'WaitInterruptedError', 'WaitInterruptedError']" in out, out
    assert "restored True" in out and "restored-after-run True" in out, out


STAGGERED_WAITS = WAIT_PRELUDE + """
waiting = asyncio.Queue()
Marker.emit = lambda self, record: "waiting" in record.getMessage() and waiting.put_nowait(1)

async def main():
    before = handlers()
    url, gen = os.environ["URL"], os.environ["GEN"]
    first = asyncio.create_task(Coordinator(url, generation=gen, wait_timeout=1).run_once("overlap", print))
    await waiting.get()  # the first wait began (and hooked the signals) before the second
    second = asyncio.create_task(Coordinator(url, generation=gen).run_once("overlap", print))
    await waiting.get()
    try:
        await first
    except Exception as exc:
        print("first ended", type(exc).__name__, flush=True)
    try:
        await second
    except Exception as exc:
        print("second ended", type(exc).__name__, flush=True)
    print("restored", handlers() == before)

asyncio.run(main())
"""


def test_a_wait_that_outlives_an_earlier_one_can_still_be_interrupted(redis_url: str, workers: Workers) -> None:
    gen = f"staggered-{time.time_ns()}"
    workers.spawn(1, url=redis_url, key="overlap", job="sleep:20", ttl=5.0, generation=gen)
    workers.wait_for("ran")
    proc = _run_script(STAGGERED_WAITS, URL=redis_url, GEN=gen)
    try:
        head = "".join(_read_until(proc, "first ended"))
        proc.send_signal(signal.SIGTERM)
        out = head + proc.communicate(timeout=30)[0]
    finally:
        proc.kill()
    assert "first ended WaitTimeoutError" in out and "second ended WaitInterruptedError" in out, out
    assert "restored True" in out, out


def test_sigint_to_a_waiter_under_asyncio_run_is_wait_interrupted(redis_url: str, workers: Workers) -> None:
    gen = f"sigint-waiter-{time.time_ns()}"
    workers.spawn(1, url=redis_url, key="overlap", job="sleep:20", ttl=5.0, generation=gen)
    workers.wait_for("ran")
    proc = _run_script(OVERLAPPING_WAITS.replace("range(3)", "range(1)"), URL=redis_url, GEN=gen)
    try:
        _read_until(proc, "waiting")
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert "results ['WaitInterruptedError']" in out, out


# -- 8. wrong input is reported at once, in the backend's own words --------------------------------------------
def test_lock_dir_that_cannot_be_created_is_a_configuration_error(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    coordinator = Coordinator(None, lock_dir=str(blocker / "locks"), generation="g", connect_timeout=30)
    with pytest.raises(ConfigurationError, match="lock directory") as info:
        coordinator.run_once_sync("k", print)
    assert "Redis" not in str(info.value).split("HYPERION_LOCK_REDIS_URL")[0]
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]  # not retried like an outage


def test_key_prefix_with_a_slash_works_with_file_locks(tmp_path: Path) -> None:
    c = Coordinator(None, lock_dir=str(tmp_path), key_prefix="team/app", generation="g")
    assert c.run_once_sync("k", lambda: None).ran_here
    assert not c.run_once_sync("k", lambda: None).ran_here


def test_wrong_db_index_is_a_configuration_error(redis_url: str) -> None:
    base = redis_url.rsplit("/", 1)[0]
    with pytest.raises(ConfigurationError, match="99"):
        Coordinator(f"{base}/99", generation="g", connect_timeout=30).run_once_sync("k", print)


# -- 10. file mode names no finished holder --------------------------------------------------------------------
def test_file_lock_holder_record_is_cleared_when_the_job_ends(tmp_path: Path) -> None:
    from hyperion_lock.runonce.file_backend import FileLayout

    c = Coordinator(None, lock_dir=str(tmp_path), generation="g1")
    seen: list[bool] = []
    files = FileLayout(tmp_path, "hyperion_lock", "k")
    c.run_once_sync("k", lambda: seen.append(files.holder.exists()))
    assert seen == [True] and not files.holder.exists()
