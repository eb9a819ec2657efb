"""The reference app's pieces on real databases and real processes: migration guard, fenced seed, gunicorn
helpers, compose file."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import event, select
from sqlalchemy.orm import Session

from demo import jobs
from demo.db import database_url, make_engine, migrations_dir, normalize_url, upgrade_to_head
from demo.models import JobFence, SeedRun
from hyperion_lock import ConfigurationError, Holder, Lease, LeaseLostError, gunicorn_worker_count, new_generation
from hyperion_lock.gunicorn import GENERATION_ENV, WORKERS_ENV, gunicorn_bind, gunicorn_workers, prepare_master_env
from tests.support.deploy import HEAD, ROOT, clean_env, fresh_database, pg_query, sqlite_query

pytestmark = pytest.mark.integration


def lease(token: int, since: float, generation: str = "g1") -> Lease:
    return Lease(key="seed", generation=generation, token="t",
                 holder=Holder(host="h", pid=os.getpid(), generation=generation, fencing_token=token, since=since))


def test_seed_is_idempotent_and_fenced(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    assert upgrade_to_head(url) is True
    assert upgrade_to_head(url) is False  # already at head: nothing runs
    engine = make_engine(url)
    try:
        before = time.time()
        assert jobs.seed(engine, lease(5, since=before - 1)) == 3
        assert jobs.seed(engine, lease(6, since=time.time())) == 0  # idempotent
        # A stale leader (token 4, whose lease began before token 6 wrote) is refused and writes nothing.
        with pytest.raises(LeaseLostError, match="refusing to write"):
            jobs.seed(engine, lease(4, since=before))
        with Session(engine) as s:
            fence = s.get(JobFence, "seed")
            assert fence is not None and fence.fencing_token == 6
            assert len(s.scalars(select(SeedRun)).all()) == 2
        # Token counter reset (Redis lost its data): a lower token whose lease began after the last write is
        # not a stale writer; it is accepted.
        assert jobs.seed(engine, lease(1, since=time.time() + 1, generation="g2")) == 0
        assert sqlite_query(tmp_path / "db.sqlite3", "SELECT fencing_token FROM job_fences") == [(1,)]
    finally:
        engine.dispose()


def test_a_dropped_connection_is_retried_and_the_fence_still_decides(postgres_url: str) -> None:
    """The database drops the seed's connection inside its transaction (as after a network cut): the write is tried
    again on a new connection, where the fence answers. Before, the drop surfaced as OperationalError, so a stale
    leader's late write failed for the wrong reason and a live one failed its boot."""
    with fresh_database(postgres_url) as url:
        assert upgrade_to_head(url) is True
        engine = make_engine(url)
        dropped: list[int] = []

        @event.listens_for(engine, "before_cursor_execute")
        def drop_first_locking_read(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if "FOR UPDATE" in statement and len(dropped) < 1:
                pid = cursor.connection.info.backend_pid
                dropped.append(pid)
                pg_query(url, f"SELECT pg_terminate_backend({pid})")

        try:
            before = time.time()
            assert jobs.seed(engine, lease(5, since=before - 1)) == 3
            assert len(dropped) == 1
            assert pg_query(url, "SELECT fencing_token FROM job_fences") == [(5,)]
            assert pg_query(url, "SELECT count(*) FROM seed_runs") == [(1,)]
            dropped.clear()
            with pytest.raises(LeaseLostError, match="refusing to write"):  # a stale leader, dropped too
                jobs.seed(engine, lease(4, since=before - 2))
            assert len(dropped) == 1
            assert pg_query(url, "SELECT fencing_token, count(*) FROM job_fences GROUP BY 1") == [(5, 1)]
        finally:
            engine.dispose()



def test_a_failed_connect_is_retried_and_the_fence_still_decides(postgres_url: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The seed's first connect fails (here: refused by the kernel, as on a link that is still coming up): the
    write is tried again after a pause, on a new connection, where the fence answers. Before, the connect error
    was the job's failure: every worker failed its boot for a blip."""
    monkeypatch.setattr(jobs, "SEED_RETRY_PAUSE", 0.01)
    with fresh_database(postgres_url) as url:
        assert upgrade_to_head(url) is True
        engine = make_engine(url)
        refused: list[int] = []

        @event.listens_for(engine, "do_connect")
        def refuse_the_first_connect(dialect: Any, conn_rec: Any, cargs: Any, cparams: dict[str, Any]) -> None:
            if not refused:
                with socket.socket() as closed:  # a port nothing listens on: the kernel refuses the connect
                    closed.bind(("127.0.0.1", 0))
                    refused.append(closed.getsockname()[1])
                cparams["port"] = refused[0]

        try:
            before = time.time()
            assert jobs.seed(engine, lease(5, since=before - 1)) == 3
            assert len(refused) == 1
            assert pg_query(url, "SELECT fencing_token FROM job_fences") == [(5,)]
            engine.dispose()
            refused.clear()
            with pytest.raises(LeaseLostError, match="refusing to write"):  # a stale leader: refused by the fence
                jobs.seed(engine, lease(4, since=before - 2))
            assert len(refused) == 1
            assert pg_query(url, "SELECT fencing_token, count(*) FROM job_fences GROUP BY 1") == [(5, 1)]
        finally:
            engine.dispose()

def test_the_same_token_from_another_run_is_refused(tmp_path: Path) -> None:
    """Redis lost the fencing counter and handed token 1 to two leaders (the model checker's shortest trace): the
    second one to write is refused by the fence, instead of both runs' writes being accepted."""
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    upgrade_to_head(url)
    engine = make_engine(url)
    try:
        began = time.time() - 1
        with Session(engine) as s, s.begin():  # the other leader, another process, wrote with token 1
            s.add(JobFence(name="seed", fencing_token=1, generation="g1", pid=os.getpid() + 1, written_at=time.time()))
        with pytest.raises(LeaseLostError, match="with the same token 1 began"):
            jobs.seed(engine, lease(1, since=began))
        assert sqlite_query(tmp_path / "db.sqlite3", "SELECT count(*) FROM seed_runs") == [(0,)]
        # An older run's write with the same token (before our lease began) is not a rival: we write.
        with Session(engine) as s, s.begin():
            fence = s.get(JobFence, "seed")
            assert fence is not None
            fence.written_at = began - 10
        assert jobs.seed(engine, lease(1, since=began)) == 3
    finally:
        engine.dispose()


def test_the_seed_delay_sleeps_before_the_write_and_names_the_token(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """HYPERION_DEMO_SEED_DELAY (the fault campaign's slow job): the sleep comes before the fenced
    write, and its log line names the pid and the fencing token, which is how the campaign finds the
    leader to hit."""
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    upgrade_to_head(url)
    engine = make_engine(url)
    rows_while_sleeping: list[Any] = []
    monkeypatch.setenv(jobs.SEED_DELAY_ENV, "2.5")
    monkeypatch.setattr(time, "sleep", lambda seconds: rows_while_sleeping.append(
        (seconds, sqlite_query(tmp_path / "db.sqlite3", "SELECT count(*) FROM seed_runs"))))
    try:
        with caplog.at_level("INFO", logger="demo.jobs"):
            assert jobs.seed(engine, lease(7, since=time.time())) == 3
    finally:
        engine.dispose()
    assert rows_while_sleeping == [(2.5, [(0,)])]
    assert f"seed: pid {os.getpid()} sleeping 2.5 s with fencing token 7" in caplog.text
    assert sqlite_query(tmp_path / "db.sqlite3", "SELECT fencing_token FROM seed_runs") == [(7,)]


_MIGRATOR = """
import sys
from demo.db import upgrade_to_head
print("migrated" if upgrade_to_head(sys.argv[1]) else "at-head", flush=True)
"""


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
def test_concurrent_upgrades_without_coordinator_apply_once(tmp_path: Path, postgres_url: str, backend: str) -> None:
    """Four processes run upgrade_to_head at once with no Coordinator: the database guard (advisory lock on a
    dedicated connection / flock) plus the head re-check make exactly one migrate, and its DDL is committed."""

    def run(url: str) -> list[str]:
        procs = [subprocess.Popen([sys.executable, "-c", _MIGRATOR, url], cwd=tmp_path, text=True,
                                  env=clean_env(HYPERION_DEMO_MIGRATION_DELAY="1", PYTHONPATH=str(ROOT)),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(4)]
        try:
            outs = [p.communicate(timeout=120) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.communicate()
        assert [p.returncode for p in procs] == [0] * 4, outs
        return sorted(o[0].strip() for o in outs)

    if backend == "sqlite":
        db = tmp_path / "demo.sqlite3"
        assert run(f"sqlite:///{db}") == ["at-head", "at-head", "at-head", "migrated"]
        assert sqlite_query(db, "SELECT count(*) FROM migration_audit") == [(1,)]
        return
    with fresh_database(postgres_url) as url:
        assert run(url) == ["at-head", "at-head", "at-head", "migrated"]
        assert pg_query(url, "SELECT count(*) FROM migration_audit") == [(1,)]
        assert pg_query(url, "SELECT version_num FROM alembic_version") == [(HEAD,)]
        # The guard never leaks: no advisory lock is left behind.
        assert pg_query(url, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == [(0,)]


def test_database_url_and_migrations_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert database_url({}) == f"sqlite:///{tmp_path / 'var' / 'demo.sqlite3'}"
    assert (tmp_path / "var").is_dir()
    assert database_url({"DATABASE_URL": "postgres://u:p@h/d"}) == "postgresql+psycopg://u:p@h/d"
    assert normalize_url("postgresql+psycopg://u@h/d") == "postgresql+psycopg://u@h/d"
    assert migrations_dir({}) == ROOT / "migrations"  # found beside the package, whatever the cwd
    assert migrations_dir({"HYPERION_DEMO_MIGRATIONS_DIR": str(ROOT / "migrations")}) == ROOT / "migrations"
    with pytest.raises(ConfigurationError, match=r"no env\.py"):
        migrations_dir({"HYPERION_DEMO_MIGRATIONS_DIR": str(tmp_path)})
    with pytest.raises(ConfigurationError, match="invalid DATABASE_URL"):
        make_engine("not a url://x:secret@")


def test_gunicorn_helpers() -> None:
    assert gunicorn_workers({}) == 4
    assert gunicorn_workers({"WEB_CONCURRENCY": "7"}) == 7
    for bad in ("0", "x", "-3"):
        with pytest.raises(ConfigurationError, match="WEB_CONCURRENCY"):
            gunicorn_workers({"WEB_CONCURRENCY": bad})
    assert gunicorn_bind({}) == "127.0.0.1:8000"
    assert gunicorn_bind({"HOST": "0.0.0.0", "PORT": "9001"}) == "0.0.0.0:9001"
    assert gunicorn_bind({"HOST": "::1"}) == "[::1]:8000"
    with pytest.raises(ConfigurationError, match="PORT"):
        gunicorn_bind({"PORT": "70000"})
    gen = new_generation(pid=123, now=1.5, host="web 1.example")
    assert gen == "web-1.example:123:1500"
    env: dict[str, str] = {}
    made = prepare_master_env(4, env)
    assert env == {GENERATION_ENV: made, WORKERS_ENV: "4"}
    assert new_generation() != new_generation(now=time.time() + 1)
    env = {GENERATION_ENV: "release-7"}
    assert prepare_master_env(2, env) == "release-7" and env[WORKERS_ENV] == "2"  # an explicit one is kept
    with pytest.raises(ConfigurationError):
        prepare_master_env(2, {GENERATION_ENV: "has spaces"})
    # What a worker reads back: the count its master handed down, None outside such a master.
    assert gunicorn_worker_count(env) == 2
    assert gunicorn_worker_count({}) is None
    with pytest.raises(ConfigurationError, match=WORKERS_ENV):
        gunicorn_worker_count({WORKERS_ENV: "many"})


def test_compose_file_has_what_the_app_needs() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert {"redis", "postgres", "app"} <= set(services)
    redis_svc, pg, app = services["redis"], services["postgres"], services["app"]
    assert "--requirepass" in redis_svc["command"]
    assert "${REDIS_PASSWORD" in redis_svc["command"][redis_svc["command"].index("--requirepass") + 1]
    for svc in (redis_svc, pg, app):
        assert svc["healthcheck"]["test"]
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert app["depends_on"] == {"redis": {"condition": "service_healthy"},
                                 "postgres": {"condition": "service_healthy"}}
    assert app["command"] == ["gunicorn", "-c", "gunicorn.conf.py"]
    env = app["environment"]
    assert env["WEB_CONCURRENCY"].endswith("4}") and env["HOST"] == "0.0.0.0"
    assert env["DATABASE_URL"].startswith("postgresql+psycopg://") and "@postgres:5432/" in env["DATABASE_URL"]
    assert env["HYPERION_LOCK_REDIS_URL"] == "redis://:${REDIS_PASSWORD}@redis:6379/0"
    assert "/health" in " ".join(app["healthcheck"]["test"])
    named = set(compose["volumes"])
    assert {v.split(":")[0] for v in redis_svc["volumes"] + pg["volumes"]} <= named
    # Every variable compose interpolates has an example value, and .env itself is never committed.
    example = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert {"REDIS_PASSWORD", "POSTGRES_PASSWORD", "POSTGRES_USER", "POSTGRES_DB"} <= set(example)
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "gunicorn.conf.py" in dockerfile and "HYPERION_DEMO_MIGRATIONS_DIR=/app/migrations" in dockerfile
    assert "COPY migrations" in dockerfile
    assert 'pip install ".[app]"' in dockerfile  # the library alone has no web server or database driver


def test_gunicorn_conf_values() -> None:
    """The config file gunicorn loads, evaluated in a clean interpreter with a deployment's environment."""
    code = ("import runpy, json; c = runpy.run_path('gunicorn.conf.py'); "
            "print(json.dumps({k: c[k] for k in ('workers', 'bind', 'worker_class', 'wsgi_app', 'preload_app', "
            "'timeout', 'graceful_timeout')}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True,
                         env=clean_env(WEB_CONCURRENCY="3", HOST="0.0.0.0", PORT="8080"), timeout=60)
    values = yaml.safe_load(out.stdout)
    assert values == {"workers": 3, "bind": ["0.0.0.0:8080"], "worker_class": "uvicorn_worker.UvicornWorker",
                      "wsgi_app": "demo.app:app", "preload_app": False, "timeout": 30,
                      "graceful_timeout": 30}


def test_failed_revision_rolls_back_its_ddl_on_sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each revision is one transaction, DDL included (env.py takes BEGIN over from pysqlite): a failing revision
    leaves no half-made table, and the next run applies it cleanly."""
    db = tmp_path / "db.sqlite3"
    monkeypatch.setenv("HYPERION_DEMO_MIGRATION_FAIL", "1")
    with pytest.raises(Exception, match="failed on purpose"):
        upgrade_to_head(f"sqlite:///{db}")
    assert sqlite_query(db, "SELECT version_num FROM alembic_version") == [("0001",)]
    assert sqlite_query(db, "SELECT count(*) FROM sqlite_master WHERE name = 'migration_audit'") == [(0,)]
    monkeypatch.delenv("HYPERION_DEMO_MIGRATION_FAIL")
    assert upgrade_to_head(f"sqlite:///{db}") is True
    assert sqlite_query(db, "SELECT count(*) FROM migration_audit") == [(1,)]
