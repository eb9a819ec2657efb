"""Response caching measured against fastapi-cache2, cashews (lock=True), aiocache (cached_stampede) and no cache.

    python -m benchmarks.cache_bench                    # all implementations (~6 min on 2 cores)
    python -m benchmarks.cache_bench --impl hyperion,none --seconds 3
    python -m benchmarks.cache_bench --results benchmarks/RESULTS.md   # also replace its caching section
    python -m benchmarks.cache_bench --only saturated --baseline /tmp/base  # A/B against an exported tree
    python -m benchmarks.cache_bench --guard            # CI: hit req/s against cashews' (< 1 min)

For each implementation: a private loopback ``redis-server`` and a fresh ``gunicorn -w 4`` of
``benchmarks/cache_app.py`` (same endpoint, same simulated upstream), then four rounds, one run each:

1. cold burst: 256 concurrent requests (fresh connections) to one cold key; upstream calls counted.
2. expiry under steady load: TTL 3 s, key warmed, 32 closed-loop clients for 4.5 s (one expiry); upstream calls.
3. hot key: 32 closed-loop keep-alive clients for ``--seconds``; latency p50/p99 and requests/s. Then, because
   one round per implementation is at the mercy of whatever else runs on the machine, ``--hit-rounds`` more hot-key
   rounds of every caching implementation in turn (A B C A B C ...); the hit target uses their medians.
4. Redis stopped (SIGSTOP) under 16 closed-loop clients on a hot key for ``--seconds``, upstream 50 ms: p99 and
   errors (non-200 or no answer within 5 s), against the same load on the no-cache app. Reported twice: measured
   from the SIGSTOP on (the transition included), and from 1 s after it.

5. saturated (``--saturated-rounds``, interleaved like the hit rounds): 64 keep-alive clients on one key with
   TTL 2 s for 7 s, starting cold, upstream 0.3 s; every upstream call counted (target: one for the cold start
   and one per expiry, 4 in all), with the hit req/s and p50/p99 of the same round.

``--baseline TREE`` adds ``hyperion-base``: the same app with ``hyperion_lock`` imported from TREE (e.g. ``git
archive main | tar -x -C /tmp/base``), measured in the same interleaved rounds, for before/after comparisons on a
noisy machine. ``--guard`` is the short check .ci/run calls: hyperion and cashews deployed side by side, a few
alternating hot-key rounds, failing when hyperion's median hit req/s falls below ``--guard-ratio`` (0.5) x cashews'.

Upstream calls are counted by the app in a file (one line per call, every worker), not through Redis. The load
generator runs in this process (asyncio + httpx) on the same 2 cores as the workers and Redis: figures are for
comparing the implementations within one run, not absolute.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import httpx

from hyperion_lock.testing import RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent
IMPLS = ("hyperion", "hyperion-15ms", "hyperion-nonear", "fastapi-cache2", "cashews", "aiocache", "none")
SAT_CLIENTS, SAT_TTL, SAT_SECONDS = 64, 2.0, 7.0
PEERS = {"fastapi-cache2": "fastapi-cache2", "cashews": "cashews", "aiocache": "aiocache"}
MARK_BEGIN = "<!-- cache-bench:begin -->"
MARK_END = "<!-- cache-bench:end -->"


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value * 1000:.1f}"


@dataclass
class Load:
    latencies: list[float] = field(default_factory=list)  # every request, failed ones included
    ok: list[float] = field(default_factory=list)  # answered 200
    errors: int = 0
    seconds: float = 0.0
    kinds: collections.Counter[str] = field(default_factory=collections.Counter)  # what the errors were

    def failed(self, kind: str) -> None:
        self.errors += 1
        self.kinds[kind] += 1

    def describe_errors(self) -> str:
        """``3 (2 ReadTimeout, 1 HTTP 500)``: the count and what they were."""
        what = ", ".join(f"{n} {kind}" for kind, n in self.kinds.most_common())
        return f"{self.errors} ({what})" if self.errors else "0"

    @property
    def rps(self) -> float:
        """Successful requests per second."""
        return len(self.ok) / self.seconds if self.seconds else math.nan


@dataclass
class Row:
    impl: str
    burst_calls: int = -1
    burst_errors: int = 0
    expiry_calls: int = -1
    hit: Load = field(default_factory=Load)
    stopped: Load = field(default_factory=Load)
    stopped_steady: Load = field(default_factory=Load)


class App:
    """``gunicorn -w 4`` of the benchmark app for one implementation, in its own session."""

    def __init__(self, impl: str, redis_url: str, ttl: float, delay: float, workdir: Path) -> None:
        self.port = free_port()
        self.calls_file = workdir / f"calls-{impl}-{self.port}"
        self.log = workdir / f"gunicorn-{impl}-{self.port}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HYPERION_", "BENCH_"))}
        path = str(ROOT)
        if impl == "hyperion-base":  # --baseline: that tree's hyperion_lock first on the path
            impl, path = "hyperion", f"{os.environ['BENCH_BASELINE']}:{ROOT}"
        env.update(BENCH_CACHE_IMPL=impl, BENCH_REDIS_URL=redis_url, BENCH_TTL=str(ttl), BENCH_DELAY=str(delay),
                   BENCH_CALLS_FILE=str(self.calls_file), PYTHONPATH=path,
                   BENCH_LOG_LEVEL=os.environ.get("BENCH_LOG_LEVEL", ""))
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-w", "4", "-k", "uvicorn_worker.UvicornWorker", "-b",
                 f"127.0.0.1:{self.port}", "--log-level", "warning", "--graceful-timeout", "5",
                 "benchmarks.cache_app:app"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def calls(self) -> int:
        return len(self.calls_file.read_text().splitlines()) if self.calls_file.exists() else 0

    async def ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=2) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"gunicorn exited: {self.log.read_text()[-2000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(self.base + "/health")).status_code == 200:
                        return
                await asyncio.sleep(0.1)
        raise RuntimeError(f"not ready within {timeout} s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


@contextlib.contextmanager
def deployed(impl: str, redis_url: str, ttl: float, delay: float, workdir: Path) -> Iterator[App]:
    app = App(impl, redis_url, ttl, delay, workdir)
    try:
        yield app
    finally:
        app.stop()


async def burst(base: str, path: str, n: int) -> int:
    """``n`` concurrent requests on fresh connections; returns how many did not answer 200."""
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        replies = await asyncio.gather(*[client.get(base + path) for _ in range(n)], return_exceptions=True)
    return sum(1 for r in replies if not isinstance(r, httpx.Response) or r.status_code != 200)


async def closed_loop(base: str, path: str, clients: int, seconds: float, timeout: float = 5.0,
                      skip: float = 0.0) -> tuple[Load, Load]:
    """``clients`` loops, each sending its next request when the previous answered, for ``seconds``. Returns the
    whole run and the part after ``skip`` seconds."""
    whole, later = Load(seconds=seconds), Load(seconds=max(seconds - skip, 1e-9))
    started = time.monotonic()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:

        async def loop() -> None:
            while time.monotonic() - started < seconds:
                sent = time.monotonic()
                try:
                    status = (await client.get(base + path)).status_code
                    kind = "" if status == 200 else f"HTTP {status}"
                except httpx.HTTPError as exc:
                    kind = type(exc).__name__
                took = time.monotonic() - sent
                for load in (whole, later) if sent - started >= skip else (whole,):
                    load.latencies.append(took)
                    if kind:
                        load.failed(kind)
                    else:
                        load.ok.append(took)

        await asyncio.gather(*[loop() for _ in range(clients)])
    return whole, later


async def measure(impl: str, workdir: Path, seconds: float) -> Row:
    row = Row(impl)
    path = "/quotes/AAPL?range=1d&interval=5m"
    with RedisServer() as server:
        with deployed(impl, server.url, ttl=30, delay=0.3, workdir=workdir) as app:
            await app.ready()
            row.burst_errors = await burst(app.base, path, 256)
            row.burst_calls = app.calls()
            await closed_loop(app.base, path, 8, 1.0)  # warm the connections and the code paths
            row.hit, _ = await closed_loop(app.base, path, 32, seconds)
        server.restart()
        with deployed(impl, server.url, ttl=3, delay=0.3, workdir=workdir) as app:
            await app.ready()
            await burst(app.base, path, 1)
            before = app.calls()
            await closed_loop(app.base, path, 32, 4.5)
            row.expiry_calls = app.calls() - before
        server.restart()
        with deployed(impl, server.url, ttl=30, delay=0.05, workdir=workdir) as app:
            await app.ready()
            await closed_loop(app.base, path, 16, 1.0)
            server.pause()
            try:
                row.stopped, row.stopped_steady = await closed_loop(app.base, path, 16, seconds + 1, skip=1.0)
            finally:
                server.resume()
    return row


async def interleaved_hits(impls: list[str], rounds: int, seconds: float, workdir: Path) -> dict[str, list[Load]]:
    """Hot-key rounds of every implementation in turn, ``rounds`` times, so load from elsewhere hits all alike."""
    path = "/quotes/AAPL?range=1d&interval=5m"
    found: dict[str, list[Load]] = {impl: [] for impl in impls}
    with RedisServer() as server:
        for _ in range(rounds):
            for impl in impls:
                with deployed(impl, server.url, ttl=300, delay=0.3, workdir=workdir) as app:
                    await app.ready()
                    await burst(app.base, path, 1)
                    await closed_loop(app.base, path, 8, 1.0)
                    load, _ = await closed_loop(app.base, path, 32, seconds)
                    found[impl].append(load)
                    print(f"  hit round {len(found[impl])} {impl:<15} p50 {ms(pct(load.ok, 50))} ms "
                          f"{load.rps:.0f} req/s, errors {load.describe_errors()}", flush=True)
    return found


@dataclass
class Saturated:
    calls: int
    load: Load


async def saturated(impls: list[str], rounds: int, workdir: Path) -> dict[str, list[Saturated]]:
    """The saturated round of every implementation in turn, ``rounds`` times: a fresh Redis and app each, then
    64 keep-alive clients on one cold key with TTL 2 s for 7 s; every upstream call counted."""
    path = "/quotes/AAPL?range=1d&interval=5m"
    found: dict[str, list[Saturated]] = {impl: [] for impl in impls}
    for _ in range(rounds):
        for impl in impls:
            with RedisServer() as server, deployed(impl, server.url, ttl=SAT_TTL, delay=0.3, workdir=workdir) as app:
                await app.ready()
                load, _ = await closed_loop(app.base, path, SAT_CLIENTS, SAT_SECONDS)
                result = Saturated(app.calls(), load)
                found[impl].append(result)
                print(f"  saturated round {len(found[impl])} {impl:<15} {result.calls} upstream calls, "
                      f"{load.rps:.0f} req/s, p50 {ms(pct(load.ok, 50))} p99 {ms(pct(load.ok, 99))} ms, "
                      f"errors {load.describe_errors()}", flush=True)
    return found


def saturated_target() -> int:
    """One upstream call for the cold start and one per expiry within the round."""
    return 1 + int(SAT_SECONDS // SAT_TTL)


def saturated_section(found: dict[str, list[Saturated]]) -> list[str]:
    target = saturated_target()
    lines = ["", f"Saturated: {SAT_CLIENTS} keep-alive clients on one cold key, TTL {SAT_TTL:g} s, {SAT_SECONDS:g} s, "
             f"upstream 0.3 s, Redis and the load generator on the same cores (target: {target} upstream calls, "
             "one for the cold start and one per expiry). Each round's figures, in run order:", "",
             "| implementation | upstream calls per round | req/s per round (median) | p50 ms (median) | "
             "p99 ms (median) | errors per round |", "|---|---|---|---|---|---|"]
    for impl, results in found.items():
        rps = [r.load.rps for r in results]
        lines.append(f"| {impl} | {', '.join(str(r.calls) for r in results)} | "
                     f"{', '.join(f'{x:.0f}' for x in rps)} ({statistics.median(rps):.0f}) | "
                     f"{ms(median_of([r.load for r in results], 50))} | {ms(median_of([r.load for r in results], 99))}"
                     f" | {'; '.join(r.load.describe_errors() for r in results)} |")
    return lines


async def guard(rounds: int, seconds: float, ratio: float, workdir: Path) -> int:
    """hyperion's hit req/s against cashews', both deployed at once, in alternating rounds on the same key."""
    path = "/quotes/AAPL?range=1d&interval=5m"
    rps: dict[str, list[float]] = {"hyperion": [], "cashews": []}
    p99: dict[str, list[float]] = {"hyperion": [], "cashews": []}
    with RedisServer() as server, deployed("hyperion", server.url, 300, 0.3, workdir) as ours, \
            deployed("cashews", server.url, 300, 0.3, workdir) as theirs:
        apps = {"hyperion": ours, "cashews": theirs}
        await asyncio.gather(ours.ready(), theirs.ready())
        for app in apps.values():
            await burst(app.base, path, 1)
            await closed_loop(app.base, path, 8, 0.5)
        for _ in range(rounds):
            for impl, app in apps.items():
                load, _ = await closed_loop(app.base, path, 32, seconds)
                rps[impl].append(load.rps)
                p99[impl].append(pct(load.ok, 99))
    ours_rps, theirs_rps = statistics.median(rps["hyperion"]), statistics.median(rps["cashews"])
    measured = ours_rps / theirs_rps if theirs_rps else math.nan
    ok = measured >= ratio
    print(f"cache hit guard: hyperion {ours_rps:.0f} req/s (p99 {ms(statistics.median(p99['hyperion']))} ms), "
          f"cashews {theirs_rps:.0f} req/s (p99 {ms(statistics.median(p99['cashews']))} ms): ratio {measured:.2f} "
          f"(rounds: {', '.join(f'{a:.0f}/{b:.0f}' for a, b in zip(rps['hyperion'], rps['cashews'], strict=True))}); "
          f"{'PASS' if ok else 'FAIL'} >= {ratio:g}", flush=True)
    return 0 if ok else 1


def median_of(loads: list[Load], q: float) -> float:
    values = [pct(load.ok, q) for load in loads if load.ok]
    return statistics.median(values) if values else math.nan


def hit_section(found: dict[str, list[Load]], seconds: float) -> list[str]:
    rounds = max((len(v) for v in found.values()), default=0)
    lines = ["", f"Hot key, {rounds} interleaved rounds per implementation (32 clients, {seconds:g} s each; median of "
             "the rounds' p50 / p99 / req/s; range of the p50s):", "",
             "| implementation | hit p50 ms (median) | p50 range ms | hit p99 ms (median) | req/s (median) | errors |",
             "|---|---|---|---|---|---|"]
    for impl, loads in found.items():
        p50s = [pct(load.ok, 50) for load in loads if load.ok]
        rps = statistics.median([load.rps for load in loads]) if loads else math.nan
        lines.append(f"| {impl} | {ms(median_of(loads, 50))} | {ms(min(p50s, default=math.nan))} - "
                     f"{ms(max(p50s, default=math.nan))} | {ms(median_of(loads, 99))} | {rps:.0f} | "
                     f"{sum(load.errors for load in loads)} |")
    return lines


def versions() -> str:
    found = []
    for dist in ("fastapi", "redis", "fastapi-cache2", "cashews", "aiocache", "gunicorn", "uvicorn"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found.append(f"{dist} {metadata.version(dist)}")
    return ", ".join(found)


def report(rows: list[Row], seconds: float, hits: dict[str, list[Load]],
           sat: dict[str, list[Saturated]]) -> list[str]:
    none = next((r for r in rows if r.impl == "none"), None)
    peers = [impl for impl in hits if not impl.startswith("hyperion")]
    best_p50 = min((median_of(hits[impl], 50) for impl in peers if hits[impl]), default=math.nan)
    fastest = min(peers, key=lambda impl: median_of(hits[impl], 50), default="-")
    lines = [
        "## Response caching (issue #8): `python -m benchmarks.cache_bench`",
        "",
        f"Run at {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} on {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; {versions()}. Load average at the end: "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}. One run; the load generator shares the 2 cores.",
        "",
        "Same app (`benchmarks/cache_app.py`), same `gunicorn -w 4 -k uvicorn_worker.UvicornWorker`, private "
        "loopback Redis 7. Upstream 0.3 s (50 ms in the Redis-stopped round). Added p99 = p99 with Redis stopped "
        "minus p99 of the no-cache app under the same load; errors = non-200 or no answer within 5 s.",
        "",
    ]
    if rows:
        lines += [
            "| implementation | upstream calls, burst of 256 to a cold key | upstream calls, one expiry under load "
            f"(32 clients) | one hit round: p50 / p99 ms (32 clients, {seconds:g} s; 200s) | req/s (200s) | errors | "
            "Redis stopped: p99 ms / added p99 ms / errors (from SIGSTOP) | same, from 1 s after SIGSTOP |",
            "|---|---|---|---|---|---|---|---|",
        ]
    for r in rows:
        base99 = pct(none.stopped.latencies, 99) if none else math.nan
        base99_steady = pct(none.stopped_steady.latencies, 99) if none else math.nan
        stop = (f"{ms(pct(r.stopped.latencies, 99))} / {ms(pct(r.stopped.latencies, 99) - base99)} / "
                f"{r.stopped.errors} of {len(r.stopped.latencies)}")
        steady = (f"{ms(pct(r.stopped_steady.latencies, 99))} / "
                  f"{ms(pct(r.stopped_steady.latencies, 99) - base99_steady)} / "
                  f"{r.stopped_steady.errors} of {len(r.stopped_steady.latencies)}")
        burst_text = f"{r.burst_calls}" + (f" ({r.burst_errors} errors)" if r.burst_errors else "")
        lines.append(f"| {r.impl} | {burst_text} | {r.expiry_calls} | {ms(pct(r.hit.ok, 50))} / "
                     f"{ms(pct(r.hit.ok, 99))} | {r.hit.rps:.0f} | {r.hit.errors} | {stop} | {steady} |")
    lines += hit_section(hits, seconds) if hits else []
    lines += saturated_section(sat) if sat else []
    lines += ["", " ".join([
        "Notes: `hyperion-15ms` is hyperion_lock with `op_timeout=0.015` (the floor of its adaptive timeout)",
        "instead of 0.05: it fails over sooner from an idle Redis.",
        "\"From SIGSTOP\" includes the requests until the breaker opened: each waits once for its read to time",
        "out (the adaptive timeout: 50 ms on an idle Redis, more when replies were slow) while a liveness check",
        "waits for its answer (0.5 s); after that nothing waits on Redis. aiocache's burst errors are its Redis",
        "pool refusing connections",
        "(`MaxConnectionsError: Too many connections`). fastapi-cache2 has no single flight; cashews' lock",
        "(`lock=True`) does serialise the computation. With Redis stopped, the peers' requests wait on it for",
        "seconds (no answer within the client's 5 s is counted as an error).",
    ])]
    lines += ["", "Targets (hyperion_lock):"]
    ours = next((r for r in rows if r.impl == "hyperion"), None)
    if ours is not None:
        lines.append(f"- {'PASS' if ours.burst_calls == 1 else 'MISS'} 1 upstream call per burst: {ours.burst_calls}")
        lines.append(f"- {'PASS' if ours.expiry_calls == 1 else 'MISS'} 1 upstream call per expiry: "
                     f"{ours.expiry_calls}")
    if hits.get("hyperion") and hits.get("cashews"):
        ours_rps = statistics.median([load.rps for load in hits["hyperion"]])
        theirs_rps = statistics.median([load.rps for load in hits["cashews"]])
        p99_ours, p99_theirs = median_of(hits["hyperion"], 99), median_of(hits["cashews"], 99)
        lines.append(f"- {'PASS' if ours_rps >= theirs_rps else 'MISS'} hit req/s {ours_rps:.0f} >= cashews' "
                     f"{theirs_rps:.0f} (ratio {ours_rps / theirs_rps:.2f}; medians of the interleaved rounds)")
        lines.append(f"- {'PASS' if p99_ours <= p99_theirs else 'MISS'} hit p99 {ms(p99_ours)} ms <= cashews' "
                     f"{ms(p99_theirs)} ms")
    if hits.get("hyperion") and peers:
        p50 = median_of(hits["hyperion"], 50)
        ok = not math.isnan(best_p50) and p50 <= 1.2 * best_p50
        lines.append(f"- {'PASS' if ok else 'MISS'} hit p50 {ms(p50)} ms <= 1.2 x fastest peer ({fastest}) "
                     f"{ms(best_p50)} ms (medians of the interleaved rounds; ratio {p50 / best_p50:.2f})")
    if sat.get("hyperion"):
        calls = [r.calls for r in sat["hyperion"]]
        lines.append(f"- {'PASS' if max(calls) <= saturated_target() else 'MISS'} saturated: upstream calls "
                     f"{', '.join(map(str, calls))} <= {saturated_target()} per round")
    if ours is not None and none is not None:
        for label, load, base in (("from SIGSTOP", ours.stopped, none.stopped),
                                  ("from 1 s after SIGSTOP", ours.stopped_steady, none.stopped_steady)):
            added = pct(load.latencies, 99) - pct(base.latencies, 99)
            added50 = pct(load.latencies, 50) - pct(base.latencies, 50)
            ok = added50 < 0.020 and load.errors == 0
            lines.append(f"- {'PASS' if ok else 'MISS'} Redis stopped ({label}): added p50 {ms(added50)} ms < 20 ms "
                         f"and {load.errors} errors (added p99 {ms(added)} ms)")
    return lines


def write_results(path: Path, lines: list[str]) -> None:
    """Replace (or append) this benchmark's section of RESULTS.md, leaving the rest of the file as it is."""
    text = path.read_text() if path.exists() else ""
    section = "\n".join([MARK_BEGIN, *lines, MARK_END]) + "\n"
    if MARK_BEGIN in text and MARK_END in text:
        head, rest = text.split(MARK_BEGIN, 1)
        text = head + section + rest.split(MARK_END, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


async def main_async(args: argparse.Namespace) -> int:
    impls = [i.strip() for i in args.impl.split(",") if i.strip()]
    unknown = set(impls) - set(IMPLS)
    if unknown:
        print(f"unknown implementation(s): {', '.join(sorted(unknown))}; choose from {', '.join(IMPLS)}")
        return 64
    if args.baseline:
        impls.insert(impls.index("hyperion") + 1 if "hyperion" in impls else 0, "hyperion-base")
    with tempfile.TemporaryDirectory(prefix="cache-bench-") as tmp:
        if args.guard:
            return await guard(args.guard_rounds, args.guard_seconds, args.guard_ratio, Path(tmp))
        rows = []
        for impl in impls if args.only in ("all", "rounds") else []:
            started = time.monotonic()
            row = await measure(impl, Path(tmp), args.seconds)
            rows.append(row)
            print(f"{impl:<15} burst calls {row.burst_calls} ({row.burst_errors} errors), expiry calls "
                  f"{row.expiry_calls}, hit p50 {ms(pct(row.hit.ok, 50))} ms p99 {ms(pct(row.hit.ok, 99))} ms "
                  f"{row.hit.rps:.0f} req/s ({row.hit.errors} errors), stopped p99 "
                  f"{ms(pct(row.stopped.latencies, 99))} ms errors "
                  f"{row.stopped.errors} ({time.monotonic() - started:.0f} s)", flush=True)
        cached = [impl for impl in impls if impl not in {"none", "hyperion-15ms"}]
        hits = {}
        if args.hit_rounds and args.only in ("all", "hits"):
            hits = await interleaved_hits(cached, args.hit_rounds, args.seconds, Path(tmp))
        sat = {}
        if args.saturated_rounds and args.only in ("all", "saturated"):
            sat = await saturated(cached, args.saturated_rounds, Path(tmp))
    lines = report(rows, args.seconds, hits, sat)
    print("\n".join(lines))
    if args.results:
        write_results(Path(args.results), lines)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", default=",".join(i for i in IMPLS if i != "hyperion-nonear"),
                        help=f"comma-separated, from {', '.join(IMPLS)} (all but hyperion-nonear by default)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the hot-key and Redis-stopped rounds")
    parser.add_argument("--results", default=None, help="replace the caching section of this RESULTS.md")
    parser.add_argument("--hit-rounds", type=int, default=3, help="interleaved hot-key rounds per implementation")
    parser.add_argument("--saturated-rounds", type=int, default=2,
                        help="interleaved saturated rounds per implementation")
    parser.add_argument("--only", choices=("all", "rounds", "hits", "saturated"), default="all",
                        help="run only the per-implementation rounds, the hot-key rounds or the saturated rounds")
    parser.add_argument("--baseline", default=None, help="also measure hyperion_lock imported from this tree")
    parser.add_argument("--guard", action="store_true", help="the short hit req/s check against cashews (CI)")
    parser.add_argument("--guard-rounds", type=int, default=3)
    parser.add_argument("--guard-seconds", type=float, default=3.0)
    parser.add_argument("--guard-ratio", type=float, default=0.5, help="fail below this x cashews' hit req/s")
    args = parser.parse_args()
    if args.baseline:
        baseline = Path(args.baseline).resolve()
        if not (baseline / "hyperion_lock" / "__init__.py").exists():
            print(f"--baseline {args.baseline}: no hyperion_lock package there")
            return 64
        os.environ["BENCH_BASELINE"] = str(baseline)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
