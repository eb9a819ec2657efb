"""Real servers for tests: Redis and PostgreSQL, from the environment, testcontainers, or local binaries.

An opt-in pytest plugin: nothing is registered just because ``hyperion_lock`` is installed. Enable it in your
top-level ``conftest.py``::

    pytest_plugins = ["hyperion_lock.testing"]

to get the fixtures ``redis_url`` (session), ``redis_server`` (a private server the test may kill, pause or
restart) and ``postgres_url`` (session). Install the ``test`` extra (``pip install "hyperion_lock[test]"``) for
what they use. Resolution order:

1. an external URL: ``HYPERION_LOCK_TEST_REDIS_URL`` / ``HYPERION_LOCK_TEST_DATABASE_URL``;
2. a throwaway container through testcontainers, when a Docker engine answers;
3. a ``redis-server`` / ``initdb`` + ``postgres`` binary started on a free loopback port.

When none works the fixture *fails* (it never skips), so a CI run cannot pass without the real servers.
``redis_server`` always starts a private binary server, for tests that kill, pause or restart it.
:class:`RedisServer`, :class:`PostgresServer` and :func:`free_port` can be used without pytest fixtures too.
Importing this module imports neither testcontainers nor psycopg: they are loaded when a server is needed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "PostgresServer",
    "RedisServer",
    "docker_available",
    "free_port",
    "postgres_url",
    "redis_server",
    "redis_url",
]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before listening on port {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout} s")


def docker_available() -> bool:
    """True when a Docker engine answers (not merely when the client binary exists)."""
    if not (os.environ.get("DOCKER_HOST") or Path("/var/run/docker.sock").exists()):
        return False
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


class RedisServer:
    """A ``redis-server`` process on a free loopback port, without persistence, that tests may kill/restart."""

    def __init__(self, *, password: str | None = None, port: int | None = None, binary: str | None = None) -> None:
        self.binary = binary or shutil.which("redis-server") or ""
        if not self.binary:
            raise RuntimeError(
                "redis-server not found: install it (Debian: apt-get install -y redis-server) or set "
                "HYPERION_LOCK_TEST_REDIS_URL"
            )
        self.password = password
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="hyperion-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", self.dir, "--maxclients", "10000", "--protected-mode", "no",
        ]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port, 10, self.proc)
        return self

    def kill(self) -> None:
        """SIGKILL: every key is lost (no persistence), clients see their connections drop."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> None:
        self.kill()
        self.start()

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class PostgresServer:
    """A throwaway PostgreSQL cluster (``initdb`` + ``postgres``) on a free loopback port.

    PostgreSQL refuses to run as root: when we are root, every server command runs as the ``postgres`` user
    (``Popen(user="postgres")``), and the data directory is made owned by it inside a world-traversable temp dir.
    """

    def __init__(self, *, bindir: str | None = None) -> None:
        self.bindir = bindir or _postgres_bindir()
        self.port = free_port()
        self.root = tempfile.mkdtemp(prefix="hyperion-pg-")
        os.chmod(self.root, 0o755)
        self.data = os.path.join(self.root, "data")
        self.proc: subprocess.Popen[bytes] | None = None
        self.user = "hyperion"
        self.password = "hyperion-test-pw"
        self.database = "hyperion"

    def _owner(self) -> dict[str, Any]:
        """Popen arguments that run a server command as ``postgres`` when we are root (signals then reach it
        directly, unlike through ``runuser``)."""
        if os.geteuid() != 0:
            return {}
        return {"user": "postgres", "group": "postgres", "extra_groups": [], "env": {**os.environ, "HOME": self.root}}

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.database}"

    def start(self) -> PostgresServer:
        os.makedirs(self.data)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
            shutil.chown(self.data, "postgres")
        pwfile = os.path.join(self.root, "pw")
        Path(pwfile).write_text(self.password + "\n")
        os.chmod(pwfile, 0o644)
        subprocess.run(
            [
                os.path.join(self.bindir, "initdb"), "-D", self.data, "-U", self.user, "--pwfile", pwfile,
                "-A", "scram-sha-256", "-E", "UTF8", "--no-sync",
            ],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=self.root, **self._owner(),
        )
        self.proc = subprocess.Popen(
            [
                os.path.join(self.bindir, "postgres"), "-D", self.data, "-p", str(self.port),
                "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.root}",
                "-c", "fsync=off", "-c", "max_connections=200",
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.root, **self._owner(),
        )
        _wait_port(self.port, 30, self.proc)
        self._create_database()
        return self

    def _create_database(self) -> None:
        import psycopg

        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(
                    host="127.0.0.1", port=self.port, user=self.user, password=self.password, dbname="postgres",
                    autocommit=True, connect_timeout=5,
                ) as conn:
                    conn.execute(f'CREATE DATABASE "{self.database}"')
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _postgres_bindir() -> str:
    found = shutil.which("postgres") or shutil.which("initdb")
    if found:
        return os.path.dirname(os.path.realpath(found))
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), reverse=True)
    if candidates:
        return str(candidates[0].parent)
    raise RuntimeError(
        "PostgreSQL binaries (initdb, postgres) not found: install them (Debian: apt-get install -y postgresql) "
        "or set HYPERION_LOCK_TEST_DATABASE_URL"
    )


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a real Redis for the whole test session (see the module docstring for where it comes from)."""
    external = os.environ.get("HYPERION_LOCK_TEST_REDIS_URL")
    if external:
        yield external
        return
    if docker_available():
        from testcontainers.redis import RedisContainer

        with RedisContainer("redis:7-alpine") as container:
            yield f"redis://{container.get_container_host_ip()}:{container.get_exposed_port(6379)}/0"
        return
    with RedisServer() as server:
        yield server.url


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private ``redis-server`` for this test only, which the test may kill, pause or restart."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """SQLAlchemy URL (``postgresql+psycopg://``) of a real PostgreSQL for the whole test session."""
    external = os.environ.get("HYPERION_LOCK_TEST_DATABASE_URL")
    if external:
        yield external
        return
    if docker_available():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver="psycopg") as container:
            yield container.get_connection_url()
        return
    with PostgresServer() as server:
        yield server.url
