"""Database side of the reference app: URL, engines, and ``alembic upgrade head`` behind a database guard.

Two layers keep a migration single. The Coordinator makes one worker per deploy generation run the
``migrate`` job; underneath, a guard in the database itself covers what the Coordinator cannot see (an
operator's ``alembic upgrade head``, two deploys with different generations, file-lock coordination used by
mistake on several hosts):

* PostgreSQL: a *session* advisory lock on a **dedicated** AUTOCOMMIT connection. Never on Alembic's own
  connection: a query there autobegins a transaction, Alembic then treats it as an external transaction and
  never commits, so the DDL is silently rolled back. The lock is taken by polling ``pg_try_advisory_lock``
  (never by blocking inside ``pg_advisory_lock``, which can deadlock with ``CREATE INDEX CONCURRENTLY`` run by
  the holder), in a loop bounded by ``HYPERION_DEMO_MIGRATION_LOCK_TIMEOUT`` seconds (default 600).
* SQLite: an exclusive ``fcntl.flock`` on ``<database file>.migrate.lock`` beside the database, polled the same
  way (one host only, like SQLite itself).

After the guard is held the current revision is read again: if the database is already at head (someone
else migrated while we waited) nothing runs.

Failure timeline: if the process holding the guard dies, PostgreSQL ends its session (the TCP connection
closes with the process) and releases the advisory lock and rolls back the open migration transaction; the
kernel drops the flock. The next migrator gets the guard on its next poll (<= 1 s later) and migrates from the
last committed revision. A guard that stays busy longer than the timeout raises
:class:`~hyperion_lock.WaitTimeoutError`, which fails the ``migrate`` job (and the deploy) with that message.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, make_url, text
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import NullPool

from hyperion_lock import ConfigurationError, WaitTimeoutError, redact_url

logger = logging.getLogger(__name__)

DATABASE_URL_ENV = "DATABASE_URL"
MIGRATIONS_DIR_ENV = "HYPERION_DEMO_MIGRATIONS_DIR"
LOCK_TIMEOUT_ENV = "HYPERION_DEMO_MIGRATION_LOCK_TIMEOUT"
DEFAULT_SQLITE_PATH = Path("var") / "demo.sqlite3"
DEFAULT_LOCK_TIMEOUT = 600.0
ADVISORY_LOCK_NAME = "demo.migrations"


def normalize_url(url: str) -> str:
    """Use the installed psycopg 3 driver for plain ``postgres://`` / ``postgresql://`` URLs."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def database_url(environ: Mapping[str, str] | None = None) -> str:
    """``DATABASE_URL``, or a SQLite file ``./var/demo.sqlite3`` (directory created) when it is unset."""
    env = os.environ if environ is None else environ
    url = env.get(DATABASE_URL_ENV, "").strip()
    if url:
        return normalize_url(url)
    path = (Path.cwd() / DEFAULT_SQLITE_PATH).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def describe_url(url: str) -> str:
    return str(redact_url(url))


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def make_engine(url: str, *, pooled: bool = True) -> Engine:
    """An engine for ``url``; call it after the fork (in the lifespan), never at import time."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigurationError(f"invalid DATABASE_URL {describe_url(url)!r}: {exc}") from None
    backend = parsed.get_backend_name()
    connect_args: dict[str, object] = {}
    if backend == "sqlite":
        connect_args["timeout"] = 30
    elif backend == "postgresql":
        connect_args["connect_timeout"] = 10
    if pooled:
        return create_engine(parsed, pool_pre_ping=True, connect_args=connect_args)
    return create_engine(parsed, poolclass=NullPool, connect_args=connect_args)


def migrations_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The Alembic script directory: ``HYPERION_DEMO_MIGRATIONS_DIR``, else ``migrations/`` of the repository
    this package lives in, else ``./migrations``."""
    env = os.environ if environ is None else environ
    override = env.get(MIGRATIONS_DIR_ENV, "").strip()
    if override:
        path = Path(override).resolve()
        if not (path / "env.py").is_file():
            raise ConfigurationError(f"{MIGRATIONS_DIR_ENV}={override!r} has no env.py: not an Alembic directory")
        return path
    candidates = [Path(__file__).resolve().parents[1] / "migrations", Path.cwd() / "migrations"]
    for path in candidates:
        if (path / "env.py").is_file():
            return path
    raise ConfigurationError(
        "Alembic migrations not found in " + ", ".join(str(p) for p in candidates)
        + f"; set {MIGRATIONS_DIR_ENV} to the directory holding env.py"
    )


def alembic_config(url: str, directory: Path | None = None) -> Config:
    """An in-memory Alembic config: no ini file, so env.py leaves the server's logging alone."""
    cfg = Config()
    cfg.set_main_option("script_location", str(directory or migrations_dir()))
    # Passed as an attribute, not an ini option: configparser would choke on '%' in a password.
    cfg.attributes["sqlalchemy_url"] = url
    return cfg


def head_revisions(cfg: Config) -> set[str]:
    return set(ScriptDirectory.from_config(cfg).get_heads())


def current_revisions(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(MigrationContext.configure(conn).get_current_heads())


def advisory_key(name: str) -> int:
    """A stable signed 64-bit key for ``pg_try_advisory_lock`` derived from ``name``."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def _lock_timeout(environ: Mapping[str, str] | None = None) -> float:
    """``HYPERION_DEMO_MIGRATION_LOCK_TIMEOUT``: a finite number of seconds > 0 (default 600)."""
    env = os.environ if environ is None else environ
    raw = env.get(LOCK_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_LOCK_TIMEOUT
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigurationError(f"{LOCK_TIMEOUT_ENV} must be a finite number of seconds > 0, got {raw!r}")
    return seconds


def _poll(try_once: Callable[[], bool], what: str, timeout: float) -> None:
    """Call ``try_once()`` until it returns True, sleeping 0.05 s doubling to 1 s; bounded by ``timeout``."""
    started = time.monotonic()
    delay = 0.05
    next_log = started + 5.0
    while not try_once():
        now = time.monotonic()
        if now - started >= timeout:
            raise WaitTimeoutError(
                f"{what} stayed busy for {timeout:.0f} s ({LOCK_TIMEOUT_ENV}); another migration is still "
                "running or hung: find it, stop it, and restart"
            )
        if now >= next_log:
            logger.info("pid %d still waiting for %s (%.0f s so far)", os.getpid(), what, now - started)
            next_log = now + 5.0
        time.sleep(delay)
        delay = min(delay * 2, 1.0)


@contextlib.contextmanager
def postgres_guard(engine: Engine, timeout: float) -> Iterator[None]:
    """Hold a session advisory lock on a dedicated AUTOCOMMIT connection (released when the block ends or the
    session dies)."""
    key = advisory_key(ADVISORY_LOCK_NAME)
    conn = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    try:
        _poll(lambda: bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar()),
              "the PostgreSQL migration advisory lock", timeout)
        logger.info("pid %d holds the migration advisory lock %d", os.getpid(), key)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
    finally:
        conn.close()


@contextlib.contextmanager
def file_guard(path: Path, timeout: float) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (the kernel drops it when this process dies)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        def try_lock() -> bool:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            return True

        _poll(try_lock, f"the migration lock file {path}", timeout)
        logger.info("pid %d holds the migration lock file %s", os.getpid(), path)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def migration_guard(engine: Engine, timeout: float) -> contextlib.AbstractContextManager[None]:
    backend = engine.url.get_backend_name()
    if backend == "postgresql":
        return postgres_guard(engine, timeout)
    if backend == "sqlite" and engine.url.database and engine.url.database != ":memory:":
        return file_guard(Path(engine.url.database + ".migrate.lock"), timeout)
    logger.warning("no migration guard for %s databases: relying on the coordinator alone", backend)
    return contextlib.nullcontext()


def upgrade_to_head(url: str, *, directory: Path | None = None, lock_timeout: float | None = None) -> bool:
    """``alembic upgrade head`` under the database guard; True if it migrated, False if already at head."""
    cfg = alembic_config(url, directory)
    target = head_revisions(cfg)
    engine = make_engine(url, pooled=False)
    try:
        with migration_guard(engine, lock_timeout if lock_timeout is not None else _lock_timeout()):
            current = current_revisions(engine)
            if current == target:
                logger.info("database %s is already at head %s: nothing to migrate",
                            describe_url(url), ",".join(sorted(target)))
                return False
            logger.info("pid %d migrating %s from %s to %s", os.getpid(), describe_url(url),
                        ",".join(sorted(current)) or "<empty>", ",".join(sorted(target)))
            command.upgrade(cfg, "head")
            return True
    finally:
        engine.dispose()
