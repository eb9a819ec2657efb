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
import re
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Awaitable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis.asyncio as aredis
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY, CollectorRegistry

from hyperion_lock import (
    Cache,
    CacheStatus,
    Coordinator,
    JobKeys,
    LeaseLostError,
    Settings,
    current_lease,
    gunicorn_child_exit,
    gunicorn_metrics_dir,
    render_metrics,
)
from hyperion_lock.connection.clients import aclose
from hyperion_lock.metrics import (
    MULTIPROC_ENV,
    NOT_INSTALLED,
    PLAIN_TEXT,
    Metrics,
    _remove_dir,
    metrics,
)
from hyperion_lock.testing import RedisServer

from ._deploy import ROOT, Gunicorn, running
from .conftest import until, wait_until

LABELS = {"key", "outcome", "namespace", "status", "le"}


def sample(name: str, registry: CollectorRegistry = REGISTRY, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def key_samples(name: str, key: str) -> dict[str, float]:
    """outcome -> value of every sample ``name`` of job ``key`` in the process-wide registry."""
    return {s.labels.get("outcome", ""): s.value for fam in REGISTRY.collect() for s in fam.samples
            if s.name == name and s.labels.get("key") == key}


def new_key() -> str:
    return f"metrics-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> InMemorySpanExporter:
    """The library's spans go to an SDK tracer with an in-memory exporter for this test."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(metrics, "_tracer", provider.get_tracer("test"))
    monkeypatch.setattr(metrics, "_traced", True)
    return exporter


def spans_of(exporter: InMemorySpanExporter, name: str, key: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans()
            if s.name == name and s.attributes is not None and s.attributes.get("hyperion_lock.key") == key]


def outcomes_of(found: list[ReadableSpan]) -> Counter[str]:
    return Counter(str((s.attributes or {}).get("hyperion_lock.outcome")) for s in found)


# -- the recorder on its own ---------------------------------------------------------------------------------------
def test_events_are_counted_under_few_labels() -> None:
    reg = CollectorRegistry()
    m = Metrics(registry=reg)
    m.job_finished("migrate", "done", 1.5)
    m.job_finished("migrate", "failed", 0.25)
    m.waited("migrate", "done", 1.25)
    m.waited("migrate", "done", -0.5)  # a clock that went back is a zero wait
    m.took_over("migrate")
    m.lease_lost("seed")
    m.reconnected("migrate")
    m.reconnected("migrate")
    assert sample("hyperion_lock_job_runs_total", reg, key="migrate", outcome="done") == 1
    assert sample("hyperion_lock_job_runs_total", reg, key="migrate", outcome="failed") == 1
    assert sample("hyperion_lock_job_duration_seconds_sum", reg, key="migrate", outcome="done") == 1.5
    assert sample("hyperion_lock_job_duration_seconds_count", reg, key="migrate", outcome="failed") == 1
    assert sample("hyperion_lock_wait_seconds_count", reg, key="migrate", outcome="done") == 2
    assert sample("hyperion_lock_wait_seconds_sum", reg, key="migrate", outcome="done") == 1.25
    assert sample("hyperion_lock_takeovers_total", reg, key="migrate") == 1
    assert sample("hyperion_lock_lost_leases_total", reg, key="seed") == 1
    assert sample("hyperion_lock_reconnects_total", reg, key="migrate") == 2
    names = {s.name for fam in reg.collect() for s in fam.samples}
    assert all(n.startswith("hyperion_lock_") for n in names), names
    assert {label for fam in reg.collect() for s in fam.samples for label in s.labels} <= LABELS


def test_cache_counts_by_namespace_and_status() -> None:
    reg = CollectorRegistry()
    m = Metrics(registry=reg)
    for _ in range(3):
        m.cache_counted("quotes", CacheStatus.HIT)
    m.cache_counted("quotes", CacheStatus.STALE)
    m.cache_counted("quotes", CacheStatus.MISS, compute=0.5)
    m.cache_counted("quotes", None, error=True, compute=0.25)
    m.cache_counted("users", "bypass")
    assert sample("hyperion_lock_cache_requests_total", reg, namespace="quotes", status="hit") == 3
    assert sample("hyperion_lock_cache_requests_total", reg, namespace="quotes", status="stale") == 1
    assert sample("hyperion_lock_cache_requests_total", reg, namespace="quotes", status="miss") == 1
    assert sample("hyperion_lock_cache_requests_total", reg, namespace="quotes", status="error") == 1
    assert sample("hyperion_lock_cache_requests_total", reg, namespace="users", status="bypass") == 1
    assert sample("hyperion_lock_cache_compute_seconds_count", reg, namespace="quotes") == 2
    assert sample("hyperion_lock_cache_compute_seconds_sum", reg, namespace="quotes") == 0.75
    # The process-wide Metrics the cache records into writes to the default registry.
    namespace = new_key()
    metrics.cache_counted(namespace, CacheStatus.MISS)
    assert sample("hyperion_lock_cache_requests_total", namespace=namespace, status="miss") == 1


async def test_a_real_cache_counts_its_lookups_in_prometheus() -> None:
    """The cache's own counting reaches the metrics: a miss (with its computation), then hits."""
    namespace = new_key()
    cache = Cache(None, settings=Settings(redis_url=None, key_prefix="metrics"))
    try:
        for _ in range(3):
            assert await cache.get_or_compute(namespace, "k", lambda: "v", ttl=30) == "v"
    finally:
        await cache.aclose()
    assert sample("hyperion_lock_cache_requests_total", namespace=namespace, status="miss") == 1
    assert sample("hyperion_lock_cache_requests_total", namespace=namespace, status="hit") == 2
    assert sample("hyperion_lock_cache_compute_seconds_count", namespace=namespace) == 1


def test_prepare_sets_everything_up_before_any_event() -> None:
    """prepare() creates the metrics and resolves the tracer; will_wait() creates the series a wake-up records into,
    at 0, so recording after the wake-up only updates values that exist."""
    reg, tracer = CollectorRegistry(), FakeTracer()
    m = Metrics(registry=reg, tracer=tracer)
    assert not list(reg.collect())
    m.prepare()
    assert {fam.name for fam in reg.collect()} >= {"hyperion_lock_wait_seconds", "hyperion_lock_job_runs",
                                                     "hyperion_lock_cache_requests"}
    assert reg.get_sample_value("hyperion_lock_wait_seconds_count", {"key": "k", "outcome": "done"}) is None
    m.will_wait("k")
    assert reg.get_sample_value("hyperion_lock_wait_seconds_count", {"key": "k", "outcome": "done"}) == 0
    m.waited("k", "done", 0.25)
    assert sample("hyperion_lock_wait_seconds_count", reg, key="k", outcome="done") == 1
    m.prepare()  # again: nothing changes
    assert sample("hyperion_lock_wait_seconds_sum", reg, key="k", outcome="done") == 0.25


def test_render_is_the_prometheus_text_format() -> None:
    reg = CollectorRegistry()
    m = Metrics(registry=reg)
    m.job_finished("k", "done", 0.5)
    body, content_type = m.render()
    assert content_type.startswith("text/plain") and "charset=utf-8" in content_type
    assert 'hyperion_lock_job_runs_total{key="k",outcome="done"} 1.0' in body.decode().splitlines()
    # render_metrics() is the process-wide registry's text.
    key = new_key()
    metrics.job_finished(key, "done", 0.5)
    assert f'hyperion_lock_job_runs_total{{key="{key}",outcome="done"}} 1.0' in render_metrics()[0].decode()


def test_a_registry_that_refuses_the_metrics_is_logged_once_and_never_raises(
    caplog: pytest.LogCaptureFixture,
) -> None:
    reg = CollectorRegistry()
    Metrics(registry=reg).job_finished("k", "done", 1.0)
    clashing = Metrics(registry=reg)  # the same metric names again: prometheus_client refuses them
    with caplog.at_level(logging.WARNING, logger="hyperion_lock.metrics"):
        clashing.job_finished("k", "done", 1.0)
        clashing.waited("k", "done", 1.0)
        clashing.cache_counted("ns", "hit")
    warned = [r for r in caplog.records if "metrics: could not record" in r.getMessage()]
    assert len(warned) == 1 and warned[0].name == "hyperion_lock.metrics", caplog.records
    assert sample("hyperion_lock_job_runs_total", reg, key="k", outcome="done") == 1  # the first one's count


def test_without_prometheus_client_and_opentelemetry_everything_is_a_no_op(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("prometheus_client", "prometheus_client.multiprocess", "opentelemetry", "opentelemetry.trace"):
        monkeypatch.setitem(sys.modules, name, None)  # `import` raises ImportError, find_spec finds nothing
    m = Metrics()
    m.job_finished("k", "done", 1.0)
    m.waited("k", "done", 1.0)
    m.took_over("k")
    m.lease_lost("k")
    m.reconnected("k")
    m.cache_counted("ns", "hit", error=True, compute=1.0)
    with m.span("hyperion_lock.job", "k") as span:
        span.set("outcome", "done")
    assert m.render() == (NOT_INSTALLED, PLAIN_TEXT)
    env: dict[str, str] = {}
    assert gunicorn_metrics_dir(env) is None and env == {}
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    gunicorn_child_exit(SimpleNamespace(), SimpleNamespace(pid=12345))  # nothing to do, nothing raised


class FakeTracer:
    """Records what the library asks of a tracer."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []

    def start_as_current_span(self, name: str, attributes: dict[str, Any]) -> Any:
        record: dict[str, Any] = {"name": name, **attributes, "exit": None}
        self.spans.append(record)

        class Manager:
            def __enter__(self) -> Any:
                return SimpleNamespace(set_attribute=record.__setitem__)

            def __exit__(self, *exc: Any) -> None:
                record["exit"] = exc[0]

        return Manager()


def test_spans_with_a_fake_tracer() -> None:
    tracer = FakeTracer()
    m = Metrics(registry=CollectorRegistry(), tracer=tracer)
    with m.span("hyperion_lock.job", "migrate") as span:
        span.set("outcome", "done")
        span.set("fencing_token", 7)
    with pytest.raises(KeyError), m.span("hyperion_lock.wait", "seed"):
        raise KeyError("the caller's own error goes through")
    assert tracer.spans == [
        {"name": "hyperion_lock.job", "hyperion_lock.key": "migrate", "hyperion_lock.outcome": "done",
         "hyperion_lock.fencing_token": 7, "exit": None},
        {"name": "hyperion_lock.wait", "hyperion_lock.key": "seed", "exit": KeyError},
    ]


def test_gunicorn_metrics_dir_makes_one_per_run_and_only_its_creator_removes_it(tmp_path: Path) -> None:
    env: dict[str, str] = {}
    made = gunicorn_metrics_dir(env)
    assert made is not None and env == {MULTIPROC_ENV: made}
    assert Path(made).is_dir() and not list(Path(made).iterdir())
    assert gunicorn_metrics_dir(env) == made  # a reload (HUP) keeps the directory and its sums
    _remove_dir(made, os.getpid() + 1)  # the exit handler, inherited by a forked worker: leaves it
    assert Path(made).is_dir()
    _remove_dir(made, os.getpid())  # the master that made it
    assert not Path(made).exists()
    # A directory the user chose is used as it is (created when missing), never removed.
    chosen = tmp_path / "prom"
    env = {MULTIPROC_ENV: str(chosen)}
    assert gunicorn_metrics_dir(env) == str(chosen) and chosen.is_dir()


def test_child_exit_marks_the_worker_dead(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    live = tmp_path / "gauge_livesum_4242.db"  # a live gauge of worker 4242, as prometheus_client names it
    other = tmp_path / "counter_4242.db"
    live.write_bytes(b"")
    other.write_bytes(b"")
    gunicorn_child_exit(SimpleNamespace(), SimpleNamespace(pid=4242))
    assert not live.exists() and other.exists()  # counters stay in the sums


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


# -- nothing on the wake-up path but the wake-up -------------------------------------------------------------------
# A waiter in a process of its own, set up as a traced app under gunicorn would be (an SDK tracer provider,
# PROMETHEUS_MULTIPROC_DIR): it notes sys.modules when it starts waiting (its DEBUG notice "running in ...; waiting")
# and again once run_once returned. Whatever was imported in between was imported by N woken workers at once.
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


# -- run-once against a real Redis ---------------------------------------------------------------------------------
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


# -- the reference deployment ---------------------------------------------------------------------------------------
def metric_values(text: str, name: str, key: str) -> dict[str, float]:
    """outcome -> value of the samples ``name`` of job ``key`` in an exposition text."""
    found: dict[str, float] = {}
    for m in re.finditer(rf'^{name}\{{([^}}]*)\}} (\S+)$', text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if labels.get("key") == key:
            found[labels.get("outcome", "")] = float(m.group(2))
    return found


def metrics_from_workers(g: Gunicorn, distinct: int, max_requests: int = 2000) -> dict[int, str]:
    """GET /metrics on fresh connections until ``distinct`` workers answered: pid -> text."""

    def one() -> tuple[int, str]:
        response = g.get("/metrics")
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
        return int(response.headers["x-worker-pid"]), response.text

    return g.from_workers(one, distinct, max_requests=max_requests)


@pytest.mark.e2e
@pytest.mark.integration
def test_gunicorn_metrics_are_summed_over_the_workers(tmp_path: Path, redis_url: str) -> None:
    """The reference app under gunicorn with 3 workers: /metrics, from whichever worker answers, shows each job run
    once and waited for twice, also after a worker was replaced; the per-run directory goes with the master."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    with running(Gunicorn(tmp_path, workers=3, HYPERION_LOCK_REDIS_URL=redis_url, TMPDIR=str(tmp))) as g:
        g.wait_healthy()
        reports = g.startup_reports(3)
        (made,) = list(tmp.glob("hyperion-lock-metrics-*"))
        texts = metrics_from_workers(g, distinct=2)
        for text in texts.values():
            for job in ("migrate", "seed"):
                assert metric_values(text, "hyperion_lock_job_runs_total", job) == {"done": 1.0}, text
                assert metric_values(text, "hyperion_lock_wait_seconds_count", job) == {"done": 2.0}, text
        # A replaced worker skips the jobs (same generation) and waits for nothing; the one it replaced still counts.
        runners = {r["jobs"]["migrate"]["runner_pid"] for r in reports.values()}
        victim = next(pid for pid in reports if pid not in runners)
        os.kill(victim, signal.SIGTERM)
        g.wait_log(r"Booting worker with pid: \d+", count=4)
        wait_until(lambda: metric_values(g.get("/metrics").text, "hyperion_lock_wait_seconds_count", "migrate")
                   == {"done": 3.0}, "the new worker's wait in the sums")
        text = g.get("/metrics").text
        assert metric_values(text, "hyperion_lock_job_runs_total", "migrate") == {"done": 1.0}
        assert "Traceback" not in g.log() and "not marked dead" not in g.log(), g.log()
    assert not made.exists()


def test_a_sync_job_runs_inside_its_span(tmp_path: Path, spans: InMemorySpanExporter) -> None:
    """The job span is the current span in the job's thread, so the job's own spans are its children."""
    from opentelemetry import trace

    key = new_key()
    inside: list[int] = []

    def job() -> None:
        inside.append(trace.get_current_span().get_span_context().span_id)

    outcome = Coordinator(None, lock_dir=str(tmp_path), generation="g").run_once_sync(key, job)
    assert outcome.ran_here
    (job_span,) = spans_of(spans, "hyperion_lock.job", key)
    assert job_span.context is not None and inside == [job_span.context.span_id]
    assert outcomes_of(spans_of(spans, "hyperion_lock.wait", key)) == {"lead": 1}
