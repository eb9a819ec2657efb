"""The Redis side of the coordinator: lease, fencing counter, outcome marker and wake-up channel of one job.

The algorithm itself lives in :mod:`.coordinator`; this module only turns its steps into Redis round trips. It works
with an asyncio client directly and with a sync client through a worker thread, so the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import time
from typing import Any, Protocol

from hyperion_lock.connection.clients import (
    _ACL_COMMANDS,
    as_text,
    async_closer,
    close_quietly,
    is_transient,
    redis_error,
)
from hyperion_lock.connection.cluster import next_sharded, sharded_script, sharded_subscribe
from hyperion_lock.errors import ConfigurationError, CorruptStateError, RedisPermissionError
from hyperion_lock.runonce import scripts as _scripts
from hyperion_lock.runonce.keys import JobKeys
from hyperion_lock.runonce.model import Event, FinishResult, Holder, Lease, Outcome, Probe, RenewResult, Status
from hyperion_lock.settings import Settings, replica_wait_ms

log = logging.getLogger(__name__)
MIN_REPLICAS_ON_CLUSTER = (
    "HYPERION_LOCK_MIN_REPLICAS (min_replicas) is not supported with redis+cluster://: WAIT must run on the "
    "connection that wrote the lease, which redis-py's cluster client does not expose; set it to 0"
)


class _Ops(Protocol):
    """The handful of Redis operations the backend needs, whatever the client flavour."""

    sharded: bool  # a Redis Cluster: wake-ups are SPUBLISH/SSUBSCRIBE

    async def run(self, script: str, keys: list[str], args: list[Any]) -> Any: ...
    async def run_and_wait(
        self, script: str, keys: list[str], args: list[Any], replicas: int, timeout_ms: int
    ) -> tuple[Any, int]: ...
    async def load(self, script: str) -> None: ...
    async def subscribe(self, channel: str) -> None: ...
    async def get_message(self, timeout: float) -> Any: ...
    async def close(self) -> None: ...


class _OpsBase:
    sharded = False

    def __init__(self, client: Any, *, owned: bool) -> None:
        self._client = client
        self._owned = owned  # close the client with the backend (we made it from a URL)
        self._scripts: dict[str, Any] = {}
        self._pubsub: Any = None

    def _script(self, script: str) -> Any:
        """redis-py Script objects: EVALSHA, falling back to SCRIPT LOAD once per server (NOSCRIPT)."""
        if script not in self._scripts:
            self._scripts[script] = self._client.register_script(self._code(script))
        return self._scripts[script]

    @staticmethod
    def _code(script: str) -> str:
        """The text the server runs for ``script`` (a Redis Cluster rewrites its wake-ups)."""
        return script

    def _eval_then_wait(self, script: str, keys: list[str], args: list[Any], replicas: int, timeout_ms: int) -> Any:
        """A pipeline of ``EVAL`` and ``WAIT``: one connection, so WAIT counts the replicas that have the script's
        writes (WAIT on another connection would wait for that connection's own, older, writes)."""
        pipe = self._client.pipeline(transaction=False)
        pipe.eval(self._code(script), len(keys), *keys, *args)
        pipe.execute_command("WAIT", replicas, timeout_ms)
        return pipe


class AsyncOps(_OpsBase):
    async def run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        return await self._script(script)(keys=keys, args=args)

    async def run_and_wait(
        self, script: str, keys: list[str], args: list[Any], replicas: int, timeout_ms: int
    ) -> tuple[Any, int]:
        result, acked = await self._eval_then_wait(script, keys, args, replicas, timeout_ms).execute()
        return result, int(acked)

    async def load(self, script: str) -> None:
        await self._client.script_load(self._code(script))

    async def subscribe(self, channel: str) -> None:
        if self._pubsub is not None:
            await close_quietly(async_closer(self._pubsub))
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        await self._pubsub.subscribe(channel)

    async def get_message(self, timeout: float) -> Any:
        return await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=max(0.0, timeout))

    async def close(self) -> None:
        if self._pubsub is not None:
            await close_quietly(async_closer(self._pubsub))
            self._pubsub = None
        if self._owned:
            await close_quietly(async_closer(self._client))


class ClusterOps(AsyncOps):
    """An asyncio ``RedisCluster`` (see ``connection.cluster``): scripts are routed by their keys' slot, and waiters
    listen with ``SSUBSCRIBE`` on the node that owns the job's slot (redis-py's cluster ``ClusterPubSub``).

    A subscription that breaks -- the node died (connection error), or the node told us it no longer owns the slot
    (an ``sunsubscribe`` pushed by the server after a resharding or a failover that demoted it) -- is reported as a
    ``ConnectionError``: the waiter logs it, re-subscribes (after re-reading the slot map, so on the slot's new
    owner) and probes the job again, as after any reconnect.
    """

    _code = staticmethod(sharded_script)
    sharded = True

    async def run_and_wait(
        self, script: str, keys: list[str], args: list[Any], replicas: int, timeout_ms: int
    ) -> tuple[Any, int]:
        raise ConfigurationError(MIN_REPLICAS_ON_CLUSTER)  # Coordinator() refuses this already; a guard

    async def subscribe(self, channel: str) -> None:
        if self._pubsub is not None:
            await close_quietly(async_closer(self._pubsub))
            self._pubsub = None
            await self._client.nodes_manager.initialize()  # a resubscribe: the slot may have a new owner
        await self._client.initialize()
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=False)
        await sharded_subscribe(self._pubsub, channel)
        await self._confirmed()

    async def _confirmed(self) -> None:
        """Read the node's reply to SSUBSCRIBE: a node that does not own the slot (a slot map older than a failover
        or a resharding) answers MOVED, which must fail the subscribe (and be retried), not a later read."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _CONFIRM_TIMEOUT
        while loop.time() < deadline:
            message = await next_sharded(self._pubsub, min(1.0, deadline - loop.time()))
            if message is not None and message["type"] == "subscribe":
                return
        raise ConnectionError(f"no reply to SSUBSCRIBE within {_CONFIRM_TIMEOUT:g} s")

    async def get_message(self, timeout: float) -> Any:
        if self._pubsub is None:
            raise ConnectionError("the sharded subscription was dropped")
        message = await next_sharded(self._pubsub, timeout)
        return message if message is not None and message["type"] == "message" else None


#: How long a sharded subscribe waits for the node's confirmation before it counts as a lost connection.
_CONFIRM_TIMEOUT = 5.0


class SyncOps(_OpsBase):
    """Runs a sync ``redis.Redis`` in a worker thread per call so the caller's event loop keeps running."""

    async def run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        return await asyncio.to_thread(self._script(script), keys=keys, args=args)

    async def run_and_wait(
        self, script: str, keys: list[str], args: list[Any], replicas: int, timeout_ms: int
    ) -> tuple[Any, int]:
        pipe = self._eval_then_wait(script, keys, args, replicas, timeout_ms)
        result, acked = await asyncio.to_thread(pipe.execute)
        return result, int(acked)

    async def load(self, script: str) -> None:
        await asyncio.to_thread(self._client.script_load, self._code(script))

    async def subscribe(self, channel: str) -> None:
        old, self._pubsub = self._pubsub, self._client.pubsub(ignore_subscribe_messages=True)
        if old is not None:
            await asyncio.to_thread(old.close)
        await asyncio.to_thread(self._pubsub.subscribe, channel)

    async def get_message(self, timeout: float) -> Any:
        # Short slices: an abandoned call (the waiter was interrupted) frees its thread within a second.
        return await asyncio.to_thread(
            self._pubsub.get_message, ignore_subscribe_messages=True, timeout=min(max(0.0, timeout), 1.0)
        )

    async def close(self) -> None:
        if self._pubsub is not None:
            pubsub, self._pubsub = self._pubsub, None
            await asyncio.to_thread(pubsub.close)
        if self._owned:
            await asyncio.to_thread(self._client.close)


class RedisBackend:
    """One job's state in Redis; see :mod:`.keys` for the key layout and :mod:`.scripts` for each step."""

    def __init__(self, ops: _Ops, keys: JobKeys, settings: Settings, where: str) -> None:
        self.ops = ops
        self.keys = keys
        self.settings = settings
        self.where = where
        self.generation = settings.generation
        # A waiter may only look at taking over once no heartbeat was heard for a whole lease TTL.
        self.holder_grace = settings.lease_ttl
        self._ttl_ms = max(1, int(settings.lease_ttl * 1000))
        self._result_ttl_ms = max(1, int(settings.result_ttl * 1000))
        self._scripts_loaded = False
        self._replicas_warned = False
        self._permissions_checked = False  # by this call's first probe

    def describe(self) -> str:
        return f"Redis at {self.where}"

    def failure(self, exc: Exception, key: str, generation: str) -> Exception | None:
        """Wrong credentials, DB index, ACL or TLS setup: a clear error at once; a lost connection: retry."""
        specific = self._script_error(exc, key, generation) or redis_error(
            exc, where=self.where, key=key, generation=generation, prefix=self.keys.prefix)
        if specific is not None:
            return specific
        return None if is_transient(exc) else exc

    async def open(self) -> None:
        """Subscribe first: an outcome published after this point cannot be missed by the next probe."""
        await self.ops.subscribe(self.keys.channel)

    def _holder_template(self) -> str:
        """The holder record without token and fence (PROBE adds both)."""
        holder = Holder(host=socket.gethostname(), pid=os.getpid(), generation=self.generation, fencing_token=0,
                        since=time.time())
        record = holder.to_mapping()
        del record["fence"]
        return json.dumps(record)

    async def _write(
        self, script: str, keys: list[str], args: list[Any], *, may_write: bool = True
    ) -> tuple[Any, int | None]:
        """Run a script that may write the lease; with ``min_replicas`` set, WAIT for the replicas after it.

        Returns the script's reply and the replicas that acknowledged (None without WAIT); the caller passes them to
        :meth:`_replicas_acked` with whether the reply means the lease was written.
        """
        wanted = self.settings.min_replicas
        if wanted == 0 or not may_write:
            return await self.ops.run(script, keys, args), None
        return await self.ops.run_and_wait(script, keys, args, wanted, replica_wait_ms(self.settings.lease_ttl))

    def _replicas_acked(self, acked: int | None, wrote: bool) -> None:
        """Log once per call when a lease write reached fewer replicas than ``min_replicas``; the job goes on."""
        if replicas_short(self.settings.min_replicas, acked, wrote) and not self._replicas_warned:
            self._replicas_warned = True
            log.warning(
                "%s: the lease write reached %d of %d replica(s) within %d ms (HYPERION_LOCK_MIN_REPLICAS); "
                "continuing, but a failover now could lose the lease and let a second worker run the job",
                self.keys.key, acked, self.settings.min_replicas, replica_wait_ms(self.settings.lease_ttl),
            )

    def _needed(self, take: bool) -> str:
        """What this call will need, as ``[kind, command, target, args...]`` for PROBE to check before it reads or
        takes anything (ARGV[8]); only on the call's first probe, so a wake-up costs nothing more. Without ``take``
        (waiting only) just what a waiter does."""
        if self._permissions_checked:
            return ""
        k, outcome = self.keys, self.keys.outcome(self.generation)
        subscribe, publish = ("SSUBSCRIBE", "SPUBLISH") if self.ops.sharded else ("SUBSCRIBE", "PUBLISH")
        needed = [["channel", subscribe, k.channel], ["key", "GET", k.lease], ["key", "GET", outcome],
                  ["key", "PTTL", outcome]]
        if take:
            needed += [
                ["channel", publish, k.channel, "x"], ["key", "SET", k.lease, "x", "PX", "1"], ["key", "INCR", k.fence],
                ["key", "PEXPIRE", k.lease, "1"], ["key", "DEL", k.lease], ["key", "SET", outcome, "x", "PX", "1"],
                ["command", "SCRIPT", "LOAD", "x"],
            ]
            if self.settings.min_replicas:
                needed += [["command", "EVAL", "return 1", "0"], ["command", "WAIT", "0", "0"]]
        return json.dumps(needed)

    def _script_error(self, exc: Exception, key: str, generation: str) -> Exception | None:
        """A script's own refusal: a permission its preflight found missing, or a stored value that is corrupt."""
        text = str(exc)
        denied = re.search(rf"{_scripts.PREFLIGHT} (\w+) (\w+) (\S+)", text)
        if denied:
            return self._denied(*denied.groups(), key=key, generation=generation)
        corrupt = re.search(rf"{_scripts.CORRUPT} (\S+)", text)
        if corrupt:
            return self._corrupt(corrupt.group(1), key, generation)
        return None

    def _denied(self, kind: str, command: str, target: str, *, key: str, generation: str) -> RedisPermissionError:
        p, grant = self.keys.prefix, f"the command +{command.lower()}"
        if kind == "channel":
            what, grant = f"{command} on the channel {target}", f"the channels &{p}:* (Redis 7 users start with " \
                f"resetchannels) and {grant}"
        elif kind == "key":
            what, grant = f"{command} on the key {target}", f"the keys ~{p}:* and {grant}"
        else:
            what = f"{command} {target}"
        return RedisPermissionError(
            f"Redis at {self.where} does not let this ACL user run {what}, which every run-once call needs; checked "
            f"before taking the lease, so no worker runs the job. Grant {grant}; the whole set: "
            f"ACL SETUSER <user> ~{p}:* &{p}:* {_ACL_COMMANDS}",
            key=key, generation=generation,
        )

    def _corrupt(self, stored: str, key: str, generation: str) -> CorruptStateError:
        return CorruptStateError(
            f"the value stored at {stored} in Redis at {self.where} is not what hyperion_lock writes (not a JSON "
            f"object): corrupt, or written by something else. Nothing was changed; clear it with "
            f"`hyperion-lock reset {key} --generation {generation}{_prefix_option(self.keys.prefix)}` (it clears "
            "the lease and this generation's outcome: the next call runs the job)",
            key=key, generation=generation,
        )

    def _decoded(self, text: str | None, stored: str) -> dict[str, Any] | None:
        if not text:
            return None
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise self._corrupt(stored, self.keys.key, self.generation)
        return data

    async def probe(self, token: str, *, take: bool, seen_fence: int = 0, with_counter: bool = False) -> Probe:
        outcome_key = self.keys.outcome(self.generation)
        reply, acked = await self._write(
            _scripts.PROBE,
            [outcome_key, self.keys.lease, self.keys.fence],
            [token, self._ttl_ms, self._holder_template(), "1" if take else "0", seen_fence,
             int(self.settings.failure_hold * 1000), "1" if with_counter else "0", self._needed(take)],
            may_write=take,
        )
        self._permissions_checked = True
        raw_outcome, raw_lease, taken, raw_counter, pttl = reply
        self._replicas_acked(acked, wrote=bool(int(taken)))
        outcome_text, lease_text, counter = as_text(raw_outcome), as_text(raw_lease), as_text(raw_counter)
        outcome_data = self._decoded(outcome_text, outcome_key)
        lease_data = self._decoded(lease_text, self.keys.lease)
        try:
            probe = Probe(
                outcome=Outcome.from_mapping(outcome_data) if outcome_data else None,
                holder=Holder.from_mapping(lease_data) if lease_data else None,
                acquired=bool(int(taken)),
                fence_counter=int(counter) if counter is not None else None,
                outcome_age=_age(outcome_data, int(pttl)),
            )
        except (KeyError, TypeError, ValueError):  # JSON, but not a lease / outcome of ours
            raise self._corrupt(outcome_key if outcome_data else self.keys.lease, self.keys.key,
                                self.generation) from None
        if probe.acquired and not self._scripts_loaded:
            # Leader only: cache the renew/finish scripts now so the outcome is published in one round trip.
            with contextlib.suppress(Exception):
                for script in (_scripts.RENEW, _scripts.FINISH):
                    await self.ops.load(script)
                self._scripts_loaded = True
        return probe

    async def next_event(self, timeout: float) -> Event | None:
        """Wait up to ``timeout`` s for a message on the job's channel; ``None`` when none came."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            left = deadline - loop.time()
            if left <= 0:
                return None
            message = await self.ops.get_message(left)
            if message is None or message.get("type") != "message":
                continue
            data = as_text(message.get("data"))
            if data:
                return self.parse_event(data)

    @staticmethod
    def parse_event(data: str) -> Event | None:
        try:
            payload = json.loads(data)
            status = Status(payload["status"])
        except (ValueError, KeyError, TypeError):
            return None
        generation = str(payload.get("generation", ""))
        if status in (Status.DONE, Status.FAILED):
            return Event(status, generation, outcome=Outcome.from_mapping(payload))
        return Event(status, generation, holder=Holder.from_mapping(payload))

    def _holder_message(self, lease: Lease, status: Status) -> str:
        return json.dumps({**lease.holder.to_mapping(), "status": str(status), "generation": self.generation})

    def _lease_record(self, lease: Lease) -> str:
        return json.dumps({**lease.holder.to_mapping(), "token": lease.token})

    async def renew(self, lease: Lease) -> RenewResult:
        reply, acked = await self._write(
            _scripts.RENEW,
            [self.keys.lease, self.keys.fence, self.keys.channel],
            [lease.token, self._ttl_ms, self._lease_record(lease), lease.fencing_token,
             self._holder_message(lease, Status.RUNNING)],
        )
        result = RenewResult(int(reply))
        self._replicas_acked(acked, wrote=result is not RenewResult.LOST)
        return result

    async def finish(self, lease: Lease, outcome: Outcome | None) -> FinishResult:
        """Record ``outcome`` (``None``: give the job up), drop the lease, wake waiters."""
        result = await self.ops.run(
            _scripts.FINISH,
            [self.keys.lease, self.keys.outcome(self.generation), self.keys.fence, self.keys.channel],
            [lease.token, outcome.to_json(ttl_ms=self._result_ttl_ms) if outcome else "", self._result_ttl_ms,
             self._holder_message(lease, Status.RELEASED), lease.fencing_token],
        )
        return FinishResult(int(result))

    async def close(self) -> None:
        await self.ops.close()


def _prefix_option(prefix: str) -> str:
    return "" if prefix == Settings.__dataclass_fields__["key_prefix"].default else f" --prefix {prefix}"


def replicas_short(wanted: int, acked: int | None, wrote: bool) -> bool:
    """True when a write of the lease reached fewer replicas than wanted (``acked`` None: no WAIT was run)."""
    return wanted > 0 and wrote and acked is not None and acked < wanted


def _age(outcome: dict[str, Any] | None, pttl_ms: int) -> float | None:
    """Seconds since an outcome was recorded, by Redis's clock: its TTL as written minus the TTL left."""
    if outcome is None or pttl_ms < 0 or not isinstance(outcome.get("ttl_ms"), int):
        return None
    return max(0.0, (int(outcome["ttl_ms"]) - pttl_ms) / 1000.0)
