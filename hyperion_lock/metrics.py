"""Optional Prometheus metrics and OpenTelemetry spans: no-ops unless ``prometheus_client`` / ``opentelemetry-api``
can be imported (extras ``metrics`` and ``tracing``). The core install needs neither.

Importing this module (or ``hyperion_lock``) imports neither. (redis-py 8 imports ``opentelemetry`` itself, in
``redis.observability``, when it is installed; that is redis-py's, not ours.) :meth:`Metrics.prepare` imports
``prometheus_client``, creates the metrics and resolves the tracer: a run-once call does it when it starts, before
its first probe, and the cache when it sets up an event loop (:meth:`Cache.connect` in the lifespan, or its first
use on that loop) -- in the worker, after the fork. Never after a wake-up: N workers woken by one message would
all import at the same moment, on a few cores, on the path that decides when they start serving (32 workers
importing ``prometheus_client``, ~30 ms each, on 2 cores: half a second of release lag). A call that is about to
wait also creates the series its wake-up records into (:meth:`Metrics.will_wait`), so the wake-up itself only
updates values that exist.

That matters under gunicorn too: ``prometheus_client`` picks its multi-process storage when it is imported, so
``PROMETHEUS_MULTIPROC_DIR`` must be set before (:func:`gunicorn_metrics_dir`, called by ``gunicorn.conf.py`` in
the master, before any worker starts), and every worker then writes its samples to files in that directory, which
:func:`render_metrics` adds up.

Metrics (labels are few: a job's ``key``, a cache ``namespace``, a fixed set of outcomes; never a generation, a
token or a cache entry):

* ``hyperion_lock_job_runs_total{key,outcome}``: jobs run in this process (outcome done, failed, interrupted, lost)
* ``hyperion_lock_job_duration_seconds{key,outcome}``: how long each of those ran
* ``hyperion_lock_wait_seconds{key,outcome}``: how long a call that did not run the job waited (outcome done,
  failed, timeout, interrupted, gave_up, error, cancelled)
* ``hyperion_lock_takeovers_total{key}``: leases taken after another holder had been seen (it died or let go)
* ``hyperion_lock_lost_leases_total{key}``: leaderships that learned another worker holds the lease now
* ``hyperion_lock_reconnects_total{key}``: a waiter's event stream broke and was opened again
* ``hyperion_lock_cache_requests_total{namespace,status}``: cache hit, miss, stale, bypass, error
* ``hyperion_lock_cache_compute_seconds{namespace}``: how long the cache's computations took

A failure to record (an unwritable multi-process directory, say) is logged once and never reaches the caller.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator, MutableMapping
from typing import Any

logger = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
NOT_INSTALLED = b"# prometheus_client is not installed: pip install 'hyperion_lock[metrics]'\n"
PLAIN_TEXT = "text/plain; version=0.0.4; charset=utf-8"
# From a fast probe to a long migration.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)

__all__ = ["gunicorn_child_exit", "gunicorn_metrics_dir", "render_metrics"]


class Span:
    """A started span (or nothing, without OpenTelemetry): attributes can be set until it ends."""

    def __init__(self, span: Any = None) -> None:
        self._span = span

    def set(self, name: str, value: str | int | float | bool) -> None:
        if self._span is not None:
            with contextlib.suppress(Exception):
                self._span.set_attribute(f"hyperion_lock.{name}", value)


class _Prometheus:
    """The metric objects of one registry."""

    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter, Histogram

        def counter(name: str, doc: str, labels: tuple[str, ...]) -> Any:
            return Counter(f"hyperion_lock_{name}", doc, labels, registry=registry)

        def histogram(name: str, doc: str, labels: tuple[str, ...]) -> Any:
            return Histogram(f"hyperion_lock_{name}", doc, labels, registry=registry, buckets=BUCKETS)

        self.runs = counter("job_runs", "Run-once jobs run in this process, by outcome", ("key", "outcome"))
        self.duration = histogram("job_duration_seconds", "Run time of the run-once jobs run here", ("key", "outcome"))
        self.wait = histogram(
            "wait_seconds", "Time a run-once call that did not run the job waited, by how it ended", ("key", "outcome")
        )
        self.takeovers = counter("takeovers", "Leases taken after another holder had been seen", ("key",))
        self.lost = counter("lost_leases", "Leaderships that found another worker holding the lease", ("key",))
        self.reconnects = counter("reconnects", "Waits whose event stream broke and was opened again", ("key",))
        self.cache = counter("cache_requests", "Cache lookups and errors, by status", ("namespace", "status"))
        self.compute = histogram("cache_compute_seconds", "Run time of the cache's computations", ("namespace",))

    def all(self) -> tuple[Any, ...]:
        return (self.runs, self.duration, self.wait, self.takeovers, self.lost, self.reconnects, self.cache,
                self.compute)


class Metrics:
    """Records this library's events. ``registry`` (default: ``prometheus_client.REGISTRY``) and ``tracer``
    (default: the global OpenTelemetry tracer ``hyperion_lock``) are resolved by :meth:`prepare` (or, failing
    that, on first use)."""

    def __init__(self, registry: Any = None, tracer: Any = None) -> None:
        self._registry = registry
        self._default = registry is None  # the process-wide registry: under gunicorn, summed over the workers
        self._tracer = tracer
        self._prom: _Prometheus | None = None
        self._resolved = False
        self._traced = tracer is not None
        self._lock = threading.Lock()
        self._warned = False
        self._pid = 0  # the process prepare() last ran in

    # -- set-up -----------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Set up, in this process, everything recording needs: import ``prometheus_client`` and create the
        metrics (once per process), resolve the tracer, and -- after a fork -- let ``prometheus_client`` move
        metrics the parent already recorded into this process's files (it does that on the first read or write
        in a new pid, for every value at once). Cheap once done; never raises."""
        self._get_tracer()
        prom = self._get()
        if prom is None:
            return
        pid = os.getpid()
        if self._pid == pid:
            return
        self._pid = pid
        try:
            for metric in prom.all():  # reading any value makes prometheus_client re-open its files in this pid
                metric.collect()
        except Exception as exc:
            self._warn(exc)

    def will_wait(self, key: str) -> None:
        """A call of ``key`` is about to wait: create the series its wake-up records into (``wait_seconds`` with
        outcome ``done``, at 0), so the wake-up only updates values that exist. (A new series is set-up work:
        in multi-process mode ``prometheus_client`` writes each of its buckets to this process's file.)"""
        self._record(lambda p: p.wait.labels(key, "done"))

    # -- events -----------------------------------------------------------------------------------------------
    def job_finished(self, key: str, outcome: str, seconds: float) -> None:
        """A job ran here and ended (outcome done, failed, interrupted or lost)."""
        self._record(lambda p: (p.runs.labels(key, outcome).inc(), p.duration.labels(key, outcome).observe(seconds)))

    def waited(self, key: str, outcome: str, seconds: float) -> None:
        """A call that did not run the job ended its wait."""
        self._record(lambda p: p.wait.labels(key, outcome).observe(max(0.0, seconds)))

    def took_over(self, key: str) -> None:
        self._record(lambda p: p.takeovers.labels(key).inc())

    def lease_lost(self, key: str) -> None:
        self._record(lambda p: p.lost.labels(key).inc())

    def reconnected(self, key: str) -> None:
        self._record(lambda p: p.reconnects.labels(key).inc())

    def cache_counted(
        self, namespace: str, status: str | None, *, error: bool = False, compute: float | None = None
    ) -> None:
        """A cache lookup of ``status`` (hit, miss, stale, bypass; any case), plus an error and a computation's
        run time when given."""

        def record(p: _Prometheus) -> None:
            if status is not None:
                p.cache.labels(namespace, str(status).lower()).inc()
            if error:
                p.cache.labels(namespace, "error").inc()
            if compute is not None:
                p.compute.labels(namespace).observe(compute)

        self._record(record)

    @contextlib.contextmanager
    def span(self, name: str, key: str) -> Iterator[Span]:
        """An OpenTelemetry span ``name``, current while the block runs, with attribute ``hyperion_lock.key``."""
        tracer = self._get_tracer()
        if tracer is None:
            yield Span()
            return
        try:
            manager = tracer.start_as_current_span(name, attributes={"hyperion_lock.key": key})
            otel_span = manager.__enter__()
        except Exception as exc:
            self._warn(exc)
            yield Span()
            return
        exc_info: tuple[Any, Any, Any] = (None, None, None)
        try:
            yield Span(otel_span)
        except BaseException:
            exc_info = sys.exc_info()
            raise
        finally:
            with contextlib.suppress(Exception):
                manager.__exit__(*exc_info)

    # -- exposition -------------------------------------------------------------------------------------------
    def render(self) -> tuple[bytes, str]:
        """The metrics in the Prometheus text format, and its content type."""
        prom = self._get()
        if prom is None:
            return NOT_INSTALLED, PLAIN_TEXT
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        if self._default and os.environ.get(MULTIPROC_ENV):
            from prometheus_client import multiprocess

            registry: Any = CollectorRegistry()
            collector: Any = multiprocess.MultiProcessCollector  # untyped in prometheus_client
            collector(registry)
        else:
            registry = self._registry
        return generate_latest(registry), CONTENT_TYPE_LATEST

    # -- internals --------------------------------------------------------------------------------------------
    def _get(self) -> _Prometheus | None:
        if self._resolved:
            return self._prom
        with self._lock:
            if self._resolved:
                return self._prom
            self._resolved = True  # once: a registry that refuses the metrics is not asked again
            try:
                import prometheus_client
            except ImportError:
                logger.debug("prometheus_client is not installed: no metrics")
                return None
            if self._registry is None:
                self._registry = prometheus_client.REGISTRY
            self._prom = _Prometheus(self._registry)
        return self._prom

    def _get_tracer(self) -> Any:
        if not self._traced:
            try:
                from opentelemetry import trace
            except ImportError:
                self._tracer = None
            else:
                from hyperion_lock._version import __version__

                self._tracer = trace.get_tracer("hyperion_lock", __version__)
            self._traced = True
        return self._tracer

    def _record(self, action: Any) -> None:
        try:
            prom = self._get()
            if prom is not None:
                action(prom)
        except Exception as exc:
            self._warn(exc)

    def _warn(self, exc: Exception) -> None:
        if not self._warned:
            self._warned = True
            logger.warning("metrics: could not record (%s: %s); not reported again", type(exc).__name__, exc)


metrics = Metrics()


def render_metrics() -> tuple[bytes, str]:
    """This library's Prometheus metrics (and any other metric of the default registry) in the text format, with
    its content type, for a ``/metrics`` route: ``body, content_type = render_metrics()``.

    Under gunicorn with ``PROMETHEUS_MULTIPROC_DIR`` set (see :func:`gunicorn_metrics_dir`), the sum over every
    worker of this master, alive or gone, whichever worker answers. Without ``prometheus_client``, a comment.
    """
    return metrics.render()


def gunicorn_metrics_dir(environ: MutableMapping[str, str] | None = None) -> str | None:
    """For ``gunicorn.conf.py`` (the master, before any fork): the directory where the workers' metrics meet.

    ``PROMETHEUS_MULTIPROC_DIR`` if set (created if missing; emptying it between runs is then up to you), else a
    new empty directory, set in ``PROMETHEUS_MULTIPROC_DIR`` for the workers to inherit and removed when this
    master exits. ``None`` (nothing set) when ``prometheus_client`` is not installed.
    """
    env = os.environ if environ is None else environ
    current = env.get(MULTIPROC_ENV, "").strip()
    if current:
        os.makedirs(current, exist_ok=True)
        return current
    if not _installed():
        return None
    if "prometheus_client" in sys.modules:
        logger.warning(
            "prometheus_client was imported before %s was set: this process's metrics stay in memory", MULTIPROC_ENV
        )
    try:
        path = tempfile.mkdtemp(prefix="hyperion-lock-metrics-")
    except OSError as exc:
        logger.warning("no directory for the workers' metrics (%s): each worker reports only its own", exc)
        return None
    env[MULTIPROC_ENV] = path
    atexit.register(_remove_dir, path, os.getpid())
    return path


def _installed() -> bool:
    """Whether prometheus_client can be imported, without importing it."""
    try:
        return importlib.util.find_spec("prometheus_client") is not None
    except (ImportError, ValueError):
        return False


def _remove_dir(path: str, owner: int) -> None:
    if os.getpid() == owner:  # not in a forked worker that exits through the inherited handler
        shutil.rmtree(path, ignore_errors=True)


def gunicorn_child_exit(server: Any, worker: Any) -> None:
    """gunicorn ``child_exit`` hook (in the master): tell ``prometheus_client`` that the worker is gone, so its live
    gauges are dropped; its counters and histograms stay in the sums."""
    if not os.environ.get(MULTIPROC_ENV) or not _installed():
        return
    from prometheus_client import multiprocess

    mark_dead: Any = multiprocess.mark_process_dead  # untyped in prometheus_client
    try:
        mark_dead(worker.pid)
    except Exception as exc:
        server.log.warning("hyperion_lock: metrics of worker pid %d not marked dead: %s", worker.pid, exc)
