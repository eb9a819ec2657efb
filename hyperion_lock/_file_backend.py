"""Single-host fallback when there is no Redis: an exclusive ``flock`` on a file is the lease.

The kernel drops the lock when the holder's process dies, so a crashed leader needs no expiry: the next waiter
gets the lock at once. Waiters block on the same lock in a daemon thread (no polling). Works across processes
of one host only; several hosts need Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import math
import os
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

from ._errors import ConfigurationError
from ._keys import JobKeys
from ._model import Event, FinishResult, Holder, Lease, Outcome, Probe, RenewResult, Status
from ._settings import Settings


@dataclass(frozen=True)
class FileLayout:
    """Every file of one job in no-Redis mode, named in one place (the file-lock counterpart of ``JobKeys``)."""

    dir: Path
    prefix: str
    key: str

    def path(self, suffix: str) -> Path:
        return self.dir / f"{quote(self.prefix, safe='')}.{quote(self.key, safe='')}.{suffix}"

    @property
    def lock(self) -> Path:
        return self.path("lock")

    @property
    def holder(self) -> Path:
        return self.path("holder.json")

    @property
    def fence(self) -> Path:
        return self.path("fence")

    def outcome(self, generation: str) -> Path:
        return self.path(f"outcome.{quote(generation, safe='')}.json")

    def outcome_glob(self, generation: str | None) -> str:
        """Glob (relative to ``dir``) of this job's outcome files, of one generation or all."""
        return self.outcome("*" if generation is None else generation).name.replace("%2A", "*")

    def read_holder(self) -> Holder | None:
        try:
            return Holder.from_mapping(json.loads(self.holder.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    @staticmethod
    def read_outcome(path: Path) -> Outcome | None:
        try:
            return Outcome.from_json(path.read_text())
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @staticmethod
    def job_keys(directory: Path, prefix: str) -> list[str]:
        """Job keys that have a lock or outcome file under ``directory`` (for the CLI's status)."""
        head = quote(prefix, safe="") + "."
        keys: set[str] = set()
        for path in directory.glob(f"{head}*") if directory.is_dir() else []:
            rest = path.name[len(head):]
            if ".outcome." in rest:
                keys.add(unquote(rest.split(".outcome.", 1)[0]))
            elif rest.endswith(".lock"):
                keys.add(unquote(rest[: -len(".lock")]))
        return sorted(keys)


class FileBackend:
    """One job's state in files of one host: the flock is the lease, outcome and holder are JSON files."""

    holder_grace = math.inf  # the kernel tells us when the holder is gone

    def __init__(self, keys: JobKeys, settings: Settings) -> None:
        self.key = keys.key
        self.settings = settings
        self.generation = settings.generation
        self.dir = Path(settings.lock_dir)
        self.files = FileLayout(self.dir, settings.key_prefix, keys.key)
        self._fd: int | None = None
        self._held = False
        self._closed = False
        self._waiter: asyncio.Future[None] | None = None
        self._guard = threading.Lock()
        self._thread_running = False

    def describe(self) -> str:
        return self.settings.describe_target()

    def failure(self, exc: Exception, key: str, generation: str) -> Exception | None:
        """A file error does not heal by waiting: say which directory and what to do, at once."""
        if isinstance(exc, OSError):
            return ConfigurationError(
                f"cannot use the lock directory {self.dir} ({exc.strerror or exc}); set HYPERION_LOCK_LOCK_DIR "
                "to a writable local directory shared by the workers of this host, or set "
                "HYPERION_LOCK_REDIS_URL", key=key, generation=generation,
            )
        return exc

    async def open(self) -> None:
        if self._fd is None:
            # Private to this user: the per-user parent too (mkdir applies ``mode`` to the last level only).
            self.dir.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.dir.mkdir(exist_ok=True, mode=0o700)
            self._fd = os.open(self.files.lock, os.O_RDWR | os.O_CREAT, 0o600)

    def _write_atomic(self, path: Path, text: str) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-")
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def _outcome(self) -> tuple[Outcome | None, float | None]:
        path = self.files.outcome(self.generation)
        outcome = self.files.read_outcome(path)
        try:
            age = max(0.0, time.time() - path.stat().st_mtime) if outcome is not None else None
        except OSError:
            age = None
        return outcome, age

    def _release(self) -> None:
        if self._held and self._fd is not None:
            with contextlib.suppress(OSError):
                self.files.holder.unlink()  # nobody holds it now: waiters must not name a finished run
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._held = False

    def _may_take(self, outcome: Outcome | None, age: float | None) -> bool:
        if outcome is None:
            return True
        if outcome.status is Status.DONE:
            return False
        return not (outcome.status is Status.FAILED and age is not None and age < self.settings.failure_hold)

    async def probe(self, token: str, *, take: bool, seen_fence: int = 0, with_counter: bool = False) -> Probe:
        """File locks cannot lose state under a live holder: ``seen_fence``/``with_counter`` are not needed."""
        assert self._fd is not None, "open() first"
        outcome, age = self._outcome()
        if not self._may_take(outcome, age):
            self._release()
            return Probe(outcome, None, outcome_age=age)
        if take and not self._held:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._held = True
            except BlockingIOError:
                pass
        if not self._held:
            return Probe(outcome, self.files.read_holder(), outcome_age=age)
        try:
            fence = int(self.files.fence.read_text().strip() or 0) + 1
        except (OSError, ValueError):
            fence = 1
        self._write_atomic(self.files.fence, str(fence))
        holder = Holder(host=socket.gethostname(), pid=os.getpid(), generation=self.generation, fencing_token=fence,
                        since=time.time())
        self._write_atomic(self.files.holder, json.dumps(holder.to_mapping()))
        return Probe(outcome, holder, acquired=True, outcome_age=age)

    def _block_until_locked(self, fd: int, future: asyncio.Future[None], loop: asyncio.AbstractEventLoop) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:  # pragma: no cover - fd closed under us
            with self._guard:
                self._thread_running = False
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, future, exc)
            return
        with self._guard:
            self._thread_running = False
            if self._closed:  # nobody wants it any more: let the next process have it
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
                return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_settle, future, None)

    async def next_event(self, timeout: float) -> Event | None:
        assert self._fd is not None, "open() first"
        if self._waiter is None:
            loop = asyncio.get_running_loop()
            self._waiter = loop.create_future()
            self._thread_running = True
            threading.Thread(
                target=self._block_until_locked,
                args=(self._fd, self._waiter, loop),
                name=f"hyperion-lock-wait-{self.key}",
                daemon=True,
            ).start()
        try:
            await asyncio.wait_for(asyncio.shield(self._waiter), timeout=max(0.0, timeout))
        except TimeoutError:
            return None
        self._waiter = None
        self._held = True
        return Event(Status.RELEASED, self.generation)

    async def renew(self, lease: Lease) -> RenewResult:
        return RenewResult.RENEWED  # a flock does not expire while its process lives

    async def finish(self, lease: Lease, outcome: Outcome | None) -> FinishResult:
        """A flock cannot be taken over while its process lives: always recorded."""
        if outcome is not None:
            previous, _ = self._outcome()
            if not (previous and previous.status is Status.DONE and outcome.status is not Status.DONE):
                self._write_atomic(self.files.outcome(self.generation), outcome.to_json())
        self._release()
        return FinishResult.RECORDED

    async def close(self) -> None:
        with self._guard:
            self._closed = True
            pending = self._thread_running
        if pending:  # the blocked thread owns the descriptor now and closes it when it wakes
            self._held = False
            self._fd = None
            return
        self._release()
        if self._fd is not None:
            os.close(self._fd)
        self._fd = None


def _settle(future: asyncio.Future[None], exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is None:
        future.set_result(None)
    else:
        future.set_exception(exc)
