"""Metrics and spans (hyperion_lock.metrics): the API on its own, the run-once events against a real Redis, the
library without prometheus_client and OpenTelemetry, and the multi-process sums under a real gunicorn.

The run-once tests read the process-wide registry, each under a job key of its own; spans are read from the
OpenTelemetry SDK's in-memory exporter, handed to the library's recorder for the test.
"""


from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from hyperion_lock import (
    Cache,
    CacheStatus,
    Coordinator,
    Settings,
    gunicorn_child_exit,
    gunicorn_metrics_dir,
    render_metrics,
)
from hyperion_lock.metrics import (
    MULTIPROC_ENV,
    NOT_INSTALLED,
    PLAIN_TEXT,
    Metrics,
    _remove_dir,
    metrics,
)
from tests.support.metrics import new_key, outcomes_of, sample, spans_of

LABELS = {"key", "outcome", "namespace", "status", "le"}












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

