"""Helpers shared by the test tiers (tests/unit, tests/integration, tests/e2e): paths, waiting on a condition,
and real worker processes (:class:`Workers`). Server fixtures come from the ``hyperion_lock.testing`` plugin."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from hyperion_lock import ConfigurationError, Coordinator, OptionalRedis

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]


def wait_until(condition: Callable[[], T], what: str, timeout: float = 30.0, interval: float = 0.05) -> T:
    """Poll ``condition`` until it returns something truthy (returned); fail after ``timeout`` s naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not reached within {timeout} s (last seen: {value!r})")
        time.sleep(interval)


async def until(condition: Callable[[], Any], what: str, timeout: float = 30.0) -> None:
    """The asyncio flavour: wait for a state another task or process reaches; ``condition`` may be sync or async;
    checked every 10 ms, failing after ``timeout`` s naming ``what``."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                value = condition()
                if inspect.isawaitable(value):
                    value = await value
                if value:
                    return
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"{what}: not reached within {timeout} s") from None


def noop() -> None:
    """A job that does nothing."""


def refusals(url: str, makers: tuple[Callable[[str], object], ...] = (Coordinator, OptionalRedis)) -> list[str]:
    """The text of the ConfigurationError each of ``makers`` raises for ``url`` (fails if one accepts it)."""
    texts = []
    for make in makers:
        with pytest.raises(ConfigurationError) as info:
            make(url)
        texts.append(str(info.value))
    return texts


class Workers:
    """Spawns real ``tests.support.proc_worker`` processes and reads what they logged."""

    def __init__(self, tmp_path: Path) -> None:
        self.log = tmp_path / "events.jsonl"
        self.log.touch()
        self.procs: list[subprocess.Popen[str]] = []
        self.outputs: dict[int, str] = {}

    def spawn(self, n: int, **opts: Any) -> list[subprocess.Popen[str]]:
        args = [sys.executable, "-m", "tests.support.proc_worker", "--log", str(self.log)]
        for name, value in opts.items():
            flag = "--" + name.replace("_", "-")
            if value is True:
                args.append(flag)
            elif value is not None and value is not False:
                args += [flag, str(value)]
        started = [
            subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
            for _ in range(n)
        ]
        self.procs += started
        return started

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        rows = [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]
        return [r for r in rows if kind is None or r["event"] == kind]

    def wait_for(self, kind: str, count: int = 1, timeout: float = 30.0) -> list[dict[str, Any]]:
        """The ``kind`` events once there are ``count``; fails after ``timeout`` s, or at once when every worker
        exited without logging them, with the output of the workers that exited."""
        deadline = time.monotonic() + timeout
        while True:
            all_exited = all(proc.poll() is not None for proc in self.procs)
            rows = self.events(kind)
            if len(rows) >= count:
                return rows
            if all_exited or time.monotonic() >= deadline:
                why = "every worker exited" if all_exited else f"still waiting after {timeout} s"
                raise AssertionError(f"{why}: expected {count} {kind!r} events, got {self.events()}\n"
                                     f"{self.exited_outputs()}")
            time.sleep(0.02)

    def exited_outputs(self) -> str:
        """Exit code and output tail of every worker that has exited (the running ones are left alone)."""
        parts = []
        for proc in self.procs:
            if proc.poll() is None:
                continue
            if proc.pid not in self.outputs:
                self.outputs[proc.pid] = proc.communicate()[0] or ""
            parts.append(f"--- worker {proc.pid} exited {proc.returncode}:\n{self.outputs[proc.pid][-3000:]}")
        return "\n".join(parts) or "(no worker has exited)"

    def join(self, timeout: float = 60.0) -> list[int]:
        deadline = time.monotonic() + timeout
        codes = []
        for proc in self.procs:
            try:
                out, _ = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
                self.outputs[proc.pid] = out
                raise AssertionError(f"worker {proc.pid} hung; output:\n{out}") from None
            self.outputs[proc.pid] = out
            codes.append(proc.returncode)
        return codes

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            if proc.stdout is not None and not proc.stdout.closed:
                out, _ = proc.communicate()
                self.outputs.setdefault(proc.pid, out)


SERVER_FIXTURES = frozenset({"redis_url", "redis_server", "postgres_url", "workers", "tls_redis"})


def tier_problem(path: Path, markers: set[str], fixtures: set[str]) -> str | None:
    tier = path.relative_to(ROOT / "tests").parts[0]
    if tier == "unit" and ({"integration", "e2e"} & markers or SERVER_FIXTURES & fixtures):
        return "is in tests/unit but is marked integration/e2e or uses a server fixture: move it to tests/integration"
    if tier == "integration" and ("integration" not in markers or "e2e" in markers):
        return "is in tests/integration: mark it pytest.mark.integration (an e2e test goes to tests/e2e)"
    if tier == "e2e" and not {"integration", "e2e"} <= markers:
        return "is in tests/e2e: mark it pytest.mark.e2e and pytest.mark.integration"
    if tier not in ("unit", "integration", "e2e"):
        return "is outside the tiers: put it under tests/unit, tests/integration or tests/e2e"
    return None
