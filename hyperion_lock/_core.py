"""The run-once algorithm, written once (async); the sync flavour runs it on a private event loop.

Timeline of one call of :meth:`Coordinator.run_once` for a job key ``K`` and generation ``G``:

1. Subscribe to ``K``'s channel, *then* probe (one Lua call): if ``G`` is already done, return at once.
2. If the lease is free, take it (``SET NX PX`` + ``INCR`` of the fencing counter, atomically) and lead:
   run the job while a background task renews the lease every TTL/3 and publishes a heartbeat. On success,
   record ``done`` for ``G``, drop the lease and publish the outcome in one script; on an exception record
   ``failed`` the same way and re-raise. If the process is killed, nothing is recorded: the lease expires.
3. Otherwise wait for messages on the channel; there is no polling. An outcome for ``G`` ends the wait (return,
   or :class:`JobFailedError`); a release or another generation's outcome means the lease is free: probe again.
   Heartbeats prove the holder alive; only after a whole TTL without one does the waiter probe again, first
   without taking anything (if Redis itself stalled, the holder gets a TTL/3 to re-assert its lease), then
   taking the lease if it is still free. A wait never ends on a timer while the holder lives, unless the
   optional ``wait_timeout`` is set; SIGTERM/SIGINT end it with :class:`WaitInterruptedError`.
4. A failed outcome that was already there when the call began belongs to an earlier attempt: the call runs
   the job again (after a fix and a restart). A failure that appears while waiting is final for that call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import inspect
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, Protocol, TypeVar

import redis
import redis.asyncio as aredis

from ._connect import async_client_from_url, auth_error, describe_client, is_auth_error, is_transient, with_retries
from ._errors import ConfigurationError, JobFailedError, LeaseLostError, WaitInterruptedError, WaitTimeoutError
from ._file_backend import FileBackend
from ._keys import JobKeys
from ._model import Event, Holder, Lease, Outcome, Probe, Status
from ._redis_backend import AsyncOps, RedisBackend, SyncOps
from ._settings import Settings
from ._signals import STOP_MESSAGE, stop_requested

T = TypeVar("T")
RedisLike = aredis.Redis | redis.Redis
_SyncRedis = redis.Redis  # the parameter named ``redis`` shadows the module inside Coordinator.__init__
_CURRENT_LEASE: contextvars.ContextVar[Lease | None] = contextvars.ContextVar("hyperion_lock_lease", default=None)


def current_lease() -> Lease | None:
    """The lease of the job running in this context (inside a run-once job), else ``None``."""
    return _CURRENT_LEASE.get()


class _Backend(Protocol):
    holder_grace: float
    generation: str

    def describe(self) -> str: ...
    async def open(self) -> None: ...
    async def reopen(self) -> None: ...
    async def prepare(self) -> None: ...
    async def probe(
        self, token: str, *, try_acquire: bool, seen_fence: int = 0, with_counter: bool = False
    ) -> tuple[Probe, str | None]: ...
    async def next_event(self, timeout: float) -> Event | None: ...
    async def renew(self, lease: Lease, record: str) -> int: ...
    async def finish(self, lease: Lease, outcome: Outcome | None) -> int: ...
    async def close(self) -> None: ...


class Coordinator:
    """Runs a job exactly once across every worker (and host) that shares a Redis, the others waiting.

    ``redis`` is an asyncio client, a sync client, a URL, or ``None`` (then ``settings.redis_url``; without any,
    the workers of one host coordinate through file locks in ``settings.lock_dir``). Keyword ``overrides`` replace
    fields of ``settings`` (default: :meth:`Settings.from_env`), e.g. ``lease_ttl=5, generation="v42"``.

    ``clock`` (monotonic seconds), ``wall`` (epoch seconds) and ``sleep`` drive every timing decision of the
    algorithm and may be replaced in tests.
    """

    def __init__(
        self,
        redis: RedisLike | str | None = None,
        *,
        settings: Settings | None = None,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        **overrides: Any,
    ) -> None:
        base = settings if settings is not None else Settings.from_env()
        self.settings = base.with_(**overrides) if overrides else base
        if isinstance(redis, str):
            self.settings = self.settings.with_(redis_url=redis)
            redis = None
        if redis is not None and not isinstance(redis, aredis.Redis | _SyncRedis):
            raise ConfigurationError(
                f"redis must be a redis.asyncio.Redis, a redis.Redis, a URL or None, not {type(redis).__name__}"
            )
        self._client = redis
        if self._client is None and self.settings.redis_url:
            async_client_from_url(self.settings.redis_url, connect_timeout=1, socket_timeout=1)  # validate only
        self.log = logger or logging.getLogger(__name__)
        self._clock = clock
        self._wall = wall
        self._sleep = sleep

    # -- public API -------------------------------------------------------------------------------------------
    @property
    def uses_redis(self) -> bool:
        return self._client is not None or bool(self.settings.redis_url)

    def describe(self) -> str:
        return describe_client(self._client) if self._client is not None else self.settings.describe_target()

    def __repr__(self) -> str:
        return f"Coordinator({self.describe()!r}, generation={self.settings.generation!r})"

    async def run_once(self, key: str, job: Callable[..., Any], *args: Any, **kwargs: Any) -> Outcome:
        """Run ``job(*args, **kwargs)`` in exactly one worker for this generation; return its :class:`Outcome`.

        Every caller returns only after the job completed successfully somewhere (``outcome.ran_here`` says
        whether it ran in this process). Sync jobs run in a worker thread so the lease keeps being renewed.

        Raises :class:`JobFailedError` if the job raised in another worker while this one waited (the leader
        itself re-raises the job's own exception), :class:`RedisUnavailableError` / :class:`RedisAuthError`
        within ``connect_timeout`` if Redis cannot be used, :class:`WaitInterruptedError` on SIGTERM/SIGINT and
        :class:`WaitTimeoutError` only when ``wait_timeout`` is set.
        """
        outcome = await self._run(key, job, args, kwargs, wait=True)
        assert outcome is not None
        return outcome

    async def _run(self, key: str, job: Callable[..., Any], args: Any, kwargs: Any, *, wait: bool) -> Outcome | None:
        keys = JobKeys(self.settings.key_prefix, key)
        backend = self._backend(keys)
        where = backend.describe()
        try:
            await self._retry(backend.open, f"connect for job {key!r}", where, key, self.settings.connect_timeout)
            return await self._coordinate(backend, key, where, job, args, kwargs, wait=wait)
        finally:
            await backend.close()

    async def try_run_once(self, key: str, job: Callable[..., Any], *args: Any, **kwargs: Any) -> Outcome | None:
        """Like :meth:`run_once`, but return ``None`` at once when another worker holds the lease instead of
        waiting for it (nobody then takes over if that worker dies). Returns the outcome when the job was
        already done for this generation or ran here."""
        return await self._run(key, job, args, kwargs, wait=False)

    def run_once_sync(self, key: str, job: Callable[..., Any], *args: Any, **kwargs: Any) -> Outcome:
        """Blocking twin of :meth:`run_once` for gunicorn hooks, scripts and the CLI (same algorithm).

        Must not be called from a running event loop's thread with an asyncio client.
        """
        if isinstance(self._client, aredis.Redis):
            raise ConfigurationError(
                "run_once_sync() needs a sync redis.Redis client, a URL or None; with an asyncio client "
                "await run_once() instead"
            )
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.run_once(key, job, *args, **kwargs))
        # Called from a thread that runs an event loop: run the same coroutine on a loop of its own elsewhere.
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hyperion-lock") as pool:
            return pool.submit(asyncio.run, self.run_once(key, job, *args, **kwargs)).result()

    # -- internals --------------------------------------------------------------------------------------------
    def _backend(self, keys: JobKeys) -> _Backend:
        s = self.settings
        socket_timeout = max(1.0, min(s.lease_ttl / 3, 5.0))
        if isinstance(self._client, aredis.Redis):
            return RedisBackend(AsyncOps(self._client, owned=False), keys, s, describe_client(self._client))
        if self._client is not None:
            return RedisBackend(SyncOps(self._client, owned=False), keys, s, describe_client(self._client))
        if s.redis_url:
            client = async_client_from_url(
                s.redis_url, connect_timeout=s.connect_timeout, socket_timeout=socket_timeout
            )
            return RedisBackend(AsyncOps(client, owned=True), keys, s, s.describe_target())
        return FileBackend(keys.key, s)

    async def _retry(self, action: Callable[[], Awaitable[T]], what: str, where: str, key: str, budget: float) -> T:
        def on_retry(exc: BaseException, attempt: int) -> None:
            if attempt == 1 or attempt % 10 == 0:
                self.log.warning("%s: %s failed (%s: %s); retrying", key, what, type(exc).__name__, exc)

        return await with_retries(
            action,
            budget=budget,
            what=what,
            where=where,
            clock=self._clock,
            sleep=self._sleep,
            key=key,
            generation=self.settings.generation,
            on_retry=on_retry,
        )

    async def _coordinate(
        self, backend: _Backend, key: str, where: str, job: Callable[..., Any], args: Any, kwargs: Any,
        *, wait: bool = True,
    ) -> Outcome | None:
        s = self.settings
        gen = s.generation
        token = secrets.token_hex(16)
        grace = backend.holder_grace
        started = self._clock()
        may_take_at = started
        stale_failure: int | None = None
        first = True
        look_first = False
        grace_for_loss = 0  # fencing token of the holder already given a TTL after Redis lost its state
        holder: Holder | None = None
        next_log = started + s.progress_interval
        loop = asyncio.get_running_loop()

        def judge(outcome: Outcome | None) -> Outcome | None:
            nonlocal stale_failure
            if outcome is None:
                return None
            if outcome.status is Status.DONE:
                return outcome
            if outcome.status is Status.FAILED:
                if first:
                    stale_failure = outcome.fencing_token
                    self.log.info(
                        "%s: a previous attempt failed in %s (%s: %s); trying again",
                        key, outcome.runner, outcome.error_type, outcome.error_message,
                    )
                elif outcome.fencing_token != stale_failure:
                    raise JobFailedError(
                        f"the run-once job failed in worker {outcome.runner} "
                        f"({outcome.error_type}: {outcome.error_message}); this worker stops too. Fix the cause "
                        "and restart; the next start runs the job again",
                        key=key, generation=gen, runner=outcome.runner, error_type=outcome.error_type,
                        error_message=outcome.error_message, fencing_token=outcome.fencing_token,
                    )
            return None

        with stop_requested(loop) as stop:
            try:
                while True:
                    now = self._clock()
                    allowed = now >= may_take_at
                    if allowed and look_first and math.isfinite(grace):
                        # Silence for a whole TTL: make sure Redis itself was not what stalled before taking over.
                        t0 = self._clock()
                        look, _ = await self._retry(
                            functools.partial(backend.probe, token, try_acquire=False, with_counter=True),
                            "look at the job", where, key, s.reconnect_timeout,
                        )
                        done = judge(look.outcome)
                        if done is not None:
                            return self._skipped(key, done, started)
                        lost_state = (
                            holder is not None and look.holder is None and look.fence_counter is not None
                            and look.fence_counter < holder.fencing_token and grace_for_loss != holder.fencing_token
                        )
                        if lost_state:
                            # The counter never goes down: Redis lost its data (restart without persistence). The
                            # holder may well be alive and reconnecting: give it a whole TTL to re-assert its lease.
                            assert holder is not None
                            grace_for_loss = holder.fencing_token
                            self.log.warning(
                                "%s: Redis lost the job's state (restarted without persistence?); giving %s "
                                "%.1f s to re-assert its lease", key, holder.runner, grace,
                            )
                            may_take_at = self._clock() + grace
                            allowed = False
                        elif look.holder is None and self._clock() - t0 > grace / 4:
                            self.log.info(
                                "%s: Redis answered slowly; giving the holder %.1f s to re-assert", key, grace / 3
                            )
                            may_take_at = self._clock() + grace / 3
                            allowed = False
                    look_first = False
                    probe, record = await self._retry(
                        functools.partial(
                            backend.probe, token, try_acquire=allowed,
                            seen_fence=holder.fencing_token if holder is not None else 0,
                        ),
                        "probe the job", where, key,
                        s.connect_timeout if first else s.reconnect_timeout,  # first round trip: a boot-time check
                    )
                    done = judge(probe.outcome)
                    first = False
                    if done is not None:
                        return self._skipped(key, done, started)
                    if probe.acquired:
                        break  # lead outside the signal hook: a SIGTERM while leading keeps its usual meaning
                    if probe.holder is not None:
                        if holder is None or holder.fencing_token != probe.holder.fencing_token:
                            self.log.info(
                                "%s: job is running in %s (fencing token %d); waiting for it",
                                key, probe.holder.runner, probe.holder.fencing_token,
                            )
                        holder = probe.holder
                        may_take_at = max(may_take_at, self._clock() + grace)
                    if not wait:
                        return None
                    # Wait for something to happen.
                    while True:
                        now = self._clock()
                        if s.wait_timeout is not None and now - started >= s.wait_timeout:
                            raise WaitTimeoutError(
                                f"gave up after wait_timeout={s.wait_timeout} s while "
                                f"{holder.runner if holder else 'another worker'} still ran the job",
                                key=key, generation=gen,
                            )
                        if now >= next_log:
                            self._log_progress(key, holder, now - started)
                            next_log = now + s.progress_interval
                        deadline = min(may_take_at, next_log)
                        if s.wait_timeout is not None:
                            deadline = min(deadline, started + s.wait_timeout)
                        try:
                            event = await backend.next_event(max(0.0, deadline - now))
                        except Exception as exc:
                            if is_auth_error(exc):
                                raise auth_error(exc, where, key, gen) from None
                            if not is_transient(exc):
                                raise
                            self.log.warning("%s: lost the connection to %s (%s); reconnecting", key, where, exc)
                            await self._retry(backend.reopen, "resubscribe", where, key, s.reconnect_timeout)
                            # Heartbeats were missed while we were cut off: the silence proves nothing.
                            may_take_at = max(may_take_at, self._clock() + grace)
                            look_first = True
                            break
                        if event is None:
                            if self._clock() >= may_take_at:
                                look_first = True
                                break
                            continue
                        if event.status is Status.RUNNING:
                            holder = event.holder
                            may_take_at = self._clock() + grace
                            continue
                        if event.generation == gen and event.outcome is not None:
                            done = judge(event.outcome)
                            if done is not None:
                                return self._skipped(key, done, started)
                        # Released, or finished for another generation: the lease is free now.
                        may_take_at = self._clock()
                        break
            except asyncio.CancelledError as exc:
                if not stop.is_set() or STOP_MESSAGE not in exc.args:
                    raise
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
                raise WaitInterruptedError(
                    "stop requested (SIGTERM/SIGINT) while waiting for the job", key=key, generation=gen
                ) from None
        assert probe.holder is not None and record is not None
        lease = Lease(key=key, generation=gen, token=token, holder=probe.holder)
        if stop.is_set():  # asked to stop while the winning probe was in flight: hand the lease straight on
            await self._finish(backend, key, where, lease, None)
            raise WaitInterruptedError(
                "stop requested (SIGTERM/SIGINT) before the job started", key=key, generation=gen
            )
        return await self._lead(backend, key, where, lease, record, job, args, kwargs)

    def _log_progress(self, key: str, holder: Holder | None, waited: float) -> None:
        if holder is None:
            self.log.info("%s: still waiting (%.0f s so far)", key, waited)
        else:
            self.log.info(
                "%s: still waiting for %s (fencing token %d, running for %.0f s; waited %.0f s)",
                key, holder.runner, holder.fencing_token, max(0.0, self._wall() - holder.since), waited,
            )

    def _skipped(self, key: str, outcome: Outcome, started: float) -> Outcome:
        self.log.info(
            "%s: already done for generation %s by %s (waited %.2f s)",
            key, outcome.generation, outcome.runner, self._clock() - started,
        )
        return outcome

    async def _lead(
        self, backend: _Backend, key: str, where: str, lease: Lease, record: str,
        job: Callable[..., Any], args: Any, kwargs: Any,
    ) -> Outcome:
        s = self.settings
        self.log.info(
            "%s: pid %d leads generation %s (fencing token %d) via %s; running the job",
            key, os.getpid(), s.generation, lease.fencing_token, where,
        )
        with contextlib.suppress(Exception):  # an optimisation only: the scripts load on first use otherwise
            await backend.prepare()
        renewal = _Renewal()
        renewer = asyncio.create_task(self._renew_loop(backend, key, lease, record, renewal))
        started_wall = self._wall()
        started = self._clock()
        ctx_token = _CURRENT_LEASE.set(lease)

        async def stop_renewer() -> None:
            # An idle renewer is simply cancelled (no wait on the release path); one whose renewal is in flight
            # is let finish first, so that renewal cannot re-create the lease after the finish script dropped it.
            renewal.stopping = True
            if renewal.in_flight:
                await asyncio.wait({renewer}, timeout=s.lease_ttl)
            renewer.cancel()

        def outcome(status: Status, exc: BaseException | None = None) -> Outcome:
            return Outcome(
                key=key, generation=s.generation, status=status, fencing_token=lease.fencing_token,
                runner_host=socket.gethostname(), runner_pid=os.getpid(),
                started_at=started_wall, finished_at=started_wall + (self._clock() - started),
                error_type=type(exc).__qualname__ if exc else None,
                error_message=str(exc)[:2000] if exc else None,
            )

        try:
            await invoke(job, args, kwargs)
        except Exception as exc:
            failed = outcome(Status.FAILED, exc)
            self.log.error("%s: job failed after %.2f s: %s: %s", key, failed.duration_s, failed.error_type, exc)
            await stop_renewer()
            if await self._finish(backend, key, where, lease, failed) and not isinstance(exc, LeaseLostError):
                raise self._superseded(lease) from exc
            raise
        except BaseException:
            self.log.warning("%s: job interrupted; releasing the lease so another worker can take over", key)
            await stop_renewer()
            await self._finish(backend, key, where, lease, None)
            raise
        finally:
            _CURRENT_LEASE.reset(ctx_token)
        done = outcome(Status.DONE)
        await stop_renewer()
        if await self._finish(backend, key, where, lease, done):
            raise self._superseded(lease)
        self.log.info("%s: job done in %.2f s (fencing token %d)", key, done.duration_s, lease.fencing_token)
        return replace(done, ran_here=True)

    def _superseded(self, lease: Lease) -> LeaseLostError:
        lease.lost = True
        return LeaseLostError(
            f"another worker took over the job while this one (fencing token {lease.fencing_token}) was stalled; "
            "its outcome is the one recorded, this run's is discarded",
            key=lease.key, generation=lease.generation,
        )

    async def _finish(self, backend: _Backend, key: str, where: str, lease: Lease, outcome: Outcome | None) -> bool:
        """Record the outcome; True when a newer leader superseded this one (nothing was recorded)."""
        budget = self.settings.reconnect_timeout if outcome is not None else min(2.0, self.settings.reconnect_timeout)
        try:
            result = await self._retry(lambda: backend.finish(lease, outcome), "record the outcome", where, key, budget)
        except Exception as exc:
            self.log.error("%s: could not record the outcome (%s); waiters will take over after the lease TTL",
                           key, exc)
            return False
        if result == 0:
            self.log.warning(
                "%s: superseded: a newer leader took the job over from fencing token %d; nothing recorded",
                key, lease.fencing_token,
            )
            return True
        if result == 2 and outcome is not None:
            self.log.warning(
                "%s: the lease (fencing token %d) had expired before the job finished, but nobody took over; "
                "outcome recorded", key, lease.fencing_token,
            )
        return False

    async def _renew_loop(self, backend: _Backend, key: str, lease: Lease, record: str, renewal: _Renewal) -> None:
        ttl = self.settings.lease_ttl
        interval = ttl / 3
        last_ok = self._clock()
        failing = False
        while not renewal.stopping:
            await self._sleep(interval if not failing else min(interval, 0.1))  # re-assert fast after an outage
            if renewal.stopping:
                return
            renewal.in_flight = True
            try:
                result = await backend.renew(lease, record)
            except Exception as exc:
                if not is_transient(exc):
                    self.log.error("%s: renewing the lease failed: %s", key, exc)
                elif not failing:
                    self.log.warning("%s: cannot renew the lease (%s); retrying while the job runs", key, exc)
                if self._clock() - last_ok > ttl:
                    self.log.error(
                        "%s: lease not renewed for %.1f s: it may have expired", key, self._clock() - last_ok
                    )
                failing = True
                continue
            finally:
                renewal.in_flight = False
            if failing:
                self.log.info("%s: lease renewal works again", key)
            failing = False
            last_ok = self._clock()
            if result == 2:
                self.log.warning(
                    "%s: the lease had vanished from Redis (restart or data loss?); re-created it with fencing "
                    "token %d", key, lease.fencing_token,
                )
            elif result == 0:
                lease.lost = True
                self.log.error(
                    "%s: another worker holds the lease now; this run (fencing token %d) is no longer the leader",
                    key, lease.fencing_token,
                )
                return


class _Renewal:
    """Shared between a leader and its renewal task."""

    def __init__(self) -> None:
        self.in_flight = False
        self.stopping = False


async def invoke(job: Callable[..., Any], args: Any, kwargs: Any) -> None:
    if inspect.iscoroutinefunction(job):
        await job(*args, **kwargs)
        return
    result = await asyncio.to_thread(job, *args, **kwargs)
    if inspect.isawaitable(result):
        await result
