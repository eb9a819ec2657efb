"""``hyperion_lock.testing``'s run-once isolation: ``isolated_run_once`` and the ``hyperion_lock_isolated`` fixture.

Without it every test of one pytest process (and every xdist worker: they share the controller as their parent)
has the same default generation, key prefix and lock directory, so a job that ran in one test is "done" for the
next. The end-to-end cases run a small generated test module in a real pytest process: two tests each start
``use_lock_for_workers(drop_db, "drop_db", ..., number_of_workers=2)``; with the fixture ``drop_db`` runs in each,
without it only in the first.
"""


from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.support.testing_isolation import GEN, LOCK_DIR, PREFIX

_MODULE = '''
import asyncio
import json
import logging
import os

import pytest
import redis

from hyperion_lock import use_lock_for_workers

{mark}

def drop_db(test):
    with open(os.environ["ISOLATION_RUNS"], "a") as fh:
        fh.write(test + "\\n")


def start(test):
    url = os.environ.get("ISOLATION_REDIS_URL")
    client = redis.Redis.from_url(url) if url else None
    try:
        # Two workers, so the call is coordinated (one worker would run the job directly).
        asyncio.run(use_lock_for_workers(drop_db, "drop_db", client, 2, logging.getLogger("t"), None, test))
    finally:
        if client is not None:
            client.close()
    seen = {{name: os.environ.get(name) for name in ("{gen}", "{prefix}", "{lock_dir}")}}
    with open(os.environ["ISOLATION_REPORT"], "a") as fh:
        fh.write(json.dumps({{"test": test, "pid": os.getpid(), **seen}}) + "\\n")


def test_first():
    start("first")


def test_second():
    start("second")
'''


def _run_two_tests(tmp_path: Path, *, isolated: bool, redis_url: str | None) -> tuple[list[str], list[dict[str, str]]]:
    mark = 'pytestmark = pytest.mark.usefixtures("hyperion_lock_isolated")' if isolated else ""
    (tmp_path / "test_two.py").write_text(_MODULE.format(mark=mark, gen=GEN, prefix=PREFIX, lock_dir=LOCK_DIR))
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    runs, report = tmp_path / "runs.txt", tmp_path / "report.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HYPERION_LOCK_", "PYTEST_", "ISOLATION_"))}
    env.update(ISOLATION_RUNS=str(runs), ISOLATION_REPORT=str(report), PYTEST_XDIST_WORKER="gw7")
    # Without isolation the two tests use the default generation: the parent's identity (this pytest process,
    # the same executable), shared by both. A prefix and lock directory of this case's own keep other tests'
    # state out of it.
    env[PREFIX] = f"test_isolation_{uuid.uuid4().hex[:12]}"
    env[LOCK_DIR] = str(tmp_path / "locks")
    if redis_url:
        env["ISOLATION_REDIS_URL"] = redis_url
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "hyperion_lock.testing", "-p", "no:cacheprovider", "-q",
         "test_two.py"], check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    return runs.read_text().splitlines() if runs.exists() else [], rows


@pytest.mark.integration
@pytest.mark.parametrize("backend", ["redis", "file-locks"])
def test_with_the_fixture_drop_db_runs_in_each_of_two_tests(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url: str | None = request.getfixturevalue("redis_url") if backend == "redis" else None
    runs, rows = _run_two_tests(tmp_path, isolated=True, redis_url=url)
    assert runs == ["first", "second"]
    first, second = rows
    assert first["pid"] == second["pid"]  # one process
    for name in (GEN, PREFIX, LOCK_DIR):
        assert first[name] != second[name], (name, rows)
    for row in rows:
        assert "gw7" in row[GEN] and "gw7" in row[PREFIX], row  # the (simulated) xdist worker's id


@pytest.mark.integration
@pytest.mark.parametrize("backend", ["redis", "file-locks"])
def test_without_it_drop_db_runs_only_in_the_first_test(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url: str | None = request.getfixturevalue("redis_url") if backend == "redis" else None
    runs, rows = _run_two_tests(tmp_path, isolated=False, redis_url=url)
    assert runs == ["first"]  # the second test found drop_db done for the shared generation
    first, second = rows
    assert first["pid"] == second["pid"]
    assert first[GEN] is None and second[GEN] is None  # the default generation, the same for both

