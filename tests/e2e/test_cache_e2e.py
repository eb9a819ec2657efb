"""End-to-end: the reference app's cached ``GET /quotes/{symbol}`` under a real ``gunicorn -c gunicorn.conf.py``
with 4 workers, SQLite in tmp_path, and a private Redis (or none).

Upstream calls are counted in the database by every worker (``/upstream-calls``, table ``upstream_calls``), so
"one call" is read from the same place whichever worker made it. Faults are injected once the database shows
the computation in flight; recovery is awaited through log lines. Nothing asserts a duration.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from hyperion_lock.testing import RedisServer
from tests.support import wait_until
from tests.support.deploy import ROOT, Gunicorn, clean_env, running, sqlite_query

pytestmark = [pytest.mark.e2e, pytest.mark.integration]
FAILING = r"cache: Redis at \S+ is failing"
RESUMED = r"cache: Redis at \S+ answers again; caching resumed"


def deploy(tmp_path: Path, redis_url: str | None, **env: str) -> Gunicorn:
    db = tmp_path / "demo.sqlite3"
    settings = {"DATABASE_URL": f"sqlite:///{db}", "HYPERION_DEMO_QUOTE_TTL": "300", **env}
    if redis_url:
        settings["HYPERION_LOCK_REDIS_URL"] = redis_url
    return Gunicorn(tmp_path, workers=4, **settings)


def get(g: Gunicorn, path: str, attempts: int = 3, headers: dict[str, str] | None = None) -> httpx.Response:
    """GET on a fresh connection (any worker may take it); retried only when the connection itself broke (a
    worker killed on purpose)."""
    for attempt in range(attempts):
        try:
            with httpx.Client(timeout=60, limits=httpx.Limits(max_keepalive_connections=0)) as client:
                return client.get(g.base + path, headers={"Connection": "close", **(headers or {})})
        except httpx.TransportError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def burst(g: Gunicorn, path: str, n: int) -> list[httpx.Response]:
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: get(g, path), range(n)))


def burst_over_workers(g: Gunicorn, path: str, per_worker: int, workers: int = 4) -> list[httpx.Response]:
    """``per_worker`` concurrent GETs on each worker, over connections pinned to it first (so the burst reaches
    every worker whatever order the kernel hands out connections in). Each response is checked to come from
    the worker its connection was pinned to."""
    pinned = g.pin_connections(per_worker, workers)
    conns = [(pid, conn) for pid, cs in pinned.items() for conn in cs]

    def one(item: tuple[int, http.client.HTTPConnection]) -> httpx.Response:
        pid, conn = item
        conn.request("GET", path)
        raw = conn.getresponse()
        response = httpx.Response(raw.status, headers=raw.getheaders(), content=raw.read())
        assert int(response.headers["x-worker-pid"]) == pid
        return response

    try:
        with ThreadPoolExecutor(len(conns)) as pool:
            return list(pool.map(one, conns))
    finally:
        for _, conn in conns:
            conn.close()


def calls(g: Gunicorn) -> int:
    return int(get(g, "/upstream-calls").json()["calls"])


def upstream_rows(g: Gunicorn) -> str:
    """Every upstream call the workers recorded (for failure messages)."""
    rows = sqlite_query(g.dir / "demo.sqlite3", "SELECT id, symbol, range, interval, pid FROM upstream_calls")
    return "\n".join(map(str, rows))


def made(g: Gunicorn, expected: int) -> bool:
    """``calls(g) == expected``; on a mismatch the failure shows every recorded call and the workers' log."""
    n = calls(g)
    assert n == expected, f"{n} upstream calls, expected {expected}:\n{upstream_rows(g)}\nlog:\n{g.log()[-6000:]}"
    return True


def calls_for(db: Path, symbol: str) -> list[int]:
    """Pids of the workers that started an upstream call for ``symbol``."""
    return [int(r[0]) for r in sqlite_query(db, f"SELECT pid FROM upstream_calls WHERE symbol = '{symbol}'")]


def from_every_worker(g: Gunicorn, path: str, workers: int = 4, limit: int = 400,
                      headers: dict[str, str] | None = None) -> dict[int, httpx.Response]:
    """One response per worker pid (``X-Worker-Pid``), asking until ``workers`` distinct pids answered."""

    def one() -> tuple[int, httpx.Response]:
        response = get(g, path, headers=headers)
        return int(response.headers["x-worker-pid"]), response

    return g.from_workers(one, workers, max_requests=limit)


def count(g: Gunicorn, pattern: str) -> int:
    return len(re.findall(pattern, g.log()))


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as s:
        yield s


def test_with_redis_a_burst_makes_one_upstream_call_and_every_worker_agrees(tmp_path: Path,
                                                                            server: RedisServer) -> None:
    with running(deploy(tmp_path, server.url, HYPERION_DEMO_UPSTREAM_DELAY="1",
                        HYPERION_LOCK_CACHE_STATS_INTERVAL="0.5", GUNICORN_CMD_ARGS="--keep-alive 300")) as g:
        g.wait_healthy()
        # A burst of concurrent requests for one cold key, 16 on each of the 4 workers: one upstream call.
        responses = burst_over_workers(g, "/quotes/AAPL?range=1d&interval=5m", per_worker=16)
        assert {r.status_code for r in responses} == {200}
        assert made(g, 1)
        assert len({r.headers["x-worker-pid"] for r in responses}) == 4
        assert len({r.content for r in responses}) == 1 and len({r.headers["etag"] for r in responses}) == 1
        assert [r.headers["x-cache"] for r in responses].count("MISS") == 1
        body = responses[0].json()
        assert body["symbol"] == "AAPL" and body["range"] == "1d" and body["interval"] == "5m"
        etag = responses[0].headers["etag"]
        # The same parameters in another order are the same entry.
        reordered = get(g, "/quotes/AAPL?interval=5m&range=1d")
        assert (reordered.headers["x-cache"], reordered.headers["etag"]) == ("HIT", etag) and made(g, 1)
        # Every worker serves the same ETag and headers, and answers If-None-Match with 304.
        hits = from_every_worker(g, "/quotes/AAPL?range=1d&interval=5m")
        assert {r.headers["etag"] for r in hits.values()} == {etag}
        assert {r.headers["x-cache"] for r in hits.values()} == {"HIT"}
        assert all(re.fullmatch(r"max-age=\d+", r.headers["cache-control"]) for r in hits.values())
        not_modified = from_every_worker(g, "/quotes/AAPL?range=1d&interval=5m", headers={"If-None-Match": etag})
        assert {r.status_code for r in not_modified.values()} == {304}
        # A client's no-cache does not reach the upstream.
        refresh = get(g, "/quotes/AAPL?range=1d&interval=5m", headers={"Cache-Control": "no-cache"})
        assert refresh.headers["etag"] == etag and made(g, 1)
        # Tag invalidation drops both cached variants, and no worker serves the old value afterwards.
        assert get(g, "/quotes/AAPL?range=5d").status_code == 200 and made(g, 2)
        with httpx.Client(timeout=30) as client:
            assert client.post(g.base + "/quotes/AAPL/invalidate").json() == {"invalidated": 2}
        fresh = from_every_worker(g, "/quotes/AAPL?range=1d&interval=5m")
        assert len({r.headers["etag"] for r in fresh.values()}) == 1
        assert etag not in {r.headers["etag"] for r in fresh.values()}
        assert made(g, 3)
        # A failing computation: every waiting request gets its error at once; errors are not cached.
        failed = burst_over_workers(g, "/quotes/FAIL1", per_worker=8)
        assert {r.status_code for r in failed} == {502}
        assert len({r.json()["detail"] for r in failed}) == 1
        assert made(g, 4)
        before = calls(g)  # errors are not cached: the next request computes again
        assert get(g, "/quotes/FAIL1").status_code == 502 and calls(g) > before
        # `hyperion-lock status` shows the namespace with the counts of every worker, once they flushed them.
        def quotes_row() -> dict[str, Any] | None:
            command = [sys.executable, "-m", "hyperion_lock.cli.main", "status", "--json", "--url", server.url]
            out = subprocess.run(command,
                                 check=False, capture_output=True, text=True, timeout=30, env=clean_env())
            rows = {r["namespace"]: r for r in json.loads(out.stdout)["cache"]}
            row = rows.get("quotes")
            flushed = row is not None and row["misses"] + row["hits"] >= 64 + 4 + 1 and row["errors"] >= 33 \
                and row["computations"] >= 5
            return row if flushed else None

        row = wait_until(quotes_row, "status shows the workers' counts", timeout=30)
        assert row is not None
        # Live entries: the 1d variant only (5d was invalidated and not asked again; errors are not cached).
        assert row["keys"] == 1 and row["memory_bytes"] > 0
        assert row["computations"] == 5


def test_compose_has_an_optional_monitoring_profile() -> None:
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    insight = services["redisinsight"]
    assert insight["profiles"] == ["monitoring"] and "redisinsight" in insight["image"]
    assert insight["environment"]["RI_REDIS_HOST"] == "redis"
    assert all(p.startswith("127.0.0.1:") for p in insight["ports"])  # not exposed beyond the host
    assert "redisinsight" not in services["app"].get("depends_on", {})  # the app never needs it


def test_with_redis_a_killed_computation_is_taken_over_by_another_worker(
        tmp_path: Path, server: RedisServer) -> None:
    db = tmp_path / "demo.sqlite3"
    with running(deploy(tmp_path, server.url, HYPERION_DEMO_UPSTREAM_DELAY="2",
                        HYPERION_LOCK_CACHE_LEASE_TTL="1")) as g:
        g.wait_healthy()
        with ThreadPoolExecutor(33) as pool:
            # SIGKILL the worker computing a key; the requests waiting in the others take over once its lease
            # expires, and all get the same value.
            first = pool.submit(get, g, "/quotes/KILL", 1)
            victim = wait_until(lambda: calls_for(db, "KILL"), "the first upstream call started")[0]
            waiting = [pool.submit(get, g, "/quotes/KILL") for _ in range(16)]
            os.kill(victim, signal.SIGKILL)
            with contextlib.suppress(httpx.TransportError):
                first.result(60)  # its connection dies with the worker
            taken_over = [f.result(60) for f in waiting]
        assert {r.status_code for r in taken_over} == {200} and len({r.headers["etag"] for r in taken_over}) == 1
        assert len(calls_for(db, "KILL")) == 2 and victim not in calls_for(db, "KILL")[1:]
        assert made(g, 2)


def test_with_redis_stopped_killed_and_restarted_requests_are_answered_and_caching_resumes(
        tmp_path: Path, server: RedisServer) -> None:
    db = tmp_path / "demo.sqlite3"
    with running(deploy(tmp_path, server.url, HYPERION_DEMO_UPSTREAM_DELAY="2",
                        HYPERION_LOCK_CACHE_BREAKER_RETRY="0.2", HYPERION_LOCK_CACHE_BREAKER_MAX_RETRY="1")) as g:
        g.wait_healthy()
        # Redis stopped (SIGSTOP) while a burst waits for a computation, then a burst for another key while it is
        # still stopped: every request is answered, at most one upstream call per worker for the first key, the
        # trouble is logged once per worker (not per request), and caching resumes by itself.
        with ThreadPoolExecutor(32) as pool:
            stopped = [pool.submit(get, g, "/quotes/STOP") for _ in range(32)]
            wait_until(lambda: calls_for(db, "STOP"), "the upstream call started")
            server.pause()
            try:
                answered = [f.result(60) for f in stopped]
                answered += burst(g, "/quotes/PAUSED", 32)
            finally:
                server.resume()
        assert {r.status_code for r in answered} == {200}
        assert 1 <= len(calls_for(db, "STOP")) <= 5
        opened = count(g, FAILING)
        assert 1 <= opened <= 4
        wait_until(lambda: count(g, RESUMED) >= opened, "every opened breaker closed again", timeout=30)
        assert {r.status_code for r in burst(g, "/quotes/AFTER", 32)} == {200}
        assert len(calls_for(db, "AFTER")) == 1

        # Redis killed: requests are computed directly; restarted (empty): caching resumes by itself.
        server.kill()
        assert {r.status_code for r in burst(g, "/quotes/DEAD", 16)} == {200}
        server.start()
        wait_until(lambda: count(g, RESUMED) >= count(g, FAILING), "caching resumed after the restart", timeout=30)
        assert {r.status_code for r in burst(g, "/quotes/BACK", 32)} == {200}
        assert len(calls_for(db, "BACK")) == 1


def test_without_redis_each_worker_computes_at_most_once(tmp_path: Path) -> None:
    with running(deploy(tmp_path, None, HYPERION_DEMO_UPSTREAM_DELAY="1")) as g:
        g.wait_healthy()
        responses = burst(g, "/quotes/MSFT?range=1d", 64)
        assert {r.status_code for r in responses} == {200}
        made = calls(g)
        assert 1 <= made <= 4
        by_worker: dict[str, set[str]] = {}
        for r in responses:
            by_worker.setdefault(r.headers["x-worker-pid"], set()).add(r.headers["etag"])
        assert all(len(tags) == 1 for tags in by_worker.values())  # one value per worker
        from_every_worker(g, "/quotes/MSFT?range=1d")
        after = calls(g)
        assert after <= 4  # every worker computed at most once, however many requests it served
        from_every_worker(g, "/quotes/MSFT?range=1d")
        assert calls(g) == after
        # Reordered parameters are the same entry in every worker's memory too.
        from_every_worker(g, "/quotes/MSFT?range=1d&interval=5m")
        with_both = calls(g)
        assert with_both <= after + 4
        reordered = from_every_worker(g, "/quotes/MSFT?interval=5m&range=1d")
        assert calls(g) == with_both and {r.headers["x-cache"] for r in reordered.values()} == {"HIT"}
