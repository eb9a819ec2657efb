"""Helpers for the deployment tests: a real gunicorn master with the reference app, and database checks."""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self, TypeVar

import httpx
import psycopg
import redis
from sqlalchemy import make_url

from hyperion_lock.testing import free_port

ROOT = Path(__file__).resolve().parents[2]


def migrations_head() -> str:
    """The newest revision in migrations/, what a finished upgrade leaves in alembic_version."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(Config(str(ROOT / "alembic.ini"))).get_current_head()
    assert head is not None
    return head


HEAD = migrations_head()
_OURS = ("HYPERION_LOCK_", "HYPERION_DEMO_")
_CLEARED = {"DATABASE_URL", "WEB_CONCURRENCY", "PORT", "HOST", "GUNICORN_CMD_ARGS", "LOG_LEVEL"}
T = TypeVar("T")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_OURS) and k not in _CLEARED}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


class Gunicorn:
    """``gunicorn -c gunicorn.conf.py`` in its own session (so the whole tree can be killed), logging to a file."""

    def __init__(self, tmp_path: Path, *, workers: int = 4, **env: str) -> None:
        self.dir = tmp_path
        self.port = free_port()
        self.log_path = tmp_path / f"gunicorn-{self.port}.log"
        self.env = clean_env(PORT=str(self.port), HOST="127.0.0.1", WEB_CONCURRENCY=str(workers),
                             HYPERION_LOCK_LOCK_DIR=str(tmp_path / "locks"), **env)
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py")]

    def start(self) -> Self:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), cwd=self.dir, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.started = time.monotonic()
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, pattern: str, count: int = 1, timeout: float = 60.0) -> list[re.Match[str]]:
        """Wait until the regex ``pattern`` matched ``count`` times in the log; return the matches. Fails (with
        the log) after ``timeout`` s, or as soon as gunicorn exited without the log reaching the count."""
        assert self.proc is not None
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            exited = self.proc.poll() is not None
            matches = list(regex.finditer(self.log()))
            if len(matches) >= count:
                return matches
            if exited or time.monotonic() >= deadline:
                state = f"gunicorn exited with {self.proc.returncode}" if exited else f"still waiting after {timeout} s"
                raise AssertionError(f"{state}: {len(matches)}/{count} log lines match {pattern!r}; log:\n{self.log()}")
            time.sleep(0.05)

    def get(self, path: str, timeout: float = 5.0) -> httpx.Response:
        # A fresh connection per request, so the kernel hands it to any worker.
        with httpx.Client(timeout=timeout, limits=httpx.Limits(max_keepalive_connections=0)) as client:
            return client.get(self.base + path, headers={"Connection": "close"})

    def pin_connections(self, per_worker: int, workers: int, limit: int = 2000,
                        timeout: float = 60.0) -> dict[int, list[http.client.HTTPConnection]]:
        """Open keep-alive connections, 8 at a time, until each of ``workers`` worker pids holds ``per_worker``
        of them (surplus ones are closed): pid -> connections. A request sent on one of them is served by that
        worker, so a burst spread over them reaches every worker whatever the kernel's accept order. Needs a
        keep-alive longer than the pinning and the burst (e.g. ``GUNICORN_CMD_ARGS="--keep-alive 300"``)."""
        pinned: dict[int, list[http.client.HTTPConnection]] = {}
        deadline = time.monotonic() + timeout

        def one(_: int) -> tuple[int, http.client.HTTPConnection]:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
            conn.request("GET", "/health")
            response = conn.getresponse()
            response.read()
            return int(response.getheader("x-worker-pid", "0")), conn

        with ThreadPoolExecutor(8) as pool:
            for _ in range(0, limit, 8):
                for pid, conn in pool.map(one, range(8)):
                    mine = pinned.setdefault(pid, [])
                    if len(mine) < per_worker:
                        mine.append(conn)
                    else:
                        conn.close()
                full = [pid for pid, conns in pinned.items() if len(conns) >= per_worker]
                if len(full) >= workers or time.monotonic() >= deadline:
                    break
        if len(full) < workers:
            for conn in (c for conns in pinned.values() for c in conns):
                conn.close()
            raise AssertionError(f"only {len(full)} of {workers} workers took {per_worker} connections: "
                                 f"{ {pid: len(c) for pid, c in pinned.items()} }")
        return {pid: pinned[pid] for pid in full[:workers]}

    def wait_healthy(self, timeout: float = 60.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"gunicorn exited with {self.proc.returncode}; log:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if self.get("/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        raise AssertionError(f"no healthy worker within {timeout} s; log:\n{self.log()}")

    def from_workers(self, fetch: Callable[[], tuple[int, T] | None], distinct: int, timeout: float = 60.0,
                     max_requests: int = 2000) -> dict[int, T]:
        """Call ``fetch`` -- requests on fresh connections, so any worker may answer: (its pid, what it said), or
        None -- 8 at a time until ``distinct`` worker pids answered; the first answer of each is kept. Fails after
        ``timeout`` s or ``max_requests`` calls, with the log."""
        seen: dict[int, T] = {}
        sent = 0
        deadline = time.monotonic() + timeout
        with ThreadPoolExecutor(8) as pool:
            while len(seen) < distinct and time.monotonic() < deadline and sent < max_requests:
                for item in pool.map(lambda _: fetch(), range(8)):
                    if item is not None:
                        seen.setdefault(*item)
                sent += 8
        assert len(seen) >= distinct, f"saw only pids {sorted(seen)} after {sent} requests; log:\n{self.log()}"
        return seen

    def startup_reports(self, distinct: int = 4, timeout: float = 60.0, max_requests: int = 2000) -> dict[int, Any]:
        """Each worker's /startup report, from ``distinct`` workers that also answer /health with 200."""

        def one() -> tuple[int, Any] | None:
            try:
                health = self.get("/health")
                report = self.get("/startup")
            except httpx.HTTPError:
                return None
            if health.status_code != 200 or report.status_code != 200:
                return None
            return int(report.json()["pid"]), report.json()

        return self.from_workers(one, distinct, timeout, max_requests)

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"gunicorn still running after {timeout} s; log:\n{self.log()}") from None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(20)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # stray workers of this master's session, if any
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


@contextlib.contextmanager
def running(g: Gunicorn) -> Iterator[Gunicorn]:
    try:
        yield g.start()
    finally:
        g.stop()


def libpq_url(sqlalchemy_url: str) -> str:
    return make_url(sqlalchemy_url).set(drivername="postgresql").render_as_string(hide_password=False)


@contextlib.contextmanager
def fresh_database(postgres_url: str) -> Iterator[str]:
    """A new, empty database on the test server; dropped afterwards. Yields its SQLAlchemy URL."""
    name = f"demo_{uuid.uuid4().hex[:12]}"
    admin = libpq_url(postgres_url)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def pg_query(url: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(libpq_url(url)) as conn:
        return list(conn.execute(sql).fetchall())


def pg_table_exists(url: str, table: str) -> bool:
    return bool(pg_query(url, f"SELECT to_regclass('public.{table}') IS NOT NULL")[0][0])


def sqlite_query(path: Path, sql: str) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return list(conn.execute(sql).fetchall())


def assert_same_jobs(reports: dict[int, Any]) -> dict[str, Any]:
    """Every worker reports the same jobs (same runner, token, outcome); return them."""
    jobs = [r["jobs"] for r in reports.values()]
    assert all(j == jobs[0] for j in jobs), jobs
    assert set(jobs[0]) == {"migrate", "seed"}
    for job in jobs[0].values():
        assert job["outcome"] == "done"
        assert isinstance(job["runner_pid"], int) and job["runner_pid"] > 0
        assert isinstance(job["fencing_token"], int) and job["fencing_token"] >= 1
        assert isinstance(job["duration_s"], float)
    generations = {r["generation"] for r in reports.values()}
    assert len(generations) == 1, generations
    return dict(jobs[0])



# -- What the processes are doing, as Redis and the kernel report it (events, not guesses about timing) ----------
def _tcp_ends_by_inode() -> dict[int, tuple[int, int]]:
    ends: dict[int, tuple[int, int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local, remote = (int(f.rsplit(":", 1)[1], 16) for f in fields[1:3])
                ends[int(fields[9])] = (local, remote)
    return ends


def tcp_connections(pid: int) -> set[tuple[int, int]]:
    """(local port, remote port) of the TCP sockets process ``pid`` has open (empty if it is gone)."""
    by_inode = _tcp_ends_by_inode()
    found: set[tuple[int, int]] = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError, ValueError):
                target = os.readlink(fd)
                if target.startswith("socket:[") and int(target[8:-1]) in by_inode:
                    found.add(by_inode[int(target[8:-1])])
    return found


def parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def waiting_on_redis(url: str, pids: Iterable[int]) -> set[int]:
    """The processes among ``pids`` that subscribed to a channel of this Redis *and* had another of their connections
    run a command (``CLIENT LIST``): a run-once caller that subscribed, then probed. A waiter is then blocked on its
    subscription; a leader looks the same, so callers exclude the leader they identified otherwise."""
    client = redis.Redis.from_url(url)
    try:
        clients = client.client_list()
    finally:
        client.close()

    def ends(c: dict[str, Any]) -> tuple[int, int]:  # (client port, server port), as the client's kernel sees them
        return int(c["addr"].rsplit(":", 1)[1]), int(c["laddr"].rsplit(":", 1)[1])

    subscribed = {ends(c) for c in clients if int(c.get("sub", 0)) > 0}
    commanded = {ends(c) for c in clients if int(c.get("sub", 0)) == 0 and c.get("cmd") not in (None, "NULL")}
    found = set()
    for pid in pids:
        conns = tcp_connections(pid)
        if conns & subscribed and conns & commanded:
            found.add(pid)
    return found


def blocked_on_flock(pids: Iterable[int]) -> set[int]:
    """The processes among ``pids`` that the kernel lists as blocked on an flock (``->`` lines of /proc/locks): a
    run-once caller waiting for the lock file's holder."""
    blocked = set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[1] == "->" and fields[2] == "FLOCK":
            blocked.add(int(fields[5]))
    return blocked & set(pids)
