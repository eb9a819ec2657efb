"""Cross-user, cross-tenant and cross-mount answers under ``gunicorn -w 4`` on a real Redis: every worker answers
each user, tenant and mount point with its own entry, shared across workers, and no key name holds a token.

The app is tests/_cache_keys_app.py (the reference app's ``/me/watchlist`` plus the cases of issue 14). Nothing
asserts a duration.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from hyperion_lock.testing import RedisServer
from tests.support.deploy import ROOT, Gunicorn, running

pytestmark = [pytest.mark.e2e, pytest.mark.integration]
ALICE, BOB = "alice-0123456789abcdef", "bob-fedcba9876543210"


class KeysApp(Gunicorn):
    def command(self) -> list[str]:
        return [*super().command(), "tests.support.cache_keys_app:app"]


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as s:
        yield s


def every_worker(g: Gunicorn, path: str, headers: dict[str, str], status: str | None = None,
                 ) -> dict[int, httpx.Response]:
    """One answer from each of the 4 workers (with ``X-Cache: <status>``, when given: a store call that timed out
    on this loaded machine is answered directly, ``BYPASS``, and the worker is simply asked again)."""
    def one() -> tuple[int, httpx.Response] | None:
        with httpx.Client(timeout=60, limits=httpx.Limits(max_keepalive_connections=0)) as client:
            r = client.get(g.base + path, headers={"Connection": "close", **headers})
        assert r.status_code == 200, (path, r.status_code, r.text)
        if status is not None and r.headers["x-cache"] != status:
            return None
        return int(r.headers["x-worker-pid"]), r

    return g.from_workers(one, 4, max_requests=400)


def test_users_tenants_and_mount_points_never_share_an_entry_across_workers(tmp_path: Path,
                                                                            server: RedisServer) -> None:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    app = KeysApp(tmp_path, workers=4, HYPERION_LOCK_REDIS_URL=server.url, PYTHONPATH=path)
    with running(app) as g:
        g.wait_healthy()
        cases = [  # (path, headers, the field that must be this caller's own)
            ("/me", {"Authorization": f"Bearer {ALICE}"}, ("user", ALICE)),
            ("/me", {"Authorization": f"Bearer {BOB}"}, ("user", BOB)),
            ("/me/watchlist", {"Authorization": "Bearer demo-alice"}, ("user", "alice")),
            ("/me/watchlist", {"Authorization": "Bearer demo-bob"}, ("user", "bob")),
            ("/tenant/settings", {"Host": "a.example"}, ("tenant", "a.example")),
            ("/tenant/settings", {"Host": "b.example"}, ("tenant", "b.example")),
            ("/v1/items", {}, ("version", "v1")),
            ("/v2/items", {}, ("version", "v2")),
        ]
        for url, headers, (field, own) in cases:
            answers = every_worker(g, url, headers)
            assert {r.json()[field] for r in answers.values()} == {own}, (url, headers)
        for url, headers, (field, own) in cases:  # one stored computation each, served by every worker
            answers = every_worker(g, url, headers, status="HIT")
            assert {r.json()[field] for r in answers.values()} == {own}, (url, headers)
            assert len({r.json()["computed_by"] for r in answers.values()}) == 1, (url, headers)
            private = url.startswith("/me")
            assert {r.headers["cache-control"].startswith("private") for r in answers.values()} == {private}
        # A user read from the header by a dependency, with nothing keyed: never cached, each gets their own.
        for user in (ALICE, BOB):
            answers = every_worker(g, "/me/unkeyed", {"Authorization": f"Bearer {user}"})
            assert {r.json()["user"] for r in answers.values()} == {user}
            assert {r.headers["x-cache"] for r in answers.values()} == {"BYPASS"}
        assert "/me/unkeyed" in g.log() and "vary=['Authorization']" in g.log()
    with redis.Redis.from_url(server.url) as r:
        names = [k.decode() for k in r.scan_iter(count=1000)]
    assert any(":e2:" in n for n in names)
    assert not [n for n in names if ALICE in n or BOB in n or "demo-alice" in n], names
