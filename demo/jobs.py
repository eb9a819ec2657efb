"""The reference app's run-once jobs: ``migrate`` (Alembic to head) and ``seed`` (idempotent, fenced).

Both are plain sync functions: the Coordinator runs them in a worker thread while it keeps the lease alive.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from sqlalchemy import Engine, select
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from hyperion_lock import Lease, LeaseLostError, current_lease

from .db import upgrade_to_head
from .models import Item, JobFence, SeedRun

logger = logging.getLogger(__name__)

SEED_ITEMS = ("alpha", "beta", "gamma")
SEED_GATE_ENV = "HYPERION_DEMO_SEED_GATE"  # test hook: a file the seed waits for before its fenced write
SEED_GATE_LIMIT = 600.0  # seconds; then the seed goes on without it
# test hook: seconds the seed sleeps before its fenced write
SEED_DELAY_ENV = "HYPERION_DEMO_SEED_DELAY"


def migrate(url: str) -> bool:
    """``alembic upgrade head`` under the database guard (see :mod:`.db`). True if something was applied."""
    lease = current_lease()
    if lease is not None:
        lease.ensure_held()
    return upgrade_to_head(url)


def check_fence(recorded: JobFence | None, token: int, lease_since: float) -> None:
    """Refuse to write when a higher fencing token already wrote for this job.

    A higher token that wrote *after* our leadership began means a successor took over (we were paused or
    cut off past our lease): raise :class:`LeaseLostError`. A higher token recorded *before* our leadership
    began cannot come from a successor (tokens grow with time): the token counter was reset (Redis lost its
    data, or the lock directory was cleared), so we log it and go on. Host clocks must roughly agree.

    The *same* token written by another run after our leadership began is refused too: a counter that Redis lost
    starts again at 1, so two leaders can be handed one token (see docs/assurance.md); the caller has already
    told its own earlier write apart (same token and pid).
    """
    if recorded is None or recorded.fencing_token < token:
        return
    if recorded.written_at >= lease_since:
        same = " the same" if recorded.fencing_token == token else ""
        raise LeaseLostError(
            f"refusing to write: fencing token {recorded.fencing_token} (pid {recorded.pid}, generation "
            f"{recorded.generation}) already wrote for {recorded.name!r} after this worker's lease with{same} token "
            f"{token} began",
            key=recorded.name, generation=recorded.generation,
        )
    if recorded.fencing_token == token:
        return  # an older run's write with a token the counter handed out again: ours is the newer run
    logger.warning(
        "%s: recorded fencing token %d is higher than ours (%d) but older than our lease: the token counter was "
        "reset (Redis data loss or a new lock directory); writing anyway", recorded.name, recorded.fencing_token,
        token,
    )


def _wait_for_gate(gate: Path, token: int) -> None:
    logger.warning("seed: pid %d waiting for %s with fencing token %d (%s)", os.getpid(), gate, token, SEED_GATE_ENV)
    deadline = time.monotonic() + SEED_GATE_LIMIT
    while not gate.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def seed(engine: Engine, lease: Lease | None = None, *, name: str = "seed") -> int:
    """Make sure the seed rows exist (idempotent) and log this run; return how many items were inserted.

    The job's fencing token (``current_lease().fencing_token``) is recorded in ``job_fences`` inside the same
    transaction, under a row lock, and a lower token is refused (:func:`check_fence`), so a worker that lost its
    lease cannot write after its successor did. Outside a run-once job (no lease) the token is 0.
    ``HYPERION_DEMO_SEED_GATE=<file>`` (a test hook) waits, up to 10 minutes, until that file exists before the
    write: a slow or partitioned leader that writes exactly when the test says so.
    ``HYPERION_DEMO_SEED_DELAY=<seconds>`` (a test hook) sleeps that long before the write, after
    the gate: a slow job that faults can hit while it holds the lease (the fault campaign,
    benchmarks/fault_campaign.py).
    """
    lease = lease if lease is not None else current_lease()
    token = lease.fencing_token if lease else 0
    generation = lease.generation if lease else "manual"
    since = lease.holder.since if lease else time.time()
    gate = os.environ.get(SEED_GATE_ENV, "")
    if gate:
        _wait_for_gate(Path(gate), token)
    delay = float(os.environ.get(SEED_DELAY_ENV, "0") or 0)
    if delay > 0:
        logger.warning("seed: pid %d sleeping %.1f s with fencing token %d (%s)", os.getpid(),
                       delay, token, SEED_DELAY_ENV)
        time.sleep(delay)
    inserted = _fenced_write_retrying(engine, name, token, generation, since, lease)
    logger.info("seed: pid %d inserted %d item(s) with fencing token %d", os.getpid(), inserted, token)
    return inserted


SEED_WRITE_TRIES = 3  # a dropped connection or a failed connect is retried; the fence is checked again each time
SEED_RETRY_PAUSE = 1.0  # seconds before the second try, twice that before the third


def _connection_trouble(exc: DBAPIError) -> str | None:
    """What went wrong with the connection itself, or ``None`` when the database answered (a refusal, a
    constraint): a dropped connection, or a connect that failed (no statement was sent)."""
    if exc.connection_invalidated:
        return "the database dropped the connection"
    if isinstance(exc, OperationalError) and exc.statement is None:
        return "connecting to the database failed"
    return None


def _fenced_write_retrying(engine: Engine, name: str, token: int, generation: str, since: float,
                           lease: Lease | None) -> int:
    """Run :func:`_fenced_write`, again on a new connection when the connection failed.

    A leader cut off from the network can find its connection gone when the link comes back (the server reset
    it, or a pooled one died while the job waited), or its first connect failing while the link is still coming
    up: neither is an answer to "may I write?". The transaction is retried on a fresh connection (up to
    :data:`SEED_WRITE_TRIES` tries, pausing in between), where the fence gives the answer (a successor's higher
    token: LeaseLostError). If the database stays unreachable, the last error is the job's failure.
    """
    for attempt in range(1, SEED_WRITE_TRIES + 1):
        try:
            return _fenced_write(engine, name, token, generation, since, lease)
        except DBAPIError as exc:
            trouble = _connection_trouble(exc)
            if trouble is None or attempt == SEED_WRITE_TRIES:
                raise
            logger.info("%s: %s (%s); trying again on a new connection (%d/%d)", name, trouble,
                        type(exc.orig).__name__, attempt + 1, SEED_WRITE_TRIES)
            time.sleep(SEED_RETRY_PAUSE * attempt)
    raise AssertionError("unreachable")


def _fenced_write(engine: Engine, name: str, token: int, generation: str, since: float, lease: Lease | None) -> int:
    with Session(engine) as session, session.begin():
        recorded = session.get(JobFence, name, with_for_update=True)
        if recorded is not None and (recorded.fencing_token, recorded.pid) == (token, os.getpid()) and token:
            return 0  # this leadership's own write, whose commit went through before the connection dropped
        check_fence(recorded, token, since)
        now = time.time()
        if recorded is None:
            session.add(JobFence(name=name, fencing_token=token, generation=generation, pid=os.getpid(),
                                 written_at=now))
        else:
            recorded.fencing_token = token
            recorded.generation, recorded.pid, recorded.written_at = generation, os.getpid(), now
        existing = set(session.scalars(select(Item.name)))
        missing = [n for n in SEED_ITEMS if n not in existing]
        session.add_all(Item(name=n, seeded_with_token=token) for n in missing)
        session.add(SeedRun(fencing_token=token, generation=generation, pid=os.getpid(), ran_at=now))
        if lease is not None:
            lease.ensure_held()  # last local check before the commit
    return len(missing)
