"""A misconfigured ACL refuses every worker before any job runs: the first probe of a call checks the permissions
the call will need (channels, script loading, the commands the scripts run) before it takes the lease.

Real redis-server 7 (``redis.acl_check_cmd``), real worker processes.
"""

from __future__ import annotations

import time

import pytest
import redis

from hyperion_lock import Coordinator, JobKeys, RedisPermissionError
from hyperion_lock.connection.clients import _ACL_COMMANDS
from hyperion_lock.testing import RedisServer
from tests.support import Workers, noop

pytestmark = pytest.mark.integration


def _user(server: RedisServer, *rules: str) -> str:
    admin = redis.Redis(port=server.port)
    try:
        admin.execute_command("ACL", "SETUSER", "app", "reset", "on", ">app-pw", "resetchannels", *rules)  # type: ignore[no-untyped-call]
        version = admin.info("server")["redis_version"]
    finally:
        admin.close()
    if int(version.split(".")[0]) < 7:
        pytest.fail(f"redis-server {version}: these tests need Redis 7 (channel permissions, acl_check_cmd)")
    return f"redis://app:app-pw@127.0.0.1:{server.port}/0"


def _without(command: str) -> list[str]:
    return [c for c in _ACL_COMMANDS.split() if c != command]


def test_no_worker_runs_the_job_without_channel_permission(redis_server: RedisServer, workers: Workers) -> None:
    url = _user(redis_server, "~hyperion_lock:*", *_ACL_COMMANDS.split())  # every key and command, no channel
    gen = f"acl-channel-{time.time_ns()}"
    workers.spawn(4, url=url, job="sleep:0.5", generation=gen)
    assert workers.join() == [3] * 4, workers.exited_outputs()
    assert workers.events("ran") == [], "a worker ran the job although no worker could publish its outcome"
    raised = workers.events("raised")
    assert {r["error"] for r in raised} == {"RedisPermissionError"}
    for r in raised:
        assert "&hyperion_lock:*" in r["message"].partition("; the whole set")[0]  # what to grant comes first
        assert "app-pw" not in r["message"]
    admin = redis.Redis(port=redis_server.port)
    try:  # nothing was taken: the lease and the fencing counter were never written
        keys = JobKeys("hyperion_lock", "migrate")
        assert admin.exists(keys.lease, keys.fence) == 0
    finally:
        admin.close()


@pytest.mark.parametrize(
    ("missing", "named"),
    [("+publish", "+publish"), ("+incr", "+incr"), ("+script", "+script"), ("+subscribe", "+subscribe")],
)
async def test_a_missing_command_is_named_before_the_lease_is_taken(
    redis_server: RedisServer, missing: str, named: str
) -> None:
    url = _user(redis_server, "~hyperion_lock:*", "&hyperion_lock:*", *_without(missing))
    ran: list[int] = []
    with pytest.raises(RedisPermissionError) as info:
        await Coordinator(url, generation=f"acl-{missing[1:]}-{time.time_ns()}").run_once("acl", lambda: ran.append(1))
    assert not ran
    assert named in str(info.value).partition("; the whole set")[0], str(info.value)
    assert redis.Redis(port=redis_server.port).exists(JobKeys("hyperion_lock", "acl").lease) == 0


async def test_the_documented_acl_passes_the_check(redis_server: RedisServer) -> None:
    url = _user(redis_server, "~hyperion_lock:*", "&hyperion_lock:*", *_ACL_COMMANDS.split())
    outcome = await Coordinator(url, generation=f"acl-ok-{time.time_ns()}").run_once("acl", noop)
    assert outcome.ran_here
