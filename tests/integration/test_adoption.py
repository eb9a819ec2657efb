"""Adoption by the app of issue #10, reproduced by ``tests/sample_app``: one import changed, nothing else.

One venv for the module (built under ``tmp_path_factory``): the sample app's pinned ``requirements.txt``
(redis-py 5.0.8 because arq 0.26.3 needs redis < 6, uvicorn 0.30.6, no gunicorn), then hyperion_lock from a copy
of this repository. Then, against the session's real Redis:

a. installing hyperion_lock changes none of the app's pins and brings no gunicorn;
b. the app's own suite (it patches the worker count to 1 and passes a Redis client) passes under ``pytest -n 4``;
c. ``uvicorn sample_app.main:app --workers 4`` with a failing ``init_db``: the job runs once, every worker
   uvicorn's supervisor starts or respawns fails at once with the recorded cause, one library line per start;
d. a healthy ``uvicorn --workers 4`` start: each job once, at most one library INFO line per worker and job.

If installing hyperion_lock moved a pin, (a) fails and the fixture puts the pins back, so that (b)-(d) still run
on the versions the app really has. Lines starting with ``ADOPTION`` (shown with ``-s``) record what was seen:
the suite's summary, worker starts and respawns, what uvicorn's supervisor did, and line counts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest
import redis

from hyperion_lock import JobKeys
from hyperion_lock.testing import free_port
from tests.support.venv import make_venv, package_source

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "tests" / "support" / "sample_app"
WORKERS = 4
JOBS = ("init_db", "seed_admin", "sync_permissions", "register_cron_jobs", "warm_cache")  # the lifespan's order
UNLOCK_JOBS = {"init_db"}  # the only call with an unlock_key
START_TIMEOUT = 60.0  # bound on every wait for the servers' log; they get there in seconds
STOP_TIMEOUT = 20.0
FAIL_CAUSE = "InitJobError: init_db failed on purpose (SAMPLE_APP_FAIL_JOB=init_db)"
# One line of the sample app's log format: "LEVEL [pid] logger: message" (sample_app/main.py, LOG_FORMAT).
APP_LINE = re.compile(r"^(?P<level>[A-Z]+) \[(?P<pid>\d+)\] (?P<logger>[\w.]+): (?P<msg>.*)$")


# --- the venv -----------------------------------------------------------------------------------------------------


def _pins() -> dict[str, str]:
    pins = {}
    for line in (SAMPLE / "requirements.txt").read_text().splitlines():
        requirement = line.split("#", 1)[0].strip()
        if "==" in requirement:
            name, version = requirement.split("==", 1)
            pins[_canonical(name)] = version.strip()
    return pins


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower().strip()


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without what would leak into the sample app's processes."""
    dropped = ("HYPERION_LOCK_", "PYTEST_", "SAMPLE_APP_")
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(dropped) and k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "REDIS_URL",
                                                   "WEB_CONCURRENCY"}
    }
    env.update(extra)
    return env


@dataclass
class SampleEnv:
    python: Path
    project: Path  # the directory holding the copy of sample_app (the servers' working directory)
    pins: dict[str, str]
    before: dict[str, str]  # installed versions after requirements.txt
    after: dict[str, str]  # ... after hyperion_lock on top
    install_log: str
    pip_check: str  # `pip check` right after hyperion_lock was installed (empty when consistent)
    restored: bool  # the pins had to be put back for (b)-(d)

    @property
    def app_dir(self) -> Path:
        return self.project / "sample_app"

    def script(self, name: str) -> str:
        return str(self.python.parent / name)


def _pip(python: Path, *args: str, cwd: Path) -> str:
    done = subprocess.run(
        [str(python), "-m", "pip", *args, "--disable-pip-version-check"], cwd=cwd, env=_clean_env(),
        capture_output=True, text=True, timeout=540, check=False,
    )
    if done.returncode != 0 and args[0] != "check":
        raise AssertionError(f"pip {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return (done.stdout + done.stderr).strip()


def _installed(python: Path, cwd: Path) -> dict[str, str]:
    rows = json.loads(_pip(python, "list", "--format", "json", cwd=cwd).splitlines()[-1])
    return {_canonical(row["name"]): row["version"] for row in rows}


@pytest.fixture(scope="module")
def sample_env(tmp_path_factory: pytest.TempPathFactory) -> SampleEnv:
    root = tmp_path_factory.mktemp("adoption")
    skip = shutil.ignore_patterns("__pycache__", ".pytest_cache", "*.pyc")
    # Copies: building, compiling or running tests in the working tree would leave artefacts others then see.
    project = root / "project"
    shutil.copytree(SAMPLE, project / "sample_app", ignore=skip)
    src = package_source(root / "src")
    python = make_venv(root / "venv")
    _pip(python, "install", "-q", "-r", str(project / "sample_app" / "requirements.txt"), cwd=root)
    before = _installed(python, root)
    install_log = _pip(python, "install", str(src), cwd=root)  # what a user of the app runs: no flags
    after = _installed(python, root)
    pip_check = _pip(python, "check", cwd=root)
    pip_check = "" if "No broken requirements" in pip_check else pip_check
    pins = _pins()
    restored = any(after.get(name) != version for name, version in pins.items())
    if restored:
        _pip(python, "install", "-q", "-r", str(project / "sample_app" / "requirements.txt"), cwd=root)
    return SampleEnv(python, project, pins, before, after, install_log, pip_check, restored)


# --- a: the install ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(900)
def test_installing_hyperion_lock_keeps_the_apps_pins(sample_env: SampleEnv) -> None:
    pins, before, after = sample_env.pins, sample_env.before, sample_env.after
    assert {"redis", "arq", "uvicorn"} <= set(pins), pins
    assert {name: before.get(name) for name in pins} == pins  # requirements.txt itself installs as pinned
    assert "hyperion-lock" in after, after
    assert "gunicorn" not in after, "installing hyperion_lock brought gunicorn"
    changed = {name: f"{version} -> {after.get(name)}" for name, version in pins.items() if after.get(name) != version}
    assert not changed, (
        f"installing hyperion_lock changed the app's pinned versions: {changed}\npip check: {sample_env.pip_check}\n"
        f"pip install said:\n{sample_env.install_log}"
    )
    assert sample_env.pip_check == "", sample_env.pip_check


# --- b: the app's own suite under xdist ---------------------------------------------------------------------------


@pytest.mark.timeout(900)
def test_the_sample_apps_suite_passes_under_xdist(sample_env: SampleEnv, redis_url: str) -> None:
    done = subprocess.run(
        [str(sample_env.python), "-m", "pytest", "-n", str(WORKERS), "-p", "no:cacheprovider"],
        cwd=sample_env.app_dir, env=_clean_env(HYPERION_LOCK_TEST_REDIS_URL=redis_url), capture_output=True,
        text=True, timeout=300, check=False,
    )
    output = done.stdout + done.stderr
    summary = output.strip().splitlines()[-1] if output.strip() else ""
    print(f"ADOPTION sample suite under pytest -n {WORKERS}: {summary}")
    assert done.returncode == 0, output
    passed = re.search(r"(\d+) passed", summary)
    assert passed is not None and int(passed.group(1)) >= 12, output
    assert not re.search(r"\d+ (failed|error|skipped)", summary), output


# --- c, d: uvicorn --workers 4 -------------------------------------------------------------------------------------


class Uvicorn:
    """``uvicorn sample_app.main:app --workers 4`` from the venv, logging to a file, in a session of its own."""

    def __init__(self, sample_env: SampleEnv, tmp_path: Path, **env: str) -> None:
        self.log_path = tmp_path / "uvicorn.log"
        self.runs_path = tmp_path / "runs.txt"
        self.port = free_port()
        self.prefix = f"adoption_{uuid.uuid4().hex[:12]}"  # the session's Redis holds other tests' keys too
        # No HYPERION_LOCK_GENERATION: the default generation is the parent's identity when the parent runs the
        # same executable, i.e. uvicorn's supervisor for every worker it spawns, respawned ones included: fresh
        # for this start, shared by its workers (checked through the outcome key in the failing case).
        self.env = _clean_env(
            WEB_CONCURRENCY=str(WORKERS), SAMPLE_APP_MARKER_FILE=str(self.runs_path),
            HYPERION_LOCK_KEY_PREFIX=self.prefix, PYTHONUNBUFFERED="1", **env,
        )
        self.args = [sample_env.script("uvicorn"), "sample_app.main:app", "--workers", str(WORKERS),
                     "--host", "127.0.0.1", "--port", str(self.port)]
        self.cwd = sample_env.project
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Uvicorn:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.args, cwd=self.cwd, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def runs(self) -> list[tuple[str, int]]:
        if not self.runs_path.exists():
            return []
        return [(name, int(pid)) for name, pid in (line.split() for line in self.runs_path.read_text().splitlines())]

    def wait_until(self, done: Callable[[str], bool], what: str, timeout: float = START_TIMEOUT) -> str:
        """Poll the log until ``done(log)`` or the supervisor exits; fail after ``timeout``."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            log = self.log()
            if done(log) or self.proc.poll() is not None:
                return log
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout} s; log:\n{log[-20000:]}")
            time.sleep(0.05)

    def stop(self) -> int | None:
        """SIGTERM to the supervisor (it stops its workers), SIGKILL to the whole session after STOP_TIMEOUT."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(STOP_TIMEOUT)
        with suppress(ProcessLookupError):  # a worker left behind by a supervisor that died first
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode


@contextmanager
def running(server: Uvicorn) -> Iterator[Uvicorn]:
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass(frozen=True)
class Line:
    level: str
    pid: int
    logger: str
    msg: str

    @property
    def job(self) -> str | None:
        head = self.msg.split(":", 1)[0]
        return head if head in JOBS else None

    @property
    def is_library(self) -> bool:
        """Logged by hyperion_lock: through the logger the app passed (``<job key>: ...``), or its own loggers."""
        return self.logger.startswith("hyperion_lock") or (self.logger == "sample_app" and self.job is not None)

    def __str__(self) -> str:
        return f"{self.level} [{self.pid}] {self.logger}: {self.msg}"


def app_lines(log: str) -> list[Line]:
    found = (APP_LINE.match(raw) for raw in log.splitlines())
    return [Line(m["level"], int(m["pid"]), m["logger"], m["msg"]) for m in found if m]


def started_pids(lines: list[Line]) -> list[int]:
    return [line.pid for line in lines if line.logger == "sample_app" and re.fullmatch(r"worker \d+ starting.*",
                                                                                        line.msg)]


def _job_key(prefix: str, name: str) -> str:
    """The job key of a key name, ``JobKeys.parse(prefix, name)[0]`` (a name not of the library's: TypeError)."""
    return cast("tuple[str, str, str | None]", JobKeys.parse(prefix, name))[0]


def _failed_line(line: Line) -> bool:
    return line.job == "init_db" and ("the job failed in" in line.msg or "job failed after" in line.msg)


def failed_starts(log: str) -> int:
    """Worker starts whose init_db failure the library logged."""
    lines = app_lines(log)
    return len(set(started_pids(lines)) & {line.pid for line in lines if _failed_line(line)})


@pytest.mark.timeout(900)
def test_a_failing_init_job_runs_once_and_every_respawned_worker_fails_at_once(
    sample_env: SampleEnv, redis_url: str, tmp_path: Path
) -> None:
    server = Uvicorn(sample_env, tmp_path, REDIS_URL=redis_url, SAMPLE_APP_FAIL_JOB="init_db")
    with running(server):
        # The first WORKERS starts plus at least 4 respawns, unless the supervisor gives up first.
        log = server.wait_until(lambda text: failed_starts(text) >= 2 * WORKERS, "4 failed respawns")
        assert server.proc is not None
        supervisor_code = server.proc.poll()
    died = len(re.findall(r"Child process \[\d+\] died", log))
    lines = app_lines(log)
    starts = started_pids(lines)
    library = [line for line in lines if line.is_library]
    per_start = Counter(line.pid for line in library)
    failed = failed_starts(log)
    behaviour = ("kept respawning" if supervisor_code is None else f"exited with code {supervisor_code}")
    print(f"ADOPTION failing init_db under uvicorn {sample_env.pins['uvicorn']} --workers {WORKERS}: "
          f"{len(starts)} worker starts, {died} 'Child process died', {failed} failed starts, "
          f"runs of init_db: {len(server.runs())}; supervisor {behaviour}; library lines per start: "
          f"max {max(per_start.values(), default=0)}, total {len(library)}; log lines in all: {len(log.splitlines())}")

    # The failing job ran exactly once, in one worker; nothing after it ran anywhere.
    runs = server.runs()
    assert len(runs) == 1 and runs[0][0] == "init_db", runs
    leader = runs[0][1]
    if supervisor_code is None:
        assert failed >= 2 * WORKERS and died >= 4, log[-20000:]
    else:  # a supervisor that stops after failed starts: then the failure must be visible in its log
        assert failed >= 1, log[-20000:]

    # Every start failed with the recorded cause; the respawned ones at once: their only library line is that.
    for line in library:
        if line.pid == leader:
            assert line.msg.startswith("init_db: job failed after ") and FAIL_CAUSE in line.msg, line
        else:
            assert re.fullmatch(rf"init_db: the job failed in \S+:{leader} \({re.escape(FAIL_CAUSE)}\)", line.msg), (
                f"unexpected library line from a worker that did not run the job: {line}")
    over = {pid: count for pid, count in per_start.items() if count > 1}
    assert not over, "more than one library line per worker start:\n" + "\n".join(
        str(line) for line in library if line.pid in over)
    assert set(per_start) <= set(starts), (per_start, starts)

    # One generation for all of them: the supervisor's identity (host:pid:start), recorded once, as failed.
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        keys = cast(list[str], client.keys(f"{server.prefix}:*"))  # decode_responses=True: names are str
        outcomes = [k for k in keys if ":outcome:" in k]
        assert len(outcomes) == 1, keys
        generation = outcomes[0].split(":outcome:", 1)[1]
        assert outcomes[0] == JobKeys(server.prefix, "init_db").outcome(generation)
        assert generation.split(":")[1] == str(server.proc.pid), (generation, server.proc.pid)
        assert json.loads(client.get(outcomes[0]) or "{}").get("status") == "failed"
        assert {_job_key(server.prefix, k) for k in keys} == {"init_db"}, keys  # nothing else attempted
    finally:
        client.close()


@dataclass
class HealthyStart:
    log: str
    runs: list[tuple[str, int]]
    pids: list[int]


@pytest.fixture(scope="module")
def healthy_start(
    sample_env: SampleEnv, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> HealthyStart:
    server = Uvicorn(sample_env, tmp_path_factory.mktemp("healthy"), REDIS_URL=redis_url)

    def all_ready(text: str) -> bool:
        ready = [line for line in app_lines(text) if re.fullmatch(r"worker \d+ ready", line.msg)]
        return len(ready) >= WORKERS

    with running(server):
        log = server.wait_until(all_ready, f"{WORKERS} ready workers")
        assert all_ready(log), f"uvicorn exited before its workers were ready:\n{log}"
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/health", timeout=10) as response:
            assert json.loads(response.read())["status"] == "ok"
    return HealthyStart(log, server.runs(), sorted(set(started_pids(app_lines(log)))))


@pytest.mark.timeout(900)
def test_a_healthy_start_runs_each_job_once_with_one_info_line_per_worker_and_job(
    healthy_start: HealthyStart,
) -> None:
    assert sorted(name for name, _ in healthy_start.runs) == sorted(JOBS), healthy_start.runs
    assert len(healthy_start.pids) == WORKERS, healthy_start.log
    library = [line for line in app_lines(healthy_start.log) if line.is_library]
    info = [line for line in library if line.level == "INFO"]
    print(f"ADOPTION healthy start, uvicorn --workers {WORKERS}: {len(info)} library INFO lines "
          f"({len(library)} at any level) for {len(JOBS)} jobs x {WORKERS} workers")
    assert [str(line) for line in library if line.level != "INFO"] == []  # nothing to warn about
    per_call = Counter((line.pid, line.job) for line in info)
    extra = [str(line) for line in info if line.job is None or per_call[(line.pid, line.job)] > 1]
    assert not extra, "library lines beyond one per worker and job:\n" + "\n".join(extra)
    assert len(info) <= len(JOBS) * WORKERS, "\n".join(map(str, info))


@pytest.mark.timeout(900)
def test_in_a_healthy_start_callers_without_unlock_key_say_they_did_not_wait(healthy_start: HealthyStart) -> None:
    runner = {name: pid for name, pid in healthy_start.runs}
    claims = []
    for line in app_lines(healthy_start.log):
        if not line.is_library or line.job is None or line.job in UNLOCK_JOBS or line.pid == runner.get(line.job):
            continue
        says_so = "not waiting" in line.msg or "did not wait" in line.msg
        if not says_so or "(waited" in line.msg:
            claims.append(str(line))
    assert not claims, (
        "callers without an unlock_key never wait, yet these lines do not say so (or report a wait):\n"
        + "\n".join(claims)
    )
