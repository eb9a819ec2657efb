"""Every tunable in one place, with defaults read from ``HYPERION_LOCK_*`` environment variables."""

from __future__ import annotations

import math
import os
import re
import socket
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from ._errors import ConfigurationError

ENV_PREFIX = "HYPERION_LOCK_"
_KEY_RE = re.compile(r"^[A-Za-z0-9_.\-:/]{1,200}$")


def redact_url(url: str | None) -> str | None:
    """Return ``url`` with any password replaced by ``***`` (safe for logs, reprs and status output)."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
    except ValueError:
        return "<unparseable url>"
    if "@" not in netloc:
        return url
    userinfo, _, hostport = netloc.rpartition("@")
    user = userinfo.split(":", 1)[0] if ":" in userinfo else ""
    if ":" not in userinfo and userinfo:
        # redis://secret@host is a password-only URL in redis-py.
        return urlunsplit(parts._replace(netloc=f"***@{hostport}"))
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostport}"))


def validate_name(value: str, what: str) -> str:
    """Check a key name or prefix: 1-200 chars of letters, digits and ``_ . - : /`` (no spaces or braces)."""
    if not isinstance(value, str) or not _KEY_RE.match(value):
        raise ConfigurationError(
            f"invalid {what} {value!r}: use 1-200 characters from letters, digits and '_ . - : /' "
            "(no spaces, braces or empty names)"
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


def _parent_identity() -> str:
    """host:ppid:start-time of the parent process: the same for every worker forked by one master."""
    ppid = os.getppid()
    start = "0"
    try:
        # Field 22 of /proc/PID/stat is the start time in clock ticks since boot.
        stat = Path(f"/proc/{ppid}/stat").read_text()
        start = stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        pass
    return f"{socket.gethostname()}:{ppid}:{start}"


@dataclass(frozen=True)
class Settings:
    """Configuration for a :class:`~hyperion_lock.Coordinator`.

    Build it with :meth:`from_env` (reads ``HYPERION_LOCK_*``), then override fields with :meth:`with_`.
    """

    redis_url: str | None = None
    key_prefix: str = "hyperion_lock"
    generation: str = field(default_factory=_parent_identity)
    lease_ttl: float = 15.0
    result_ttl: float = 7 * 24 * 3600.0
    connect_timeout: float = 10.0
    reconnect_timeout: float = 60.0
    wait_timeout: float | None = None
    progress_interval: float = 5.0
    lock_dir: str = field(default_factory=lambda: os.path.join(tempfile.gettempdir(), f"hyperion_lock-{os.getuid()}"))

    def __post_init__(self) -> None:
        validate_name(self.key_prefix, "key prefix")
        validate_name(self.generation, "generation")
        for name in ("lease_ttl", "result_ttl", "connect_timeout", "reconnect_timeout", "progress_interval"):
            object.__setattr__(self, name, positive_seconds(getattr(self, name), name))
        if self.wait_timeout is not None:
            object.__setattr__(self, "wait_timeout", positive_seconds(self.wait_timeout, "wait_timeout"))
        if self.lease_ttl < 0.1:
            raise ConfigurationError(f"lease_ttl must be at least 0.1 s, got {self.lease_ttl!r}")
        if self.redis_url is not None and not self.redis_url.strip():
            object.__setattr__(self, "redis_url", None)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Defaults from the environment: ``HYPERION_LOCK_REDIS_URL``, ``_LEASE_TTL``, ``_GENERATION``,
        ``_KEY_PREFIX``, ``_RESULT_TTL``, ``_CONNECT_TIMEOUT``, ``_RECONNECT_TIMEOUT``, ``_WAIT_TIMEOUT``,
        ``_PROGRESS_INTERVAL``, ``_LOCK_DIR``. Explicit ``overrides`` win over the environment."""
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
            f"generation={self.generation!r}, lease_ttl={self.lease_ttl})"
        )
