"""Shared helpers for the tests. Server fixtures (redis_url, redis_server, postgres_url) come from the
``hyperion_lock.testing`` pytest plugin, enabled here (it is opt-in, like in any project using the library)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Workers

pytest_plugins = ["hyperion_lock.testing"]

@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    w = Workers(tmp_path)
    try:
        yield w
    finally:
        w.kill_all()
