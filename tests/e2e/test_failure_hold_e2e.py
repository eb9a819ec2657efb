"""End-to-end: a migration that fails is attempted once per deploy, and the deploy fails visibly.

``gunicorn -c gunicorn.conf.py`` with 8 workers and ``HYPERION_DEMO_MIGRATION_FAIL=1`` (revision 0002 raises
``DeliberateMigrationFailure``). One worker runs the migration and fails; the failure is held for the rest of that
deploy: every other worker, also one that starts (or is respawned) after the failure was recorded, fails its boot
with the recorded cause instead of running the migration again. The master halts and exits non-zero, the cause in
its log. Counted through Alembic's own log line for the failing revision, once per attempt.

On SQLite with file locks (the embedded default) and with Redis, each with and without ``--preload``.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest

from tests.support.deploy import Gunicorn, running, sqlite_query

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

WORKERS = 8
ATTEMPT_LINE = "Running upgrade 0001 -> 0002"  # alembic.runtime.migration, once per attempt of revision 0002
CAUSE = "revision 0002 failed on purpose (HYPERION_DEMO_MIGRATION_FAIL=1)"
# Bound on the whole deploy, start to exit: it fails in seconds; a hang must fail the test, not stall CI.
EXIT_TIMEOUT = 120.0


@pytest.mark.parametrize("preload", [False, True], ids=["fork", "preload"])
@pytest.mark.parametrize("backend", ["file-locks", "redis"])
def test_failing_migration_is_attempted_once_and_the_master_exits_nonzero(
    backend: str, preload: bool, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    env: dict[str, str] = {"HYPERION_DEMO_MIGRATION_FAIL": "1"}
    if backend == "redis":
        redis_url: str = request.getfixturevalue("redis_url")
        # A generation of its own: the session's Redis may hold outcomes of other tests.
        env.update(HYPERION_LOCK_REDIS_URL=redis_url, HYPERION_LOCK_GENERATION=f"failure-hold-{uuid.uuid4().hex}")
    if preload:
        env["GUNICORN_CMD_ARGS"] = "--preload"  # overrides preload_app = False of gunicorn.conf.py
    with running(Gunicorn(tmp_path, workers=WORKERS, **env)) as g:
        code = g.wait_exit(timeout=EXIT_TIMEOUT)
        log = g.log()
    attempts = [line for line in log.splitlines() if ATTEMPT_LINE in line]
    leaders = re.findall(r"migrate: pid \d+ leads generation [^ ]+ \(fencing token \d+\)", log)
    assert len(attempts) == 1, (
        f"the failing migration was attempted {len(attempts)} times in one deploy (expected once):\n"
        + "\n".join(attempts) + "\nleaderships:\n" + "\n".join(leaders)
    )
    assert code != 0, f"gunicorn exited 0 although the migration failed; log:\n{log}"
    assert CAUSE in log, log
    assert "Worker failed to boot" in log or "HaltServer" in log, log
    # Nothing else started: the seed job never ran, and the failed revision was rolled back (0001 stayed).
    assert "seed: pid" not in log
    db = tmp_path / "var" / "demo.sqlite3"
    assert sqlite_query(db, "SELECT version_num FROM alembic_version") == [("0001",)]
    assert sqlite_query(db, "SELECT count(*) FROM sqlite_master WHERE name = 'migration_audit'") == [(0,)]
