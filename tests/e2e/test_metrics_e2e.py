"""Metrics of the reference app under gunicorn: /metrics sums every worker's counts, also after a worker is replaced."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from tests.support import wait_until
from tests.support.deploy import Gunicorn, running


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

