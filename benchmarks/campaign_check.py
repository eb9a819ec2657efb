"""The fault campaign's history and its checker: pure code, no processes (the campaign itself is
:mod:`benchmarks.fault_campaign`; the unit tests feed this module made-up histories).

A round is one deploy generation: three gunicorn masters boot the reference app, one worker leads
the ``seed`` job (it sleeps ``HYPERION_DEMO_SEED_DELAY`` with the lease held, then writes under the
fence of ``job_fences``), and one fault hits while it sleeps. What the round leaves behind, and what
this module reads:

- the masters' logs (one per host): every worker's boot, the seed runs it led (the ``sleeping`` line
  names the fencing token; the ``inserted`` line is its accepted write; a failed job names its
  error), what it was told about each job (``ran here`` / ``was done by another worker``, with
  runner and token), and its end (``startup finished``, ``startup failed``, ``exiting without
  serving``, or its master's report of its exit);
- the fenced store's view: the rows of ``seed_runs`` of the generation, in commit order (one per
  accepted seed);
- the ``/startup`` reports of the workers that serve;
- the fault the campaign injected (kind, target, start, end).

:func:`check_round` and :func:`check_store_order` turn that into findings. An anomaly is a broken
property; a note is an allowed event worth counting (a second run the protocol allows:
docs/assurance.md, anomaly 3).
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

# Fault kinds, in the order the summary lists them.
SIGKILL_LEADER = "sigkill-leader"
SIGSTOP_LEADER = "sigstop-leader"
CUT_LEADER_HOST = "cut-leader-host"
FAILOVER = "failover"
RESTART_EMPTY = "restart-empty"
FAULT_KINDS = (SIGKILL_LEADER, SIGSTOP_LEADER, CUT_LEADER_HOST, FAILOVER, RESTART_EMPTY)
REDIS_FAULTS = (FAILOVER, RESTART_EMPTY)  # Redis may lose writes (the lease, the fencing counter)

# How a worker ended.
READY = "ready"
FAILED = "failed"  # startup failed with an error (a LeaseLostError, a JobFailedError, ...)
STOPPED = "stopped"  # asked to stop while waiting (its master halted): exited without serving
# no line of its own: its master stopped it while halting the host (the master says why)
HALTED = "halted"
KILLED = "killed"  # the fault's SIGKILL
ENDS = (READY, FAILED, STOPPED, HALTED, KILLED)

_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) \[(\d+)\] \[\w+\] [\w.]+: (.*)$")
_BOOT = re.compile(r"Booting worker with pid: (\d+)")
_SLEEP = re.compile(r"seed: pid (\d+) sleeping [\d.]+ s with fencing token (\d+)")
_WROTE = re.compile(r"seed: pid (\d+) inserted \d+ item\(s\) with fencing token (\d+)")
_JOB_FAILED = re.compile(r"^seed: job failed after [\d.]+ s: (\w+): (.*)")
_LOST = re.compile(r"^seed: (another worker holds the lease now|superseded)")
_SEEN = re.compile(
    r"worker pid (\d+): job '(\w+)' (ran here|was done by another worker) \(runner [^:]*:(\d+), "
    r"fencing token (\d+)"
)
_READY = re.compile(r"worker pid (\d+): startup finished; serving")
_FAILED = re.compile(r"worker pid (\d+): startup failed, this worker will exit: (\w+): (.*)")
_STOPPED = re.compile(r"worker pid (\d+): (.*); exiting without serving")
_REAPED = re.compile(r"Worker \(pid:(\d+)\) (?:was sent (\w+)!|exited with code (\d+))")
_MASTER_REASON = re.compile(r"^Reason: (.*)")


def log_time(stamp: str, millis: str) -> float:
    """A log line's time (``%(asctime)s``: local time, milliseconds) as seconds since the epoch."""
    return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000


@dataclass
class Run:
    """One leadership of the seed job, as its worker logged it."""

    host: str
    pid: int
    token: int
    started: float  # the ``sleeping`` line: the job runs with the lease held
    ended: float | None = None
    result: str = (
        "unfinished"  # "wrote", "raised" (the job raised: see error), "killed", "unfinished"
    )
    error: str = ""


@dataclass
class Worker:
    """One worker process of a round, from its boot to its end."""

    host: str
    pid: int
    booted: float
    end: str | None = None
    ended: float | None = None
    error: str = ""
    runs: list[Run] = field(default_factory=list)
    told: dict[str, tuple[bool, int, int]] = field(
        default_factory=dict
    )  # job -> (ran here, runner pid, token)
    reaped: str = ""  # what its master said about its exit


@dataclass
class HostLog:
    """What one master's log says: its workers, and the reason it gave if it shut down."""

    host: str
    workers: dict[int, Worker] = field(default_factory=dict)
    master_reason: str = ""


@dataclass(frozen=True)
class Fault:
    kind: str
    started: float
    ended: float
    target: str  # "b:1234" (a worker), "b" (a host), "redis :6380" (a node)
    target_pid: int | None = None
    target_host: str | None = None
    detail: str = ""


@dataclass(frozen=True)
class StoreWrite:
    """A row of ``seed_runs``: the fenced store accepted this seed run."""

    row: int
    generation: str
    token: int
    pid: int
    at: float


@dataclass
class Round:
    number: int
    generation: str
    started: float
    fault: Fault | None
    hosts: dict[str, HostLog]
    writes: list[StoreWrite]  # this generation's, in commit order
    reports: dict[int, dict[str, Any]]  # pid -> its /startup report
    ended: float
    bound: float  # every worker ends within this many s after the fault ended (or after its boot)
    problems: list[str] = field(
        default_factory=list
    )  # what the campaign could not do (no leader seen, ...)

    def workers(self) -> list[Worker]:
        return [w for log in self.hosts.values() for w in log.workers.values()]

    def runs(self) -> list[Run]:
        return sorted((r for w in self.workers() for r in w.runs), key=lambda r: r.started)


@dataclass(frozen=True)
class Finding:
    round: int
    rule: str
    text: str
    anomaly: bool = True


def parse_log(host: str, text: str) -> HostLog:
    """Every worker of one master's log: its boot, its seed runs, what it was told, and its end."""
    log = HostLog(host)
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            _read_line(log, log_time(m.group(1), m.group(2)), int(m.group(3)), m.group(4))
    return log


def _read_line(log: HostLog, at: float, pid: int, message: str) -> None:
    if m := _BOOT.search(message):
        log.workers[int(m.group(1))] = Worker(log.host, int(m.group(1)), at)
        return
    if m := _MASTER_REASON.match(message):
        log.master_reason = m.group(1)
        return
    if m := _REAPED.search(message):
        worker = log.workers.get(int(m.group(1)))
        if worker is not None:
            worker.reaped = f"signal {m.group(2)}" if m.group(2) else f"exit code {m.group(3)}"
        return
    worker = log.workers.get(pid)
    if worker is not None:
        _read_worker_line(worker, at, message)


def _read_worker_line(worker: Worker, at: float, message: str) -> None:
    run = worker.runs[-1] if worker.runs else None
    if m := _SLEEP.search(message):
        worker.runs.append(Run(worker.host, worker.pid, int(m.group(2)), at))
    elif (m := _WROTE.search(message)) and run is not None:
        run.ended, run.result = at, "wrote"
    elif (m := _JOB_FAILED.match(message)) and run is not None and run.result == "unfinished":
        run.ended, run.result, run.error = at, "raised", f"{m.group(1)}: {m.group(2)}"
    elif _LOST.match(message) and run is not None and run.result == "unfinished":
        run.error = run.error or message
    elif m := _SEEN.search(message):
        worker.told[m.group(2)] = (m.group(3) == "ran here", int(m.group(4)), int(m.group(5)))
    elif _READY.search(message):
        worker.end, worker.ended = READY, at
    elif m := _FAILED.search(message):
        worker.end, worker.ended, worker.error = FAILED, at, f"{m.group(2)}: {m.group(3)}"
    elif m := _STOPPED.search(message):
        worker.end, worker.ended, worker.error = STOPPED, at, m.group(2)


def settle(round_: Round, killed: Iterable[int], exited_at: dict[str, float]) -> None:
    """Fill in the ends the workers could not log: the fault's SIGKILL (at the fault's start), and a
    worker its halting master stopped without a line of its own (at the master's exit, with the
    master's reason)."""
    dead = set(killed)
    for worker in round_.workers():
        if worker.pid in dead and worker.end is None:
            worker.end = KILLED
            worker.ended = round_.fault.started if round_.fault else round_.ended
            for run in worker.runs:
                if run.result == "unfinished":
                    run.ended, run.result = worker.ended, "killed"
        log = round_.hosts[worker.host]
        if worker.end is None and worker.reaped and log.master_reason and worker.host in exited_at:
            worker.end, worker.ended = HALTED, exited_at[worker.host]
            worker.error = f"{worker.reaped}; its master: {log.master_reason}"


# -- the checks ------------------------------------------------------------------------------------


def check_round(r: Round) -> list[Finding]:
    """Every check of one round (the store's order across rounds is :func:`check_store_order`)."""
    findings = [Finding(r.number, "campaign", p) for p in r.problems]
    findings += _check_ends(r)
    findings += _check_seeds(r)
    findings += _check_agreement(r)
    findings += _check_writes_logged(r)
    return findings


def _check_ends(r: Round) -> list[Finding]:
    """bounded-end: every worker ended ready or with a clear error, within the bound."""
    out = []
    fault_end = r.fault.ended if r.fault else r.started
    for w in r.workers():
        deadline = max(fault_end, w.booted) + r.bound
        who = f"worker {w.host}:{w.pid}"
        if w.end is None:
            out.append(
                Finding(
                    r.number,
                    "bounded-end",
                    f"{who} has no end (neither ready nor an error) by the "
                    f"round's end, {r.ended - fault_end:.1f} s after the fault",
                )
            )
        elif w.ended is not None and w.ended > deadline:
            out.append(
                Finding(
                    r.number,
                    "bounded-end",
                    f"{who} ended {w.end} {w.ended - deadline + r.bound:.1f} s "
                    f"after the fault (bound {r.bound:.0f} s)",
                )
            )
        elif w.end in (FAILED, STOPPED, HALTED) and not w.error.strip():
            out.append(Finding(r.number, "bounded-end", f"{who} ended {w.end} without saying why"))
    return out


def _faulted(r: Round, pid: int, host: str) -> bool:
    """Whether the round's fault could end this leader's lease without an outcome: it hit the leader
    itself (killed, stopped, its host cut off), or Redis (a failover or a restart may lose the
    lease)."""
    f = r.fault
    if f is None:
        return False
    if f.kind in REDIS_FAULTS:
        return True
    if f.kind == CUT_LEADER_HOST:
        return f.target_host == host
    return f.target_pid == pid


def _check_seeds(r: Round) -> list[Finding]:
    """one-seed, and no overlap in the store's view: the store accepted one seed run per generation;
    a later one is allowed only after a higher token (the writes are ordered by their tokens), when
    the fault ended the earlier leader's lease without an outcome (it did not record done), and the
    earlier run is then a noted second run."""
    serving = sum(1 for w in r.workers() if w.end == READY)
    if not r.writes:
        return [
            Finding(
                r.number,
                "one-seed",
                f"the store accepted no seed in generation {r.generation} "
                f"({serving} worker(s) serving)",
            )
        ]
    out = []
    ran_here = {w.pid for w in r.workers() if w.told.get("seed", (False, 0, 0))[0]}
    hosts = {w.pid: w.host for w in r.workers()}
    for earlier, later in itertools.pairwise(r.writes):
        pair = (
            f"pid {earlier.pid} (token {earlier.token}) then pid {later.pid} (token {later.token})"
        )
        if later.token <= earlier.token:
            out.append(
                Finding(
                    r.number,
                    "fence",
                    f"the store accepted {pair}: a token not above the one before it "
                    "(two runs' writes overlap in the store's view)",
                )
            )
        elif earlier.pid in ran_here:
            out.append(
                Finding(
                    r.number,
                    "one-seed",
                    f"the store accepted {pair}, after pid {earlier.pid} recorded done",
                )
            )
        elif not _faulted(r, earlier.pid, hosts.get(earlier.pid, "?")):
            out.append(
                Finding(
                    r.number,
                    "one-seed",
                    f"the store accepted {pair}, but the fault did not hit pid "
                    f"{earlier.pid}'s lease",
                )
            )
        else:
            out.append(
                Finding(
                    r.number,
                    "second-run",
                    f"the store accepted {pair}: the fault ended pid "
                    f"{earlier.pid}'s lease before it recorded done",
                    False,
                )
            )
    return out


def _check_agreement(r: Round) -> list[Finding]:
    """agreement: every worker told about the seed names one runner and token, the store's last
    accepted write; at most one worker ran it; every /startup report says the same."""
    out = []
    told = {w.pid: w.told["seed"] for w in r.workers() if "seed" in w.told}
    ran = sorted(pid for pid, (here, _, _) in told.items() if here)
    if len(ran) > 1:
        out.append(
            Finding(r.number, "agreement", f"more than one worker says it ran the seed: {ran}")
        )
    answers = {(runner, token) for _, runner, token in told.values()}
    if r.writes and answers and answers != {(r.writes[-1].pid, r.writes[-1].token)}:
        out.append(
            Finding(
                r.number,
                "agreement",
                f"the workers were told runner/token {sorted(answers)}, the store's "
                f"last seed is pid {r.writes[-1].pid} token {r.writes[-1].token}",
            )
        )
    for pid, report in sorted(r.reports.items()):
        seed = report.get("jobs", {}).get("seed", {})
        said = (seed.get("runner_pid"), seed.get("fencing_token"), seed.get("outcome"))
        logged = told.get(pid)
        if (
            report.get("generation") != r.generation
            or logged is None
            or said != (logged[1], logged[2], "done")
        ):
            out.append(
                Finding(
                    r.number,
                    "agreement",
                    f"pid {pid}'s /startup report {said} (generation "
                    f"{report.get('generation')}) differs from its log {logged}",
                )
            )
    return out


def _check_writes_logged(r: Round) -> list[Finding]:
    """Every write a leader logged as accepted is in the store (a commit the store lost would be an
    anomaly)."""
    stored = {(w.pid, w.token) for w in r.writes}
    return [
        Finding(
            r.number,
            "store",
            f"pid {run.pid} logged its write with token {run.token}, the store has no such row",
        )
        for run in r.runs()
        if run.result == "wrote" and (run.pid, run.token) not in stored
    ]


def check_store_order(rounds: Sequence[Round], writes: Sequence[StoreWrite]) -> list[Finding]:
    """fence, across generations: every accepted seed's token is above the one before it in the
    store, except after Redis may have lost the counter (a failover or a restart since the earlier
    write's round: the counter starts again lower, and the store takes a lower token whose lease
    began after the last write, by design)."""
    number = {r.generation: r.number for r in rounds}
    lossy = {r.number for r in rounds if r.fault is not None and r.fault.kind in REDIS_FAULTS}
    out = []
    for earlier, later in itertools.pairwise(writes):
        if later.token > earlier.token or later.generation == earlier.generation:
            continue  # within a generation: check_round
        a, b = number.get(earlier.generation, -1), number.get(later.generation, -1)
        if not any(a <= n <= b for n in lossy):
            out.append(
                Finding(
                    b,
                    "fence",
                    f"token {later.token} (generation {later.generation}) came after token "
                    f"{earlier.token} (generation {earlier.generation}) with no Redis fault in "
                    "between",
                )
            )
    return out


# -- what a round looked like ----------------------------------------------------------------------


@dataclass(frozen=True)
class RoundSummary:
    leaders: int  # seed runs started
    takeover: bool  # a run started after the first one (the lease went to another worker)
    raised: dict[
        str, int
    ]  # runs whose job raised, by why: "fence" (refused by the store), "lease lost", other
    ends: dict[str, int]
    settle: float  # the last worker's end, seconds after the fault ended


def summarise(r: Round) -> RoundSummary:
    runs = r.runs()
    ends = {end: 0 for end in ENDS}
    for w in r.workers():
        ends[w.end or "none"] = ends.get(w.end or "none", 0) + 1
    fault_end = r.fault.ended if r.fault else r.started
    last = max((w.ended for w in r.workers() if w.ended is not None), default=fault_end)
    raised: dict[str, int] = {}
    for x in runs:
        if x.result == "raised":
            raised[why_raised(x.error)] = raised.get(why_raised(x.error), 0) + 1
    return RoundSummary(
        len(runs),
        len({(x.pid, x.token) for x in runs}) > 1,
        raised,
        ends,
        max(0.0, last - fault_end),
    )


def why_raised(error: str) -> str:
    """A run's error in a word: the fence refused its write, its lease was lost (its own check), or
    something else."""
    if "refusing to write" in error:
        return "fence"
    if error.startswith("LeaseLostError"):
        return "lease lost"
    return error.split(":", 1)[0] or "error"


def round_line(r: Round, findings: Sequence[Finding], total: int) -> str:
    s = summarise(r)
    f = r.fault
    fault = (
        f"{f.kind} {f.target} ({f.ended - f.started:.1f} s{', ' + f.detail if f.detail else ''})"
        if f
        else "none"
    )
    runs = (
        ", ".join(
            f"{x.host}:{x.pid} t{x.token} {x.result}"
            f"{' (' + why_raised(x.error) + ')' if x.result == 'raised' else ''}"
            for x in r.runs()
        )
        or "none"
    )
    ends = " ".join(f"{k} {v}" for k, v in s.ends.items() if v)
    anomalies = [x for x in findings if x.anomaly]
    verdict = (
        "ok" if not anomalies else "ANOMALY " + "; ".join(f"[{x.rule}] {x.text}" for x in anomalies)
    )
    notes = "".join(f" (note: {x.text})" for x in findings if not x.anomaly)
    return (
        f"round {r.number}/{total} {r.generation}: fault {fault}; runs {runs}; "
        f"store {len(r.writes)} seed(s); workers {ends}; settled {s.settle:.1f} s after the fault; "
        f"{r.ended - r.started:.0f} s; {verdict}{notes}"
    )


def rounds_from_json(data: dict[str, Any]) -> list[Round]:
    """The rounds of a history file the campaign wrote (``--history``), to check or draw them
    again."""
    rounds = []
    for r in data["rounds"]:
        hosts = {}
        for host, log in r["hosts"].items():
            workers = {
                int(pid): Worker(
                    **{
                        **w,
                        "runs": [Run(**x) for x in w["runs"]],
                        "told": {k: tuple(v) for k, v in w["told"].items()},
                    }
                )
                for pid, w in log["workers"].items()
            }
            hosts[host] = HostLog(host, workers, log["master_reason"])
        fault = Fault(**r["fault"]) if r["fault"] else None
        rounds.append(
            Round(
                **{
                    **r,
                    "fault": fault,
                    "hosts": hosts,
                    "writes": [StoreWrite(**w) for w in r["writes"]],
                    "reports": {int(pid): rep for pid, rep in r["reports"].items()},
                }
            )
        )
    return rounds
