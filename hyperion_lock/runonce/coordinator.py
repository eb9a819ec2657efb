"""The run-once coordinator: a thin shell that performs what :class:`~._policy.WaitPolicy` decides.

Timeline of one call of :meth:`Coordinator.run_once` for a job key ``K`` and generation ``G``:

1. Connect and listen to ``K``'s events, *then* probe (one Lua call), all within ``connect_timeout``: if ``G`` is
   done, return at once; if it failed within the failure hold, raise :class:`JobFailedError` at once.
2. If the lease is free, take it (atomically with the next fencing token) and lead (see :mod:`.leadership`).
3. Otherwise wait for events; there is no polling. The policy (:mod:`.policy`) decides when a silent holder
   is presumed dead and how a takeover is checked first.

The one algorithm is async; :meth:`Coordinator.run_once_sync` runs the same coroutine on a private loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

import redis as _redis
import redis.asyncio as aredis

from hyperion_lock._aio import to_the_end
from hyperion_lock.connection.clients import async_client_from_url, describe_client
from hyperion_lock.connection.cluster import is_cluster_client
from hyperion_lock.connection.urls import is_cluster_url
from hyperion_lock.errors import ConfigurationError, JobFailedError, WaitInterruptedError, WaitTimeoutError
from hyperion_lock.metrics import metrics
from hyperion_lock.runonce.call import Backend, Call
from hyperion_lock.runonce.file_backend import FileBackend
from hyperion_lock.runonce.keys import JobKeys
from hyperion_lock.runonce.leadership import CURRENT_LEASE, RELEASE_BUDGET, Leadership
from hyperion_lock.runonce.model import Holder, Lease, Outcome, Probe
from hyperion_lock.runonce.policy import TERMINAL, Act, Next, Notice, WaitPolicy
from hyperion_lock.runonce.redis_backend import MIN_REPLICAS_ON_CLUSTER, AsyncOps, ClusterOps, RedisBackend, SyncOps
from hyperion_lock.runonce.signals import stop_requested
from hyperion_lock.settings import Settings

P = ParamSpec("P")
T = TypeVar("T")
RedisLike = aredis.Redis | _redis.Redis


def current_lease() -> Lease | None:
    """The lease of the job running in this context (inside a run-once job), else ``None``."""
    return CURRENT_LEASE.get()


class Coordinator:
    """Runs a job exactly once across every worker (and host) that shares a Redis, the others waiting.

    ``redis`` is an asyncio client, a sync client, a URL, or ``None`` (then ``settings.redis_url``; without any,
    the workers of one host coordinate through file locks in ``settings.lock_dir``). Keyword ``overrides`` replace
    fields of ``settings`` (default: :meth:`Settings.from_env`), e.g. ``lease_ttl=5, generation="v42"``.

    ``clock`` (monotonic seconds), ``wall`` (epoch seconds) and ``sleep`` drive every timing decision and may be
    replaced in tests.
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
        if is_cluster_client(redis):
            raise ConfigurationError(
                "a RedisCluster client cannot be handed over: give the redis+cluster://host:port[,host:port...] URL "
                "instead (the coordinator builds its own cluster client, with sharded pub/sub for the waiters)"
            )
        if redis is not None and not isinstance(redis, aredis.Redis | _redis.Redis):
            raise ConfigurationError(
                f"redis must be a redis.asyncio.Redis, a redis.Redis, a URL or None, not {type(redis).__name__}"
            )
        self._client = redis
        if self._client is None and self.settings.redis_url:
            async_client_from_url(self.settings.redis_url, connect_timeout=1, socket_timeout=1)  # validate only
            if self.settings.min_replicas and is_cluster_url(self.settings.redis_url):
                raise ConfigurationError(MIN_REPLICAS_ON_CLUSTER)
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

    async def run_once(self, key: str, job: Callable[P, Any], *args: P.args, **kwargs: P.kwargs) -> Outcome:
        """Run ``job(*args, **kwargs)`` in exactly one worker for this generation; return its :class:`Outcome`.

        Every caller returns only after the job completed successfully somewhere (``outcome.ran_here`` says
        whether it ran in this process). Sync jobs run in a worker thread so the lease keeps being renewed.

        Raises :class:`JobFailedError` if the job failed in another worker (now, or within the failure hold
        before this call began; the leader itself re-raises the job's own exception), a
        :class:`RedisUnavailableError` / :class:`ConfigurationError` within ``connect_timeout`` if the store
        cannot be used, :class:`WaitInterruptedError` on SIGTERM/SIGINT while waiting and
        :class:`WaitTimeoutError` only when ``wait_timeout`` is set.
        """
        outcome = await self._run(key, job, args, kwargs, wait=True)
        assert outcome is not None
        return outcome

    async def try_run_once(
        self, key: str, job: Callable[P, Any], *args: P.args, **kwargs: P.kwargs
    ) -> Outcome | None:
        """Like :meth:`run_once`, but return ``None`` at once when another worker holds the lease instead of
        waiting for it (nobody then takes over if that worker dies). Returns the outcome when the job was
        already done for this generation or ran here."""
        return await self._run(key, job, args, kwargs, wait=False)

    async def wait_for(self, key: str) -> Outcome:
        """Wait until job ``key`` is done for this generation, without ever running it (init containers,
        readiness gates: the job runs elsewhere, e.g. as a Kubernetes Job with ``hyperion-lock run``).

        Returns the outcome once the job succeeded; raises :class:`JobFailedError` when it failed (now, or
        within the failure hold before the call), :class:`WaitTimeoutError` after ``wait_timeout`` and
        :class:`WaitInterruptedError` on SIGTERM/SIGINT. A runner that dies is not replaced by this call.
        """
        if not self.uses_redis:
            raise ConfigurationError(
                "waiting without running needs Redis (set HYPERION_LOCK_REDIS_URL): a file lock only says when "
                "its holder is gone, not what it recorded; with file locks, call run_once in every process",
                key=key, generation=self.settings.generation,
            )
        keys = JobKeys(self.settings.key_prefix, key)
        call = Call(key, self.settings, self._backend(keys), self.log, self._clock, self._wall, self._sleep)
        try:
            outcome = await _Waiter(call, wait=True, lead=False).run()
        finally:
            await call.backend.close()
        assert isinstance(outcome, Outcome)
        return outcome

    def run_once_sync(self, key: str, job: Callable[P, Any], *args: P.args, **kwargs: P.kwargs) -> Outcome:
        """Blocking twin of :meth:`run_once` for gunicorn hooks, scripts and the CLI (same algorithm)."""
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
    def _backend(self, keys: JobKeys) -> Backend:
        s = self.settings
        if isinstance(self._client, aredis.Redis):
            return RedisBackend(AsyncOps(self._client, owned=False), keys, s, describe_client(self._client))
        if self._client is not None:
            return RedisBackend(SyncOps(self._client, owned=False), keys, s, describe_client(self._client))
        if s.redis_url:
            client = async_client_from_url(
                s.redis_url, connect_timeout=s.connect_timeout, socket_timeout=max(1.0, min(s.lease_ttl / 3, 5.0))
            )
            ops = ClusterOps(client, owned=True) if is_cluster_url(s.redis_url) else AsyncOps(client, owned=True)
            return RedisBackend(ops, keys, s, s.describe_target())
        return FileBackend(keys, s)

    async def _run(
        self, key: str, job: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], *, wait: bool
    ) -> Outcome | None:
        keys = JobKeys(self.settings.key_prefix, key)
        call = Call(key, self.settings, self._backend(keys), self.log, self._clock, self._wall, self._sleep)
        try:
            lease = await _Waiter(call, wait).run()
            if isinstance(lease, Lease):
                return await Leadership(call, lease).run(job, args, kwargs)
            return lease
        finally:
            await call.backend.close()


_ENDED = {Act.LEAD: "lead", Act.RETURN: "done", Act.FAIL: "failed", Act.GIVE_UP: "gave_up", Act.TIME_OUT: "timeout"}


class _Waiter:
    """Performs the policy's actions for one call until it leads, returns, or raises."""

    def __init__(self, call: Call, wait: bool, lead: bool = True) -> None:
        self.call = call
        s = call.settings
        self.started = call.clock()
        self.deadline = self.started + s.connect_timeout  # the first round trips are a boot-time check
        self.policy = WaitPolicy(
            now=self.started, generation=call.generation, grace=call.backend.holder_grace, wait=wait, lead=lead,
            wait_timeout=s.wait_timeout, failure_hold=s.failure_hold, progress_interval=s.progress_interval,
        )
        self.ended = "error"  # how the wait ended, for the metrics: an Act's label, or why it raised

    async def run(self) -> Lease | Outcome | None:
        call = self.call
        metrics.prepare()  # imports and set-up now, before the first probe: never between a wake-up and the return
        with metrics.span("hyperion_lock.wait", call.key) as span:
            try:
                return await self._run()
            except asyncio.CancelledError:
                self.ended = "cancelled"
                raise
            finally:
                span.set("outcome", self.ended)
                if self.ended != "lead":
                    metrics.waited(call.key, self.ended, call.clock() - self.started)

    async def _run(self) -> Lease | Outcome | None:
        call = self.call
        with stop_requested() as stop:
            try:
                await call.retry(call.backend.open, "connect", budget=call.settings.connect_timeout, overall=True)
                nxt = self.policy.start()
                while True:
                    self._notice(nxt)
                    if nxt.act in TERMINAL:
                        break
                    nxt = await self._step(nxt)
            except asyncio.CancelledError:
                if not stop.absorb():
                    raise
                self.ended = "interrupted"
                raise WaitInterruptedError(
                    "stop requested (SIGTERM/SIGINT) while waiting for the job", key=call.key,
                    generation=call.generation,
                ) from None
        if stop.is_set() and nxt.act is Act.LEAD:  # asked to stop as the lease was won: hand it straight on
            await self._release(nxt)
            self.ended = "interrupted"
            raise WaitInterruptedError(
                "stop requested (SIGTERM/SIGINT) before the job started", key=call.key, generation=call.generation
            )
        return self._conclude(nxt)

    async def _step(self, nxt: Next) -> Next:
        now = self.call.clock()
        if nxt.act is Act.PROBE:
            return self.policy.on_probe(self.call.clock(), await self._probe(nxt.take))
        if nxt.act is Act.LOOK:
            look = await self._retried(lambda: self.call.backend.probe(
                self.call.token, take=False, with_counter=True), "look at the job")
            return self.policy.on_look(self.call.clock(), look, self.call.clock() - now)
        return await self._wait(nxt.until)

    def _budget(self) -> tuple[float, bool]:
        """The first round trips share ``connect_timeout`` (a boot-time check); later ones may ride out an
        outage for ``reconnect_timeout``."""
        if self.policy.first:
            return max(0.0, self.deadline - self.call.clock()), True
        return self.call.settings.reconnect_timeout, False

    async def _retried(self, action: Callable[[], Awaitable[Probe]], what: str) -> Probe:
        budget, overall = self._budget()
        return await self.call.retry(action, what, budget=budget, overall=overall)

    async def _probe(self, take: bool) -> Probe:
        call, seen = self.call, self.policy.seen_fence
        if not take:
            return await self._retried(lambda: call.backend.probe(call.token, take=False, seen_fence=seen), "probe")
        return await self._retried(lambda: self._take_attempt(seen), "probe the job")

    async def _take_attempt(self, seen_fence: int) -> Probe:
        """One probe that may take the lease, shielded: if this task is cancelled while the script runs, wait for
        its reply and hand a won lease straight on, then let the cancellation through."""
        call = self.call
        probe: Awaitable[Probe] = call.backend.probe(call.token, take=True, seen_fence=seen_fence)
        if self.policy.first:
            # connect_timeout bounds the first round trip, its reply included (the shield would otherwise wait for
            # the socket timeout). A lease won without the reply arriving in time is never used: it expires after
            # lease_ttl, as a killed leader's does, and a waiter takes over.
            probe = asyncio.wait_for(probe, max(0.0, self.deadline - call.clock()))
        done, cancelled = await to_the_end(probe)
        if not cancelled:
            return done.result()
        if not done.cancelled() and done.exception() is None and done.result().acquired:
            await self._release(Next(Act.LEAD, holder=done.result().holder))
        raise asyncio.CancelledError

    async def _release(self, nxt: Next) -> None:
        if nxt.act is not Act.LEAD or nxt.holder is None:
            return
        call = self.call
        lease = Lease(key=call.key, generation=call.generation, token=call.token, holder=nxt.holder)
        try:
            await call.retry(lambda: call.backend.finish(lease, None), "hand the lease on", budget=RELEASE_BUDGET)
        except Exception as exc:
            call.log.warning("%s: could not hand the lease on (%s); it expires after the lease TTL", call.key, exc)

    async def _wait(self, until: float) -> Next:
        call, policy = self.call, self.policy
        metrics.will_wait(call.key)  # the series the wake-up records into exists before it comes
        now = call.clock()
        if policy.progress_due(now):
            self._log_progress(now)
        try:
            event = await call.backend.next_event(max(0.0, until - now))
        except Exception as exc:
            err = call.backend.failure(exc, call.key, call.generation)
            if err is not None:
                raise err from (None if err is exc else exc)
            call.log.warning("%s: lost the connection to %s (%s); reconnecting", call.key, call.where, exc)
            await call.retry(call.backend.open, "resubscribe", budget=call.settings.reconnect_timeout)
            metrics.reconnected(call.key)
            return policy.on_reconnect(call.clock())
        return policy.on_event(call.clock(), event)

    def _conclude(self, nxt: Next) -> Lease | Outcome | None:
        call = self.call
        waited = call.clock() - self.started
        self.ended = _ENDED[nxt.act]
        if nxt.act is Act.LEAD:
            assert nxt.holder is not None
            if self.policy.holder is not None:  # another holder was seen: it died or let go
                metrics.took_over(call.key)
            return Lease(key=call.key, generation=call.generation, token=call.token, holder=nxt.holder)
        if nxt.act is Act.RETURN:
            assert nxt.outcome is not None
            if not self.policy.wait:
                call.log.info("%s: already done by %s; did not wait", call.key, nxt.outcome.runner)
            else:
                call.log.info("%s: done by %s (waited %.2f s)", call.key, nxt.outcome.runner, waited)
            return nxt.outcome
        if nxt.act is Act.GIVE_UP:
            runner = nxt.holder.runner if nxt.holder else "another worker"
            call.log.info("%s: running in %s; not waiting for it", call.key, runner)
            return None
        if nxt.act is Act.FAIL:
            raise self._failed(nxt)
        raise WaitTimeoutError(self._timeout_text(nxt.holder), key=call.key, generation=call.generation)

    def _timeout_text(self, holder: Holder | None) -> str:
        """What was true when the wait gave up: the holder seen last (it may have died since), or nobody."""
        gave_up = f"gave up after wait_timeout={self.call.settings.wait_timeout:g} s"
        if holder is None:
            return (f"{gave_up}: no worker held the job's lease and no outcome was recorded for this generation "
                    "while this call waited (is anything running the job?)")
        return (f"{gave_up}: no outcome recorded yet; the job was last seen running in {holder.runner} (fencing "
                f"token {holder.fencing_token})")

    def _failed(self, nxt: Next) -> JobFailedError:
        o, call = nxt.outcome, self.call
        assert o is not None
        call.log.info("%s: the job failed in %s (%s: %s)", call.key, o.runner, o.error_type, o.error_message)
        return JobFailedError(
            f"the run-once job failed in worker {o.runner} ({o.error_type}: {o.error_message}); this worker stops "
            f"too. Fix the cause and restart: a new generation runs the job again, the same one after the failure "
            f"hold ({call.settings.failure_hold:g} s) or at once after `hyperion-lock reset {call.key}`",
            key=call.key, generation=call.generation, runner=o.runner, error_type=o.error_type,
            error_message=o.error_message, fencing_token=o.fencing_token,
        )

    def _notice(self, nxt: Next) -> None:
        notice, call, h = nxt.notice, self.call, self.policy.holder
        if notice is None:
            return
        if notice is Notice.NEW_HOLDER and h is not None:
            call.log.debug("%s: running in %s (fencing token %d); waiting", call.key, h.runner, h.fencing_token)
        elif notice is Notice.DATA_LOSS and h is not None:
            call.log.warning(
                "%s: Redis lost the job's state (restarted without persistence?); giving %s %.1f s to re-assert "
                "its lease", call.key, h.runner, self.policy.grace,
            )
        elif notice is Notice.STALE_FAILURE and (o := self.policy.stale) is not None:
            call.log.info(
                "%s: an earlier attempt failed in %s (%s: %s) before the failure hold; trying again",
                call.key, o.runner, o.error_type, o.error_message,
            )
        elif notice is Notice.SLOW_STORE:
            call.log.info("%s: %s answered slowly; giving the holder time to re-assert", call.key, call.where)

    def _log_progress(self, now: float) -> None:
        call, h = self.call, self.policy.holder
        if h is None:
            call.log.info("%s: still waiting (%.0f s so far)", call.key, now - self.started)
            return
        call.log.info(
            "%s: still waiting for %s (fencing token %d, running for %.0f s; waited %.0f s)",
            call.key, h.runner, h.fencing_token, max(0.0, call.wall() - h.since), now - self.started,
        )

