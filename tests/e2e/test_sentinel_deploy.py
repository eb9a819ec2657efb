"""Sentinel failover under the reference deployment: ``gunicorn -c gunicorn.conf.py`` with 8 workers on
``redis+sentinel://`` (a primary, a replica, three Sentinels) and PostgreSQL; the primary is SIGKILLed while the
migration runs. Synchronised on log lines and on the replica holding the lease; nothing asserts a duration."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from hyperion_lock import JobKeys
from hyperion_lock.testing import SentinelSet, _redis_call
from tests.support import wait_until
from tests.support.deploy import HEAD, Gunicorn, assert_same_jobs, fresh_database, pg_query, running

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


def test_primary_killed_during_a_slow_migration_every_worker_ready_and_the_schema_migrated_once(
        tmp_path: Path, postgres_url: str) -> None:
    """8 workers; revision 0002 sleeps 5 s inside its transaction; the primary is killed once the migration runs
    and its lease reached the replica. Every worker becomes ready, the migration and the seed ran once (the
    database's audit rows, alembic head, the fenced seed), and every worker reports the same runner. A 10 s lease:
    the leader re-asserts it on the promoted replica before it could expire (failover takes 2-3 s here)."""
    lease = JobKeys("hyperion_lock", "migrate").lease
    with SentinelSet() as sset, fresh_database(postgres_url) as db, running(Gunicorn(
        tmp_path, workers=8, DATABASE_URL=db, HYPERION_LOCK_REDIS_URL=sset.url(), HYPERION_LOCK_LEASE_TTL="10",
        HYPERION_DEMO_MIGRATION_DELAY="5",
    )) as g:
        leader = int(g.wait_log(r"revision 0002: pid (\d+) sleeping")[0].group(1))
        replica_port = sset.replica.port
        wait_until(lambda: _redis_call(replica_port, "EXISTS", lease) == 1, "the lease reached the replica")
        old = sset.kill_primary()
        killed = time.monotonic()
        new_port = sset.wait_failover(old.port)
        promoted = time.monotonic() - killed
        g.wait_healthy(timeout=120)  # a bound for a hang only
        reports = g.startup_reports(8, timeout=120)
        jobs = assert_same_jobs(reports)
        print(f"\nsentinel failover mid-migration: replica :{new_port} promoted {promoted:.1f} s after the kill; "
              f"8/8 workers ready; migrate ran by pid {jobs['migrate']['runner_pid']} (fencing token "
              f"{jobs['migrate']['fencing_token']}), seed by {jobs['seed']['runner_pid']}")
        assert new_port == replica_port
        assert jobs["migrate"]["runner_pid"] == leader and jobs["migrate"]["fencing_token"] == 1
        assert pg_query(db, "SELECT count(*) FROM migration_audit") == [(1,)]
        assert pg_query(db, "SELECT version_num FROM alembic_version") == [(HEAD,)]
        assert pg_query(db, "SELECT count(*) FROM seed_runs") == [(1,)]
        assert "READONLY" not in g.log()
        assert g.proc is not None and g.proc.poll() is None
