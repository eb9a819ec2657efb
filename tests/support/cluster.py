"""Cluster test helpers: whether this redis-py supports Cluster URLs, the password used, and the refusal check."""

from __future__ import annotations

import pytest

from hyperion_lock import (
    ConfigurationError,
    Coordinator,
)
from hyperion_lock.connection.cluster import MIN_REDIS_PY, cluster_support_problem

SUPPORTED = cluster_support_problem() is None


PW = "Clu5/Pw?Ok"


def _refused(url: str) -> bool:
    """On an old redis-py: assert the refusal and tell the test to stop there."""
    if SUPPORTED:
        return False
    with pytest.raises(ConfigurationError, match=rf"needs redis-py >= {MIN_REDIS_PY}"):
        Coordinator(url)
    return True

