"""A won lease: run the job while renewing the lease, then record the outcome and let the lease go.

Failure timeline of a leader:

* Killed (SIGKILL, OOM, power): nothing is recorded; renewals stop; the lease expires after one TTL and a
  waiter takes over (Redis). A file lock is released by the kernel at once.
* The job ends by raising anything (an ``Exception``, a custom ``BaseException``, pytest's ``Failed``, gevent's
  ``Timeout``, a ``CancelledError`` of its own, ``SystemExit`` with a non-zero code from ``alembic.config.main()``
  or click in standalone mode): ``failed`` is recorded, every waiter raises ``JobFailedError`` at once, and for
  the failure hold every later call of this generation does too; the leader re-raises what the job raised
  (``SystemExit`` as ``JobFailedError``). ``SystemExit(0)``/``SystemExit(None)`` is success.
* The call itself is cancelled (Ctrl-C under ``asyncio.run``, a timeout around the call, ``task.cancel()``), or
  ``KeyboardInterrupt`` arrives in the main thread (where Python delivers SIGINT; a ``KeyboardInterrupt`` raised
  in a sync job's worker thread is the job's own failure, as no signal reaches that thread): an interruption.
  An async job is cancelled and awaited; a sync job
  runs in a thread that cannot be interrupted, so the lease stays held, and renewed, until the thread returns.
  If the job finished anyway its outcome is recorded; otherwise the lease is released with nothing recorded and
  a waiter takes over at once. Then the cancellation propagates.
* Paused past its lease (stopped process, cut-off host) and superseded: renewal sees the newer holder and marks
  the lease lost (``Lease.ensure_held`` raises); at the end nothing is recorded or published and
  ``LeaseLostError`` is raised: the successor's outcome is the one that counts.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from hyperion_lock._aio import to_the_end
from hyperion_lock.connection.clients import is_transient
from hyperion_lock.errors import JobFailedError, LeaseLostError
from hyperion_lock.metrics import metrics
from hyperion_lock.runonce.call import Call
from hyperion_lock.runonce.model import FinishResult, Lease, Outcome, RenewResult, Status

CURRENT_LEASE: contextvars.ContextVar[Lease | None] = contextvars.ContextVar("hyperion_lock_lease", default=None)
RELEASE_BUDGET = 2.0  # seconds spent trying to hand an unfinished lease on; after that it simply expires


@dataclass(frozen=True)
class JobEnd:
    """How the job ended: ``status`` DONE or FAILED (to record), or ``None`` for an interruption."""

    status: Status | None
    error: BaseException | None = None

    @classmethod
    def raised(cls, exc: BaseException) -> JobEnd:
        """The job raised ``exc`` itself: a failure, except ``SystemExit(0)``/``SystemExit(None)`` (success)."""
        if isinstance(exc, SystemExit) and exc.code in (None, 0):
            return cls(Status.DONE)
        return cls(Status.FAILED, exc)

    @classmethod
    def of(cls, future: asyncio.Future[JobEnd]) -> JobEnd:
        """``future`` is :func:`run_job`'s: cancelled only when the call itself was (see there)."""
        if future.cancelled():
            return cls(None, asyncio.CancelledError())
        return future.result()

    def label(self, lost: bool) -> str:
        """How the run ended, for the metrics: done, failed, interrupted, or lost (another worker took over)."""
        if lost:
            return "lost"
        return "interrupted" if self.status is None else str(self.status)


async def run_job(job: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> JobEnd:
    """Run the job to its end and say how it ended; what it raised is returned in the :class:`JobEnd`, not
    raised (a task would re-raise a ``SystemExit``/``KeyboardInterrupt`` out of the event loop).

    Only the cancellation of this task (the call was cancelled: :class:`Leadership` cancels the job) propagates,
    and a ``KeyboardInterrupt`` raised in the main thread (SIGINT) is an interruption; anything else the job
    raises, a ``CancelledError`` of its own included, is a failure. A sync job runs in a thread, awaited to its real
    end even when this task is cancelled; its result is then ignored if it is an awaitable that was never started.
    """
    try:
        if inspect.iscoroutinefunction(job):
            await job(*args, **kwargs)
            return JobEnd(Status.DONE)
        loop = asyncio.get_running_loop()
        thread = loop.run_in_executor(None, functools.partial(contextvars.copy_context().run, job, *args, **kwargs))
        done, cancelled = await to_the_end(thread)
        try:
            result = done.result()
        except KeyboardInterrupt as exc:  # raised by the job's own code: no signal reaches a worker thread
            return JobEnd.raised(exc)
        if inspect.isawaitable(result):
            if cancelled:
                if inspect.iscoroutine(result):
                    result.close()
                raise asyncio.CancelledError
            await result
    except asyncio.CancelledError as exc:
        task = asyncio.current_task()
        if task is not None and task.cancelling():  # the call was cancelled: not the job's own outcome
            raise
        return JobEnd.raised(exc)
    except KeyboardInterrupt as exc:
        if threading.current_thread() is threading.main_thread():  # SIGINT: the process is being interrupted
            return JobEnd(None, exc)
        return JobEnd.raised(exc)
    except BaseException as exc:
        return JobEnd.raised(exc)
    return JobEnd(Status.DONE)


class Leadership:
    """This call's leadership of a job, from the won probe to the recorded outcome."""

    def __init__(self, call: Call, lease: Lease) -> None:
        self.call = call
        self.lease = lease
        self._renewing = False  # a renewal round trip is in flight
        self._stopping = False

    async def run(self, job: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Outcome:
        call, lease = self.call, self.lease
        call.log.debug(
            "%s: pid %d leads generation %s (fencing token %d) via %s; running the job",
            call.key, os.getpid(), call.generation, lease.fencing_token, call.where,
        )
        renewer = asyncio.create_task(self._renew_loop())
        started_wall, started = call.wall(), call.clock()
        with metrics.span("hyperion_lock.job", call.key) as span:
            span.set("fencing_token", lease.fencing_token)
            reset = CURRENT_LEASE.set(lease)
            try:
                ended, cancelled = await to_the_end(run_job(job, args, kwargs), on_cancel=lambda f: f.cancel())
            finally:
                CURRENT_LEASE.reset(reset)
            end = JobEnd.of(ended)
            duration = call.clock() - started
            outcome = self._outcome(end, started_wall, duration)
            recorded, cancelled_again = await to_the_end(self._stop_and_finish(renewer, outcome))
            superseded = recorded.result() is FinishResult.SUPERSEDED
            label = end.label(superseded or lease.lost)
            span.set("outcome", label)
            metrics.job_finished(call.key, label, duration)
        if cancelled or cancelled_again:
            raise asyncio.CancelledError
        return self._conclude(end, outcome, superseded)

    def _outcome(self, end: JobEnd, started_wall: float, duration: float) -> Outcome | None:
        call = self.call
        if end.status is None:
            call.log.warning(
                "%s: job interrupted (%s); releasing the lease so another worker can take over",
                call.key, type(end.error).__name__,
            )
            return None
        exc = end.error
        outcome = Outcome(
            key=call.key, generation=call.generation, status=end.status, fencing_token=self.lease.fencing_token,
            runner_host=socket.gethostname(), runner_pid=os.getpid(),
            started_at=started_wall, finished_at=started_wall + duration,
            error_type=type(exc).__qualname__ if exc else None,
            error_message=str(exc)[:2000] if exc else None,
        )
        if exc is not None:
            call.log.error("%s: job failed after %.2f s: %s: %s", call.key, duration, outcome.error_type, exc)
        return outcome

    def _conclude(self, end: JobEnd, outcome: Outcome | None, superseded: bool) -> Outcome:
        call, exc = self.call, end.error
        if end.status is None:
            assert exc is not None
            raise exc
        if superseded and not isinstance(exc, LeaseLostError):
            raise self._superseded() from exc
        if isinstance(exc, SystemExit):
            raise JobFailedError(
                f"the run-once job exited with status {exc.code!r}; recorded as failed",
                key=call.key, generation=call.generation, runner=outcome.runner if outcome else None,
                error_type="SystemExit", error_message=str(exc.code), fencing_token=self.lease.fencing_token,
            ) from exc
        if exc is not None:
            raise exc
        assert outcome is not None
        call.log.info(
            "%s: ran the job in %.2f s (fencing token %d)", call.key, outcome.duration_s, self.lease.fencing_token
        )
        return replace(outcome, ran_here=True)

    def _superseded(self) -> LeaseLostError:
        self._lose()
        return LeaseLostError(
            f"another worker took over the job while this one (fencing token {self.lease.fencing_token}) was "
            "stalled; its outcome is the one recorded, this run's is discarded",
            key=self.lease.key, generation=self.lease.generation,
        )

    def _lose(self) -> None:
        if not self.lease.lost:
            metrics.lease_lost(self.lease.key)
        self.lease.lost = True

    async def _stop_and_finish(self, renewer: asyncio.Task[None], outcome: Outcome | None) -> FinishResult | None:
        # An idle renewer is simply cancelled; one whose renewal is in flight is let finish first, so that renewal
        # cannot re-create the lease after the finish script dropped it.
        self._stopping = True
        if self._renewing:
            await asyncio.wait({renewer}, timeout=self.call.settings.lease_ttl)
        renewer.cancel()
        return await self._finish(outcome)

    async def _finish(self, outcome: Outcome | None) -> FinishResult | None:
        """Record the outcome (``None``: hand the lease on); ``None`` when it could not be recorded at all."""
        call, lease = self.call, self.lease
        budget = call.settings.reconnect_timeout if outcome is not None else RELEASE_BUDGET
        try:
            result = await call.retry(lambda: call.backend.finish(lease, outcome), "record the outcome", budget=budget)
        except Exception as exc:
            call.log.error(
                "%s: could not record the outcome (%s); waiters will take over after the lease TTL", call.key, exc
            )
            return None
        if result is FinishResult.SUPERSEDED:
            call.log.warning(
                "%s: superseded: a newer leader took the job over from fencing token %d; nothing recorded",
                call.key, lease.fencing_token,
            )
        elif result is FinishResult.RECORDED_AFTER_EXPIRY and outcome is not None:
            call.log.warning(
                "%s: the lease (fencing token %d) had expired before the job finished, but nobody took over; "
                "outcome recorded", call.key, lease.fencing_token,
            )
        return result

    async def _renew_loop(self) -> None:
        call = self.call
        interval = call.settings.lease_ttl / 3
        last_ok = call.clock()
        failing = False
        while not self._stopping:
            await call.sleep(min(interval, 0.1) if failing else interval)  # re-assert fast after an outage
            if self._stopping:
                return
            self._renewing = True
            try:
                result = await call.backend.renew(self.lease)
            except Exception as exc:
                self._renew_failed(exc, failing, call.clock() - last_ok)
                failing = True
                continue
            finally:
                self._renewing = False
            if failing:
                call.log.info("%s: lease renewal works again", call.key)
            failing = False
            last_ok = call.clock()
            if self._renewed(result) is RenewResult.LOST:
                return

    def _renew_failed(self, exc: Exception, failing: bool, silent_for: float) -> None:
        call = self.call
        if not is_transient(exc):
            call.log.error("%s: renewing the lease failed: %s", call.key, exc)
        elif not failing:
            call.log.warning("%s: cannot renew the lease (%s); retrying while the job runs", call.key, exc)
        if silent_for > call.settings.lease_ttl:
            call.log.error("%s: lease not renewed for %.1f s: it may have expired", call.key, silent_for)

    def _renewed(self, result: RenewResult) -> RenewResult:
        call = self.call
        if result is RenewResult.RECREATED:
            call.log.warning(
                "%s: the lease had vanished from Redis (restart or data loss?); re-created it with fencing token %d",
                call.key, self.lease.fencing_token,
            )
        elif result is RenewResult.LOST:
            self._lose()
            call.log.error(
                "%s: another worker holds the lease now; this run (fencing token %d) is no longer the leader",
                call.key, self.lease.fencing_token,
            )
        return result
