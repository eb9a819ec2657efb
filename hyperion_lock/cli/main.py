"""``hyperion-lock``: look at, reset and use run-once jobs from a shell, with the same keys as the app.

    hyperion-lock status [--json] [--generation G] [--key K ...]
    hyperion-lock reset KEY [--generation G] [--force]
    hyperion-lock run --key K [--generation G] -- CMD [ARG ...]
    hyperion-lock wait --key K [--generation G] [--timeout S]

Where the state lives: ``--url`` or ``HYPERION_LOCK_REDIS_URL``; without either, the file locks of this host in
``HYPERION_LOCK_LOCK_DIR``. ``--prefix`` / ``HYPERION_LOCK_KEY_PREFIX`` select the key prefix.

Exit codes (usable by a health check) and what ``status`` judges: :data:`EXIT_CODES_HELP`, printed at the end of
``hyperion-lock --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

from hyperion_lock.cache.store import cache_report, describe_report
from hyperion_lock.cli.guard import adopt_orphans, children, kill_descendants
from hyperion_lock.connection.clients import as_text, sync_client_from_url
from hyperion_lock.connection.cluster import is_cluster_client, sharded_script
from hyperion_lock.errors import (
    ConfigurationError,
    HyperionLockError,
    JobFailedError,
    LeaseLostError,
    RedisAuthError,
    RedisDatabaseIndexError,
    RedisPermissionError,
    RedisTLSError,
    RedisUnavailableError,
    WaitInterruptedError,
    WaitTimeoutError,
)
from hyperion_lock.runonce import scripts as _scripts
from hyperion_lock.runonce.coordinator import Coordinator, current_lease
from hyperion_lock.runonce.file_backend import FileLayout, held_lock_fd, read_private, verify_lock_dir
from hyperion_lock.runonce.keys import JobKeys
from hyperion_lock.runonce.model import Holder, Outcome, Status
from hyperion_lock.settings import Settings, validate_name

logger = logging.getLogger(__name__)

_GUARD = str(Path(__file__).with_name("guard.py"))  # run by path: it must not import the package
LEASE_CHECK = 0.1  # s between two looks at the lease while the command runs (renewals mark it lost)
EXIT_OK, EXIT_FAILED, EXIT_RUNNING, EXIT_UNREACHABLE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 3, 64, 130
#: The epilog of ``--help``: exit codes per command, and which generation ``status`` judges.
EXIT_CODES_HELP = """\
exit codes (usable by a health check):

status  0 every job done · 1 a job failed (its outcome failed and nothing runs it now), or its lease in
        Redis is corrupt (reset clears it) · 2 a job is running, or a job named with --key has no outcome
        yet · 3 Redis unreachable or refusing us
        (credentials, ACL, TLS, DB index), or the lock directory unreadable or refused (not private to this
        user) · 64 bad usage.
        It judges one generation: --generation G, else the current one, the generation of the newest lease
        or outcome among all jobs of the prefix (a failure of an older deployment no longer counts). Jobs
        with no outcome in it (not run yet, reset, expired after the result TTL, or only run by older
        generations) show as idle and count as fine unless named with --key: a health check should name
        its jobs, e.g. status --key migrate --key seed --generation "$G".
reset   0 cleared (or nothing to clear) · 1 refused: a live lease exists (--force drops it) · 3 (as for
        status) · 64
run     where the command ran: its exit code (128+N when killed by signal N; SIGTERM/SIGINT are passed on to
        the command's process group, whose exit is recorded as the outcome); elsewhere: 0 once it succeeded
        somewhere, its exit code when it failed there · 1 this run lost its lease to another worker · 3 Redis
        unreachable or refusing us · 64 bad usage (e.g. no generation), or a lock directory refused · 130
        interrupted while waiting
wait    0 the job is done for the generation · 1 it failed (now, or within the failure hold) · 2 timed out
        (--timeout) · 3 Redis unreachable or refusing us · 64 bad usage · 130 interrupted. It never runs the
        job, and does not replace a runner that died: pair it with run (a Kubernetes Job)
"""
_STATUS_RE = re.compile(r"command exited with status (-?\d+)")


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


# -- Redis ---------------------------------------------------------------------------------------------------
def redis_jobs(client: redis.Redis, prefix: str, generation: str | None) -> list[JobState]:
    found: dict[str, dict[str, Any]] = {}
    for raw in client.scan_iter(match=JobKeys.scan_pattern(prefix), count=500):
        parsed = JobKeys.parse(prefix, as_text(raw) or "")
        if parsed is None:
            continue
        job, kind, gen = parsed
        entry = found.setdefault(job, {"outcome_keys": []})
        if kind == "outcome" and gen:
            entry["outcome_keys"].append(as_text(raw))
    jobs = []
    for key in sorted(found):
        keys = JobKeys(prefix, key)
        lease_raw, pttl = as_text(client.get(keys.lease)), int(client.pttl(keys.lease))
        outcomes = []
        for okey in found[key]["outcome_keys"]:
            text = as_text(client.get(okey))
            try:
                outcomes.extend([Outcome.from_json(text)] if text else [])
            except (ValueError, KeyError, TypeError, AttributeError):
                logger.warning("ignoring %s: not a readable outcome (corrupt? `hyperion-lock reset %s` clears it)",
                               okey, key)
        try:
            holder = Holder.from_mapping(json.loads(lease_raw)) if lease_raw else None
        except (ValueError, KeyError, TypeError, AttributeError):  # not JSON, or not an object: no holder wrote it
            jobs.append(JobState(key=key, state="corrupt", last_error=(
                f"the lease {keys.lease} is not a lease this package wrote (corrupt); `hyperion-lock reset {key}` "
                "clears it")))
            continue
        jobs.append(judge(key, holder, pttl / 1000.0 if holder and pttl > 0 else None, outcomes, generation))
    return jobs


def redis_reset(client: redis.Redis, prefix: str, key: str, generation: str | None, force: bool) -> tuple[bool, str]:
    """Clear ``key``'s outcome(s) (and with ``force`` a live lease) with the RESET script; (refused, message)."""
    keys = JobKeys(prefix, key)
    if generation is not None:
        outcome_keys = [keys.outcome(generation)]
    else:
        outcome_keys = [as_text(k) or "" for k in client.scan_iter(match=f"{keys.base}:outcome:*", count=500)]
    script = client.register_script(sharded_script(_scripts.RESET) if is_cluster_client(client) else _scripts.RESET)
    release = json.dumps({"status": str(Status.RELEASED), "generation": generation or "", "host": "hyperion-lock",
                          "pid": os.getpid(), "fence": 0, "since": int(time.time() * 1000)})
    deleted = 0
    for okey in outcome_keys or [keys.outcome(generation or "-")]:
        done, lease = script(keys=[keys.lease, okey, keys.channel],
                             args=["1" if force else "0", release])
        if as_text(lease):  # RESET returns only a lease that is a JSON object (it clears a corrupt one)
            holder = Holder.from_mapping(json.loads(as_text(lease) or "{}"))
            return True, (f"refused: {key} is running in {holder.runner} (generation {holder.generation}, fencing "
                          f"token {holder.fencing_token}); wait for it, or use --force if that process is gone")
        deleted += int(done)
    return False, f"{key}: cleared {deleted} key(s)" if deleted else f"{key}: nothing to clear"


# -- file locks (no Redis) -----------------------------------------------------------------------------------
# The lock directory is verified (private to this user) before anything in it is read or removed; every error
# reading it is raised, never taken for "no jobs".
def _lock_held(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops our shared lock, if we got it
    return False


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


def file_jobs(lock_dir: Path, prefix: str, generation: str | None) -> list[JobState]:
    if not verify_lock_dir(lock_dir, create=False):
        return []  # nothing ever ran here
    jobs = []
    for key in FileLayout.job_keys(lock_dir, prefix):
        files = FileLayout(lock_dir, prefix, key)
        holder = None
        if _lock_held(files.lock):
            holder = files.read_holder() or Holder(host="?", pid=0, generation="?", fencing_token=0, since=0.0)
        jobs.append(judge(key, holder, None, _file_outcomes(files, None), generation))
    return jobs


def file_reset(lock_dir: Path, prefix: str, key: str, generation: str | None, force: bool) -> tuple[bool, str]:
    if not verify_lock_dir(lock_dir, create=False):
        return False, f"{key}: nothing to clear"
    files = FileLayout(lock_dir, prefix, key)
    if _lock_held(files.lock) and not force:
        return True, f"refused: {key} is running on this host (its lock file is held); wait, or use --force"
    removed = 0
    for path in lock_dir.glob(files.outcome_glob(generation)):
        path.unlink(missing_ok=True)
        removed += 1
    return False, f"{key}: removed {removed} outcome file(s)" if removed else f"{key}: nothing to clear"


def _file_unusable(settings: Settings, exc: OSError | ConfigurationError) -> int:
    """The lock directory could not be read or changed (or was refused): say which file and why; exit 3."""
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        message = f"cannot use the file locks in {settings.lock_dir}: {where}{exc.strerror or exc}"
    else:
        message = str(exc)
    print(f"hyperion-lock: {message}", file=sys.stderr)
    return EXIT_UNREACHABLE


# -- commands ------------------------------------------------------------------------------------------------
def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env(redis_url=args.url, key_prefix=args.prefix)


def _client(settings: Settings) -> redis.Redis:
    assert settings.redis_url
    return sync_client_from_url(settings.redis_url, connect_timeout=settings.connect_timeout,
                                socket_timeout=settings.connect_timeout)


def _where(settings: Settings) -> str:
    return settings.describe_target()


def _unreachable(settings: Settings, exc: Exception) -> int:
    print(f"hyperion-lock: cannot use Redis at {_where(settings)}: {type(exc).__name__}: {exc}", file=sys.stderr)
    return EXIT_UNREACHABLE


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


def _read_jobs(settings: Settings, generation: str | None, cache: bool
               ) -> tuple[list[JobState], list[dict[str, Any]] | None, str | None]:
    """The jobs judged for ``generation`` (None: each job's latest outcome) and, with ``cache``, the cache section
    (None without Redis) and why it could not be read."""
    if not settings.redis_url:
        return file_jobs(Path(settings.lock_dir), settings.key_prefix, generation), None, None
    client = _client(settings)
    try:
        jobs = redis_jobs(client, settings.key_prefix, generation)
        rows, error = _cache_section(client, settings.key_prefix) if cache else (None, None)
        return jobs, rows, error
    finally:
        client.close()


def _status_failed(settings: Settings, exc: Exception) -> int:
    """The exit code of ``status`` when the state could not be read; a bad Redis URL goes on to ``main``."""
    if not settings.redis_url and isinstance(exc, OSError | ConfigurationError):
        return _file_unusable(settings, exc)
    if isinstance(exc, ConfigurationError):
        raise exc
    return _unreachable(settings, exc)


def _print_status(settings: Settings, generation: str | None, chosen: str, jobs: list[JobState],
                  cache: list[dict[str, Any]] | None, cache_error: str | None) -> None:
    print(f"{_where(settings)}, prefix {settings.key_prefix!r}" + (
        f", generation {generation}" + (" (the newest seen; --generation to choose)" if chosen == "newest" else "")
        if generation else ""))
    if not jobs:
        print("no run-once jobs found")
    for j in jobs:
        left = f"{j.lease_left_s:.1f}s" if j.lease_left_s is not None else "-"
        print(f"{j.key:<20} {j.state:<8} holder={j.holder or '-'} generation={j.generation or '-'} "
              f"token={j.fencing_token if j.fencing_token is not None else '-'} lease_left={left}"
              + (f" last_error={j.last_error}" if j.last_error else ""))
    if cache_error:
        print(f"cache: {cache_error}")
    else:
        print("cache:" if cache is not None else "cache: each worker's own memory (no Redis): no shared view")
    if cache is not None:
        print("\n".join(describe_report(cache)))


def cmd_status(args: argparse.Namespace) -> int:
    settings = _settings(args)
    generation = args.generation and validate_name(args.generation, "generation")
    chosen = "given" if generation else "newest"
    try:
        # cache None: no shared cache (each worker caches in its own memory), or not readable (cache_error says)
        jobs, cache, cache_error = _read_jobs(settings, generation, cache=True)
        if not generation:  # judge the current generation: the newest one seen (see newest_generation)
            generation = newest_generation(jobs)
            if generation:
                jobs = _read_jobs(settings, generation, cache=False)[0]
    except (redis.RedisError, redis.exceptions.RedisClusterException, OSError, ConfigurationError) as exc:
        return _status_failed(settings, exc)
    if args.key:
        names = {j.key for j in jobs}
        jobs += [JobState(key=k, state="idle") for k in args.key if k not in names]
        jobs = [j for j in jobs if j.key in set(args.key)]
        for j in jobs:  # a job the caller requires that has no outcome: not done yet
            j.state = "pending" if j.state == "idle" else j.state
    code = exit_code(jobs)
    if args.json:
        print(json.dumps({"where": _where(settings), "prefix": settings.key_prefix, "generation": generation,
                          "generation_chosen": chosen, "exit_code": code, "jobs": [asdict(j) for j in jobs],
                          "cache": cache, "cache_error": cache_error}, indent=2))
    else:
        _print_status(settings, generation, chosen, jobs, cache, cache_error)
    return code


def cmd_reset(args: argparse.Namespace) -> int:
    settings = _settings(args)
    key = validate_name(args.job_key, "job key")
    generation = args.generation and validate_name(args.generation, "generation")
    try:
        if settings.redis_url:
            client = _client(settings)
            try:
                refused, message = redis_reset(client, settings.key_prefix, key, generation, args.force)
            finally:
                client.close()
        else:
            try:
                refused, message = file_reset(Path(settings.lock_dir), settings.key_prefix, key, generation,
                                              args.force)
            except (OSError, ConfigurationError) as exc:
                return _file_unusable(settings, exc)
    except (redis.RedisError, redis.exceptions.RedisClusterException, OSError) as exc:
        return _unreachable(settings, exc)
    print(message, file=sys.stderr if refused else sys.stdout)
    return EXIT_FAILED if refused else EXIT_OK


class CommandJob:
    """A shell command as a run-once job, in its own process group so a signal reaches a whole pipeline.

    SIGTERM/SIGINT while the command runs here are passed on (:meth:`forward`) and the lease is kept until the
    command exits, so it never runs twice; its exit status is then recorded as the outcome. While waiting, the
    coordinator ends the wait itself (exit 130).

    If this process dies without a chance to react (SIGKILL, OOM killer, a crash), the command dies with it: on
    Linux it runs under ``hyperion_lock/cli/guard.py``, which SIGKILLs the command's process group when this
    process is gone (see there), and whatever the command left running when it exits. If the guard itself is
    SIGKILLed, what the command started is re-parented to this process (made a child subreaper when the command
    starts), which kills it before recording the outcome. With file locks the command also inherits the locked
    descriptor, so the lock is held for exactly as long as any process of the command lives: a waiter cannot
    start a second copy meanwhile.
    """

    def __init__(self, command: list[str], key: str, generation: str, lock: Path | None = None) -> None:
        self.command = command
        self.key = key
        self.generation = generation
        self.lock = lock  # the lock file with file locks: its held descriptor is passed to the command
        self.children: list[subprocess.Popen[bytes]] = []
        self.status: int | None = None  # exit status when it ran here
        self.guarded = sys.platform.startswith("linux") and bool(sys.executable)

    def _popen(self) -> subprocess.Popen[bytes]:
        # One argument: a shell command line; several: an argv run without a shell.
        cmd = self.command
        fd = held_lock_fd(self.lock) if self.lock is not None else None
        fds = () if fd is None else (fd,)
        if self.guarded:
            # Started from (and waited for by) this thread, which so outlives the guard: its death signal fires
            # only when this process dies.
            guard = [sys.executable, "-I", "-S", _GUARD, str(os.getpid()),
                     str(-1 if fd is None else fd), "shell" if len(cmd) == 1 else "exec", *cmd]
            return subprocess.Popen(guard, start_new_session=True, pass_fds=fds)
        if len(cmd) == 1:
            return subprocess.Popen(cmd[0], shell=True, start_new_session=True, pass_fds=fds)
        return subprocess.Popen(cmd, start_new_session=True, pass_fds=fds)

    def __call__(self) -> None:
        cmd = self.command
        others = frozenset(children())
        if self.guarded:
            adopt_orphans()  # this process (the CLI's own) becomes a subreaper: see cli/guard.py
        child = self._popen()
        self.children.append(child)
        rc = self._wait(child)
        if rc < 0 and self.guarded:
            # The guard was killed before it could kill what the command started; all of it was re-parented here
            # (a subreaper): kill it before the outcome is recorded and the lock released, or it would run on
            # beside the copy a waiter (or the next run after a reset) starts.
            kill_descendants(spare=others)
        self.status = 128 - rc if rc < 0 else rc  # killed by signal N: 128 + N, like a shell
        if self.status != 0:
            raise JobFailedError(f"command exited with status {self.status}: {shlex.join(cmd)}", key=self.key,
                                 generation=self.generation)

    def _wait(self, child: subprocess.Popen[bytes]) -> int:
        """The command's exit status; SIGKILLs it (the guard, and so all of it) once the lease is seen lost.

        A runner paused past its lease (SIGSTOP, a frozen VM, a cut-off host) learns at its next renewal that a
        waiter took over and started its own copy: the command must stop at once, not run on beside that copy.
        """
        lease = current_lease()
        while True:
            try:
                return child.wait(timeout=LEASE_CHECK)
            except subprocess.TimeoutExpired:
                pass
            if lease is not None and lease.lost:
                logger.error("%s: the lease was taken over (fencing token %d): killing the command",
                             self.key, lease.fencing_token)
                with contextlib.suppress(ProcessLookupError):  # the guard: the rest as when it is SIGKILLed
                    (os.kill if self.guarded else os.killpg)(child.pid, signal.SIGKILL)
                return child.wait()

    def forward(self, signum: int, frame: object) -> None:
        for child in self.children:
            if child.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(child.pid, signum)


def _generation(args: argparse.Namespace) -> str | None:
    generation = args.generation or os.environ.get("HYPERION_LOCK_GENERATION", "").strip()
    if not generation:
        print(f"hyperion-lock {args.command_name}: set --generation (or HYPERION_LOCK_GENERATION): a job runs "
              "once per generation, e.g. the release id", file=sys.stderr)
    return generation or None


def _run_request(args: argparse.Namespace) -> tuple[list[str], str] | int:
    """The command and generation of ``run``, or the usage exit code."""
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print("hyperion-lock run: give the command after '--'", file=sys.stderr)
        return EXIT_USAGE
    generation = _generation(args)
    return (command, generation) if generation else EXIT_USAGE


_EXIT_FOR: tuple[tuple[type[HyperionLockError], int], ...] = (
    (LeaseLostError, EXIT_FAILED),
    (WaitInterruptedError, EXIT_INTERRUPTED),
    (WaitTimeoutError, EXIT_RUNNING),
    (JobFailedError, EXIT_FAILED),
)


def _exit_for(exc: HyperionLockError, settings: Settings, name: str) -> int:
    """The exit code of ``run``/``wait`` for an error of the coordinator (configuration errors go to main)."""
    if isinstance(exc, RedisUnavailableError | RedisAuthError | RedisPermissionError | RedisTLSError
                  | RedisDatabaseIndexError):
        return _unreachable(settings, exc)  # the same code as status/reset: Redis cannot be used as configured
    code = next((code for kind, code in _EXIT_FOR if isinstance(exc, kind)), None)
    if code is None:
        raise exc
    print(f"hyperion-lock {name}: {exc}", file=sys.stderr)
    if isinstance(exc, JobFailedError) and name == "run":  # failed elsewhere: its exit status, if a command
        match = _STATUS_RE.search(exc.error_message or "")
        return (int(match.group(1)) % 256 or EXIT_FAILED) if match else EXIT_FAILED
    return code


def _run_failed(exc: HyperionLockError, job: CommandJob, settings: Settings) -> int:
    if isinstance(exc, JobFailedError) and job.status is not None:
        return job.status  # it ran here: its own exit status
    return _exit_for(exc, settings, "run")


def cmd_wait(args: argparse.Namespace) -> int:
    generation = _generation(args)
    if generation is None:
        return EXIT_USAGE
    settings = _settings(args).with_(generation=generation, wait_timeout=args.timeout)
    try:
        outcome = asyncio.run(Coordinator(None, settings=settings).wait_for(args.key))
    except HyperionLockError as exc:
        return _exit_for(exc, settings, "wait")
    print(f"{args.key}: done for generation {generation} by {outcome.runner}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    request = _run_request(args)
    if isinstance(request, int):
        return request
    command, generation = request
    settings = _settings(args).with_(generation=generation)
    lock = None if settings.redis_url else FileLayout(Path(settings.lock_dir), settings.key_prefix, args.key).lock
    job = CommandJob(command, args.key, generation, lock)
    # A signal this process ignores (a background job's SIGINT, nohup) stays ignored, here and so in the command.
    previous = {sig: signal.signal(sig, job.forward) for sig in (signal.SIGTERM, signal.SIGINT)
                if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        outcome = Coordinator(None, settings=settings).run_once_sync(args.key, job)
    except HyperionLockError as exc:
        return _run_failed(exc, job, settings)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not outcome.ran_here:
        print(f"hyperion-lock run: {args.key} already done for generation {generation} by {outcome.runner}",
              file=sys.stderr)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=None, help="Redis URL (default: $HYPERION_LOCK_REDIS_URL; none: file locks)")
    common.add_argument("--prefix", default=None,
                        help="key prefix (default: $HYPERION_LOCK_KEY_PREFIX or hyperion_lock)")
    common.add_argument("-v", "--verbose", action="store_true", help="log the coordinator's steps to stderr")
    parser = argparse.ArgumentParser(prog="hyperion-lock", description=(__doc__ or "").split("\n\n")[0],
                                     epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command_name", required=True)
    tail: dict[str, Any] = {"epilog": EXIT_CODES_HELP, "formatter_class": argparse.RawDescriptionHelpFormatter}
    status = sub.add_parser("status", parents=[common], help="state of every run-once job (exit 0/1/2/3)", **tail)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--generation", default=None,
                        help="judge this generation (default: the newest lease or outcome's, see below)")
    status.add_argument("--key", action="append", help="only these jobs; a missing one counts as pending")
    status.set_defaults(func=cmd_status)
    reset = sub.add_parser("reset", parents=[common], help="clear a job's recorded outcome(s)", **tail)
    reset.add_argument("job_key", metavar="KEY")
    reset.add_argument("--generation", default=None, help="only this generation's outcome (default: all)")
    reset.add_argument("--force", action="store_true", help="also drop a live lease (its holder must be gone)")
    reset.set_defaults(func=cmd_reset)
    run = sub.add_parser("run", parents=[common], help="run a command once across all workers and hosts",
                         **tail)
    run.add_argument("--key", required=True, help="job key shared by every caller (e.g. migrate)")
    run.add_argument("--generation", default=None, help="default: $HYPERION_LOCK_GENERATION (required)")
    run.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARG ...]")
    run.set_defaults(func=cmd_run)
    wait = sub.add_parser("wait", parents=[common],
                          help="wait until a job is done elsewhere, never running it (init containers)", **tail)
    wait.add_argument("--key", required=True, help="job key (e.g. migrate)")
    wait.add_argument("--generation", default=None, help="default: $HYPERION_LOCK_GENERATION (required)")
    wait.add_argument("--timeout", type=float, default=None, help="give up after this many seconds (exit 2)")
    wait.set_defaults(func=cmd_wait)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return EXIT_OK if exc.code == 0 else EXIT_USAGE
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s")
    try:
        code: int = args.func(args)
    except HyperionLockError as exc:  # bad configuration (URL, key, generation, ...)
        print(f"hyperion-lock: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return code


if __name__ == "__main__":
    sys.exit(main())
