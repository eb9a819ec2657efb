"""End-to-end: the reference app under a real ``gunicorn -c gunicorn.conf.py`` with 4 workers.

Against a real PostgreSQL and Redis (the deployment of compose.yaml) and on the embedded default (SQLite file,
file locks, no Redis). Every spawned process is killed in ``finally``; every loop is bounded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from sqlalchemy import make_url

from hyperion_lock import JobKeys
from hyperion_lock.testing import RedisServer, free_port
from tests.support import wait_until
from tests.support.deploy import (
    HEAD,
    ROOT,
    Gunicorn,
    assert_same_jobs,
    clean_env,
    fresh_database,
    pg_query,
    pg_table_exists,
    running,
    sqlite_query,
    waiting_on_redis,
)

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


def lease_holder_pid(url: str, key: str) -> int | None:
    client = redis.Redis.from_url(url)
    try:
        raw = client.get(JobKeys("hyperion_lock", key).lease)
    finally:
        client.close()
    return int(json.loads(raw)["pid"]) if raw else None


def test_postgres_and_redis_four_workers_init_once(tmp_path: Path, postgres_url: str) -> None:
    """The compose deployment without Docker: password-protected Redis, PostgreSQL, gunicorn with 4 workers."""
    redis_password = "compose-like-Redis-pw"
    with RedisServer(password=redis_password) as redis_server, fresh_database(postgres_url) as db, running(Gunicorn(
        tmp_path, DATABASE_URL=db, HYPERION_LOCK_REDIS_URL=redis_server.url,
    )) as g:
        g.wait_healthy()
        reports = g.startup_reports(4)
        jobs = assert_same_jobs(reports)
        # Exactly once, as recorded in the database itself.
        assert pg_query(db, "SELECT count(*) FROM migration_audit") == [(1,)]
        assert pg_query(db, "SELECT version_num FROM alembic_version") == [(HEAD,)]
        seed_token = jobs["seed"]["fencing_token"]
        assert pg_query(db, "SELECT count(*), max(fencing_token) FROM seed_runs") == [(1, seed_token)]
        assert pg_query(db, "SELECT fencing_token FROM job_fences WHERE name = 'seed'") == [
            (jobs["seed"]["fencing_token"],)]
        assert pg_query(db, "SELECT count(*) FROM items") == [(3,)]
        assert g.get("/items").json() == ["alpha", "beta", "gamma"]
        # The runners were workers of this master, and the app's log says who ran what.
        log = g.log()
        workers = {int(pid) for pid in re.findall(r"Booting worker with pid: (\d+)", log)}
        for name in ("migrate", "seed"):
            runner = jobs[name]["runner_pid"]
            assert runner in workers, (runner, workers)
            assert f"worker pid {runner}: job '{name}' ran here" in log
            assert log.count(f"job '{name}' was done by another worker") >= 3
        assert "generation" in log and "4 worker(s)" in log
        # Passwords never reach the log (URLs are redacted).
        pg_password = make_url(db).password
        assert pg_password and str(pg_password) not in log and redis_password not in log
        assert "redis://:***@127.0.0.1" in log
        # The Redis key layout is the one the CLI reads.
        client = redis.Redis.from_url(redis_server.url)
        try:
            gen = next(iter(reports.values()))["generation"]
            raw = client.get(JobKeys("hyperion_lock", "migrate").outcome(gen))
            assert raw is not None and json.loads(raw)["status"] == "done"
        finally:
            client.close()


def test_embedded_default_sqlite_four_workers_then_restart(tmp_path: Path) -> None:
    """No DATABASE_URL, no Redis: ./var/demo.sqlite3 and file locks. A restart (new generation) re-runs the jobs,
    but the migration finds the database at head and does nothing."""
    db = tmp_path / "var" / "demo.sqlite3"
    with running(Gunicorn(tmp_path)) as g:
        g.wait_healthy()
        first = assert_same_jobs(g.startup_reports(4))
        assert "Redis none (file locks on this host)" in g.log()
    assert db.is_file()
    assert sqlite_query(db, "SELECT count(*) FROM migration_audit") == [(1,)]
    assert sqlite_query(db, "SELECT count(*) FROM seed_runs") == [(1,)]
    assert sqlite_query(db, "SELECT version_num FROM alembic_version") == [(HEAD,)]

    with running(Gunicorn(tmp_path, workers=2)) as g2:
        g2.wait_healthy()
        second = assert_same_jobs(g2.startup_reports(2))
        assert f"already at head {HEAD}: nothing to migrate" in g2.log()
    assert second["seed"]["fencing_token"] > first["seed"]["fencing_token"]
    assert sqlite_query(db, "SELECT count(*) FROM migration_audit") == [(1,)]
    assert sqlite_query(db, "SELECT count(*), count(DISTINCT generation) FROM seed_runs") == [(2, 2)]
    assert sqlite_query(db, "SELECT count(*) FROM items") == [(3,)]


def test_sigkill_of_the_migrating_worker_is_taken_over(
    tmp_path: Path, postgres_url: str, redis_server: RedisServer
) -> None:
    delay = 3.0
    with fresh_database(postgres_url) as db, running(Gunicorn(
        tmp_path, DATABASE_URL=db, HYPERION_LOCK_REDIS_URL=redis_server.url, HYPERION_LOCK_LEASE_TTL="2",
        HYPERION_DEMO_MIGRATION_DELAY=str(delay),
    )) as g:
        # Wait until revision 0002 sleeps inside its transaction, then kill the lease holder.
        victim = int(g.wait_log(r"revision 0002: pid (\d+) sleeping")[0].group(1))
        assert lease_holder_pid(redis_server.url, "migrate") == victim
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()

        g.wait_healthy(timeout=90)  # bound for a hang only: the take-over comes one lease TTL (2 s) after the kill
        print(f"\ntake-over: healthy {time.monotonic() - killed_at:.1f} s after the SIGKILL")
        reports = g.startup_reports(4)
        assert victim not in reports
        jobs = assert_same_jobs(reports)
        assert jobs["migrate"]["runner_pid"] != victim
        assert jobs["migrate"]["fencing_token"] >= 2  # a new leadership
        assert pg_query(db, "SELECT count(*) FROM migration_audit") == [(1,)]
        assert pg_query(db, "SELECT version_num FROM alembic_version") == [(HEAD,)]
        assert pg_query(db, "SELECT count(*) FROM seed_runs") == [(1,)]
        log = g.log()
        assert f"Worker (pid:{victim}) was sent SIGKILL" in log
        assert g.proc is not None and g.proc.poll() is None


def test_failing_migration_stops_gunicorn_promptly(
    tmp_path: Path, postgres_url: str, redis_server: RedisServer
) -> None:
    # The halt takes seconds when every worker's wait ends on the failure outcome. A worker still waiting would be
    # SIGKILLed only at graceful_timeout: the exit bound, half of a graceful_timeout of 120 s, catches that without
    # depending on how fast this machine is.
    graceful_timeout = 120
    with fresh_database(postgres_url) as db, running(Gunicorn(
        tmp_path, DATABASE_URL=db, HYPERION_LOCK_REDIS_URL=redis_server.url, HYPERION_DEMO_MIGRATION_FAIL="1",
        GUNICORN_CMD_ARGS=f"--graceful-timeout {graceful_timeout}",
    )) as g:
        code = g.wait_exit(timeout=graceful_timeout / 2)
        print(f"\nfailed deploy: gunicorn exited {time.monotonic() - g.started:.1f} s after its start")
        log = g.log()
        assert code != 0, log
        assert "DeliberateMigrationFailure" in log and "HYPERION_DEMO_MIGRATION_FAIL=1" in log
        assert "startup failed, this worker will exit" in log
        assert "Worker failed to boot" in log
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", g.port), timeout=1):
            pass
        # The failed revision was rolled back; revision 0001 (its own transaction) stayed.
        assert not pg_table_exists(db, "migration_audit")
        assert pg_query(db, "SELECT version_num FROM alembic_version") == [("0001",)]
        # The CLI sees the failure, for a health check (exit 1), with the cause.
        status = subprocess.run(
            [sys.executable, "-m", "hyperion_lock.cli.main", "status", "--json", "--url", redis_server.url],
            check=False, capture_output=True, text=True, timeout=30, env=clean_env(),
        )
        assert status.returncode == 1, status
        report = json.loads(status.stdout)
        migrate = next(j for j in report["jobs"] if j["key"] == "migrate")
        assert migrate["state"] == "failed" and "DeliberateMigrationFailure" in migrate["last_error"]


def test_cli_run_twice_and_a_booting_app_run_the_command_once(
    tmp_path: Path, postgres_url: str, redis_server: RedisServer
) -> None:
    generation = "release-42"
    marker = tmp_path / "marker.txt"
    cli = shutil.which("hyperion-lock")
    assert cli, "the console script is installed by pip install -e ."
    command = (f"echo $$ >> {marker}; sleep 1; "
               f"{sys.executable} -m alembic -c {ROOT / 'alembic.ini'} upgrade head")
    with fresh_database(postgres_url) as db:
        env = clean_env(DATABASE_URL=db, HYPERION_LOCK_REDIS_URL=redis_server.url)
        argv = ["run", "--key", "migrate", "--generation", generation, "--", command]
        procs: list[subprocess.Popen[str]] = []
        try:
            with running(Gunicorn(tmp_path, DATABASE_URL=db, HYPERION_LOCK_REDIS_URL=redis_server.url,
                                  HYPERION_LOCK_GENERATION=generation)) as g:
                procs.append(subprocess.Popen([cli, *argv], env=env, cwd=tmp_path, text=True,
                                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
                procs.append(subprocess.Popen([sys.executable, "-m", "hyperion_lock.cli.main", *argv], env=env,
                                              cwd=tmp_path, text=True, stdout=subprocess.PIPE,
                                              stderr=subprocess.STDOUT))
                outputs = [p.communicate(timeout=90)[0] for p in procs]
                assert [p.returncode for p in procs] == [0, 0], outputs
                g.wait_healthy()
                jobs = assert_same_jobs(g.startup_reports(4))
                assert jobs["migrate"]["outcome"] == "done"
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.communicate()
        cli_runs = marker.read_text().split() if marker.exists() else []
        app_ran = jobs["migrate"]["runner_pid"] not in {p.pid for p in procs}
        assert len(cli_runs) + int(app_ran) == 1, (cli_runs, jobs, outputs)
        assert pg_query(db, "SELECT count(*) FROM migration_audit") == [(1,)]
        assert pg_query(db, "SELECT version_num FROM alembic_version") == [(HEAD,)]


def test_sigterm_during_a_slow_migration_stops_without_waiting_for_graceful_timeout(
    tmp_path: Path, postgres_url: str, redis_server: RedisServer
) -> None:
    """SIGTERM to the master while one worker provably leads the migration (inside revision 0002, holding the lease)
    and the three others provably wait for it. The waiters end their wait at once; the leader finishes its revision
    (a migration is not interrupted) but starts no further job; every worker exits without serving, nobody is
    killed at graceful_timeout, and the master exits 0 (a requested stop is not a boot failure)."""
    delay, graceful_timeout = 6.0, 120
    url = redis_server.url
    with fresh_database(postgres_url) as db, running(Gunicorn(
        tmp_path, DATABASE_URL=db, HYPERION_LOCK_REDIS_URL=url,
        HYPERION_DEMO_MIGRATION_DELAY=str(delay), GUNICORN_CMD_ARGS=f"--graceful-timeout {graceful_timeout}",
    )) as g:
        workers = {int(m.group(1)) for m in g.wait_log(r"Booting worker with pid: (\d+)", 4)}
        leader = int(g.wait_log(r"revision 0002: pid (\d+) sleeping")[0].group(1))
        assert leader in workers and lease_holder_pid(url, "migrate") == leader
        waiters = workers - {leader}
        wait_until(lambda: waiters <= waiting_on_redis(url, waiters), "the 3 other workers wait for the migration")
        assert f"worker pid {leader}: job 'migrate'" not in g.log(), f"migrated before all waited (delay {delay} s)"
        assert g.proc is not None
        g.proc.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        # Bound for a hang only (half of graceful_timeout): a worker that ignored SIGTERM would be killed at
        # graceful_timeout; the leader has at most the rest of its revision (< delay) to finish.
        code = g.wait_exit(timeout=graceful_timeout / 2)
        print(f"\nSIGTERM mid-migration: gunicorn exited {time.monotonic() - stopped_at:.1f} s after the signal")
        log = g.log()
        # The signal arrived while the leader was inside its job: it finished the migration (committed), then
        # started no new job.
        assert f"worker pid {leader}: stop requested before job 'seed'; exiting without serving" in log, log
        assert pg_query(db, "SELECT version_num FROM alembic_version") == [(HEAD,)]
        assert pg_query(db, "SELECT count(*) FROM seed_runs") == [(0,)]
        assert "seed: pid" not in log
        # The waiters ended their wait on the signal.
        for pid in sorted(waiters):
            assert (f"worker pid {pid}: stop requested (SIGTERM/SIGINT) while waiting for the job; exiting without "
                    "serving") in log, log
        # Nobody served, nobody was killed, and the stop is a clean shutdown, not a boot failure.
        assert "startup finished; serving" not in log
        assert "was sent SIGKILL" not in log and "HaltServer" not in log and "Worker failed to boot" not in log
        assert code == 0, log


def test_unreachable_redis_fails_the_deploy_with_a_redacted_cause(tmp_path: Path) -> None:
    """A wrong HYPERION_LOCK_REDIS_URL must not come up silently on file locks: every worker fails its startup
    within the connect timeout and gunicorn exits non-zero, naming the (redacted) URL."""
    port = free_port()
    with running(Gunicorn(tmp_path, HYPERION_LOCK_REDIS_URL=f"redis://:hunter2-secret@127.0.0.1:{port}/0",
                          HYPERION_LOCK_CONNECT_TIMEOUT="1")) as g:
        code = g.wait_exit(timeout=60)
        log = g.log()
        assert code != 0, log
        assert "RedisUnavailableError" in log and f"redis://:***@127.0.0.1:{port}/0" in log
        assert "hunter2-secret" not in log
        assert not (tmp_path / "var" / "demo.sqlite3").exists() or sqlite_query(
            tmp_path / "var" / "demo.sqlite3", "SELECT count(*) FROM sqlite_master WHERE name = 'alembic_version'"
        ) == [(0,)]
