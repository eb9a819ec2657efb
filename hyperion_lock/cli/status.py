"""``hyperion-lock status``: gather (one read of Redis or the lock directory), select (which jobs,
judged for which generation) and render (text or JSON).

:func:`gather` is the only step that does I/O; :func:`select`, :func:`render_text` and
:func:`render_json` are pure functions of what it read, so the rules of the report (which generation
counts, what a missing ``--key`` means, the exit code) are tested without a server.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

from hyperion_lock.cache.keys import CacheKeys
from hyperion_lock.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_RUNNING,
    client_of,
    file_unusable,
    lock_held,
    settings_of,
    unreachable,
)
from hyperion_lock.connection.clients import as_text
from hyperion_lock.errors import ConfigurationError
from hyperion_lock.runonce.file_backend import FileLayout, read_private, verify_lock_dir
from hyperion_lock.runonce.keys import JobKeys
from hyperion_lock.runonce.model import Holder, Outcome, Status
from hyperion_lock.settings import Settings, validate_name

logger = logging.getLogger(__name__)

#: Where ``status`` read nothing shared about the cache: each worker caches in its own memory.
NO_SHARED_CACHE = "each worker's own memory (no Redis): no shared view"


@dataclass
class JobState:
    """One job as ``status`` reports it (also the ``--json`` shape)."""

    key: str
    state: str  # running | done | failed | idle (nothing recorded) | pending (idle, but asked for with --key)
    #             | corrupt (its lease in Redis is not a lease this package wrote: ``reset`` clears it)
    holder: str | None = None  # host:pid of the lease holder, else of the runner of the reported outcome
    generation: str | None = None
    fencing_token: int | None = None
    lease_left_s: float | None = None
    lease_since: float | None = None  # epoch seconds the lease was taken (running only)
    last_error: str | None = None
    outcomes: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Found:
    """What was read about one job, before it is judged for a generation."""

    key: str
    holder: Holder | None = None
    lease_left: float | None = None  # seconds (Redis only)
    outcomes: tuple[Outcome, ...] = ()
    # why its lease is not a lease this package wrote (then nothing else counts)
    corrupt: str | None = None


@dataclass(frozen=True)
class Snapshot:
    """Everything ``status`` read, in one pass: the jobs and, with Redis, the cache section (None:
    no shared cache, or not readable -- ``cache_error`` says which)."""

    where: str
    prefix: str
    jobs: tuple[Found, ...]
    cache: list[dict[str, Any]] | None = None
    cache_error: str | None = None


@dataclass(frozen=True)
class StatusView:
    """What ``status`` shows and exits with."""

    where: str
    prefix: str
    generation: str | None
    chosen: str  # given (--generation) | newest (see newest_generation)
    jobs: list[JobState]
    code: int
    cache: list[dict[str, Any]] | None
    cache_error: str | None


# -- judging (pure) --------------------------------------------------------------------------------
def _outcome_row(o: Outcome) -> dict[str, Any]:
    return {"generation": o.generation, "status": str(o.status), "runner": o.runner, "fencing_token": o.fencing_token,
            "finished_at": o.finished_at, "duration_s": round(o.duration_s, 3),
            "error": f"{o.error_type}: {o.error_message}" if o.error_type else None}


def judge(key: str, holder: Holder | None, lease_left: float | None, outcomes: list[Outcome],
          generation: str | None) -> JobState:
    """Turn what was found for one job into its reported state."""
    outcomes = sorted(outcomes, key=lambda o: o.finished_at)
    relevant = [o for o in outcomes if generation is None or o.generation == generation]
    failures = [o for o in relevant if o.status is Status.FAILED]
    last_error = f"{failures[-1].error_type}: {failures[-1].error_message}" if failures else None
    job = JobState(key=key, state="idle", last_error=last_error, outcomes=[_outcome_row(o) for o in outcomes])
    if holder is not None:
        job.state, job.holder, job.generation = "running", holder.runner, holder.generation
        job.fencing_token, job.lease_left_s, job.lease_since = holder.fencing_token, lease_left, holder.since
    elif relevant:
        last = relevant[-1]
        job.state = "done" if last.status is Status.DONE else "failed"
        job.holder, job.generation, job.fencing_token = last.runner, last.generation, last.fencing_token
    return job


def judge_found(found: Found, generation: str | None) -> JobState:
    """:func:`judge` for what :func:`gather` read; a corrupt lease is reported as such, whatever
    else was found."""
    if found.corrupt is not None:
        return JobState(key=found.key, state="corrupt", last_error=found.corrupt)
    return judge(found.key, found.holder, found.lease_left, list(found.outcomes), generation)


def newest_generation(jobs: Sequence[JobState]) -> str | None:
    """The current generation, judged by ``status`` without ``--generation``: the generation of the most recent
    activity among all jobs of the prefix -- the newest live lease (by when it was taken) or recorded outcome (by
    when it finished). None when nothing is recorded. A failure of an older generation then no longer counts."""
    seen = [(j.lease_since, j.generation) for j in jobs if j.state == "running" and j.lease_since and j.generation]
    seen += [(float(o["finished_at"]), str(o["generation"])) for j in jobs for o in j.outcomes if o["generation"]]
    return max(seen, key=lambda found: found[0])[1] if seen else None


def exit_code(jobs: Sequence[JobState]) -> int:
    states = {j.state for j in jobs}
    if states & {"failed", "corrupt"}:
        return EXIT_FAILED
    if states & {"running", "pending"}:
        return EXIT_RUNNING
    return EXIT_OK


def only_keys(jobs: Sequence[JobState], keys: Sequence[str]) -> list[JobState]:
    """The jobs named with ``--key``, in the order found, then the named ones not found; a named job
    that has no outcome is ``pending`` (required, not done yet), not ``idle``."""
    names = {j.key for j in jobs}
    listed = [*jobs, *(JobState(key=k, state="idle") for k in keys if k not in names)]
    return [dataclasses.replace(j, state="pending" if j.state == "idle" else j.state)
            for j in listed if j.key in set(keys)]


def select(snapshot: Snapshot, generation: str | None, keys: Sequence[str] | None) -> StatusView:
    """Judge the jobs for ``generation``, else for the current one (:func:`newest_generation`), keep
    those named in ``keys`` (all without), and compute the exit code."""
    chosen = "given" if generation else "newest"
    jobs = [judge_found(f, generation) for f in snapshot.jobs]
    if not generation:  # judge the current generation: the newest one seen (see newest_generation)
        generation = newest_generation(jobs)
        if generation:
            jobs = [judge_found(f, generation) for f in snapshot.jobs]
    if keys:
        jobs = only_keys(jobs, keys)
    return StatusView(where=snapshot.where, prefix=snapshot.prefix, generation=generation,
                      chosen=chosen, jobs=jobs, code=exit_code(jobs), cache=snapshot.cache,
                      cache_error=snapshot.cache_error)


# -- rendering (pure) ------------------------------------------------------------------------------
def describe_report(rows: list[dict[str, Any]]) -> list[str]:
    """The cache section of ``hyperion-lock status`` as text lines."""
    if not rows:
        return ["  no cache namespaces yet"]
    lines = []
    for r in rows:
        computations = int(r["computations"])
        average = r["compute_seconds"] / computations if computations else 0.0
        memory = f"{'~' if r['estimated'] else ''}{r['memory_bytes'] / 1024:.1f} KiB"
        lines.append(
            f"  {r['namespace']:<20} keys={r['keys']} memory={memory} hits={int(r['hits'])} misses={int(r['misses'])} "
            f"stale={int(r['stale'])} bypass={int(r['bypass'])} errors={int(r['errors'])} "
            f"compute={r['compute_seconds']:.2f}s ({computations} runs, avg {average:.3f}s)"
        )
    return lines


def _job_line(j: JobState) -> str:
    left = f"{j.lease_left_s:.1f}s" if j.lease_left_s is not None else "-"
    return (f"{j.key:<20} {j.state:<8} holder={j.holder or '-'} generation={j.generation or '-'} "
            f"token={j.fencing_token if j.fencing_token is not None else '-'} lease_left={left}"
            + (f" last_error={j.last_error}" if j.last_error else ""))


def render_text(view: StatusView) -> str:
    """The report for a person: where, which generation, one line per job, then the cache."""
    lines = [f"{view.where}, prefix {view.prefix!r}" + (
        f", generation {view.generation}" + (" (the newest seen; --generation to choose)"
                                             if view.chosen == "newest" else "")
        if view.generation else "")]
    if not view.jobs:
        lines.append("no run-once jobs found")
    lines += [_job_line(j) for j in view.jobs]
    if view.cache_error:
        lines.append(f"cache: {view.cache_error}")
    else:
        lines.append("cache:" if view.cache is not None else f"cache: {NO_SHARED_CACHE}")
    if view.cache is not None:
        lines += describe_report(view.cache)
    return "\n".join(lines)


def render_json(view: StatusView) -> str:
    """The ``--json`` report (its shape is part of the interface: health checks parse it)."""
    return json.dumps({"where": view.where, "prefix": view.prefix, "generation": view.generation,
                       "generation_chosen": view.chosen, "exit_code": view.code,
                       "jobs": [asdict(j) for j in view.jobs], "cache": view.cache,
                       "cache_error": view.cache_error}, indent=2)


# -- gathering: Redis ------------------------------------------------------------------------------
def _outcome_keys(client: redis.Redis, prefix: str) -> dict[str, list[str]]:
    """Every job of ``prefix`` with a key in Redis (lease or outcome), and the names of its outcome
    keys."""
    found: dict[str, list[str]] = {}
    for raw in client.scan_iter(match=JobKeys.scan_pattern(prefix), count=500):
        parsed = JobKeys.parse(prefix, as_text(raw) or "")
        if parsed is None:
            continue
        job, kind, gen = parsed
        entry = found.setdefault(job, [])
        if kind == "outcome" and gen:
            entry.append(as_text(raw) or "")
    return found


def _redis_outcomes(client: redis.Redis, key: str, outcome_keys: list[str]) -> list[Outcome]:
    outcomes = []
    for okey in outcome_keys:
        text = as_text(client.get(okey))
        try:
            outcomes.extend([Outcome.from_json(text)] if text else [])
        except (ValueError, KeyError, TypeError, AttributeError):
            logger.warning("ignoring %s: not a readable outcome (corrupt? `hyperion-lock reset %s` clears it)",
                           okey, key)
    return outcomes


def redis_found(client: redis.Redis, prefix: str) -> list[Found]:
    """What Redis holds for every job of ``prefix``: its lease (and time left) and its outcomes."""
    found = _outcome_keys(client, prefix)
    jobs = []
    for key in sorted(found):
        keys = JobKeys(prefix, key)
        lease_raw, pttl = as_text(client.get(keys.lease)), int(client.pttl(keys.lease))
        outcomes = _redis_outcomes(client, key, found[key])
        try:
            holder = Holder.from_mapping(json.loads(lease_raw)) if lease_raw else None
        except (ValueError, KeyError, TypeError, AttributeError):  # not JSON, or not an object: no holder wrote it
            jobs.append(Found(key=key, corrupt=(
                f"the lease {keys.lease} is not a lease this package wrote (corrupt); `hyperion-lock reset {key}` "
                "clears it")))
            continue
        lease_left = pttl / 1000.0 if holder and pttl > 0 else None
        jobs.append(Found(key, holder, lease_left, tuple(outcomes)))
    return jobs


def cache_report(client: redis.Redis, prefix: str, sample: int = 50) -> list[dict[str, Any]]:
    """Per namespace listed in the registry: live entries (from its index, by the server's clock), memory used
    (``MEMORY USAGE`` of up to ``sample`` entries, scaled to all), and the counters every process added. A handful
    of commands per namespace; nothing is scanned."""
    seconds, micros = client.time()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    report = []
    for raw in sorted(client.smembers(CacheKeys.registry(prefix))):
        namespace = as_text(raw) or ""
        try:
            keys = CacheKeys(prefix, namespace)
        except ConfigurationError:
            continue
        live = int(client.zcount(keys.index, f"({now_ms}", "+inf"))
        members = [as_text(m) or "" for m in client.zrangebyscore(keys.index, f"({now_ms}", "+inf", 0, sample)]
        sizes = [int(client.memory_usage(keys.entry(m)) or 0) for m in members]
        memory = int(sum(sizes) / len(sizes) * live) if sizes else 0
        counters = {as_text(k) or "": float(as_text(v) or 0) for k, v in client.hgetall(keys.stats).items()}
        report.append({"namespace": namespace, "keys": live, "memory_bytes": memory, "estimated": live > len(sizes),
                       **{name: counters.get(name, 0) for name in ("hits", "misses", "stale", "bypass", "errors",
                                                                   "computations", "compute_seconds")}})
    return report


def _cache_section(client: redis.Redis, prefix: str) -> tuple[list[dict[str, Any]] | None, str | None]:
    """The cache part of ``status`` and, when it could not be read, why; a user not allowed to read it (ACL) still
    gets the jobs' status, and is told the cache could not be listed instead of seeing "no namespaces"."""
    try:
        return cache_report(client, prefix), None
    except (redis.ResponseError, redis.exceptions.RedisClusterException) as exc:
        denied = "NOPERM" in str(exc) or isinstance(exc, redis.exceptions.NoPermissionError)
        why = (f"not readable as this Redis user ({exc}); grant the cache's commands listed in docs/caching.md "
               "(ACL)" if denied else f"not readable ({type(exc).__name__}: {exc})")
        return None, why


# -- gathering: file locks (no Redis) --------------------------------------------------------------
def _file_outcomes(files: FileLayout, generation: str | None) -> list[Outcome]:
    found = []
    for path in sorted(files.dir.glob(files.outcome_glob(generation))):
        try:
            found.append(Outcome.from_json(read_private(path)[0]))
        except FileNotFoundError:  # reset meanwhile
            continue
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            logger.warning("ignoring %s: not a readable outcome (%s)", path, exc)
    return found


def file_found(lock_dir: Path, prefix: str) -> list[Found]:
    """What the lock directory holds for every job of ``prefix``: whether its lock is held (and by
    whom, as far as the holder file says) and its outcomes."""
    if not verify_lock_dir(lock_dir, create=False):
        return []  # nothing ever ran here
    jobs = []
    for key in FileLayout.job_keys(lock_dir, prefix):
        files = FileLayout(lock_dir, prefix, key)
        holder = None
        if lock_held(files.lock):
            holder = files.read_holder() or Holder(host="?", pid=0, generation="?", fencing_token=0, since=0.0)
        jobs.append(Found(key, holder, None, tuple(_file_outcomes(files, None))))
    return jobs


def gather(settings: Settings) -> Snapshot:
    """Read the jobs (and, with Redis, the cache section) once: the only step of ``status`` that
    does I/O."""
    where, prefix = settings.describe_target(), settings.key_prefix
    if not settings.redis_url:
        return Snapshot(where, prefix, tuple(file_found(Path(settings.lock_dir), prefix)))
    client = client_of(settings)
    try:
        jobs = redis_found(client, prefix)
        rows, error = _cache_section(client, prefix)
        return Snapshot(where, prefix, tuple(jobs), rows, error)
    finally:
        client.close()


def _status_failed(settings: Settings, exc: Exception) -> int:
    """The exit code of ``status`` when the state could not be read; a bad Redis URL goes on to ``main``."""
    if not settings.redis_url and isinstance(exc, OSError | ConfigurationError):
        return file_unusable(settings, exc)
    if isinstance(exc, ConfigurationError):
        raise exc
    return unreachable(settings, exc)


def cmd_status(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    generation = args.generation and validate_name(args.generation, "generation")
    try:
        snapshot = gather(settings)
    except (redis.RedisError, redis.exceptions.RedisClusterException, OSError, ConfigurationError) as exc:
        return _status_failed(settings, exc)
    view = select(snapshot, generation, args.key)
    print(render_json(view) if args.json else render_text(view))
    return view.code
