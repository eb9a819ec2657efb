"""An explicit-state model checker of the run-once protocol (``Coordinator.run_once`` over Redis).

What is real and what is modelled:

* Each worker's decisions are the library's own :class:`~hyperion_lock.runonce.policy.WaitPolicy`, restored from a
  frozen snapshot before each step and snapshotted after it. Script arguments are built and replies parsed by the real
  :class:`~hyperion_lock.runonce.redis_backend.RedisBackend` (``probe``, ``renew``, ``finish``, ``parse_event``), whose
  Redis round trips go to :class:`ModelOps`: the Lua scripts' semantics as transcribed in ``redis_model.Scripts``
  (held to the real scripts by ``tests/integration/test_model_diff.py``).
* The shell around them (``_core._Waiter`` and ``_leadership.Leadership``) is modelled: subscribe, then probe; wait
  for a message or the policy's deadline; reconnect after a broken subscription; as leader, run a job of two writes
  to a fenced store while renewing every ``lease_ttl / 3``, then FINISH.
* The environment: a worker crashes (a gunicorn master may start a new worker in its place), pauses past its lease
  and resumes; a pub/sub message is lost; a script's reply is lost (the call retries it with the same owner token);
  a job ends done, failed or interrupted (lease handed on, nothing recorded); Redis restarts empty, or fails over
  to a replica that may lack the latest writes (an asynchronous replication step copies the primary at any moment);
  time advances by ticks of one second (lease TTL 3 s, renewal every 1 s). Live, unpaused workers are fast: time
  only advances when none of them has a step to take, so every slowness is an explicit pause.
* The job's own store keeps the highest fencing token it has seen and refuses lower ones (the reference app's
  ``seed`` job does this in PostgreSQL). A refused write makes the job raise, so that run ends ``failed``.

States are frozen tuples; exploration is breadth-first with de-duplication, so a violation comes with a shortest
trace, printed as a timeline. Time is not part of a state: every clock in it is relative to "now".

Checked in every explored state (safety):

* ``fence``: the fenced store never accepts a write of a run after it accepted a write of another run since that
  run's previous one (the runs' writes do not interleave);
* ``done-final``: no run starts once ``done`` was recorded for the generation, unless Redis lost it since;
* ``failure-final``: while a failure recorded less than ``failure_hold`` ago (by the store's clock) is kept, no run
  starts and no call returns success (every call that ends raises: that failure, an earlier one it saw, its own
  job's error, or ``LeaseLostError`` for a superseded leader);
* ``lease-owner``: a call's script never deletes or replaces a lease another call holds;
* ``single-run`` (opt-in, ``Config.single_run``): the fenced store accepts the writes of one run only. It cannot
  hold (see docs/assurance.md); the test checks what its shortest counterexample needs.

And (liveness, under fair scheduling once faults stop): from every explored state, a state in which every caller
that did not crash has returned or raised is reachable -- nobody waits for nobody.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import deque
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, NamedTuple, TypeVar

from hyperion_lock.runonce.keys import JobKeys
from hyperion_lock.runonce.model import Event, FinishResult, Holder, Lease, Outcome, Probe, RenewResult, Status
from hyperion_lock.runonce.policy import Act, Next, WaitPolicy
from hyperion_lock.runonce.redis_backend import RedisBackend
from hyperion_lock.settings import Settings

from . import search
from .redis_model import EMPTY, Db, Scripts
from .search import Violation, timeline

T = TypeVar("T")

GEN = "g1"
KEYS = JobKeys("model", "job")
TICK = 1.0  # seconds per tick
LEASE_TTL = 3.0  # ticks; renewals every LEASE_TTL / 3
FAILURE_HOLD = 5.0
RESULT_TTL = 100.0
JOB_TICKS = 1  # ticks between the job's two writes
TIME_FIELDS = frozenset({"started", "may_take_at", "_progress_at"})
INF = math.inf


# -- the environment's budget and the bound ---------------------------------------------------------------------------
class Budget(NamedTuple):
    """How many faults of each kind may still happen (each a separate choice at every step)."""

    crashes: int = 1
    respawns: int = 1
    pauses: int = 1
    losses: int = 1
    restarts: int = 0
    failovers: int = 0
    replies: int = 0  # a script ran but its reply was lost: the call retries it with the same owner token


@dataclass(frozen=True)
class Config:
    workers: int = 3
    depth: int = 30  # steps (worker steps, faults and ticks) from the initial state
    budget: Budget = field(default_factory=Budget)
    endings: tuple[str, ...] = ("done", "failed")  # how a job that was not refused may end
    scripts: Scripts = field(default_factory=Scripts)
    liveness: bool = True
    max_states: int = 3_000_000
    stop_at_first: bool = False  # end the search at the first violation (a broken rule's shortest trace)
    single_run: bool = False  # also check "the fenced store accepts the writes of one run only" (see docs)

    def describe(self) -> str:
        b = self.budget
        return (
            f"{self.workers} workers, depth {self.depth}, faults: {b.crashes} crash, {b.respawns} respawn, "
            f"{b.pauses} pause, {b.losses} lost message, {b.replies} lost reply, {b.restarts} restart empty, "
            f"{b.failovers} failover; "
            f"job endings {'/'.join(self.endings)}; lease TTL {LEASE_TTL:g} ticks, failure hold {FAILURE_HOLD:g}"
        )


# -- the state ----------------------------------------------------------------------------------------------------
class Leader(NamedTuple):
    holder: Holder
    pc: int  # 0: before the job's first write; 1: between its writes; 2: the job ended (``status``), to FINISH
    ready_in: float  # ticks until the job's next step
    renew_in: float  # ticks until the next renewal (INF once the renewer stopped)
    lost: bool  # a renewal saw another holder
    status: str  # how the job ended: done, failed, or "" (not yet)


class Worker(NamedTuple):
    name: str  # the call's owner token; a respawned worker is a new call with a new token
    idx: int
    phase: str  # new, probe, look, wait, lead, end, dead
    take: bool = False
    policy: tuple[tuple[str, Any], ...] = ()
    until: float = 0.0  # a waiter's deadline, relative to now
    inbox: tuple[Event, ...] = ()
    broken: bool = False  # its subscription broke (Redis restarted or failed over)
    paused: bool = False
    leader: Leader | None = None
    result: str = ""


class Fenced(NamedTuple):
    """The job's own store: the highest token seen, the run that wrote last, every run that wrote."""

    highest: int = 0
    last: str = ""
    writers: frozenset[str] = frozenset()


class Facts(NamedTuple):
    done: bool = False  # done was recorded for the generation and Redis did not lose it since
    failure: tuple[int, float] | None = None  # (fencing token, age in ticks) of a recorded failure within the hold


class World(NamedTuple):
    workers: tuple[Worker, ...]
    db: Db
    replica: Db | None
    fenced: Fenced
    facts: Facts
    budget: Budget


class Local(NamedTuple):
    """One worker's step, computed from its own state and the shared parts only (so it can be cached)."""

    label: str
    worker: Worker
    db: Db
    fenced: Fenced
    facts: Facts
    messages: tuple[str, ...] = ()
    violation: tuple[str, str] | None = None
    script: bool = False  # the step ran a script (whose reply may be lost)


class Step(NamedTuple):
    label: str
    world: World
    violation: tuple[str, str] | None = None  # (invariant, what happened)
    fault: bool = False  # a step of the environment other than a resume or a tick


# -- the library code, driven without an event loop --------------------------------------------------------------
def drive(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never really suspends (its I/O is the model) to its end."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("a backend call suspended: the model's operations must complete at once")


class ModelOps:
    """The backend's Redis operations, answered by the model of the scripts on one :class:`Db`."""

    sharded = False

    def __init__(self, scripts: Scripts) -> None:
        self.scripts = scripts
        self.db = EMPTY
        self.published: list[str] = []

    async def run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        self.db, reply, published = self.scripts.run(self.db, script, keys, args)
        self.published.extend(message for _, message in published)
        return reply

    async def run_and_wait(
        self, script: str, keys: list[str], args: list[Any], replicas: int, timeout_ms: int
    ) -> tuple[Any, int]:
        raise NotImplementedError("min_replicas is not modelled")

    async def load(self, script: str) -> None:
        return None

    async def subscribe(self, channel: str) -> None:
        return None

    async def get_message(self, timeout: float) -> Any:
        raise NotImplementedError("messages are delivered by the checker")

    async def close(self) -> None:
        return None


class ModelBackend(RedisBackend):
    """The real backend with a fixed holder identity (host ``h``, pid = worker index, since 0), so that equal
    situations give equal states."""

    def __init__(self, ops: ModelOps, idx: int) -> None:
        settings = Settings(generation=GEN, key_prefix=KEYS.prefix, lease_ttl=LEASE_TTL * TICK,
                            result_ttl=RESULT_TTL * TICK, failure_hold=FAILURE_HOLD * TICK, lock_dir="/nonexistent")
        super().__init__(ops, KEYS, settings, "model")
        self.idx = idx

    def _holder_template(self) -> str:
        return json.dumps({"host": "h", "pid": self.idx, "generation": GEN, "since": 0})


@lru_cache(maxsize=4096)
def parse_event(message: str) -> Event | None:
    return RedisBackend.parse_event(message)


# -- the policy as a frozen snapshot ------------------------------------------------------------------------------
def new_policy() -> WaitPolicy:
    return WaitPolicy(now=0.0, generation=GEN, grace=LEASE_TTL * TICK, failure_hold=FAILURE_HOLD * TICK,
                      progress_interval=INF)


def freeze(policy: WaitPolicy) -> tuple[tuple[str, Any], ...]:
    """Every attribute of the policy; clocks relative to now (0), a past time being the same as now for it."""
    return tuple(sorted((k, max(0.0, v) if k in TIME_FIELDS else v) for k, v in vars(policy).items()))


def thaw(snapshot: tuple[tuple[str, Any], ...]) -> WaitPolicy:
    policy = WaitPolicy.__new__(WaitPolicy)
    policy.__dict__.update(snapshot)
    return policy


@lru_cache(maxsize=65536)
def age_policy(snapshot: tuple[tuple[str, Any], ...], ticks: float) -> tuple[tuple[str, Any], ...]:
    return tuple((k, max(0.0, v - ticks) if k in TIME_FIELDS else v) for k, v in snapshot)


# -- the checker ------------------------------------------------------------------------------------------------
class Model:
    """Successor function, invariants and state rendering for one :class:`Config`."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.ops = ModelOps(config.scripts)
        self.backends = [ModelBackend(self.ops, i + 1) for i in range(config.workers)]
        self._cache: dict[tuple[Worker, Db, Fenced, Facts], tuple[Local, ...]] = {}

    def initial(self) -> World:
        # The workers of one start subscribe at once (a slow starter is a respawned worker: it subscribes, then
        # probes, as steps of their own).
        first = new_policy()
        start = first.start()
        workers = tuple(Worker(name=f"w{i + 1}", idx=i, phase="probe", take=start.take, policy=freeze(first))
                        for i in range(self.config.workers))
        replica = EMPTY if self.config.budget.failovers else None
        return World(workers, EMPTY, replica, Fenced(), Facts(), self.config.budget)

    # -- successors ---------------------------------------------------------------------------------------------
    def successors(self, world: World, faults: bool = True) -> list[Step]:
        """Every step from ``world``; without ``faults``, only the workers' steps, resumes, and ticks. The first
        step that is not a fault is the same either way (the liveness check's greedy schedule follows it)."""
        steps: list[Step] = []
        for worker in world.workers:
            steps.extend(self.worker_steps(world, worker))
        urgent = bool(steps)
        steps.extend(self.resumes(world))
        if faults:
            steps.extend(self.fault_steps(world))
        if not urgent:
            steps.extend(self.tick(world))
        return steps

    def tick(self, world: World) -> list[Step]:
        if all(w.phase in ("end", "dead") for w in world.workers):
            return []
        workers = tuple(self.age_worker(w) for w in world.workers)
        facts = world.facts
        if facts.failure is not None:
            token, age = facts.failure
            facts = facts._replace(failure=(token, age + 1) if age + 1 < FAILURE_HOLD else None)
        ms = int(TICK * 1000)
        replica = world.replica.elapse(ms) if world.replica is not None else None
        new = world._replace(workers=workers, db=world.db.elapse(ms), replica=replica, facts=facts)
        return [Step("tick: one second passes", new)]

    @staticmethod
    @lru_cache(maxsize=65536)
    def age_worker(w: Worker) -> Worker:
        if w.phase in ("end", "dead", "new"):
            return w
        leader = w.leader
        if leader is not None:
            leader = leader._replace(ready_in=max(0.0, leader.ready_in - 1), renew_in=max(0.0, leader.renew_in - 1))
        return w._replace(policy=age_policy(w.policy, 1), until=max(0.0, w.until - 1), leader=leader)

    def worker_steps(self, world: World, w: Worker) -> list[Step]:
        return [Step(s.label, self.apply(world, s), s.violation) for s in self.local(world, w)]

    def local(self, world: World, w: Worker) -> tuple[Local, ...]:
        if w.paused or w.phase in ("end", "dead"):
            return ()
        key = (w, world.db, world.fenced, world.facts)
        local = self._cache.get(key)
        if local is None:
            start = Local("", w, world.db, world.fenced, world.facts)
            local = self._cache[key] = tuple(self.check_lease(start, s) for s in self.local_steps(start))
        return local

    def apply(self, world: World, local: Local) -> World:
        i = local.worker.idx
        workers = (*world.workers[:i], local.worker, *world.workers[i + 1:])
        new = World(workers, local.db, world.replica, local.fenced, local.facts, world.budget)
        return self.publish(new, local.messages) if local.messages else new

    def local_steps(self, s: Local) -> list[Local]:
        """What a worker can do next, from its own state and the shared store (and the facts the checks use)."""
        w = s.worker
        if w.phase == "new":
            return [self.subscribe(s)]
        if w.phase in ("probe", "look"):
            return [self.script_step(s)]
        if w.phase == "wait":
            return self.wait_step(s)
        return self.leader_steps(s)

    def subscribe(self, s: Local) -> Local:
        w = s.worker
        nxt = new_policy()
        first = nxt.start()
        return s._replace(label=f"{w.name} subscribes to the job's channel",
                          worker=w._replace(phase="probe", take=first.take, policy=freeze(nxt)))

    def script_step(self, s: Local) -> Local:
        w = s.worker
        policy, backend = thaw(w.policy), self.backends[w.idx]
        self.ops.db, self.ops.published = s.db, []
        if w.phase == "probe":
            probe = drive(backend.probe(w.name, take=w.take, seen_fence=policy.seen_fence))
            nxt = policy.on_probe(0.0, probe)
            what = f"probes{' to take' if w.take else ''} ({seen(probe)})"
        else:
            probe = drive(backend.probe(w.name, take=False, with_counter=True))
            nxt = policy.on_look(0.0, probe, 0.0)
            what = f"looks ({seen(probe)}, counter {probe.fence_counter})"
        return self.settle(s._replace(db=self.ops.db, script=True), policy, nxt, what)

    def wait_step(self, s: Local) -> list[Local]:
        w = s.worker
        policy = thaw(w.policy)
        if w.inbox:
            event = w.inbox[0]
            nxt = policy.on_event(0.0, event)
            s = s._replace(worker=w._replace(inbox=w.inbox[1:]))
            return [self.settle(s, policy, nxt, f"receives {describe_event(event)}")]
        if w.broken:
            nxt = policy.on_reconnect(0.0)
            s = s._replace(worker=w._replace(broken=False))
            return [self.settle(s, policy, nxt, "resubscribes after the broken connection")]
        if w.until <= 0:
            nxt = policy.on_event(0.0, None)
            return [self.settle(s, policy, nxt, "wakes at its deadline")]
        return []

    def settle(self, s: Local, policy: WaitPolicy, nxt: Next, what: str) -> Local:
        """Apply the policy's next action to the worker; check the invariants of a run start and of a call's end."""
        w = s.worker
        label = f"{w.name} {what} -> {nxt.act.value}"
        if nxt.act in (Act.PROBE, Act.LOOK):
            phase = "probe" if nxt.act is Act.PROBE else "look"
            return s._replace(label=label, worker=w._replace(phase=phase, take=nxt.take, policy=freeze(policy)))
        if nxt.act is Act.WAIT:
            return s._replace(label=label, worker=w._replace(phase="wait", until=max(0.0, nxt.until),
                                                             policy=freeze(policy)))
        if nxt.act is Act.LEAD:
            assert nxt.holder is not None
            label = f"{w.name} {what} -> leads with fencing token {nxt.holder.fencing_token}"
            leader = Leader(nxt.holder, pc=0, ready_in=0.0, renew_in=1.0, lost=False, status="")
            return s._replace(label=label, worker=w._replace(phase="lead", policy=(), inbox=(), leader=leader),
                              violation=self.check_start(s.facts, w))
        assert nxt.outcome is not None, nxt
        status = "done" if nxt.act is Act.RETURN else "failed"
        result = f"{status}@{nxt.outcome.fencing_token}"
        says = "returns done" if status == "done" else "raises JobFailedError"
        label = f"{w.name} {what} -> {says} (fencing token {nxt.outcome.fencing_token})"
        return s._replace(label=label, worker=w._replace(phase="end", policy=(), inbox=(), result=result),
                          violation=self.check_end(s.facts, w, result))

    # -- the leader ---------------------------------------------------------------------------------------------
    def leader_steps(self, s: Local) -> list[Local]:
        leader = s.worker.leader
        assert leader is not None
        steps: list[Local] = []
        if leader.pc < 2 and leader.renew_in <= 0:
            steps.append(self.renew(s, leader))
        if leader.pc == 0 or (leader.pc == 1 and leader.ready_in <= 0):
            steps.extend(self.write(s, leader))
        elif leader.pc == 2:
            steps.append(self.finish(s, leader))
        return steps

    def lease(self, w: Worker, leader: Leader) -> Lease:
        return Lease(key=KEYS.key, generation=GEN, token=w.name, holder=leader.holder)

    def renew(self, s: Local, leader: Leader) -> Local:
        w = s.worker
        self.ops.db, self.ops.published = s.db, []
        result = drive(self.backends[w.idx].renew(self.lease(w, leader)))
        if result is RenewResult.LOST:
            leader = leader._replace(lost=True, renew_in=INF)
        else:
            leader = leader._replace(renew_in=1.0)
        return s._replace(label=f"{w.name} renews its lease: {result.name.lower()}", db=self.ops.db, script=True,
                          messages=tuple(self.ops.published), worker=w._replace(leader=leader))

    def write(self, s: Local, leader: Leader) -> list[Local]:
        """One write of the job to the fenced store; after the second, the job ends (one step per ending)."""
        w = s.worker
        token, fenced, run = leader.holder.fencing_token, s.fenced, w.name
        nth = "first" if leader.pc == 0 else "second"
        if token < fenced.highest:
            label = f"{run}'s job: {nth} write with token {token} refused (store has {fenced.highest}); the job raises"
            return [s._replace(label=label, worker=w._replace(leader=leader._replace(pc=2, status="failed")))]
        violation = None
        if run in fenced.writers and fenced.last != run:
            violation = ("fence", f"the fenced store accepted a write of {run} (token {token}) after a write of "
                                  f"{fenced.last}, which came after {run}'s previous write")
        elif self.config.single_run and fenced.writers - {run}:
            violation = ("single-run", f"the fenced store accepted a write of {run} (token {token}) after writes of "
                                       f"{', '.join(sorted(fenced.writers - {run}))}: a second run of the job")
        s = s._replace(fenced=Fenced(token, run, fenced.writers | {run}), violation=violation)
        label = f"{run}'s job: {nth} write with token {token} accepted"
        if leader.pc == 0:
            return [s._replace(label=label, worker=w._replace(leader=leader._replace(pc=1, ready_in=float(JOB_TICKS))))]
        return [s._replace(label=f"{label}; the job ends {ending}",
                           worker=w._replace(leader=leader._replace(pc=2, status=ending)))
                for ending in self.config.endings]

    def finish(self, s: Local, leader: Leader) -> Local:
        w = s.worker
        token = leader.holder.fencing_token
        failed = leader.status == "failed"
        outcome = None if leader.status == "interrupted" else Outcome(
            key=KEYS.key, generation=GEN, status=Status(leader.status), fencing_token=token, runner_host="h",
            runner_pid=w.idx + 1, started_at=0.0, finished_at=0.0, error_type="RuntimeError" if failed else None,
            error_message="boom" if failed else None)
        self.ops.db, self.ops.published = s.db, []
        reply = drive(self.backends[w.idx].finish(self.lease(w, leader), outcome))
        facts = self.note_outcome(s.facts, s.db, self.ops.db)
        if outcome is None:
            result = "interrupted"
        else:
            result = "lost" if reply is FinishResult.SUPERSEDED else f"ran {leader.status}@{token}"
        says = {"lost": "raises LeaseLostError", f"ran done@{token}": "returns done (ran here)",
                "interrupted": "hands the lease on, re-raises"}.get(result, "re-raises the job's error")
        return s._replace(label=f"{w.name} finishes ({leader.status}): {reply.name.lower()} -> {says}",
                          db=self.ops.db, messages=tuple(self.ops.published), facts=facts, script=True,
                          worker=w._replace(phase="end", leader=None, result=result),
                          violation=self.check_end(s.facts, w, result))

    @staticmethod
    def note_outcome(facts: Facts, before: Db, after: Db) -> Facts:
        """Remember a newly recorded done or failure (the failure's age counts in ticks from now)."""
        old, new = before.get(KEYS.outcome(GEN)), after.get(KEYS.outcome(GEN))
        if new is None or new == old:
            return facts
        data = json.loads(new)
        if data["status"] == "done":
            return facts._replace(done=True)
        if data["status"] == "failed":
            return facts._replace(failure=(int(data["fencing_token"]), 0.0))
        return facts

    # -- invariants ---------------------------------------------------------------------------------------------
    @staticmethod
    def check_lease(before: Local, after: Local) -> Local:
        """``lease-owner``: a call's scripts never delete or replace a lease that another call holds (only its
        expiry or Redis losing it may end it)."""
        old = before.db.get(KEYS.lease)
        if old is None or after.violation is not None or after.db.get(KEYS.lease) == old:
            return after
        owner = json.loads(old).get("token")
        if owner == before.worker.name:
            return after
        return after._replace(violation=("lease-owner", f"{before.worker.name}'s step removed or replaced the lease "
                                                        f"that {owner} holds"))

    @staticmethod
    def check_start(facts: Facts, w: Worker) -> tuple[str, str] | None:
        if facts.done:
            return ("done-final", f"{w.name} starts a run although done was recorded and not lost since")
        if facts.failure is not None:
            token, age = facts.failure
            return ("failure-final", f"{w.name} starts a run {age:g} s after a failure (fencing token {token}) "
                                     f"was recorded, within the failure hold ({FAILURE_HOLD:g} s)")
        return None

    @staticmethod
    def check_end(facts: Facts, w: Worker, result: str) -> tuple[str, str] | None:
        failure = facts.failure
        if failure is None:
            return None
        if not result.startswith(("done", "ran done")):
            return None  # it raised: this failure, an earlier one it saw within that one's hold, or LeaseLostError
        token, age = failure
        return ("failure-final", f"{w.name}'s call ends '{result}' while the failure of fencing token {token} "
                                 f"recorded {age:g} s ago is held")

    # -- the environment ----------------------------------------------------------------------------------------
    def resumes(self, world: World) -> list[Step]:
        return [Step(f"{w.name} resumes", self.put(world, w._replace(paused=False)))
                for w in world.workers if w.paused]

    def fault_steps(self, world: World) -> list[Step]:
        steps: list[Step] = []
        b = world.budget
        for w in world.workers:
            steps.extend(self.worker_faults(world, w, b))
        if b.replies:
            steps.extend(self.lost_replies(world, b._replace(replies=b.replies - 1)))
        if b.restarts:
            steps.append(self.lose_data(world, EMPTY, "Redis restarts empty", b._replace(restarts=b.restarts - 1)))
        if b.failovers and world.replica is not None and world.replica != world.db:
            steps.append(Step("the replica copies the primary", world._replace(replica=world.db)))
            steps.append(self.lose_data(world, world.replica, "Redis fails over to a replica missing the last "
                                        "writes", b._replace(failovers=b.failovers - 1)))
        return [step._replace(fault=True) for step in steps]

    def worker_faults(self, world: World, w: Worker, b: Budget) -> Iterator[Step]:
        if w.phase == "dead" and b.respawns:
            fresh = Worker(name=w.name + "'", idx=w.idx, phase="new")
            yield Step(f"{fresh.name} starts in place of the dead {w.name}",
                       self.put(world._replace(budget=b._replace(respawns=b.respawns - 1)), fresh))
        if w.phase in ("end", "dead"):
            return
        if b.crashes:
            yield Step(f"{w.name} crashes", self.put(world._replace(budget=b._replace(crashes=b.crashes - 1)),
                                                     Worker(name=w.name, idx=w.idx, phase="dead")))
        if b.pauses and not w.paused:
            yield Step(f"{w.name} pauses", self.put(world._replace(budget=b._replace(pauses=b.pauses - 1)),
                                                    w._replace(paused=True)))
        if b.losses and w.inbox:
            yield Step(f"the message '{describe_event(w.inbox[0])}' to {w.name} is lost",
                       self.put(world._replace(budget=b._replace(losses=b.losses - 1)), w._replace(inbox=w.inbox[1:])))

    def lost_replies(self, world: World, budget: Budget) -> Iterator[Step]:
        """A script ran (its writes and messages happened) but the caller never got the reply: it retries."""
        for w in world.workers:
            for s in self.local(world, w):
                if s.script:
                    kept = s.violation if s.violation is not None and s.violation[0] == "lease-owner" else None
                    after = self.apply(world, s._replace(worker=w))
                    yield Step(f"{s.label.split(' -> ')[0]}, but the reply is lost", after._replace(budget=budget),
                               kept)

    def lose_data(self, world: World, db: Db, label: str, budget: Budget) -> Step:
        workers = tuple(w._replace(broken=True, inbox=()) if w.phase in ("probe", "look", "wait") else w
                        for w in world.workers)
        facts = world.facts
        outcome = db.get(KEYS.outcome(GEN))
        if facts.done and (outcome is None or json.loads(outcome)["status"] != "done"):
            facts = facts._replace(done=False)
        if facts.failure is not None and (outcome is None or
                                          int(json.loads(outcome)["fencing_token"]) != facts.failure[0]):
            facts = facts._replace(failure=None)
        replica = db if world.replica is not None else None
        return Step(label, world._replace(workers=workers, db=db, replica=replica, facts=facts, budget=budget))

    # -- helpers ------------------------------------------------------------------------------------------------
    @staticmethod
    def put(world: World, w: Worker) -> World:
        workers = (*world.workers[:w.idx], w, *world.workers[w.idx + 1:])
        return World(workers, world.db, world.replica, world.fenced, world.facts, world.budget)

    @staticmethod
    def publish(world: World, messages: Sequence[str]) -> World:
        """Deliver messages to every subscribed waiter (consecutive equal messages count once)."""
        if not messages:
            return world
        events = [e for e in (parse_event(m) for m in messages) if e is not None]
        workers = []
        for w in world.workers:
            if w.phase in ("probe", "look", "wait") and not w.broken:
                inbox = w.inbox
                for event in events:
                    if not inbox or inbox[-1] != event:
                        inbox = (*inbox, event)
                workers.append(w._replace(inbox=inbox))
            else:
                workers.append(w)
        return world._replace(workers=tuple(workers))

    @staticmethod
    def finished(world: World) -> bool:
        return all(w.phase in ("end", "dead") for w in world.workers)


def seen(probe: Probe) -> str:
    parts = []
    if probe.outcome is not None:
        parts.append(f"outcome {probe.outcome.status} of token {probe.outcome.fencing_token}")
    if probe.holder is not None:
        parts.append(f"lease of token {probe.holder.fencing_token}{' (ours)' if probe.acquired else ''}")
    return ", ".join(parts) or "nothing"


def describe_event(event: Event) -> str:
    if event.outcome is not None:
        return f"{event.status} (token {event.outcome.fencing_token})"
    if event.holder is not None:
        return f"{event.status} (token {event.holder.fencing_token})"
    return str(event.status)


# -- the search -------------------------------------------------------------------------------------------------
@dataclass
class Report(search.Report[Config, str]):
    terminal: int = 0  # explored states in which every caller that did not crash has ended
    liveness_checked: int = 0

    def summary(self) -> str:
        lines = [
            f"model check of run-once: {self.config.describe()}",
            f"  {self.states} states explored ({self.frontier} at the depth bound), {self.transitions} transitions, "
            f"{self.terminal} final states, liveness checked from {self.liveness_checked} states, "
            f"{self.seconds:.1f} s",
        ]
        if not self.violations:
            lines.append("  no invariant violated")
        for v in self.violations.values():
            lines.append(v.timeline())
        return "\n".join(lines)


class Checker(search.Search[World, str, Step]):
    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.config = config
        self.model = Model(config)
        self.next_free: dict[World, World] = {}  # the greedy schedule's step from each expanded state

    def initial(self) -> World:
        return self.model.initial()

    def successors(self, state: World) -> list[Step]:
        return self.model.successors(state)

    def explored(self, state: World, steps: Sequence[Step]) -> None:
        free = next((step for step in steps if not step.fault), None)
        if free is not None and free.violation is None:
            self.next_free[state] = free.world

    def run(self) -> Report:
        start = time.monotonic()
        report = Report(self.config)
        parent, _ = self.search(report)
        report.terminal = sum(1 for s in parent if Model.finished(s))
        if self.config.liveness and not (report.violations and self.config.stop_at_first):
            self.check_liveness(list(parent), parent, report)
        report.seconds = time.monotonic() - start
        return report

    # -- liveness -----------------------------------------------------------------------------------------------
    def check_liveness(self, states: list[World], parent: dict[World, tuple[World, str] | None],
                       report: Report) -> None:
        """From every explored state, with no more faults (paused workers resume), some schedule ends every call.
        Deepest states first, so that a greedy run soon meets a state already shown good."""
        good: set[World] = set()
        for world in reversed(states):
            report.liveness_checked += 1
            if world in good or Model.finished(world) or self.next_free.get(world) in good:
                good.add(world)
                continue
            stuck = self.greedy(world, good)
            if stuck is None:
                continue
            if not self.some_end(world):
                labels = [*self.path(world, parent), *stuck]
                report.violations.setdefault("liveness", Violation(
                    "liveness", "from the last state below, no schedule without faults ends every call "
                    "(the greedy continuation shown after '--')", timeline([*labels[:-len(stuck)], "--", *stuck])))
                return

    def greedy(self, world: World, good: set[World], limit: int = 400) -> list[str] | None:
        """Follow the first possible step; None when every call ended (all states passed are good), else the
        steps taken (up to the first repeated state: a cycle in which nobody ends)."""
        passed, labels = [world], list[str]()
        visited = {world}
        for _ in range(limit):
            if world in good or Model.finished(world):
                good.update(passed)
                return None
            steps = self.model.successors(world, faults=False)
            if not steps:
                return [*labels, "(no step possible: every caller waits for nobody)"]
            world = steps[0].world
            labels.append(steps[0].label)
            if world in visited:
                return [*labels, "(back to an earlier state: this repeats forever)"]
            visited.add(world)
            passed.append(world)
        return [*labels, f"(still not ended after {limit} steps)"]

    def some_end(self, world: World, limit: int = 200_000) -> bool:
        """Breadth-first, without faults: is a state where every call ended reachable at all?"""
        seen_states, queue = {world}, deque([world])
        while queue and len(seen_states) < limit:
            w = queue.popleft()
            if Model.finished(w):
                return True
            for step in self.model.successors(w, faults=False):
                if step.world not in seen_states:
                    seen_states.add(step.world)
                    queue.append(step.world)
        return False


def bound_from_env(default: int) -> int:
    """``default`` plus ``HYPERION_LOCK_MODEL_EXTRA_DEPTH`` (0 when unset): a larger bound explores more, for a run
    outside the suite."""
    extra = os.environ.get("HYPERION_LOCK_MODEL_EXTRA_DEPTH", "").strip()
    return default + (int(extra) if extra else 0)
