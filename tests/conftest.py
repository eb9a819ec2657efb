"""Shared helpers for the tests. Server fixtures (redis_url, redis_server, postgres_url) come from the
``hyperion_lock.testing`` pytest plugin, enabled here (it is opt-in, like in any project using the library)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Workers, tier_problem

# Fixtures: the servers (the library's own plugin), a TLS-only redis-server, an in-memory span exporter.
pytest_plugins = ["hyperion_lock.testing", "tests.support.tls", "tests.support.metrics"]

@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    w = Workers(tmp_path)
    try:
        yield w
    finally:
        w.kill_all()


# The tiers are directories (tests/unit, tests/integration, tests/e2e) and markers at once, so that
# `pytest tests/unit` and `pytest -m "not integration"` select the same tests: a test in the wrong place is refused
# at collection, as is a unit test that asks for a server.
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    problems = []
    for item in items:
        markers = {m.name for m in item.iter_markers()}
        problem = tier_problem(Path(str(item.path)), markers, set(getattr(item, "fixturenames", ())))
        if problem:
            problems.append(f"{item.nodeid} {problem}")
    if problems:
        raise pytest.UsageError("tests in the wrong tier:\n" + "\n".join(problems))
