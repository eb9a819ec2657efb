"""The exception hierarchy: one root, :class:`HyperionLockError`, carrying the job key and generation."""

from __future__ import annotations


class HyperionLockError(Exception):
    """Root of every error this package raises on purpose.

    ``key`` and ``generation`` say which run-once job the error is about (``None`` when it happened before a
    job was involved, e.g. while parsing configuration).
    """

    def __init__(self, message: str, *, key: str | None = None, generation: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.key = key
        self.generation = generation

    def __str__(self) -> str:
        where = []
        if self.key is not None:
            where.append(f"key={self.key!r}")
        if self.generation is not None:
            where.append(f"generation={self.generation!r}")
        return f"{self.message} [{', '.join(where)}]" if where else self.message


class ConfigurationError(HyperionLockError, ValueError):
    """A setting or argument makes no sense (bad URL, empty key, non-positive TTL, ...). Fix it and restart."""


class RedisUnavailableError(HyperionLockError):
    """Redis could not be reached (or kept being unreachable) within the configured time."""


class RedisAuthError(ConfigurationError):
    """Redis refused the credentials. Check the password/user in the URL (``HYPERION_LOCK_REDIS_URL``)."""


class RedisPermissionError(ConfigurationError):
    """The Redis (ACL) user may not run a command, touch a key or use a channel this package needs.

    Raised at once on the server's ``NOPERM`` reply (retrying cannot grant a permission). The user needs the
    keys ``~<prefix>:*``, the channels ``&<prefix>:*`` (Redis 7 users start with ``resetchannels``) and the
    commands ``EVALSHA EVAL SCRIPT SUBSCRIBE UNSUBSCRIBE PUBLISH PING``.
    """


class RedisDatabaseIndexError(ConfigurationError):
    """The database number in the URL (``/N`` or ``?db=N``) does not exist on the server (``SELECT`` refused it).

    Raised at once: the server only has ``databases`` numbered 0 .. databases-1 (16 by default), and Redis
    Cluster only database 0.
    """


class RedisTLSError(ConfigurationError):
    """TLS could not be set up with the server: certificate not trusted or not for this host name, or TLS spoken
    to a plain port. Raised at once; the message says what to check (``rediss://`` vs ``redis://``, the CA file)."""


class CorruptStateError(HyperionLockError):
    """A value stored for a job (its lease or an outcome) is not what this package writes: not a JSON object.

    Raised at once, before anything is changed; the message names the key. ``hyperion-lock reset KEY`` clears a
    corrupt lease (no holder wrote it) and the job's outcomes, after which the next call runs the job.
    """


class JobFailedError(HyperionLockError):
    """The run-once job raised in the worker that ran it; every worker waiting for it raises this."""

    def __init__(
        self,
        message: str,
        *,
        key: str | None = None,
        generation: str | None = None,
        runner: str | None = None,
        error_type: str | None = None,
        error_message: str | None = None,
        fencing_token: int | None = None,
    ) -> None:
        super().__init__(message, key=key, generation=generation)
        self.runner = runner
        self.error_type = error_type
        self.error_message = error_message
        self.fencing_token = fencing_token


class WaitTimeoutError(HyperionLockError):
    """The optional overall wait deadline (``wait_timeout``) passed before the job finished."""


class WaitInterruptedError(HyperionLockError):
    """The process was asked to stop (SIGTERM/SIGINT) while it waited for another worker's job."""


class LeaseLostError(HyperionLockError):
    """This worker no longer holds the lease: another worker may be running the job. Stop writing."""
