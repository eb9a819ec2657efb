"""Single-host fallback when there is no Redis: an exclusive ``flock`` on a file is the lease.

The kernel drops the lock when the holder's process dies, so a crashed leader needs no expiry: the next waiter
gets the lock at once. Waiters block on the same lock in a daemon thread (no polling). Works across processes
of one host only; several hosts need Redis.

The directory is trusted only once verified (:func:`verify_lock_dir`): a directory another local user can write
to would let them hold the lock (every worker waits forever), plant a "done" outcome (the job is skipped) or a
symbolic link (a root worker writes elsewhere). Files in it are opened with ``O_NOFOLLOW``; outcome and holder
files are written to a temporary file and renamed into place, so a reader sees the old or the new one, whole.

File names: ``<prefix>+<key>+lock``, ``+holder.json``, ``+fence`` and ``+outcome+<generation>.json``, each name
part percent-encoded (``/`` and ``:`` become ``%2F``/``%3A``). ``+`` never appears in an encoded part, so two
different (prefix, key) pairs never share a file (``shop.staging`` + ``migrate`` vs ``shop`` + ``staging.migrate``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import math
import os
import socket
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

from hyperion_lock.errors import ConfigurationError, CorruptStateError
from hyperion_lock.runonce.keys import JobKeys
from hyperion_lock.runonce.model import Event, FinishResult, Holder, Lease, Outcome, Probe, RenewResult, Status
from hyperion_lock.settings import Settings

SEP = "+"  # between the parts of a file name; quote(..., safe="") always encodes it inside a part
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


def _prefix_option(prefix: str) -> str:
    return "" if prefix == Settings.__dataclass_fields__["key_prefix"].default else f" --prefix {prefix}"


def _part(name: str) -> str:
    return quote(name, safe="")


def _mode(st: os.stat_result) -> str:
    return f"owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}"


def _refuse(path: Path, st: os.stat_result, why: str) -> ConfigurationError:
    return ConfigurationError(
        f"refusing the lock directory {path}: {why} ({_mode(st)}; this process runs as uid {os.geteuid()}); another "
        "local user could hold its locks or plant outcomes in it. Remove it, or set HYPERION_LOCK_LOCK_DIR to a "
        "directory of this user with mode 0700 (e.g. under $XDG_RUNTIME_DIR)"
    )


def _check_ancestors(path: Path) -> None:
    """Every directory above ``path``, as spelled and as resolved, must be this user's or root's and not writable
    by others unless sticky (``/tmp``): otherwise its owner could rename ``path`` away and put their own in its
    place after we checked it."""
    spelled = list(path.parents)
    resolved = Path(os.path.realpath(path.parent))
    for parent in [*spelled, resolved, *resolved.parents]:
        st = os.lstat(parent)
        if st.st_uid not in (0, os.geteuid()):
            raise _refuse(path, st, f"{parent} above it belongs to another user")
        if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise _refuse(path, st, f"{parent} above it is writable by other users and not sticky")


def _check_private(path: Path) -> None:
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise _refuse(path, st, "it is a symbolic link")
    if not stat.S_ISDIR(st.st_mode):
        raise _refuse(path, st, "it is not a directory")
    if st.st_uid != os.geteuid():
        raise _refuse(path, st, "it belongs to another user")
    if st.st_mode & 0o077:
        raise _refuse(path, st, "other users have access to it (chmod 700 it if that is not wanted)")


def verify_lock_dir(path: Path, *, create: bool) -> bool:
    """Check that ``path`` is a directory private to this effective uid that nobody else can replace; with
    ``create``, make the missing levels first (mode 0700). False when it does not exist (and not ``create``).

    Raises :class:`ConfigurationError` naming the path, its owner and mode when it is a symbolic link, another
    user's, open to others, or sits in a directory another user can write to; an ``OSError`` when it cannot be
    made or read at all.
    """
    path = Path(os.path.abspath(path))
    missing = []
    top = path
    while not os.path.lexists(top) and top != top.parent:
        missing.append(top)
        top = top.parent
    if missing and not create:
        return False
    _check_ancestors(missing[-1] if missing else path)
    for level in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made meanwhile by another worker: checked right below
            os.mkdir(level, 0o700)
        _check_private(level)
    _check_private(path)
    return True


def read_private(path: Path) -> tuple[str, float]:
    """The text of a file in a verified directory and its mtime, never following a symbolic link.

    Anything but a regular file (a named pipe, whose open would wait for a writer for ever) is a ``ValueError``:
    opened without blocking, checked on the descriptor, never read.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW)
    with os.fdopen(fd) as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path} is not a regular file (mode {stat.filemode(st.st_mode)})")
        return fh.read(), st.st_mtime


@dataclass(frozen=True)
class FileLayout:
    """Every file of one job in no-Redis mode, named in one place (the file-lock counterpart of ``JobKeys``)."""

    dir: Path
    prefix: str
    key: str

    def path(self, suffix: str) -> Path:
        return self.dir / SEP.join((_part(self.prefix), _part(self.key), suffix))

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
        return self.path(f"outcome{SEP}{_part(generation)}.json")

    def outcome_glob(self, generation: str | None) -> str:
        """Glob (relative to ``dir``) of this job's outcome files, of one generation or all."""
        return self.outcome("*" if generation is None else generation).name.replace("%2A", "*")

    def read_holder(self) -> Holder | None:
        try:
            return Holder.from_mapping(json.loads(read_private(self.holder)[0]))
        except (OSError, ValueError, TypeError):
            return None

    @staticmethod
    def read_outcome(path: Path) -> Outcome | None:
        return FileLayout.read_outcome_at(path)[0]

    @staticmethod
    def read_outcome_at(path: Path) -> tuple[Outcome | None, float | None]:
        """The outcome in ``path`` and its file's mtime; (None, None) when missing or unreadable."""
        try:
            text, mtime = read_private(path)
            return Outcome.from_json(text), mtime
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None, None

    @staticmethod
    def job_keys(directory: Path, prefix: str) -> list[str]:
        """Job keys that have a lock or outcome file in ``directory`` (for the CLI's status); the directory must
        have been verified. An unreadable directory raises ``OSError``."""
        head = _part(prefix) + SEP
        keys: set[str] = set()
        for name in os.listdir(directory):
            parts = name.split(SEP)
            if not name.startswith(head) or len(parts) < 3:
                continue
            if parts[2] == "lock" or (parts[2] == "outcome" and len(parts) == 4):
                keys.add(unquote(parts[1]))
        return sorted(keys)


# Lock descriptors this process holds, by lock file: ``hyperion-lock run`` passes its job's one to the command.
_HELD: dict[Path, int] = {}


def held_lock_fd(lock: Path) -> int | None:
    """The descriptor through which this process holds the flock of ``lock`` (a :attr:`FileLayout.lock`), if any.

    A child that inherits it shares the lock: it stays held until the last process with the descriptor is gone.
    """
    return _HELD.get(lock)


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
            try:
                verify_lock_dir(self.dir, create=True)
            except ConfigurationError as exc:
                raise ConfigurationError(str(exc), key=self.key, generation=self.generation) from None
            try:
                self._fd = os.open(self.files.lock, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o600)
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise
                raise ConfigurationError(
                    f"refusing the lock file {self.files.lock}: it is a symbolic link; remove it",
                    key=self.key, generation=self.generation,
                ) from None

    def _held_now(self, held: bool) -> None:
        self._held = held
        if held and self._fd is not None:
            _HELD[self.files.lock] = self._fd
        else:
            _HELD.pop(self.files.lock, None)

    def _write_atomic(self, path: Path, text: str) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-")
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def _outcome(self) -> tuple[Outcome | None, float | None]:
        """This generation's outcome and its age; (None, None) when there is none.

        An outcome file that is there but not an outcome (corrupt, truncated by hand, not a regular file) is a
        :class:`CorruptStateError`, as in Redis: taking it for "no outcome" would run a done job again. Any other
        error reading it is raised too (``failure`` names the directory).
        """
        path = self.files.outcome(self.generation)
        try:
            text, mtime = read_private(path)
            outcome = Outcome.from_json(text)
        except FileNotFoundError:
            return None, None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CorruptStateError(
                f"the outcome file {path} is not what hyperion_lock writes ({exc}): corrupt, or written by something "
                f"else. Nothing was changed; clear it with `hyperion-lock reset {self.key} --generation "
                f"{self.generation}{_prefix_option(self.settings.key_prefix)}` with the same lock directory (the next "
                "call runs the job)",
                key=self.key, generation=self.generation,
            ) from None
        return outcome, max(0.0, time.time() - mtime)

    def _release(self) -> None:
        if self._held and self._fd is not None:
            with contextlib.suppress(OSError):
                self.files.holder.unlink()  # nobody holds it now: waiters must not name a finished run
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._held_now(False)

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
                self._held_now(True)
            except BlockingIOError:
                pass
        if not self._held:
            return Probe(outcome, self.files.read_holder(), outcome_age=age)
        try:
            fence = int(read_private(self.files.fence)[0].strip() or 0) + 1
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
        self._held_now(True)
        return Event(Status.RELEASED, self.generation)

    async def renew(self, lease: Lease) -> RenewResult:
        return RenewResult.RENEWED  # a flock does not expire while its process lives

    async def finish(self, lease: Lease, outcome: Outcome | None) -> FinishResult:
        """A flock cannot be taken over while its process lives: always recorded."""
        if outcome is not None:
            try:
                previous, _ = self._outcome()
            except CorruptStateError:  # made corrupt while the job ran: replaced by what the job did
                previous = None
            if not (previous and previous.status is Status.DONE and outcome.status is not Status.DONE):
                self._write_atomic(self.files.outcome(self.generation), outcome.to_json())
        self._release()
        return FinishResult.RECORDED

    async def close(self) -> None:
        with self._guard:
            self._closed = True
            pending = self._thread_running
        if pending:  # the blocked thread owns the descriptor now and closes it when it wakes
            self._held_now(False)
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
