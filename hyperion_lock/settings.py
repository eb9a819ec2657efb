"""Every tunable in one place, with defaults read from ``HYPERION_LOCK_*`` environment variables."""

from __future__ import annotations

import hashlib
import math
import os
import re
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import NamedTuple

from hyperion_lock.connection.urls import check_redis_url, redact_url
from hyperion_lock.errors import ConfigurationError

ENV_PREFIX = "HYPERION_LOCK_"
_KEY_RE = re.compile(r"[A-Za-z0-9_.\-:/]{1,200}")


def name_part(text: str, limit: int, *, keep: str = "") -> str:
    """``text`` made fit for a name (:func:`validate_name`): every character other than a letter, a
    digit, ``_ . -`` or one of ``keep`` becomes ``-``; at most ``limit`` characters (maybe none)."""
    return re.sub(rf"[^A-Za-z0-9_.\-{re.escape(keep)}]", "-", text)[:limit]


def validate_name(value: str, what: str) -> str:
    """Check a key name or prefix: 1-200 chars of letters, digits and ``_ . - : /`` (no spaces or braces).

    The whole string must match (a trailing newline is refused too): names end up inside Redis keys and file
    names, where a stray character would make two spellings of one job.
    """
    if not isinstance(value, str) or not _KEY_RE.fullmatch(value):
        raise ConfigurationError(
            f"invalid {what} {value!r}: use 1-200 characters from letters, digits and '_ . - : /' "
            "(no spaces, braces, newlines or empty names)"
        )
    return value


def positive_seconds(value: float | str, what: str) -> float:
    """Parse a duration in seconds that must be a finite number > 0."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"{what} must be a number of seconds, got {value!r}") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigurationError(f"{what} must be a finite number of seconds > 0, got {value!r}")
    return seconds


MINUTE = 60.0
HOUR = 3600.0
DAY = 86400.0
YEAR = 365 * DAY

#: (lowest, highest) accepted value of each duration; 0 as the lowest means "any value > 0".
DURATION_BOUNDS: dict[str, tuple[float, float]] = {
    "lease_ttl": (0.1, DAY),
    "result_ttl": (0.0, 10 * YEAR),
    "connect_timeout": (0.0, HOUR),
    "reconnect_timeout": (0.0, DAY),
    "wait_timeout": (0.0, DAY),
    "progress_interval": (0.0, DAY),
    "failure_hold": (0.0, 10 * YEAR),  # and at most result_ttl (checked in Settings)
}


def _number(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:g}"


def _span(seconds: float) -> str:
    """``86400 s (1 day)``: the exact number to type, and what it means."""
    for unit, size in (("year", YEAR), ("day", DAY), ("hour", HOUR), ("minute", MINUTE)):
        if seconds >= size and seconds % size == 0:
            count = seconds / size
            return f"{_number(seconds)} s ({_number(count)} {unit}{'' if count == 1 else 's'})"
    return f"{_number(seconds)} s"


def bounded_seconds(value: float | str, what: str, low: float, high: float) -> float:
    """Parse a duration that must lie in ``(0, high]`` (``low`` == 0) or ``[low, high]``.

    The caps keep every value inside what Redis accepts as a ``PX``/``EXPIRE`` argument and what a person
    could mean; the message names the allowed range, so a typo (ms for s) is caught at startup, not inside Lua.
    """
    seconds = positive_seconds(value, what)
    if seconds < low or seconds > high:
        lowest = f"at least {_span(low)}" if low > 0 else "> 0"
        raise ConfigurationError(f"{what} must be {lowest} and at most {_span(high)}, got {value!r}")
    return seconds


MAX_REPLICAS = 100


def replica_count(value: int | str) -> int:
    """Parse the number of replicas a lease write must reach: a whole number from 0 (off) to 100."""
    try:
        count = int(str(value).strip())
    except ValueError:
        raise ConfigurationError(f"min_replicas must be a whole number of replicas from 0 to {MAX_REPLICAS}, "
                                 f"got {value!r}") from None
    if not 0 <= count <= MAX_REPLICAS:
        raise ConfigurationError(f"min_replicas must be from 0 (off) to {MAX_REPLICAS}, got {value!r}")
    return count


def replica_wait_ms(lease_ttl: float) -> int:
    """How long one ``WAIT`` for replicas may block: a tenth of the lease TTL, at most 1 s, at least 10 ms. It
    stays well inside the renewal interval (a third of the TTL) and the client's read timeout (>= 1 s)."""
    return max(10, min(1000, int(lease_ttl * 100)))


# --- default generation --------------------------------------------------------------------------------------


class ProcessInfo(NamedTuple):
    """What /proc says about one process: its resolved executable and its start time (clock ticks since boot);
    ``None`` where /proc could not be read."""

    pid: int
    exe: str | None
    start_ticks: str | None


def read_process(pid: int) -> ProcessInfo:
    """Read ``/proc/<pid>/exe`` and field 22 of ``/proc/<pid>/stat``; unreadable parts become ``None``."""
    exe: str | None
    try:
        exe = os.path.realpath(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        exe = None
    try:
        start: str | None = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        start = None
    return ProcessInfo(pid, exe, start)


@cache
def _fallback_start() -> str:
    """Without /proc: a stamp taken once per process, so a restart still makes a new generation."""
    return f"t{int(time.time() * 1000)}"


def host_label(host: str | None = None) -> str:
    """The host name as a valid name part: characters outside ``A-Z a-z 0-9 _ . -`` become ``-``."""
    return name_part(host if host is not None else socket.gethostname(), 100) or "host"


def generation_of(pid: int, start: str | int, host: str | None = None) -> str:
    """``host:pid:start``: the generation of one start of process ``pid`` (the host as
    :func:`host_label`)."""
    return f"{host_label(host)}:{pid}:{start}"


def default_generation(
    *,
    pid: int | None = None,
    ppid: int | None = None,
    host: str | None = None,
    inspect: Callable[[int], ProcessInfo] = read_process,
) -> str:
    """``host:pid:start-ticks`` of the process whose start defines this deployment.

    If the parent runs the same executable as this process, this process is a worker that a Python master
    forked or spawned (gunicorn, ``uvicorn --workers``, ``fastapi run --workers``, multiprocessing): the
    generation is the parent's identity, shared by every worker of one master start, so a respawned worker skips
    jobs that are done. Otherwise (the parent is a shell, systemd, tini, a container runtime, PID 0, or /proc
    is unreadable) it is this process's own identity, so every restart of a single-process app is a new
    generation and runs its init again.
    """
    me = inspect(os.getpid() if pid is None else pid)
    parent_pid = os.getppid() if ppid is None else ppid
    chosen = me
    if parent_pid > 0 and me.exe is not None:
        parent = inspect(parent_pid)
        if parent.exe == me.exe:
            chosen = parent
    start = chosen.start_ticks or (_fallback_start() if chosen is me else "0")
    return generation_of(chosen.pid, start, host)


# --- default lock directory ----------------------------------------------------------------------------------


def _runtime_dir_is_ours(path: str) -> bool:
    """``$XDG_RUNTIME_DIR`` is a directory of this effective uid, as the XDG spec requires. Not so when it was
    inherited from another user (``su app`` keeps root's ``/run/user/0``) or is not made yet."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()


def default_lock_dir(cwd: str | None = None, tmp: str | None = None, uid: int | None = None) -> str:
    """``$XDG_RUNTIME_DIR/hyperion_lock/<app>`` when that is set to a directory of this user (a per-user 0700
    directory), else ``$TMP/hyperion_lock-<uid>/<app>``; ``<app>`` is ``<basename of cwd>-<8 hex of sha256(realpath
    cwd)>``. A ``$XDG_RUNTIME_DIR`` of another user (inherited through ``su``) is ignored, not refused.

    One directory per app: the workers of one master share its working directory, and the CLI run from the
    project directory finds the same one; other apps of the same user get their own. The directory is verified
    before use (private to this user, see ``hyperion_lock.runonce.file_backend.verify_lock_dir``): the path is
    predictable, so another local user may have made it first. An explicit ``tmp`` skips ``$XDG_RUNTIME_DIR``.
    """
    try:
        real = os.path.realpath(cwd if cwd is not None else os.getcwd())
    except OSError:  # the working directory was deleted
        real = "/"
    digest = hashlib.sha256(os.fsencode(real)).hexdigest()[:8]
    base = name_part(os.path.basename(real), 60).lstrip(".") or "root"
    runtime = os.environ.get("XDG_RUNTIME_DIR", "") if tmp is None else ""
    if os.path.isabs(runtime) and _runtime_dir_is_ours(runtime):
        return os.path.join(runtime, "hyperion_lock", f"{base}-{digest}")
    user = os.getuid() if uid is None else uid
    return os.path.join(tmp if tmp is not None else tempfile.gettempdir(), f"hyperion_lock-{user}", f"{base}-{digest}")


@dataclass(frozen=True)
class Settings:
    """Configuration for a :class:`~hyperion_lock.Coordinator`.

    Build it with :meth:`from_env` (reads ``HYPERION_LOCK_*``), then override fields with :meth:`with_`.
    ``redis_url`` is parsed at construction (:func:`check_redis_url`): a malformed URL, an unknown query parameter
    or a database that is not a number is a :class:`ConfigurationError`, an index no server can have a
    :class:`RedisDatabaseIndexError`, each saying what to fix without the password.
    Durations are seconds, each checked at construction against its range (:data:`DURATION_BOUNDS`), so a value
    that Redis or the OS would refuse later fails at startup instead:

    - ``lease_ttl``: 0.1 s to 1 day. How long a silent leader keeps the lease (renewed every third of it).
    - ``result_ttl``: > 0, at most 10 years. How long a recorded outcome (done or failed) is kept.
    - ``failure_hold``: > 0, at most ``result_ttl``. A recorded failure is final for every call of the same
      generation that starts within this many seconds of it; after that a call retries the job (a restart
      after a fix). Default 300 s.
    - ``connect_timeout``: > 0, at most 1 hour. Bound on the first connection and probe of a call.
    - ``reconnect_timeout``, ``wait_timeout``, ``progress_interval``: > 0, at most 1 day.
    - ``generation``: see :func:`default_generation` (parent's identity under a Python master, else this
      process's own identity).
    - ``lock_dir``: see :func:`default_lock_dir` (``$XDG_RUNTIME_DIR/hyperion_lock/<cwd name>-<cwd hash>``, else
      ``$TMP/hyperion_lock-<uid>/…``, one per app directory). Default or set, it must be private to this user
      (0700, owned by the effective uid, not a symbolic link): anything else is refused when it is used.
    - ``min_replicas``: 0 (default, off) to 100. With ``n`` > 0 the leader runs ``WAIT n <ms>`` after taking the
      lease and after each renewal (``ms``: :func:`replica_wait_ms`). Fewer acknowledgements are logged at WARNING,
      once per call, and the job goes on: WAIT narrows the window in which a failover loses the lease, it cannot
      close it (see docs/deployment.md, Sentinel).
    """

    redis_url: str | None = None
    key_prefix: str = "hyperion_lock"
    generation: str = field(default_factory=default_generation)
    lease_ttl: float = 15.0
    result_ttl: float = 7 * DAY
    connect_timeout: float = 10.0
    reconnect_timeout: float = 60.0
    wait_timeout: float | None = None
    progress_interval: float = 5.0
    lock_dir: str = field(default_factory=default_lock_dir)
    failure_hold: float = 300.0
    min_replicas: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "min_replicas", replica_count(self.min_replicas))
        validate_name(self.key_prefix, "key prefix")
        validate_name(self.generation, "generation")
        for name, (low, high) in DURATION_BOUNDS.items():
            value = getattr(self, name)
            if name == "wait_timeout" and value is None:
                continue
            object.__setattr__(self, name, bounded_seconds(value, name, low, high))
        if self.failure_hold > self.result_ttl:
            raise ConfigurationError(
                f"failure_hold must be > 0 and at most result_ttl, now {_span(self.result_ttl)}: a failure cannot be "
                f"held longer than it is kept; got {_number(self.failure_hold)} s"
            )
        if self.redis_url is not None and not self.redis_url.strip():
            object.__setattr__(self, "redis_url", None)
        if self.redis_url is not None:
            check_redis_url(self.redis_url)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Defaults from the environment: ``HYPERION_LOCK_REDIS_URL``, ``_LEASE_TTL``, ``_GENERATION``,
        ``_KEY_PREFIX``, ``_RESULT_TTL``, ``_FAILURE_HOLD``, ``_CONNECT_TIMEOUT``, ``_RECONNECT_TIMEOUT``,
        ``_WAIT_TIMEOUT``, ``_PROGRESS_INTERVAL``, ``_LOCK_DIR``, ``_MIN_REPLICAS``. Explicit ``overrides`` win over
        the environment."""
        env = os.environ if environ is None else environ
        kwargs: dict[str, object] = {}
        for name in cls.__dataclass_fields__:
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is not None and raw != "":
                kwargs[name] = raw
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(kwargs) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigurationError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        return cls(**kwargs)  # type: ignore[arg-type]

    def describe_target(self) -> str:
        """Where coordination happens, safe to print: the redacted Redis URL, or the lock directory."""
        return str(redact_url(self.redis_url)) if self.redis_url else f"file locks in {self.lock_dir}"

    def with_(self, **changes: object) -> Settings:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return (
            f"Settings(redis_url={redact_url(self.redis_url)!r}, key_prefix={self.key_prefix!r}, "
            f"generation={self.generation!r}, lease_ttl={self.lease_ttl}, failure_hold={self.failure_hold})"
        )
