"""``hyperion_lock.testing``'s run-once isolation: ``isolated_run_once`` and the ``hyperion_lock_isolated`` fixture.

Without it every test of one pytest process (and every xdist worker: they share the controller as their parent)
has the same default generation, key prefix and lock directory, so a job that ran in one test is "done" for the
next. The end-to-end cases run a small generated test module in a real pytest process: two tests each start
``use_lock_for_workers(drop_db, "drop_db", ..., number_of_workers=2)``; with the fixture ``drop_db`` runs in each,
without it only in the first.
"""


from __future__ import annotations

import os
from pathlib import Path

import pytest

from hyperion_lock import ConfigurationError, Settings
from hyperion_lock.testing import Isolation, isolated_run_once
from tests.support.testing_isolation import GEN, LOCK_DIR, PREFIX


def test_the_environment_is_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(GEN, "outer-generation")
    monkeypatch.delenv(PREFIX, raising=False)
    monkeypatch.delenv(LOCK_DIR, raising=False)
    with isolated_run_once() as isolation:
        settings = Settings.from_env()
        assert (settings.generation, settings.key_prefix, settings.lock_dir) == (
            isolation.generation, isolation.key_prefix, isolation.lock_dir)
        assert isolation.generation != "outer-generation"
        assert Path(isolation.lock_dir).is_dir()
    assert os.environ[GEN] == "outer-generation"
    assert PREFIX not in os.environ and LOCK_DIR not in os.environ
    assert not Path(isolation.lock_dir).exists()


def test_the_environment_is_restored_when_the_block_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(GEN, raising=False)
    monkeypatch.setenv(PREFIX, "outer_prefix")
    with pytest.raises(RuntimeError, match="inside"), isolated_run_once():
        raise RuntimeError("inside")
    assert GEN not in os.environ and LOCK_DIR not in os.environ
    assert os.environ[PREFIX] == "outer_prefix"


def test_names_are_valid_fresh_and_name_the_xdist_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw3")
    with isolated_run_once() as first:
        Settings.from_env()  # validates the generation and the prefix
    with isolated_run_once() as second:
        Settings.from_env()
    assert first.generation != second.generation and first.key_prefix != second.key_prefix
    assert first.lock_dir != second.lock_dir
    for isolation in (first, second):
        assert "gw3" in isolation.generation and "gw3" in isolation.key_prefix, isolation
    monkeypatch.delenv("PYTEST_XDIST_WORKER")
    with isolated_run_once() as plain:
        assert "main" in plain.generation and "main" in plain.key_prefix, plain


def test_explicit_names_are_used_as_given_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(GEN, "outer")
    with isolated_run_once(prefix="myapp:test", generation="release-42") as isolation:
        assert (os.environ[PREFIX], os.environ[GEN]) == ("myapp:test", "release-42")
        assert isolation.key_prefix == "myapp:test" and isolation.generation == "release-42"
    with pytest.raises(ConfigurationError, match="generation"), isolated_run_once(generation="has space"):
        pass
    with pytest.raises(ConfigurationError, match="key prefix"), isolated_run_once(prefix="{braces}"):
        pass
    assert os.environ[GEN] == "outer"


def test_the_fixture_sets_this_tests_own_state(hyperion_lock_isolated: Isolation) -> None:
    assert os.environ[GEN] == hyperion_lock_isolated.generation
    assert os.environ[PREFIX] == hyperion_lock_isolated.key_prefix
    assert os.environ[LOCK_DIR] == hyperion_lock_isolated.lock_dir

