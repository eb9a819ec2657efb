"""Fault campaign on real processes: many deploy generations of the reference app, a fault in each,
every worker's history checked.

    python3 -m benchmarks.fault_campaign --rounds 100 --seed 1 --time-limit 3600 [--timeline x.png]
    python3 -m benchmarks.fault_campaign --short   # one round of each fault kind (.ci/run), ~1 min

Root only (network namespaces). Not part of the test run: it takes minutes, and its figures go to
docs/assurance.md.

The deployment (built once; loopback and namespaces only). Its plumbing is the e2e tests' own,
imported from tests/support/netns.py rather than copied: the campaign and tests/e2e/test_hosts.py
build the same deployment, and both run from a checkout (neither is in the wheel), so one copy is
kept where the tests already maintain it.

- three "hosts" ``a``, ``b``, ``c``: network namespaces on a bridge, each running ``gunicorn -c
  gunicorn.conf.py`` with ``--workers`` workers (default 2) of the reference app (demo/);
- in the "server" namespace: Redis with Sentinel (a primary, a replica, three Sentinels; the app
  connects with ``redis+sentinel://``) and PostgreSQL, the ``seed`` job's fenced store
  (``job_fences`` keeps the highest fencing token and refuses a lower one, ``seed_runs`` gets one
  row per accepted run).

A round (a new ``HYPERION_LOCK_GENERATION``, so the jobs run again):

1. the three masters start together; their workers race for ``migrate`` (a no-op after the first
   round) and ``seed``, whose leader sleeps ``HYPERION_DEMO_SEED_DELAY`` (3 s) with the lease held
   (2 s TTL) and logs that it does, with its pid and fencing token: that is how the campaign finds
   the leader;
2. at a random moment of that sleep, one fault (the kinds in turn, in a random order per block of
   five): the leader SIGKILLed; the leader SIGSTOPped for 1 to 6 s, then continued; the leader's
   host cut off (its bridge port down) for 1 to 6 s; the Sentinel primary SIGKILLed (the replica is
   promoted; the old node comes back as its replica); the primary SIGKILLed and restarted at once,
   empty (the replica resyncs: Redis loses everything);
3. the round ends when every host is settled (all its workers serve, or its master exited) or after
   the bound; then the logs, the ``/startup`` reports of the serving workers and the store's rows
   are collected, the masters stopped, and Redis checked (one primary, its replica in sync, every
   Sentinel agreeing) before the next round.

The checker (:mod:`benchmarks.campaign_check`) verifies that the store accepted one seed per
generation (a second run only after a higher token, and only when the fault ended the first leader's
lease before it recorded done), that accepted tokens only grow in the store's order (across
generations too, unless Redis lost the counter), that every worker was told the runner and token the
store holds, and that every worker ended ready or with a clear error within the bound. A line per
round, then a summary; exit status 1 on an anomaly, 2 when the campaign could not run. Every
process, link cut and namespace is undone on exit, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType
from typing import Any

from benchmarks.campaign_check import (
    CUT_LEADER_HOST,
    FAILOVER,
    FAULT_KINDS,
    RESTART_EMPTY,
    SIGKILL_LEADER,
    SIGSTOP_LEADER,
    Fault,
    Finding,
    HostLog,
    Round,
    Run,
    StoreWrite,
    check_round,
    check_store_order,
    parse_log,
    round_line,
    rounds_from_json,
    settle,
    summarise,
)
from tests.support.netns import (
    HostGunicorn,
    NetnsPostgres,
    NetnsSentinelSet,
    Network,
    netns_unavailable,
)

HOSTS = ("a", "b", "c")
LEASE_TTL = 2.0  # seconds
SEED_DELAY = 3.0  # the seed job's sleep with the lease held
HOLD = (
    0.5,
    3.0,
)  # a SIGSTOP or a link cut lasts this many lease TTLs (from, to): often past the lease, not always
BOUND = 60.0  # every worker ends within this many seconds after the fault ended
LEADER_WAIT = (
    120.0  # the masters boot and a leader starts the seed within this (a loaded machine: generous)
)
FAILOVER_WAIT = 30.0
REDIS_SETTLE = 30.0
FIRST_ESTIMATE = 60.0  # a round's length before one was measured (for the time limit)


class CampaignError(Exception):
    """The campaign itself could not go on (a server would not start, Redis would not settle): exit
    status 2."""


def schedule(rounds: int, rng: random.Random, faults: Sequence[str] = FAULT_KINDS) -> list[str]:
    """The fault of each round: every kind once per block, in a random order within the block."""
    kinds: list[str] = []
    while len(kinds) < rounds:
        block = list(faults)
        rng.shuffle(block)
        kinds += block
    return kinds[:rounds]


class Deployment:
    """The network, Redis with Sentinel and PostgreSQL (once), and a round's three gunicorn masters.

    Everything it starts or changes is recorded as it happens (stopped pids, cut hosts, masters), so
    that :meth:`close` can undo it from any point: SIGCONT first (a stopped process cannot act on a
    signal), links back up, the masters' sessions stopped, then the servers and the namespaces.
    """

    def __init__(self, workdir: Path, workers: int) -> None:
        reason = netns_unavailable()
        if reason:
            raise CampaignError(reason)
        self.workdir = workdir
        self.workers = workers
        self.net = Network(HOSTS)
        self.redis = NetnsSentinelSet(self.net)
        self.db = NetnsPostgres(self.net)
        self.masters: dict[str, HostGunicorn] = {}
        self.stopped: set[int] = set()
        self.cut: set[str] = set()
        self._started: list[str] = []

    def open(self) -> None:
        try:
            self.net.setup()
            self._started.append("net")
            self._started.append("redis")
            self.redis.start()
            self._started.append("db")
            self.db.start()
        except (AssertionError, OSError, RuntimeError, TimeoutError) as exc:
            raise CampaignError(f"could not build the deployment: {exc}") from exc

    def close(self) -> None:
        for pid in list(self.stopped):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGCONT)
        self.stopped.clear()
        for host in list(self.cut):
            with contextlib.suppress(AssertionError):
                self.net.restore(host)
        self.cut.clear()
        self.stop_masters()
        if "db" in self._started:
            with contextlib.suppress(Exception):
                self.db.stop()
        if "redis" in self._started:
            with contextlib.suppress(Exception):
                self.redis.stop()
        if "net" in self._started:
            self.net.teardown()
        self._started.clear()

    # -- a round's masters -------------------------------------------------------------------------
    def start_masters(self, directory: Path, generation: str, rng: random.Random) -> None:
        env = {
            "DATABASE_URL": self.db.url,
            "HYPERION_LOCK_REDIS_URL": self.redis.url(),
            "HYPERION_LOCK_GENERATION": generation,
            "HYPERION_LOCK_LEASE_TTL": str(LEASE_TTL),
            "HYPERION_DEMO_SEED_DELAY": str(SEED_DELAY),
        }
        order = list(HOSTS)
        rng.shuffle(order)
        for host in order:
            g = HostGunicorn(self.net, host, directory, self.workers, **env)
            g.env["PROMETHEUS_MULTIPROC_DIR"] = str(directory / f"host-{host}" / "metrics")
            self.masters[host] = g
            g.start()

    def stop_masters(self) -> None:
        masters, self.masters = list(self.masters.values()), {}
        if masters:
            with ThreadPoolExecutor(len(masters)) as pool:
                list(pool.map(lambda g: g.stop(), masters))

    def logs(self) -> dict[str, HostLog]:
        return {host: parse_log(host, g.log()) for host, g in self.masters.items()}

    def exited(self) -> dict[str, float]:
        """Hosts whose master has exited, with the time it was seen."""
        now = time.time()
        return {
            host: now
            for host, g in self.masters.items()
            if g.proc is not None and g.proc.poll() is not None
        }

    # -- Redis -------------------------------------------------------------------------------------
    def settle_redis(self) -> None:
        """Wait (bounded) for one primary, its replica in sync and every Sentinel agreeing; restart
        a node that is down as the primary's replica once; CampaignError if Redis still does not
        settle."""
        for attempt in (1, 2):
            deadline = time.monotonic() + REDIS_SETTLE
            while time.monotonic() < deadline:
                if self.redis.healthy():
                    return
                time.sleep(0.2)
            if attempt == 1:
                with contextlib.suppress(Exception):
                    primary = self.redis.primary_port()
                    for node in self.redis.nodes:
                        if not node.running:
                            self.redis.start_node(node, replica_of=primary)
        raise CampaignError(f"Redis did not settle within {2 * REDIS_SETTLE:.0f} s")


class Campaign:
    def __init__(self, deployment: Deployment, rng: random.Random, seed: int) -> None:
        self.d = deployment
        self.rng = rng
        self.seed = seed

    def round(self, number: int, kind: str) -> Round:
        """One generation with one fault; every wait is bounded."""
        generation = f"campaign-{self.seed}-{number:03d}"
        directory = self.d.workdir / f"round-{number:03d}"
        directory.mkdir()
        started = time.time()
        problems: list[str] = []
        fault: Fault | None = None
        killed: set[int] = set()
        self.d.start_masters(directory, generation, self.rng)
        try:
            leader = self._wait_leader()
            if leader is None:
                problems.append(f"no worker started the seed within {LEADER_WAIT:.0f} s")
            else:
                time.sleep(self.rng.uniform(0, SEED_DELAY / 2))  # a random moment of the job
                fault = self._inject(kind, leader, killed, problems)
            settled_by = (fault.ended if fault else time.time()) + BOUND + 15
            self._wait_settled(settled_by, killed)
            logs, exited = self.d.logs(), self.d.exited()
            reports = self._reports(logs, killed, problems)
        finally:
            self.d.stop_masters()
        writes = self._writes(f"WHERE generation = '{generation}'")
        r = Round(
            number, generation, started, fault, logs, writes, reports, time.time(), BOUND, problems
        )
        settle(r, killed, exited)
        self.d.settle_redis()
        return r

    def _wait_leader(self) -> Run | None:
        deadline = time.monotonic() + LEADER_WAIT
        while time.monotonic() < deadline:
            runs = sorted(
                (
                    run
                    for log in self.d.logs().values()
                    for w in log.workers.values()
                    for run in w.runs
                ),
                key=lambda run: run.started,
            )
            if runs:
                return runs[0]
            if len(self.d.exited()) == len(HOSTS):
                return None
            time.sleep(0.05)
        return None

    def _inject(self, kind: str, leader: Run, killed: set[int], problems: list[str]) -> Fault:
        host, pid, who = leader.host, leader.pid, f"{leader.host}:{leader.pid}"
        hold = self.rng.uniform(*HOLD) * LEASE_TTL
        started = time.time()
        try:
            if kind == SIGKILL_LEADER:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
                return Fault(kind, started, time.time(), who, pid, host, f"token {leader.token}")
            if kind == SIGSTOP_LEADER:
                with self._stopped(pid):
                    time.sleep(hold)
                return Fault(
                    kind, started, time.time(), who, pid, host, f"token {leader.token}, continued"
                )
            if kind == CUT_LEADER_HOST:
                with self._cut(host):
                    time.sleep(hold)
                return Fault(
                    kind,
                    started,
                    time.time(),
                    host,
                    None,
                    host,
                    f"leader {who} token {leader.token}",
                )
        except ProcessLookupError:
            problems.append(f"the leader {who} was gone before the fault")
            return Fault(kind, started, time.time(), who, pid, host, "missed")
        return self._redis_fault(kind)

    def _redis_fault(self, kind: str) -> Fault:
        redis = self.d.redis
        started = time.time()
        if kind == FAILOVER:
            old = redis.kill_primary()
            try:
                new = redis.wait_failover(old.port, FAILOVER_WAIT)
            except TimeoutError as exc:
                raise CampaignError(f"no failover after the primary was killed: {exc}") from exc
            promoted = time.time()
            redis.start_node(old, replica_of=new)
            return Fault(kind, started, promoted, f"redis :{old.port}", detail=f":{new} promoted")
        assert kind == RESTART_EMPTY, kind
        port = redis.primary_port()
        node = redis.node_at(port)
        node.kill()
        redis.start_node(node)
        return Fault(kind, started, time.time(), f"redis :{port}", detail="restarted empty")

    @contextlib.contextmanager
    def _stopped(self, pid: int) -> Iterator[None]:
        os.kill(pid, signal.SIGSTOP)
        self.d.stopped.add(pid)
        try:
            yield
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
            self.d.stopped.discard(pid)

    @contextlib.contextmanager
    def _cut(self, host: str) -> Iterator[None]:
        self.d.net.cut(host)
        self.d.cut.add(host)
        try:
            yield
        finally:
            self.d.net.restore(host)
            self.d.cut.discard(host)

    def _wait_settled(self, deadline: float, killed: set[int]) -> None:
        """Until every host is settled: its master exited, or it runs its full count of workers, all
        serving, and every worker it booted has ended."""
        while time.time() < deadline:
            exited = self.d.exited()
            if all(
                host in exited or self._serving(log, killed) for host, log in self.d.logs().items()
            ):
                return
            time.sleep(0.1)

    def _serving(self, log: HostLog, killed: set[int]) -> bool:
        alive = [w for w in log.workers.values() if not w.reaped and w.pid not in killed]
        ended = all(w.end is not None or w.reaped or w.pid in killed for w in log.workers.values())
        return ended and len(alive) >= self.d.workers and all(w.end == "ready" for w in alive)

    def _reports(
        self, logs: dict[str, HostLog], killed: set[int], problems: list[str]
    ) -> dict[int, Any]:
        """The /startup reports of the serving workers of every host whose master still runs."""
        reports: dict[int, Any] = {}
        exited = self.d.exited()
        for host, log in logs.items():
            serving = [
                w
                for w in log.workers.values()
                if w.end == "ready" and not w.reaped and w.pid not in killed
            ]
            if host in exited or not serving:
                continue
            try:
                got = self.d.masters[host].startup_reports(
                    len(serving), timeout=30, max_requests=400
                )
            except AssertionError as exc:
                problems.append(
                    f"host {host}: /startup of {len(serving)} serving worker(s) not all answered: "
                    f"{str(exc)[:200]}"
                )
                continue
            reports.update(got)
        return reports

    def _writes(self, where: str = "") -> list[StoreWrite]:
        rows = self.d.db.query(
            f"SELECT id, generation, fencing_token, pid, ran_at FROM seed_runs {where} ORDER BY id"
        )
        return [StoreWrite(int(a), str(b), int(c), int(d), float(e)) for a, b, c, d, e in rows]

    def all_writes(self) -> list[StoreWrite]:
        return self._writes()


# -- running it ------------------------------------------------------------------------------------


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM ignored inside (in the main thread; elsewhere signals cannot be set, nor
    arrive)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def run(opts: argparse.Namespace) -> int:
    rng = random.Random(opts.seed)
    kinds = schedule(opts.rounds, rng, opts.faults)
    workdir = Path(tempfile.mkdtemp(prefix="hyperion-campaign-"))
    began = time.monotonic()
    rounds: list[Round] = []
    findings: list[Finding] = []
    durations: list[float] = []
    deployment = Deployment(workdir, opts.workers)
    print(
        f"campaign: {opts.rounds} round(s), seed {opts.seed}, time limit {opts.time_limit:.0f} s; "
        f"{len(HOSTS)} hosts x {opts.workers} workers, lease TTL {LEASE_TTL:.0f} s, "
        f"seed job {SEED_DELAY:.0f} s, "
        f"bound {BOUND:.0f} s; work directory {workdir}",
        flush=True,
    )
    try:
        deployment.open()
        campaign = Campaign(deployment, rng, opts.seed)
        for number, kind in enumerate(kinds, 1):
            estimate = max(durations, default=FIRST_ESTIMATE)
            if time.monotonic() - began + estimate > opts.time_limit:
                print(
                    f"time limit: {opts.time_limit:.0f} s would be passed by round {number} "
                    "(rounds take up to "
                    f"{estimate:.0f} s); stopping after {len(rounds)}",
                    flush=True,
                )
                break
            r = campaign.round(number, kind)
            durations.append(r.ended - r.started)
            found = check_round(r)
            rounds.append(r)
            findings += found
            print(round_line(r, found, len(kinds)), flush=True)
        if rounds:
            findings += check_store_order(rounds, campaign.all_writes())
    except CampaignError as exc:
        print(f"campaign: could not go on: {exc}", flush=True)
        return 2
    finally:
        with _signals_held():  # a second Ctrl-C (or CI's SIGTERM) must not cut the clean-up short
            deployment.close()
        elapsed = time.monotonic() - began
        anomalies = [f for f in findings if f.anomaly]
        if anomalies or opts.keep:
            print(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(
        summary(rounds, findings, elapsed, f"seed {opts.seed}, time limit {opts.time_limit:.0f} s")
    )
    if opts.history:
        write_history(Path(opts.history), rounds, findings)
    if opts.timeline:
        draw(Path(opts.timeline), rounds)
    return 1 if anomalies else 0


def summary(rounds: Sequence[Round], findings: Sequence[Finding], elapsed: float, how: str) -> str:
    faults = Counter(r.fault.kind for r in rounds if r.fault is not None)
    stats = [summarise(r) for r in rounds]
    ends: Counter[str] = Counter()
    raised: Counter[str] = Counter()
    for s in stats:
        ends.update({k: v for k, v in s.ends.items() if v})
        raised.update(s.raised)
    settles = [s.settle for s in stats] or [0.0]
    anomalies = [f for f in findings if f.anomaly]
    notes = Counter(f.rule for f in findings if not f.anomaly)
    lines = [
        f"summary: {len(rounds)} round(s) in {elapsed:.0f} s ({how})",
        "  faults injected: " + ", ".join(f"{k} {faults.get(k, 0)}" for k in FAULT_KINDS),
        f"  takeovers (a second leader ran the job): {sum(s.takeover for s in stats)}; "
        "second runs the protocol "
        f"allows: {notes.get('second-run', 0)}",
        "  runs whose job raised: "
        + (", ".join(f"{why} {n}" for why, n in sorted(raised.items())) or "none"),
        "  workers: " + ", ".join(f"{k} {v}" for k, v in sorted(ends.items())),
        f"  settled after the fault: median {statistics.median(settles):.1f} s, "
        f"max {max(settles):.1f} s "
        f"(bound {BOUND:.0f} s)",
        f"  anomalies: {len(anomalies)}",
    ]
    lines += [f"    round {f.round} [{f.rule}] {f.text}" for f in anomalies]
    return "\n".join(lines)


def write_history(path: Path, rounds: Sequence[Round], findings: Sequence[Finding]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "rounds": [dataclasses.asdict(r) for r in rounds],
        "findings": [dataclasses.asdict(f) for f in findings],
    }
    path.write_text(json.dumps(data, indent=1, default=str))
    print(f"history written to {path}")


def draw(path: Path, rounds: Sequence[Round]) -> None:
    from benchmarks.campaign_plot import pick_round, timeline

    chosen = pick_round(rounds)
    if chosen is None:
        print("timeline: no round had a takeover; nothing drawn")
        return
    timeline(chosen, path)
    print(
        f"timeline of round {chosen.number} "
        f"({chosen.fault.kind if chosen.fault else 'no fault'}) written to "
        f"{path} ({path.stat().st_size // 1024} KB)"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python3 -m benchmarks.fault_campaign", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds (default 100; 5 with --short)"
    )
    parser.add_argument(
        "--seed", type=int, default=1, help="random seed (fault order, timing, hold times)"
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help="seconds; no round starts that would end past it (default 3600; 170 with --short)",
    )
    parser.add_argument(
        "--short", action="store_true", help="one round of each fault kind (for CI)"
    )
    parser.add_argument(
        "--faults",
        default=",".join(FAULT_KINDS),
        help=f"fault kinds to draw from, comma-separated (default: {','.join(FAULT_KINDS)})",
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="gunicorn workers per host (default 2)"
    )
    parser.add_argument(
        "--timeline", help="write a PNG timeline of one round with a takeover to this path"
    )
    parser.add_argument(
        "--history", help="write every round's history and the findings as JSON to this path"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (logs) even without anomaly"
    )
    parser.add_argument(
        "--from-history",
        metavar="FILE",
        help="run nothing: check the rounds of a --history file again (and draw --timeline)",
    )
    opts = parser.parse_args(argv)
    if opts.rounds is None:
        opts.rounds = len(FAULT_KINDS) if opts.short else 100  # --short: one round of each kind
    if opts.time_limit is None:
        opts.time_limit = 170.0 if opts.short else 3600.0
    opts.faults = [kind.strip() for kind in opts.faults.split(",") if kind.strip()]
    if not opts.faults or set(opts.faults) - set(FAULT_KINDS):
        parser.error(f"--faults: choose among {', '.join(FAULT_KINDS)}")
    if opts.rounds < 1 or opts.workers < 1 or opts.time_limit <= 0:
        parser.error("--rounds, --workers and --time-limit must be positive")
    return opts


def recheck(opts: argparse.Namespace) -> int:
    """``--from-history``: the checks and the picture again, from a history file (no processes, no
    root)."""
    rounds = rounds_from_json(json.loads(Path(opts.from_history).read_text()))
    writes = sorted((w for r in rounds for w in r.writes), key=lambda w: w.row)
    findings = [f for r in rounds for f in check_round(r)] + check_store_order(rounds, writes)
    for r in rounds:
        print(round_line(r, [f for f in findings if f.round == r.number], len(rounds)))
    print(
        summary(
            rounds,
            findings,
            sum(r.ended - r.started for r in rounds),
            f"rounds' own time, checked again from {opts.from_history}",
        )
    )
    if opts.timeline:
        draw(Path(opts.timeline), rounds)
    return 1 if any(f.anomaly for f in findings) else 0


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.from_history:
        return recheck(opts)
    if threading.current_thread() is threading.main_thread():
        signal.signal(
            signal.SIGTERM, _interrupt
        )  # `timeout` and CI stop with SIGTERM: clean up as on Ctrl-C
    try:
        return run(opts)
    except KeyboardInterrupt:
        print("campaign: interrupted; everything it started was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
