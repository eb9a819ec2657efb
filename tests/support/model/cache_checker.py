"""An explicit-state model checker of the response cache's Redis protocol (``hyperion_lock/cache/store.py``).

What is modelled, over one namespace, key ``k`` (tag ``t``) and key ``k2`` (tag ``t``):

* The scripts: ``cache_model.CacheScripts``, a line-by-line transcription of the Lua (held to the real scripts by
  ``tests/integration/test_cache_model_diff.py``), called with the key names of the real
  :class:`~hyperion_lock.cache.keys.CacheKeys` and the arguments ``RedisStore`` passes.
* Two workers, each a lookup of ``k`` as the engine does it: ``READ`` taking the lease if there is no entry -> an
  entry: served; the lease ours: compute (reading the data, whose version the value records), ``RENEW`` at any
  moment while computing, then ``PUT`` under the namespace version the ``READ`` returned; another's: wait, and
  ``READ`` again later (at any later moment: a message, or the holder's lease running out). The computation reads
  the data as the lease is won, the earliest it could (the oldest data it could see).
* An invalidator: the data of ``k`` changes (its version + 1), then one of ``INVALIDATE_KEY`` (``k``),
  ``INVALIDATE_TAG`` (``t``), ``INVALIDATE_NAMESPACE``; when it returns, "an invalidation that followed the change
  to version d returned" is recorded.
* Someone stores ``k2`` (same tag, a shorter life): ``READ`` taking its lease and ``PUT`` at once. That ``PUT``
  trims the tag index, and its entry's life is what the tag index key lives by when nothing else extends it.
* The environment: time passes (ticks of 1 s: lease TTL 2 s, ``k``'s entry life 3 s, ``k2``'s 1 s; leases, entries
  and index keys expire); a worker crashes (its lease stays until it expires); a script's reply is lost (the worker
  calls it again with the same owner token: ``READ`` again, or ``PUT`` again).

Time is not part of a state: the model's clock always reads 0 and every TTL and ZSET score counts from now. Scores
that have passed are raised to 0 when time passes: every script treats all scores at or below now alike
(``ZREMRANGEBYSCORE -inf now``, ``ZCOUNT (now``, ``ZADD GT`` with a future expiry, ``keep``'s ``want``), so this
merges states no script can tell apart.

Checked in every state reached (safety):

* ``fresh``: once an invalidation that followed a data change to version d has returned, no ``READ`` serves, and
  no live entry of ``k`` (one written under the current namespace version) holds, a value computed from data older
  than d;
* ``one-computation``: a computation of ``k`` starts only with a token no computation had before, and only while
  no other call holds ``k``'s lease (a second computation starts after the first's lease expired or was
  invalidated, never beside it).

States are frozen tuples, explored breadth-first with de-duplication, so a violation comes with a shortest trace.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from functools import lru_cache
from typing import Any, NamedTuple

from hyperion_lock.cache import store as _store
from hyperion_lock.cache.keys import CacheKeys

from . import search
from .cache_model import EMPTY, CacheScripts, Db, Hash

KEYS = CacheKeys("model", "ns")
K, K2, TAG = "k", "k2", "t"
TICK_MS = 1000
LEASE_MS = 2 * TICK_MS
LIFE_MS = 3 * TICK_MS  # k's entries
OTHER_LIFE_MS = 1 * TICK_MS  # k2's entries: shorter than a lease


class Invariant(Enum):
    FRESH = "fresh"
    ONE_COMPUTATION = "one-computation"


class Phase(Enum):
    READ = "read"  # about to READ k (first, or again after waiting)
    COMPUTE = "compute"  # holds the lease (as far as it knows): RENEW or PUT
    PUT_AGAIN = "put again"  # PUT's reply was lost: calls it again with the same token
    DONE = "done"
    DEAD = "dead"


class Kind(Enum):
    KEY = "key"
    TAG = "tag"
    NAMESPACE = "namespace"


class Budget(NamedTuple):
    crashes: int = 1
    replies: int = 1  # lost script replies (READ or PUT)
    invalidations: int = 1  # data change + invalidation rounds
    others: int = 1  # stores of k2


@dataclass(frozen=True)
class Config:
    depth: int = 16
    budget: Budget = field(default_factory=Budget)
    workers: int = 2
    kinds: tuple[Kind, ...] = (Kind.KEY, Kind.TAG, Kind.NAMESPACE)
    scripts: CacheScripts = field(default_factory=CacheScripts)
    max_states: int = 2_000_000
    stop_at_first: bool = False

    def describe(self) -> str:
        b = self.budget
        return (f"scripts {self.scripts.name}; {self.workers} workers, depth bound {self.depth}; {b.invalidations} "
                f"invalidation ({'/'.join(k.value for k in self.kinds)}), {b.others} store of {K2}, {b.crashes} crash, "
                f"{b.replies} lost reply; lease {LEASE_MS // TICK_MS} s, life {LIFE_MS // TICK_MS} s ({K}), "
                f"{OTHER_LIFE_MS // TICK_MS} s ({K2})")


class Worker(NamedTuple):
    name: str
    idx: int
    phase: Phase = Phase.READ
    data: int = -1  # the data version its computation read
    version: int = 0  # the namespace version READ returned with the lease
    renewing: bool = True  # a RENEW answered "lost" stops the renewals

    @property
    def token(self) -> str:
        return f"{self.name}.1"


class World(NamedTuple):
    workers: tuple[Worker, ...]
    db: Db
    data: int  # version of k's data
    fresh_from: int  # the data version of the latest invalidation that returned (values older must be gone)
    changed: bool  # the invalidator changed the data and has yet to invalidate
    budget: Budget
    computations: frozenset[str]  # tokens of every computation of k started so far


class Step(NamedTuple):
    label: str
    world: World
    violation: tuple[Invariant, str] | None = None


@lru_cache(maxsize=8)
def lease_key(ident: str) -> str:
    return KEYS.lease(ident)


def payload(data: int) -> str:
    return f"d{data}"


@lru_cache(maxsize=64)
def header(token: str) -> str:
    return _store.Header(ttl_ms=LIFE_MS, stale_ms=0, etag="e", codec="json", version=0, owner=token).to_json()


class Model:
    """Successor function and invariants for one :class:`Config`."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.scripts = config.scripts
        self._runs: dict[tuple[Db, str, tuple[str, ...], tuple[Any, ...]], tuple[Db, Any]] = {}

    def initial(self) -> World:
        workers = tuple(Worker(f"w{i + 1}", i) for i in range(self.config.workers))
        return World(workers, EMPTY, 0, 0, False, self.config.budget, frozenset())

    def run(self, db: Db, script: str, keys: Sequence[str], args: Sequence[Any]) -> tuple[Db, Any]:
        """One script on ``db`` (the same call on the same keys recurs in many states: computed once)."""
        key = (db, script, tuple(keys), tuple(args))
        done = self._runs.get(key)
        if done is None:
            new, reply, _ = self.scripts.run(db, script, keys, args)
            done = self._runs[key] = (new, reply)
        return done

    # -- successors ---------------------------------------------------------------------------------------------
    def successors(self, world: World) -> list[Step]:
        steps: list[Step] = []
        for w in world.workers:
            steps.extend(self.worker_steps(world, w))
        steps.extend(self.invalidator_steps(world))
        steps.extend(self.other_steps(world))
        steps.extend(self.environment(world))
        return [s if s.violation is not None else s._replace(violation=self.check_live(s.world)) for s in steps]

    def worker_steps(self, world: World, w: Worker) -> Iterator[Step]:
        if w.phase is Phase.READ:
            yield self.read(world, w)
        elif w.phase is Phase.COMPUTE:
            if w.renewing:
                yield self.renew(world, w)
            yield self.put(world, w)
            yield self.release(world, w)
        elif w.phase is Phase.PUT_AGAIN:
            yield self.put(world, w)

    def read(self, world: World, w: Worker, lost: bool = False) -> Step:
        before = world.db.get(lease_key(K))
        db, reply = self.run(world.db, _store.READ, [KEYS.entry(K), KEYS.version, lease_key(K), KEYS.tag_index(TAG)],
                             [w.token, LEASE_MS, int(_store.TakeMode.IF_MISSING), K])
        head, value, _, state, _, version, _ = reply
        world = world._replace(db=db)
        if lost:
            return Step(f"{w.name} READs {K}, but the reply is lost", world)
        if state == int(_store.LeaseState.MINE):
            violation = self.check_start(world, w, before)
            new = w._replace(phase=Phase.COMPUTE, data=world.data, version=version)
            world = self.put_worker(world, new)._replace(computations=world.computations | {w.token})
            return Step(f"{w.name} READs {K}: lease won (namespace version {version}) -> computes from data "
                        f"version {world.data}", world, violation)
        if head is not None:
            served = int(value[1:])
            violation = None
            if served < world.fresh_from:
                violation = (Invariant.FRESH, f"{w.name} served a value computed from data version {served} after an "
                                              f"invalidation that followed the change to {world.fresh_from} returned")
            return Step(f"{w.name} READs {K}: hit, serves the value of data version {served}",
                        self.put_worker(world, w._replace(phase=Phase.DONE)), violation)
        return Step(f"{w.name} READs {K}: lease held by another -> waits, reads again later", world)

    def renew(self, world: World, w: Worker) -> Step:
        db, reply = self.run(world.db, _store.RENEW, [lease_key(K), KEYS.tag_index(TAG)], [w.token, LEASE_MS, K])
        if reply == 1:
            return Step(f"{w.name} RENEWs its lease: renewed", world._replace(db=db))
        return Step(f"{w.name} RENEWs its lease: lost, stops renewing",
                    self.put_worker(world._replace(db=db), w._replace(renewing=False)))

    def put(self, world: World, w: Worker, lost: bool = False) -> Step:
        db, reply = self.run(
            world.db, _store.PUT,
            [KEYS.entry(K), KEYS.version, lease_key(K), KEYS.index, KEYS.tag_index(TAG)],
            [w.token, header(w.token), payload(w.data), LIFE_MS, w.version, KEYS.channel, "ok", "retry", K])
        again = " again" if w.phase is Phase.PUT_AGAIN else ""
        what = f"{w.name} PUTs{again} the value of data version {w.data} (namespace version {w.version})"
        if lost:
            return Step(f"{what}, but the reply is lost",
                        self.put_worker(world._replace(db=db), w._replace(phase=Phase.PUT_AGAIN)))
        result = _store.PutResult(int(reply)).name.lower()
        return Step(f"{what}: {result}", self.put_worker(world._replace(db=db), w._replace(phase=Phase.DONE)))

    def release(self, world: World, w: Worker) -> Step:
        """The computation raised: the lease is given up (the waiters are told), nothing stored."""
        db, reply = self.run(world.db, _store.RELEASE, [lease_key(K)], [w.token, KEYS.channel, "error"])
        what = "released" if reply == 1 else "not held"
        return Step(f"{w.name}'s computation raises; it RELEASEs the lease: {what}",
                    self.put_worker(world._replace(db=db), w._replace(phase=Phase.DONE)))

    def invalidator_steps(self, world: World) -> Iterator[Step]:
        if not world.changed:
            if world.budget.invalidations:
                b = world.budget._replace(invalidations=world.budget.invalidations - 1)
                yield Step(f"the data of {K} changes (version {world.data + 1})",
                           world._replace(data=world.data + 1, changed=True, budget=b))
            return
        for kind in self.config.kinds:
            yield self.invalidate(world, kind)

    def invalidate(self, world: World, kind: Kind) -> Step:
        if kind is Kind.KEY:
            db, n = self.run(world.db, _store.INVALIDATE_KEY, [KEYS.entry(K), lease_key(K), KEYS.index],
                             [KEYS.channel, "retry", K])
        elif kind is Kind.TAG:
            db, n = self.run(world.db, _store.INVALIDATE_TAG, [KEYS.tag_index(TAG), KEYS.index],
                             [KEYS.entry_prefix, KEYS.lease_prefix, KEYS.channel])
        else:
            db, n = self.run(world.db, _store.INVALIDATE_NAMESPACE, [KEYS.version, KEYS.index], [KEYS.channel, "all"])
        what = {Kind.KEY: f"key {K}", Kind.TAG: f"tag {TAG}", Kind.NAMESPACE: "the namespace"}[kind]
        return Step(f"the invalidation of {what} returns ({n} dropped): data version {world.data} from now on",
                    world._replace(db=db, changed=False, fresh_from=world.data))

    def other_steps(self, world: World) -> Iterator[Step]:
        b = world.budget
        if not b.others:
            return
        token = f"o.{b.others}"
        db, reply = self.run(world.db, _store.READ, [KEYS.entry(K2), KEYS.version, lease_key(K2), KEYS.tag_index(TAG)],
                             [token, LEASE_MS, int(_store.TakeMode.IF_MISSING), K2])
        if reply[3] != int(_store.LeaseState.MINE):
            return
        db, result = self.run(
            db, _store.PUT, [KEYS.entry(K2), KEYS.version, lease_key(K2), KEYS.index, KEYS.tag_index(TAG)],
            [token, header(token), payload(0), OTHER_LIFE_MS, reply[5], KEYS.channel, "ok", "retry", K2])
        yield Step(f"someone READs {K2} (lease won) and PUTs it: {_store.PutResult(int(result)).name.lower()}",
                   world._replace(db=db, budget=b._replace(others=b.others - 1)))

    def environment(self, world: World) -> Iterator[Step]:
        yield Step("tick", world._replace(db=world.db.elapse(TICK_MS, floor=0)))
        b = world.budget
        for w in world.workers:
            if b.crashes and w.phase in (Phase.READ, Phase.COMPUTE, Phase.PUT_AGAIN):
                crashed = world._replace(budget=b._replace(crashes=b.crashes - 1))
                yield Step(f"{w.name} crashes", self.put_worker(crashed, w._replace(phase=Phase.DEAD)))
            if b.replies and w.phase is Phase.READ:
                yield self.read(world._replace(budget=b._replace(replies=b.replies - 1)), w, lost=True)
            if b.replies and w.phase in (Phase.COMPUTE, Phase.PUT_AGAIN):
                yield self.put(world._replace(budget=b._replace(replies=b.replies - 1)), w, lost=True)

    # -- invariants ---------------------------------------------------------------------------------------------
    @staticmethod
    def check_start(world: World, w: Worker, before: str | None) -> tuple[Invariant, str] | None:
        if w.token in world.computations:
            return (Invariant.ONE_COMPUTATION, f"{w.name} starts a second computation with token {w.token}")
        if before is not None and before != w.token:
            return (Invariant.ONE_COMPUTATION, f"{w.name} starts computing {K} while {before} holds its lease")
        return None

    @staticmethod
    def check_live(world: World) -> tuple[Invariant, str] | None:
        entry = world.db.value(KEYS.entry(K))
        if not isinstance(entry, Hash) or entry.get("n") != (world.db.get(KEYS.version) or "0"):
            return None
        value = entry.get("v")
        if value is not None and int(value[1:]) < world.fresh_from:
            return (Invariant.FRESH, f"the live entry of {K} holds a value computed from data version {value[1:]} "
                                     f"after an invalidation that followed the change to {world.fresh_from} returned")
        return None

    @staticmethod
    def put_worker(world: World, w: Worker) -> World:
        return world._replace(workers=(*world.workers[:w.idx], w, *world.workers[w.idx + 1:]))


# -- the search -------------------------------------------------------------------------------------------------
@dataclass
class Report(search.Report[Config, Invariant]):
    depth: int = 0  # the deepest level expanded

    def summary(self) -> str:
        lines = [f"model check of the cache: {self.config.describe()}",
                 f"  {self.states} states explored, {self.depth} levels deep ({self.frontier} left at the bound), "
                 f"{self.transitions} transitions, {self.seconds:.1f} s"]
        if not self.violations:
            lines.append("  no invariant violated")
        lines.extend(v.timeline() for v in self.violations.values())
        return "\n".join(lines)


class Checker(search.Search[World, Invariant, Step]):
    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.config = config
        self.model = Model(config)

    def initial(self) -> World:
        return self.model.initial()

    def successors(self, state: World) -> list[Step]:
        return self.model.successors(state)

    def run(self) -> Report:
        start = time.monotonic()
        report = Report(self.config)
        _, report.depth = self.search(report)
        report.seconds = time.monotonic() - start
        return report
