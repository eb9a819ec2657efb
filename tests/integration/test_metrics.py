"""Metrics and spans (hyperion_lock.metrics): the API on its own, the run-once events against a real Redis, the
library without prometheus_client and OpenTelemetry, and the multi-process sums under a real gunicorn.

The run-once tests read the process-wide registry, each under a job key of its own; spans are read from the
OpenTelemetry SDK's in-memory exporter, handed to the library's recorder for the test.
"""


from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Awaitable
from pathlib import Path

import pytest
import redis.asyncio as aredis
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY

from hyperion_lock import (
    Cache,
    Coordinator,
    JobKeys,
    LeaseLostError,
    Settings,
    current_lease,
    render_metrics,
)
from hyperion_lock.connection.clients import aclose
from hyperion_lock.metrics import (
    MULTIPROC_ENV,
    NOT_INSTALLED,
    PLAIN_TEXT,
)
from hyperion_lock.testing import RedisServer
from tests.support import until
from tests.support.deploy import ROOT
from tests.support.metrics import new_key, outcomes_of, sample, spans_of


def key_samples(name: str, key: str) -> dict[str, float]:
    """outcome -> value of every sample ``name`` of job ``key`` in the process-wide registry."""
    return {s.labels.get("outcome", ""): s.value for fam in REGISTRY.collect() for s in fam.samples
            if s.name == name and s.labels.get("key") == key}










_WRITER = """
import sys
from hyperion_lock.metrics import metrics
metrics.job_finished(sys.argv[1], sys.argv[2], 1.0)
metrics.waited(sys.argv[1], "done", 0.5)
"""


@pytest.mark.integration
def test_multiprocess_sums(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Processes with PROMETHEUS_MULTIPROC_DIR set write their samples there; render_metrics() adds them up."""
    key = new_key()
    env = {**os.environ, MULTIPROC_ENV: str(tmp_path)}
    for outcome in ("done", "failed", "done"):
        subprocess.run([sys.executable, "-c", _WRITER, key, outcome], check=True, env=env, cwd=ROOT, timeout=60)
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    text = render_metrics()[0].decode()
    assert f'hyperion_lock_job_runs_total{{key="{key}",outcome="done"}} 2.0' in text
    assert f'hyperion_lock_job_runs_total{{key="{key}",outcome="failed"}} 1.0' in text
    assert f'hyperion_lock_wait_seconds_count{{key="{key}",outcome="done"}} 3.0' in text


_WITHOUT = """
import json, sys
for name in ("prometheus_client", "opentelemetry"):
    sys.modules[name] = None  # as if not installed: importing it raises ImportError
from hyperion_lock import Coordinator, gunicorn_metrics_dir, render_metrics
from hyperion_lock.metrics import metrics

calls = []
outcome = Coordinator(None, lock_dir=sys.argv[1], generation="g").run_once_sync("k", lambda: calls.append(1))
again = Coordinator(None, lock_dir=sys.argv[1], generation="g").run_once_sync("k", lambda: calls.append(1))
metrics.cache_counted("ns", "HIT", error=True, compute=0.1)
body, content_type = render_metrics()
env = {}
print(json.dumps({"ran": [outcome.ran_here, again.ran_here], "calls": len(calls), "body": body.decode(),
                  "content_type": content_type, "dir": gunicorn_metrics_dir(env), "env": env}))
"""


@pytest.mark.integration
def test_the_library_works_without_prometheus_client_and_opentelemetry(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", _WITHOUT, str(tmp_path)], check=True, capture_output=True,
                         text=True, cwd=ROOT, timeout=60)
    seen = json.loads(out.stdout.splitlines()[-1])
    assert seen == {"ran": [True, False], "calls": 1, "body": NOT_INSTALLED.decode(), "content_type": PLAIN_TEXT,
                    "dir": None, "env": {}}, out.stderr
    assert "Traceback" not in out.stderr and "WARNING" not in out.stderr, out.stderr


@pytest.mark.integration
def test_importing_the_package_imports_neither() -> None:
    # Recent redis-py imports OpenTelemetry itself (redis.observability): only what the package adds counts.
    code = ("import json, sys, redis, redis.asyncio\nbefore = set(sys.modules)\n"
            "import hyperion_lock, hyperion_lock.runonce.coordinator, hyperion_lock.metrics\n"
            "print(json.dumps(sorted(m for m in set(sys.modules) - before if m.split('.')[0] in "
            "('prometheus_client', 'opentelemetry'))))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT,
                         timeout=60)
    assert json.loads(out.stdout.splitlines()[-1]) == []


_WAKE = r"""
import asyncio, json, logging, sys
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

url, key, generation = sys.argv[1:4]
exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
from hyperion_lock import Coordinator

at_wait = set()

class AtWait(logging.Handler):
    def emit(self, record):
        if not at_wait and record.getMessage().startswith(key + ": running in "):
            at_wait.update(sys.modules)
            print("waiting", flush=True)

log = logging.getLogger("hyperion_lock")
log.setLevel(logging.DEBUG)
log.addHandler(AtWait())

async def main():
    outcome = await Coordinator(url, generation=generation, lease_ttl=5).run_once(key, lambda: None)
    new = sorted(set(sys.modules) - at_wait)
    print(json.dumps({"ran_here": outcome.ran_here, "new": new, "spans": len(exporter.get_finished_spans()),
                      "set_up": "prometheus_client" in at_wait}), flush=True)

asyncio.run(main())
"""


_HIT = r"""
import asyncio, json, sys
from hyperion_lock import Cache, Settings

url, namespace = sys.argv[1:3]

async def main():
    cache = Cache(url, settings=Settings(redis_url=url, key_prefix="metrics"))
    assert await cache.connect(5.0)  # the warm-up a lifespan does, after the fork
    before = set(sys.modules)
    value = await cache.get_or_compute(namespace, "k", lambda: "computed here", ttl=60)
    new = sorted(set(sys.modules) - before)
    await cache.aclose()
    print(json.dumps({"value": value, "stats": cache.stats().get(namespace), "new": new}), flush=True)

asyncio.run(main())
"""


_FORKED = r"""
import json, os, sys
from hyperion_lock.metrics import metrics

metrics.prepare()
metrics.job_finished("k", "done", 1.0)  # the parent (a gunicorn master's hook, say) records before the fork
pid = os.fork()
if pid == 0:
    before = sorted(os.listdir(os.environ["PROMETHEUS_MULTIPROC_DIR"]))
    metrics.prepare()  # the child's set-up: its own files now, not at its first event
    after = sorted(os.listdir(os.environ["PROMETHEUS_MULTIPROC_DIR"]))
    print(json.dumps({"child": os.getpid(), "before": before, "after": after}), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
"""


@pytest.mark.integration
def test_prepare_in_a_forked_child_opens_its_own_files(tmp_path: Path) -> None:
    """prometheus_client moves a forked process's values to files of its own pid on the first read or write;
    prepare() makes that happen in the set-up, not at the child's first event (a wake-up)."""
    out = subprocess.run([sys.executable, "-c", _FORKED], check=True, capture_output=True, text=True, cwd=ROOT,
                         timeout=60, env={**os.environ, MULTIPROC_ENV: str(tmp_path)})
    seen = json.loads(out.stdout.splitlines()[-1])
    mine = {f"counter_{seen['child']}.db", f"histogram_{seen['child']}.db"}
    assert not mine & set(seen["before"]) and mine <= set(seen["after"]), seen


@pytest.mark.integration
async def test_nothing_is_imported_between_a_wake_up_and_the_return(redis_url: str, tmp_path: Path) -> None:
    """prometheus_client and the tracer are set up when the call starts, not after the wake-up (issue 13)."""
    key, generation = new_key(), f"gen-{uuid.uuid4().hex}"
    started, go = asyncio.Event(), asyncio.Event()

    async def job() -> None:
        started.set()
        await go.wait()

    leader = asyncio.create_task(Coordinator(redis_url, generation=generation, lease_ttl=5).run_once(key, job))
    await asyncio.wait_for(started.wait(), 30)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _WAKE, redis_url, key, generation, cwd=ROOT,
        env={**os.environ, MULTIPROC_ENV: str(tmp_path)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        waiting = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert waiting == b"waiting\n", (waiting, await proc.stderr.read() if proc.stderr else b"")
        go.set()
        assert (await leader).ran_here
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        go.set()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    seen = json.loads(out.decode().splitlines()[-1])
    assert seen["ran_here"] is False and seen["spans"] == 1, seen  # woken, and its wait span ended
    assert seen["set_up"], "prometheus_client was not imported before the wait"
    assert seen["new"] == [], f"imported between the wake-up and the return: {seen['new']}"


@pytest.mark.integration
async def test_a_cache_hit_imports_nothing(redis_url: str, tmp_path: Path) -> None:
    """After Cache.connect() (the lifespan's warm-up), a hit counts itself in metrics already set up."""
    namespace = new_key()
    cache = Cache(redis_url, settings=Settings(redis_url=redis_url, key_prefix="metrics"))
    try:
        assert await cache.get_or_compute(namespace, "k", lambda: "v", ttl=60) == "v"
    finally:
        await cache.aclose()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _HIT, redis_url, namespace, cwd=ROOT, env={**os.environ, MULTIPROC_ENV: str(tmp_path)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    seen = json.loads(out.decode().splitlines()[-1])
    assert seen["value"] == "v" and seen["stats"]["hits"] == 1, seen
    assert seen["new"] == [], f"imported on a cache hit: {seen['new']}"


async def subscribers(client: aredis.Redis, key: str) -> int:
    reply = await client.pubsub_numsub(JobKeys("hyperion_lock", key).channel)
    return int(reply[0][1])


def logged_waiting(caplog: pytest.LogCaptureFixture, key: str) -> int:
    """How many calls logged that they saw the job running elsewhere and wait (a policy notice, at DEBUG)."""
    return sum(1 for r in caplog.records if r.getMessage().startswith(f"{key}: running in ") and "waiting" in
               r.getMessage())


@pytest.mark.integration
async def test_concurrent_callers_one_run_the_others_wait(redis_url: str, spans: InMemorySpanExporter) -> None:
    key, generation, n = new_key(), f"gen-{uuid.uuid4().hex}", 5
    watcher = aredis.Redis.from_url(redis_url)
    runs: list[int] = []

    async def job() -> None:
        runs.append(1)
        # Hold the lease until every caller listens to the job's events (each subscribes before it probes).
        await until(lambda: _ge(subscribers(watcher, key), n), "every caller subscribed")

    try:
        outcomes = await asyncio.gather(*(
            Coordinator(redis_url, generation=generation, lease_ttl=5).run_once(key, job) for _ in range(n)))
    finally:
        await aclose(watcher)
    assert runs == [1] and sum(o.ran_here for o in outcomes) == 1
    assert key_samples("hyperion_lock_job_runs_total", key) == {"done": 1}
    assert key_samples("hyperion_lock_job_duration_seconds_count", key) == {"done": 1}
    assert key_samples("hyperion_lock_wait_seconds_count", key) == {"done": n - 1}
    for name in ("takeovers_total", "lost_leases_total", "reconnects_total"):
        assert sample(f"hyperion_lock_{name}", key=key) == 0, name
    text = render_metrics()[0].decode()
    assert f'hyperion_lock_job_runs_total{{key="{key}",outcome="done"}} 1.0' in text
    # One job span (its outcome and fencing token); one wait span per call: the leader's ended in "lead".
    (job_span,) = spans_of(spans, "hyperion_lock.job", key)
    assert job_span.attributes is not None
    assert job_span.attributes["hyperion_lock.outcome"] == "done"
    assert job_span.attributes["hyperion_lock.fencing_token"] == outcomes[0].fencing_token
    assert outcomes_of(spans_of(spans, "hyperion_lock.wait", key)) == {"lead": 1, "done": n - 1}


async def _ge(value: Awaitable[int], minimum: int) -> bool:
    return await value >= minimum


@pytest.mark.integration
async def test_a_failed_job_counts_failed_runs_and_waits(redis_url: str, spans: InMemorySpanExporter) -> None:
    key, generation = new_key(), f"gen-{uuid.uuid4().hex}"
    watcher = aredis.Redis.from_url(redis_url)

    async def job() -> None:
        await until(lambda: _ge(subscribers(watcher, key), 3), "every caller subscribed")
        raise RuntimeError("migration broke")

    try:
        results = await asyncio.gather(*(
            Coordinator(redis_url, generation=generation, lease_ttl=5).run_once(key, job) for _ in range(3)),
            return_exceptions=True)
    finally:
        await aclose(watcher)
    assert sorted(type(r).__name__ for r in results) == ["JobFailedError", "JobFailedError", "RuntimeError"]
    assert key_samples("hyperion_lock_job_runs_total", key) == {"failed": 1}
    # The "done" series was created, at 0, when the waiters began to wait (before any wake-up).
    assert key_samples("hyperion_lock_wait_seconds_count", key) == {"done": 0, "failed": 2}
    assert outcomes_of(spans_of(spans, "hyperion_lock.job", key)) == {"failed": 1}
    assert outcomes_of(spans_of(spans, "hyperion_lock.wait", key)) == {"lead": 1, "failed": 2}


@pytest.mark.integration
async def test_a_cancelled_leader_is_taken_over(redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    key, generation = new_key(), f"gen-{uuid.uuid4().hex}"
    caplog.set_level(logging.DEBUG, logger="hyperion_lock")
    started = asyncio.Event()

    async def first() -> None:
        started.set()
        await asyncio.Event().wait()  # until cancelled

    async def second() -> None:
        pass

    leader = asyncio.create_task(
        Coordinator(redis_url, generation=generation, lease_ttl=5).run_once(key, first))
    await started.wait()
    successor = asyncio.create_task(Coordinator(redis_url, generation=generation, lease_ttl=5).run_once(key, second))

    async def seen() -> bool:
        return logged_waiting(caplog, key) >= 1

    await until(seen, "the second caller saw the leader and waits")
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    outcome = await successor
    assert outcome.ran_here
    assert key_samples("hyperion_lock_job_runs_total", key) == {"interrupted": 1, "done": 1}
    assert sample("hyperion_lock_takeovers_total", key=key) == 1
    # Both led; the second one's wait series was created, at 0, when it began to wait.
    assert key_samples("hyperion_lock_wait_seconds_count", key) == {"done": 0}


@pytest.mark.integration
async def test_a_superseded_leader_counts_a_lost_lease(redis_url: str, spans: InMemorySpanExporter) -> None:
    key, generation = new_key(), f"gen-{uuid.uuid4().hex}"
    keys = JobKeys("hyperion_lock", key)
    client = aredis.Redis.from_url(redis_url)

    async def job() -> None:
        lease = current_lease()
        assert lease is not None
        raw = await client.get(keys.lease)
        assert raw is not None
        # Another worker's lease now: the next renewal (every lease_ttl / 3) finds it.
        await client.set(keys.lease, json.dumps({**json.loads(raw), "token": "a-successor"}), px=60_000)

        async def lost() -> bool:
            return lease.lost

        await until(lost, "the renewal saw the other holder")

    try:
        with pytest.raises(LeaseLostError):
            await Coordinator(redis_url, generation=generation, lease_ttl=0.6).run_once(key, job)
        await client.delete(keys.lease)
    finally:
        await aclose(client)
    assert sample("hyperion_lock_lost_leases_total", key=key) == 1
    assert key_samples("hyperion_lock_job_runs_total", key) == {"lost": 1}
    assert outcomes_of(spans_of(spans, "hyperion_lock.job", key)) == {"lost": 1}


@pytest.mark.integration
async def test_a_broken_event_stream_counts_a_reconnect(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """On a Redis of its own: every subscription to it is cut."""
    key, generation, redis_url = new_key(), f"gen-{uuid.uuid4().hex}", redis_server.url
    caplog.set_level(logging.DEBUG, logger="hyperion_lock")
    admin = aredis.Redis.from_url(redis_url)

    async def job() -> None:
        async def waiting() -> bool:
            return logged_waiting(caplog, key) >= 1

        await until(waiting, "the second caller waits")
        await admin.client_kill_filter(_type="pubsub")  # every subscription, the waiter's too

        async def reconnected() -> bool:
            return sample("hyperion_lock_reconnects_total", key=key) >= 1

        await until(reconnected, "the waiter subscribed again")

    try:
        outcomes = await asyncio.gather(*(
            Coordinator(redis_url, generation=generation, lease_ttl=5).run_once(key, job) for _ in range(2)))
    finally:
        await aclose(admin)
    assert sorted(o.ran_here for o in outcomes) == [False, True]
    assert sample("hyperion_lock_reconnects_total", key=key) == 1
    assert key_samples("hyperion_lock_wait_seconds_count", key) == {"done": 1}







