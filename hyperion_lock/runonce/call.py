"""What one run-once call carries through its steps, and the interface every backend offers."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from hyperion_lock.connection.clients import RedisCall, RetryPolicy, with_retries
from hyperion_lock.runonce.model import Event, FinishResult, Lease, Outcome, Probe, RenewResult
from hyperion_lock.settings import Settings

T = TypeVar("T")


class Backend(Protocol):
    """One job's state in one store (Redis, or the file locks of one host).

    ``holder_grace``: how long a holder may stay silent before a waiter looks at taking over; ``math.inf`` when
    the backend reports a dead holder itself (a file lock is released by the kernel when its process dies).
    """

    holder_grace: float

    def describe(self) -> str:
        """Where the state lives, safe to print (no credentials)."""
        ...

    def failure(self, exc: Exception, key: str, generation: str) -> Exception | None:
        """``None`` when ``exc`` is transient (worth retrying), else the error to raise now, in this backend's
        words (``exc`` itself when there is nothing better to say)."""
        ...

    async def open(self) -> None:
        """Connect, and listen for the job's events before the first probe (so none is missed). Also called
        again after the event stream broke."""
        ...

    async def probe(self, token: str, *, take: bool, seen_fence: int = 0, with_counter: bool = False) -> Probe: ...

    async def next_event(self, timeout: float) -> Event | None: ...

    async def renew(self, lease: Lease) -> RenewResult: ...

    async def finish(self, lease: Lease, outcome: Outcome | None) -> FinishResult: ...

    async def close(self) -> None: ...


@dataclass
class Call:
    """One call of ``run_once`` for one job: its key, settings, backend, clocks and owner token."""

    key: str
    settings: Settings
    backend: Backend
    log: logging.Logger
    clock: Callable[[], float]
    wall: Callable[[], float]
    sleep: Callable[[float], Awaitable[None]]
    token: str = field(default_factory=lambda: secrets.token_hex(16))

    @property
    def generation(self) -> str:
        return self.settings.generation

    @property
    def where(self) -> str:
        return self.backend.describe()

    async def retry(
        self, action: Callable[[], Awaitable[T]], what: str, *, budget: float, overall: bool = False
    ) -> T:
        """Run ``action`` until it succeeds; transient errors are retried for ``budget`` seconds (from the first
        failure, or with ``overall`` from now, bounding the attempt in flight too); others raise at once."""

        async def attempt() -> T:
            try:
                return await action()
            except Exception as exc:
                err = self.backend.failure(exc, self.key, self.generation)
                if err is None or err is exc:
                    raise
                raise err from exc

        def on_retry(exc: BaseException, attempt_no: int) -> None:
            if attempt_no == 1 or attempt_no % 10 == 0:
                self.log.warning("%s: %s failed (%s: %s); retrying", self.key, what, type(exc).__name__, exc)

        return await with_retries(
            attempt,
            RedisCall(what, self.where, key=self.key, generation=self.generation,
                      prefix=self.settings.key_prefix),
            RetryPolicy(budget, overall=overall, clock=self.clock, sleep=self.sleep),
            on_retry,
        )
