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
