"""A stored lease or outcome that is not what the package writes (not a JSON object) is a clear error naming the key
and the way out (``hyperion-lock reset``), never a raw Lua ``ResponseError`` or a CLI traceback; ``reset`` clears it.

Real redis-server, the real CLI.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import redis

from hyperion_lock import Coordinator, CorruptStateError, HyperionLockError, JobKeys
from tests.support import ROOT, noop

pytestmark = pytest.mark.integration

BAD = [b"not json {", b"42", b'"a string"', b"\xff\xfe"]


def _cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hyperion_lock.cli.main", *args, "--url", url], capture_output=True,
                          text=True, check=False, timeout=60, cwd=ROOT)


def _prefix() -> str:
    return f"corrupt{time.time_ns()}"


@pytest.mark.parametrize("value", BAD, ids=["garbage", "number", "string", "binary"])
@pytest.mark.parametrize("where", ["lease", "outcome"])
async def test_run_once_names_the_corrupt_key(redis_url: str, where: str, value: bytes) -> None:
    prefix, gen = _prefix(), "g1"
    keys = JobKeys(prefix, "migrate")
    stored = keys.lease if where == "lease" else keys.outcome(gen)
    admin = redis.Redis.from_url(redis_url)
    admin.set(stored, value)
    ran: list[int] = []
    with pytest.raises(CorruptStateError) as info:
        await Coordinator(redis_url, key_prefix=prefix, generation=gen).run_once("migrate", lambda: ran.append(1))
    assert not ran
    text = str(info.value)
    assert stored in text and f"hyperion-lock reset migrate --generation {gen} --prefix {prefix}" in text
    assert isinstance(info.value, HyperionLockError) and info.value.key == "migrate"
    assert admin.get(stored) == value  # nothing was changed
    assert admin.get(keys.fence) is None  # nor taken


def test_status_reports_a_corrupt_lease_and_reset_clears_it(redis_url: str) -> None:
    prefix, gen = _prefix(), "g1"
    keys = JobKeys(prefix, "migrate")
    admin = redis.Redis.from_url(redis_url)
    admin.set(keys.lease, b"not json {", px=600_000)
    status = _cli(redis_url, "status", "--prefix", prefix)
    assert status.returncode == 1, status.stdout + status.stderr
    assert "Traceback" not in status.stderr
    assert "corrupt" in status.stdout and "hyperion-lock reset migrate" in status.stdout
    reset = _cli(redis_url, "reset", "migrate", "--prefix", prefix)  # no --force needed: no holder wrote it
    assert reset.returncode == 0, reset.stdout + reset.stderr
    assert "Traceback" not in reset.stderr
    assert admin.get(keys.lease) is None
    outcome = Coordinator(redis_url, key_prefix=prefix, generation=gen).run_once_sync("migrate", noop)
    assert outcome.ran_here
    status = _cli(redis_url, "status", "--prefix", prefix)
    assert status.returncode == 0, status.stdout + status.stderr


def test_reset_still_refuses_a_live_lease(redis_url: str) -> None:
    """Only a corrupt lease is cleared without --force; a real holder's is not."""
    prefix = _prefix()
    keys = JobKeys(prefix, "migrate")
    admin = redis.Redis.from_url(redis_url)
    admin.set(keys.lease, b'{"host":"h","pid":1,"generation":"g1","since":0,"fence":3,"token":"t"}', px=600_000)
    reset = _cli(redis_url, "reset", "migrate", "--prefix", prefix)
    assert reset.returncode == 1 and "refused" in reset.stderr, reset.stdout + reset.stderr
    assert admin.get(keys.lease) is not None
