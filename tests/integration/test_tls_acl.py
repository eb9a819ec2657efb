"""Production Redis: a TLS-only server and an ACL user limited to the prefix (real redis-server, real processes)."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time

import pytest
import redis

from hyperion_lock import Cache, Settings
from hyperion_lock.connection.clients import _ACL_COMMANDS
from tests.support import ROOT, Workers
from tests.support.caching import Waits, computed_once
from tests.support.tls import TlsRedis

pytestmark = pytest.mark.integration


def _grant(server: TlsRedis, *rules: str) -> None:
    admin = redis.Redis(host="127.0.0.1", port=server.port, ssl=True, ssl_ca_certs=str(server.ca))
    try:
        admin.execute_command("ACL", "SETUSER", "app", "on", ">app-pw", "resetchannels", *rules)  # type: ignore[no-untyped-call]
    finally:
        admin.close()


def test_the_minimal_acl_the_library_names_is_enough_over_tls(tls_redis: TlsRedis, workers: Workers) -> None:
    """The user gets exactly what a RedisPermissionError tells users to grant: keys and channels under the prefix
    and the library's commands. Four processes over TLS run the job once; the CLI's status needs SCAN on top."""
    _grant(tls_redis, "~hyperion_lock:*", "&hyperion_lock:*", *_ACL_COMMANDS.split())
    url = f"rediss://app:app-pw@127.0.0.1:{tls_redis.port}/0?ssl_ca_certs={tls_redis.ca}"
    gen = f"tls-acl-{time.time_ns()}"
    workers.spawn(4, url=url, job="sleep:0.3", generation=gen)
    assert workers.join() == [0] * 4, workers.outputs
    assert len(workers.events("ran")) == 1 and len(workers.events("returned")) == 4

    status = [sys.executable, "-m", "hyperion_lock.cli.main", "status", "--url", url, "--generation", gen, "--key",
              "migrate"]
    denied = subprocess.run(status, capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)
    assert denied.returncode == 3 and "app-pw" not in denied.stderr, denied.stderr
    _grant(tls_redis, "+scan")
    allowed = subprocess.run(status, capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr

    # The documented ACL line grants the same commands, plus SCAN for the CLI.
    line = next(ln for ln in (ROOT / "docs" / "deployment.md").read_text().splitlines() if "ACL SETUSER" in ln
                and "~hyperion_lock:*" in ln)
    assert set(_ACL_COMMANDS.split()) | {"+scan"} == set(re.findall(r"\+[a-z]+", line))


async def test_the_cache_works_as_an_acl_user_with_the_commands_docs_caching_lists(
        tls_redis: TlsRedis, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """The core's commands plus the ones docs/caching.md lists (read from the page): two caches (two workers)
    over TLS compute once, invalidate by tag, add their counts, and the CLI's status shows the namespace; the
    store never fails (the breaker never opens)."""
    page = (ROOT / "docs" / "caching.md").read_text()
    extra = re.findall(r"\+[a-z]+", page[page.index("## ACL"):page.index("## The reference app")])
    assert "+zadd" in extra
    _grant(tls_redis, "~hyperion_lock:*", "&hyperion_lock:*", *_ACL_COMMANDS.split(), *extra, "+scan")
    url = f"rediss://app:app-pw@127.0.0.1:{tls_redis.port}/0?ssl_ca_certs={tls_redis.ca}"
    namespace = f"acl{time.time_ns()}"
    # A missing permission fails at once; a generous op_timeout keeps a busy machine from opening the breaker.
    caches = [Cache(url, settings=Settings(redis_url=None), op_timeout=2) for _ in range(2)]
    waits = Waits(monkeypatch)
    try:
        async with asyncio.timeout(30):
            runs, results = await computed_once(caches, waits, namespace, "k", "value", ttl=60, tags=["t"])
            assert (runs, results) == (1, ["value"] * 4)
            assert await caches[0].invalidate_tag(namespace, "t") == 1
            again, results = await computed_once(caches[::-1], waits, namespace, "k", "value", ttl=60, tags=["t"])
            assert (again, results) == (1, ["value"] * 4)
    finally:
        for c in caches:
            await c.aclose()  # adds this worker's counts
    assert not [r for r in caplog.records if "is failing" in r.getMessage()], caplog.text
    out = subprocess.run([sys.executable, "-m", "hyperion_lock.cli.main", "status", "--json", "--url", url],  # noqa: ASYNC221
                         capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)
    assert out.returncode in (0, 2), out.stdout + out.stderr
    row = {r["namespace"]: r for r in json.loads(out.stdout)["cache"]}[namespace]
    assert row["keys"] == 1 and row["computations"] == 2
