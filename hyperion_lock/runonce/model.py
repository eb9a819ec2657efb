"""Plain data shared by the coordinator, its backends, the CLI and the reference app.

The wire format of a lease holder (what the Lua scripts store and the heartbeats carry) is built only by
:meth:`Holder.to_mapping` and read only by :meth:`Holder.from_mapping`; an outcome's by :meth:`Outcome.to_json`
and :meth:`Outcome.from_mapping`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import IntEnum, StrEnum
from typing import Any

from hyperion_lock.errors import LeaseLostError


class Status(StrEnum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    RELEASED = "released"


class RenewResult(IntEnum):
    """Reply of the RENEW script (see :mod:`.scripts`)."""

    LOST = 0  # another owner holds the lease, or a newer leader was elected: nothing changed
    RENEWED = 1
    RECREATED = 2  # the lease had vanished (Redis restart without persistence) and nobody newer took it


class FinishResult(IntEnum):
    """Reply of the FINISH script (see :mod:`.scripts`)."""

    SUPERSEDED = 0  # a newer leader took over: nothing was written or published
    RECORDED = 1  # we still held the lease (or a retry of our own finish found it done)
    RECORDED_AFTER_EXPIRY = 2  # the lease had expired but nobody took over: recorded anyway


@dataclass(frozen=True)
class Holder:
    """Who holds (or last held) a job's lease, as stored in Redis or in the lock file."""

    host: str
    pid: int
    generation: str
    fencing_token: int
    since: float  # wall-clock seconds when leadership started

    @property
    def runner(self) -> str:
        return f"{self.host}:{self.pid}"

    def to_mapping(self) -> dict[str, Any]:
        """The stored form: ``since`` in integer milliseconds, the fencing token as ``fence``."""
        return {
            "host": self.host,
            "pid": self.pid,
            "generation": self.generation,
            "since": int(self.since * 1000),
            "fence": self.fencing_token,
        }

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> Holder:
        return cls(
            host=str(data.get("host", "?")),
            pid=int(data.get("pid", 0)),
            generation=str(data.get("generation", "")),
            fencing_token=int(data.get("fence", 0)),
            since=float(data.get("since", 0)) / 1000.0,
        )


@dataclass(frozen=True)
class Outcome:
    """The recorded result of one run of a job for one generation (the "done" marker, or a failure)."""

    key: str
    generation: str
    status: Status
    fencing_token: int
    runner_host: str
    runner_pid: int
    started_at: float
    finished_at: float
    error_type: str | None = None
    error_message: str | None = None
    # Filled in locally: did *this* process run the job?
    ran_here: bool = field(default=False, compare=False)

    @property
    def duration_s(self) -> float:
        return max(0.0, self.finished_at - self.started_at)

    @property
    def runner(self) -> str:
        return f"{self.runner_host}:{self.runner_pid}"

    def to_json(self, **extra: Any) -> str:
        data = asdict(self)
        data.pop("ran_here")
        data["status"] = str(self.status)
        data.update(extra)
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Outcome:
        return cls.from_mapping(json.loads(raw))

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> Outcome:
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "ran_here"}
        fields["status"] = Status(fields["status"])
        return cls(**fields)


class Lease:
    """This worker's leadership of a job, visible to the job through :func:`current_lease`.

    ``fencing_token`` grows by one with every leadership of the key. A job that writes to a store which can
    keep the highest token it has seen should pass it along and let the store refuse lower ones: that stops a
    worker that lost its lease (paused process, partitioned network) from writing after a successor started.
    :meth:`ensure_held` is the cheap local check: it raises :class:`LeaseLostError` once the renewal loop
    saw another holder in Redis.
    """

    def __init__(self, *, key: str, generation: str, token: str, holder: Holder) -> None:
        self.key = key
        self.generation = generation
        self.token = token
        self.holder = holder
        self.lost = False

    @property
    def fencing_token(self) -> int:
        return self.holder.fencing_token

    def ensure_held(self) -> None:
        if self.lost:
            raise LeaseLostError(
                f"lease with fencing token {self.fencing_token} was taken over by another worker; "
                "stop writing and let the job fail",
                key=self.key,
                generation=self.generation,
            )

    def __repr__(self) -> str:
        return f"Lease(key={self.key!r}, generation={self.generation!r}, fencing_token={self.fencing_token})"


@dataclass(frozen=True)
class Probe:
    """One look at a job's state; ``acquired`` means this worker (this call's token) now holds the lease."""

    outcome: Outcome | None
    holder: Holder | None
    acquired: bool = False
    fence_counter: int | None = None  # only when asked for: the job's fencing counter as stored
    outcome_age: float | None = None  # seconds since the outcome was recorded, by the store's own clock


@dataclass(frozen=True)
class Event:
    """Something a waiter was woken for: an outcome, a heartbeat of the holder, or a release."""

    status: Status
    generation: str
    outcome: Outcome | None = None
    holder: Holder | None = None
