"""``hyperion-lock status`` without a server: which generation is judged, which jobs are shown, the
exit code, and the text and JSON renderings, as pure functions of what was read
(:class:`Snapshot`)."""

from __future__ import annotations

import json

import pytest

from hyperion_lock.cli.status import (
    NO_SHARED_CACHE,
    Found,
    Snapshot,
    render_json,
    render_text,
    select,
)
from hyperion_lock.runonce.model import Holder, Outcome, Status

WHERE = "redis://127.0.0.1:6379/0"


def outcome(
    key: str,
    generation: str,
    finished_at: float,
    status: Status = Status.DONE,
    error: tuple[str, str] | None = None,
) -> Outcome:
    return Outcome(
        key=key,
        generation=generation,
        status=status,
        fencing_token=int(finished_at),
        runner_host="web1",
        runner_pid=42,
        started_at=finished_at - 1.5,
        finished_at=finished_at,
        error_type=error[0] if error else None,
        error_message=error[1] if error else None,
    )


def holder(generation: str, since: float, pid: int = 7) -> Holder:
    return Holder(host="web2", pid=pid, generation=generation, fencing_token=9, since=since)


def snapshot(
    *jobs: Found, cache: list[dict[str, object]] | None = None, cache_error: str | None = None
) -> Snapshot:
    return Snapshot(WHERE, "app", jobs, cache, cache_error)


FAILED_OLD = Found(
    "migrate", outcomes=(outcome("migrate", "g1", 100.0, Status.FAILED, ("RuntimeError", "boom")),)
)
DONE_NEW = Found(
    "migrate",
    outcomes=(
        outcome("migrate", "g1", 100.0, Status.FAILED, ("RuntimeError", "boom")),
        outcome("migrate", "g2", 200.0),
    ),
)


# -- which generation ------------------------------------------------------------------------------
def test_the_newest_outcome_decides_and_an_older_failure_no_longer_counts() -> None:
    seed = Found("seed", outcomes=(outcome("seed", "g1", 150.0),))
    view = select(snapshot(DONE_NEW, seed), None, None)
    assert (view.generation, view.chosen, view.code) == ("g2", "newest", 0)
    assert [(j.key, j.state, j.generation) for j in view.jobs] == [
        ("migrate", "done", "g2"),
        ("seed", "idle", None),
    ]
    assert view.jobs[0].last_error is None  # the g1 failure is of another generation
    assert [o["generation"] for o in view.jobs[0].outcomes] == [
        "g1",
        "g2",
    ]  # every outcome is still listed


def test_a_newer_live_lease_makes_its_generation_the_current_one() -> None:
    running = Found("seed", holder=holder("g3", since=300.0), lease_left=4.25)
    view = select(snapshot(DONE_NEW, running), None, None)
    assert (view.generation, view.code) == ("g3", 2)
    assert [(j.key, j.state) for j in view.jobs] == [("migrate", "idle"), ("seed", "running")]
    seed = view.jobs[1]
    assert (seed.holder, seed.fencing_token, seed.lease_left_s, seed.lease_since) == (
        "web2:7",
        9,
        4.25,
        300.0,
    )


def test_an_older_lease_does_not_outrank_a_newer_outcome() -> None:
    running = Found("seed", holder=holder("g0", since=50.0))
    view = select(snapshot(DONE_NEW, running), None, None)
    assert view.generation == "g2"
    assert view.jobs[1].state == "running"  # a live lease is reported whatever its generation


def test_a_given_generation_is_judged_as_given() -> None:
    view = select(snapshot(DONE_NEW), "g1", None)
    assert (view.generation, view.chosen, view.code) == ("g1", "given", 1)
    (job,) = view.jobs
    assert (job.state, job.generation, job.last_error) == ("failed", "g1", "RuntimeError: boom")


def test_a_failure_of_the_newest_generation_fails_the_status() -> None:
    view = select(snapshot(FAILED_OLD), None, None)
    assert (view.generation, view.code, view.jobs[0].state) == ("g1", 1, "failed")


def test_nothing_recorded_means_no_generation_and_exit_0() -> None:
    view = select(snapshot(), None, None)
    assert (view.generation, view.jobs, view.code) == (None, [], 0)


def test_a_corrupt_lease_is_reported_and_fails_the_status_whatever_else_was_found() -> None:
    corrupt = Found(
        "seed", corrupt="the lease app:seed:lease is not a lease this package wrote (corrupt)"
    )
    view = select(snapshot(DONE_NEW, corrupt), None, None)
    seed = view.jobs[1]
    assert (seed.state, seed.last_error, view.code) == ("corrupt", corrupt.corrupt, 1)
    assert view.generation == "g2"


# -- which jobs ------------------------------------------------------------------------------------
def test_named_jobs_only_and_a_named_job_without_an_outcome_is_pending() -> None:
    seed = Found("seed", outcomes=(outcome("seed", "g1", 150.0),))
    view = select(snapshot(DONE_NEW, seed), "g2", ["seed", "other", "migrate"])
    assert [(j.key, j.state) for j in view.jobs] == [
        ("migrate", "done"),
        ("seed", "pending"),
        ("other", "pending"),
    ]
    assert view.code == 2


def test_named_jobs_that_are_all_done_exit_0() -> None:
    view = select(snapshot(DONE_NEW), "g2", ["migrate"])
    assert ([j.state for j in view.jobs], view.code) == (["done"], 0)


def test_unnamed_idle_jobs_count_as_fine() -> None:
    view = select(snapshot(DONE_NEW), "g9", None)
    assert ([j.state for j in view.jobs], view.code) == (["idle"], 0)


# -- rendering -------------------------------------------------------------------------------------
ROW = {
    "namespace": "quotes",
    "keys": 2,
    "memory_bytes": 3072,
    "estimated": True,
    "hits": 4.0,
    "misses": 2.0,
    "stale": 1.0,
    "bypass": 0.0,
    "errors": 1.0,
    "computations": 3.0,
    "compute_seconds": 0.75,
}


def test_text_report() -> None:
    running = Found("seed", holder=holder("g3", since=300.0), lease_left=4.25)
    failed = Found(
        "migrate", outcomes=(outcome("migrate", "g3", 310.0, Status.FAILED, ("OSError", "disk")),)
    )
    text = render_text(select(snapshot(failed, running, cache=[ROW]), None, None))
    assert text.splitlines() == [
        f"{WHERE}, prefix 'app', generation g3 (the newest seen; --generation to choose)",
        "migrate              failed   holder=web1:42 generation=g3 token=310 lease_left=- "
        "last_error=OSError: disk",
        "seed                 running  holder=web2:7 generation=g3 token=9 lease_left=4.2s",
        "cache:",
        "  quotes               keys=2 memory=~3.0 KiB hits=4 misses=2 stale=1 bypass=0 errors=1 "
        "compute=0.75s (3 runs, avg 0.250s)",
    ]


def test_text_report_of_a_given_generation_without_jobs_or_shared_cache() -> None:
    text = render_text(select(Snapshot("file locks in /run/x", "app", ()), "g1", None))
    assert text.splitlines() == [
        "file locks in /run/x, prefix 'app', generation g1",
        "no run-once jobs found",
        f"cache: {NO_SHARED_CACHE}",
    ]


def test_text_report_without_any_generation_and_an_empty_cache() -> None:
    text = render_text(select(snapshot(cache=[]), None, None))
    assert text.splitlines() == [
        f"{WHERE}, prefix 'app'",
        "no run-once jobs found",
        "cache:",
        "  no cache namespaces yet",
    ]


def test_text_report_says_why_the_cache_could_not_be_listed() -> None:
    text = render_text(select(snapshot(cache_error="not readable (ResponseError: x)"), None, None))
    assert text.splitlines()[-1] == "cache: not readable (ResponseError: x)"


@pytest.mark.parametrize("cache", [None, [ROW]])
def test_json_report(cache: list[dict[str, object]] | None) -> None:
    view = select(
        snapshot(DONE_NEW, cache=cache, cache_error=None if cache else "denied"), None, ["migrate"]
    )
    data = json.loads(render_json(view))
    assert list(data) == [
        "where",
        "prefix",
        "generation",
        "generation_chosen",
        "exit_code",
        "jobs",
        "cache",
        "cache_error",
    ]
    assert (data["where"], data["prefix"], data["generation"], data["generation_chosen"]) == (
        WHERE,
        "app",
        "g2",
        "newest",
    )
    assert (data["exit_code"], data["cache"], data["cache_error"]) == (
        0,
        cache,
        None if cache else "denied",
    )
    (job,) = data["jobs"]
    assert job == {
        "key": "migrate",
        "state": "done",
        "holder": "web1:42",
        "generation": "g2",
        "fencing_token": 200,
        "lease_left_s": None,
        "lease_since": None,
        "last_error": None,
        "outcomes": [
            {
                "generation": "g1",
                "status": "failed",
                "runner": "web1:42",
                "fencing_token": 100,
                "finished_at": 100.0,
                "duration_s": 1.5,
                "error": "RuntimeError: boom",
            },
            {
                "generation": "g2",
                "status": "done",
                "runner": "web1:42",
                "fencing_token": 200,
                "finished_at": 200.0,
                "duration_s": 1.5,
                "error": None,
            },
        ],
    }
