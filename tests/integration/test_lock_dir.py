"""The file-lock directory is trusted only when it is private to this user: another local user (a real second
uid here, ``nobody``) who made the predictable default directory first, or a symbolic link in it, is refused with
an error naming the path, its owner and mode, instead of holding our lock, skipping our job or redirecting our
writes. Also: file names that cannot collide, and the CLI's own words for file-lock errors."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hyperion_lock import ConfigurationError, Coordinator
from hyperion_lock.runonce.file_backend import FileLayout
from hyperion_lock.settings import default_lock_dir
from tests.support import wait_until
from tests.support.deploy import clean_env

pytestmark = pytest.mark.integration

NOBODY = 65534
OUTCOME_DONE = {"key": "k", "generation": "g1", "status": "done", "fencing_token": 1, "runner_host": "elsewhere",
                "runner_pid": 1, "started_at": 1.0, "finished_at": 2.0}


def as_nobody(script: str) -> subprocess.Popen[bytes]:
    """A shell script run as the other local user."""
    return subprocess.Popen(["sh", "-c", script], user=NOBODY, group=NOBODY, extra_groups=[])


def run_as_nobody(script: str) -> None:
    proc = as_nobody(script)
    assert proc.wait(60) == 0, script


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A world-writable sticky directory like /tmp (pytest's tmp_path is private to root, nobody cannot use it)."""
    path = Path(tempfile.mkdtemp(prefix="hyperion-shared-tmp-"))
    path.chmod(0o1777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run_cli(*args: str, cwd: Path, tmp: Path, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in clean_env(TMPDIR=str(tmp), **env).items() if k != "XDG_RUNTIME_DIR"}
    return subprocess.run([sys.executable, "-m", "hyperion_lock.cli.main", *args], cwd=cwd, env=base, text=True,
                          capture_output=True, timeout=timeout, check=False)


def taken_over(shared_tmp: Path, app: Path) -> Path:
    """The other user makes this user's default lock directory first, open to everyone (as a 0777 umask would)."""
    victim = Path(default_lock_dir(str(app), tmp=str(shared_tmp), uid=os.getuid()))
    run_as_nobody(f"mkdir -p '{victim}' && chmod 777 '{victim.parent}' '{victim}'")
    return victim


@pytest.mark.parametrize("attack", ["holds the lock", "plants a done outcome", "symlinks the lock file"])
def test_default_lock_dir_made_by_another_user_is_refused(attack: str, shared_tmp: Path, tmp_path: Path) -> None:
    """Before, the other user could hold the flock (we waited forever), write a done outcome (our job was skipped)
    or link the lock file elsewhere (we, root, created a file there)."""
    app = tmp_path / "app"
    app.mkdir()
    victim = taken_over(shared_tmp, app)
    files = FileLayout(victim, "hyperion_lock", "k")
    marker, elsewhere = tmp_path / "ran", shared_tmp / "written-by-root"
    holder = None
    if attack == "holds the lock":
        ready = shared_tmp / "ready"
        holder = as_nobody(f"exec flock -x '{files.lock}' sh -c 'touch {ready}; sleep 120'")
        wait_until(ready.exists, "the other user holds the lock")
    elif attack == "plants a done outcome":
        run_as_nobody(f"echo '{json.dumps(OUTCOME_DONE)}' > '{files.outcome('g1')}'")
    else:
        run_as_nobody(f"ln -s '{elsewhere}' '{files.lock}'")
    try:
        result = run_cli("run", "--key", "k", "--generation", "g1", "--", f"touch {marker}", cwd=app, tmp=shared_tmp)
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
    assert result.returncode == 64, result
    assert not marker.exists() and not elsewhere.exists()
    assert f"refusing the lock directory {victim.parent}" in result.stderr or str(victim) in result.stderr, result
    assert f"uid {os.getuid()}" in result.stderr and "mode 0777" in result.stderr, result.stderr
    # status and reset refuse it too (exit 3: the state cannot be read), instead of reporting what is planted there
    for args in (["status"], ["reset", "k"]):
        report = run_cli(*args, cwd=app, tmp=shared_tmp)
        assert report.returncode == 3 and "refusing the lock directory" in report.stderr, report


def test_default_lock_dir_that_is_another_users_symlink_is_refused(shared_tmp: Path, tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    victim = Path(default_lock_dir(str(app), tmp=str(shared_tmp), uid=os.getuid()))
    theirs = shared_tmp / "theirs"
    run_as_nobody(f"mkdir -m 700 '{theirs}' && ln -s '{theirs}' '{victim.parent}'")
    result = run_cli("run", "--key", "k", "--generation", "g1", "--", "true", cwd=app, tmp=shared_tmp)
    assert result.returncode == 64 and "refusing the lock directory" in result.stderr, result
    assert f"uid {NOBODY}" in result.stderr
    assert not any(theirs.iterdir())  # nothing of ours was made in the other user's directory


def test_explicit_lock_dir_of_another_user_is_refused(shared_tmp: Path, tmp_path: Path) -> None:
    theirs = shared_tmp / "locks"
    run_as_nobody(f"mkdir -m 777 '{theirs}' && chmod 777 '{theirs}'")
    result = run_cli("run", "--key", "k", "--generation", "g1", "--", "true", cwd=tmp_path, tmp=shared_tmp,
                     HYPERION_LOCK_LOCK_DIR=str(theirs))
    assert result.returncode == 64, result
    assert f"refusing the lock directory {theirs}: it belongs to another user" in result.stderr, result.stderr
    assert f"owner uid {NOBODY}, mode 0777" in result.stderr
    assert not any(theirs.iterdir())


def test_own_directory_open_to_others_is_refused(tmp_path: Path) -> None:
    open_dir = tmp_path / "locks"
    open_dir.mkdir()
    open_dir.chmod(0o755)
    with pytest.raises(ConfigurationError, match=r"other users have access to it.*mode 0755"):
        Coordinator(None, lock_dir=str(open_dir), generation="g").run_once_sync("k", lambda: None)


def test_symlinked_lock_file_is_not_followed(tmp_path: Path) -> None:
    locks, target = tmp_path / "locks", tmp_path / "target"
    locks.mkdir(mode=0o700)
    FileLayout(locks, "hyperion_lock", "k").lock.symlink_to(target)
    ran: list[int] = []
    with pytest.raises(ConfigurationError, match="is a symbolic link"):
        Coordinator(None, lock_dir=str(locks), generation="g").run_once_sync("k", lambda: ran.append(1))
    assert not target.exists() and not ran


def test_lock_dir_is_created_private_with_a_private_parent(tmp_path: Path) -> None:
    from hyperion_lock.runonce.file_backend import verify_lock_dir

    leaf = tmp_path / "per-user" / "app"
    assert verify_lock_dir(leaf, create=True)
    for level in (leaf, leaf.parent):
        st = os.lstat(level)
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()
    assert not verify_lock_dir(tmp_path / "missing", create=False) and not (tmp_path / "missing").exists()


def test_xdg_runtime_dir_is_preferred(tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    code = ("from hyperion_lock import Coordinator; from hyperion_lock.settings import Settings; "
            "print(Settings().lock_dir); print(Coordinator(None, generation='g').run_once_sync('k', int).ran_here)")
    env = {**clean_env(), "XDG_RUNTIME_DIR": str(runtime)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True, timeout=60).stdout.split()
    assert out[0].startswith(str(runtime / "hyperion_lock") + "/") and out[1] == "True"
    assert stat.S_IMODE(os.lstat(out[0]).st_mode) == 0o700


# -- file names ------------------------------------------------------------------------------------------------
def test_prefix_and_key_never_share_a_file(tmp_path: Path) -> None:
    """``shop.staging`` + ``migrate`` and ``shop`` + ``staging.migrate`` are two jobs (they shared their files)."""
    ran: list[str] = []
    one = Coordinator(None, lock_dir=str(tmp_path), key_prefix="shop.staging", generation="g")
    two = Coordinator(None, lock_dir=str(tmp_path), key_prefix="shop", generation="g")
    assert one.run_once_sync("migrate", lambda: ran.append("one")).ran_here
    assert two.run_once_sync("staging.migrate", lambda: ran.append("two")).ran_here
    assert ran == ["one", "two"]
    assert FileLayout.job_keys(tmp_path, "shop") == ["staging.migrate"]
    assert FileLayout.job_keys(tmp_path, "shop.staging") == ["migrate"]
    assert FileLayout(tmp_path, "team/app", "db:seed").lock.name == "team%2Fapp+db%3Aseed+lock"


# -- the CLI's words for file-lock errors ----------------------------------------------------------------------
def nobody_cli(*args: str, lock_dir: Path) -> subprocess.CompletedProcess[str]:
    """The CLI as the other user: imported as root (the interpreter is root's), then run as uid ``nobody``."""
    code = ("import os, sys; import hyperion_lock.cli.main as cli; "
            f"os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY}); sys.exit(cli.main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, *args], env=clean_env(HYPERION_LOCK_LOCK_DIR=str(lock_dir)),
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def nobody_dir(shared_tmp: Path) -> Path:
    path = shared_tmp / "locks"
    path.mkdir(mode=0o700)
    os.chown(path, NOBODY, NOBODY)
    return path


def test_status_on_an_unreadable_lock_dir_fails(nobody_dir: Path) -> None:
    """Before: "no run-once jobs found", exit 0, for a directory it could not list."""
    (nobody_dir / FileLayout(nobody_dir, "hyperion_lock", "k").outcome("g1").name).write_text(json.dumps(OUTCOME_DONE))
    nobody_dir.chmod(0o300)  # its owner may enter it but not list it
    result = nobody_cli("status", lock_dir=nobody_dir)
    assert result.returncode == 3, result
    assert f"cannot use the file locks in {nobody_dir}" in result.stderr and "Permission denied" in result.stderr
    assert "Redis" not in result.stderr and "no run-once jobs found" not in result.stdout


def test_reset_of_an_outcome_it_cannot_remove_says_so(nobody_dir: Path) -> None:
    """Before: "cannot use Redis at file locks …"."""
    outcome = FileLayout(nobody_dir, "hyperion_lock", "k").outcome("g1")
    outcome.write_text(json.dumps(OUTCOME_DONE))  # root's file ...
    nobody_dir.chmod(0o500)  # ... in a directory its owner cannot write to
    result = nobody_cli("reset", "k", lock_dir=nobody_dir)
    assert result.returncode == 3, result
    assert f"{outcome}: Permission denied" in result.stderr and "Redis" not in result.stderr, result.stderr
    assert outcome.exists()
    listed = nobody_cli("status", "--json", lock_dir=nobody_dir)
    assert listed.returncode == 0 and json.loads(listed.stdout)["jobs"][0]["state"] == "done", listed


@pytest.mark.parametrize("planted", ["outcome+g2.json", "fence", "lock"])
def test_a_fifo_in_the_lock_dir_does_not_hang(planted: str, tmp_path: Path) -> None:
    """A named pipe where an outcome, fence or lock file should be (a broken tool, a mistaken mkfifo): status and
    run treat it as unreadable and go on (an outcome that cannot be read is refused as corrupt until reset). Before,
    opening it for reading blocked for ever, waiting for a writer (``run`` then ignored SIGTERM too: no command was
    running to pass it on to)."""
    lock_dir = tmp_path / "locks"
    assert run_cli("run", "--key", "k", "--generation", "g1", "--", "true", cwd=tmp_path, tmp=tmp_path,
                   HYPERION_LOCK_LOCK_DIR=str(lock_dir)).returncode == 0
    fifo = lock_dir / f"hyperion_lock+k+{planted}"
    fifo.unlink(missing_ok=True)
    os.mkfifo(fifo, 0o600)
    status = run_cli("status", "--generation", "g1", cwd=tmp_path, tmp=tmp_path, HYPERION_LOCK_LOCK_DIR=str(lock_dir))
    assert status.returncode == 0, status.stderr
    ran = tmp_path / "ran"
    run = run_cli("run", "--key", "k", "--generation", "g2", "--", f"touch {ran}", cwd=tmp_path, tmp=tmp_path,
                  HYPERION_LOCK_LOCK_DIR=str(lock_dir))
    if planted.startswith("outcome"):
        assert run.returncode == 64 and str(fifo) in run.stderr and "corrupt" in run.stderr, run.stderr
        assert not ran.exists()
        fifo.unlink()
        run = run_cli("run", "--key", "k", "--generation", "g2", "--", f"touch {ran}", cwd=tmp_path, tmp=tmp_path,
                      HYPERION_LOCK_LOCK_DIR=str(lock_dir))
    assert run.returncode == 0 and ran.exists(), run.stderr
    status = run_cli("status", "--generation", "g2", cwd=tmp_path, tmp=tmp_path, HYPERION_LOCK_LOCK_DIR=str(lock_dir))
    assert status.returncode == 0 and "done" in status.stdout, status


@pytest.mark.parametrize("content", ['{"status": "do', "", "[1, 2]", '{"status": "done"}'])
def test_a_corrupt_outcome_is_refused_not_taken_for_none(content: str, tmp_path: Path) -> None:
    """The outcome file of a done job is corrupt (truncated, emptied, edited): run refuses with an error naming the
    file and the reset that clears it, and does not run the job again (status warns about the file); after that
    reset it runs. Before, the file was taken for "no outcome" and the done job ran a second time (a JSON list:
    run and status crashed with a traceback); with Redis a corrupt value was already refused."""
    lock_dir = tmp_path / "locks"
    ran = tmp_path / "ran"

    def run() -> subprocess.CompletedProcess[str]:
        return run_cli("run", "--key", "k", "--generation", "g1", "--", f"echo x >> {ran}", cwd=tmp_path,
                       tmp=tmp_path, HYPERION_LOCK_LOCK_DIR=str(lock_dir))

    assert run().returncode == 0
    outcome = lock_dir / "hyperion_lock+k+outcome+g1.json"
    outcome.write_text(content)
    refused = run()
    assert refused.returncode == 64, refused.stderr
    assert str(outcome) in refused.stderr and "hyperion-lock reset k --generation g1" in refused.stderr
    assert ran.read_text() == "x\n", "the done job ran again"
    status = run_cli("status", "--generation", "g1", cwd=tmp_path, tmp=tmp_path, HYPERION_LOCK_LOCK_DIR=str(lock_dir))
    assert "Traceback" not in status.stderr and "not a readable outcome" in status.stderr, status.stderr
    assert run_cli("reset", "k", "--generation", "g1", cwd=tmp_path, tmp=tmp_path,
                   HYPERION_LOCK_LOCK_DIR=str(lock_dir)).returncode == 0
    assert run().returncode == 0 and ran.read_text() == "x\nx\n"


def test_xdg_runtime_dir_of_another_user_is_ignored(shared_tmp: Path) -> None:
    """``su app`` keeps root's ``XDG_RUNTIME_DIR``: a directory the user cannot write to. The default lock directory
    then falls back to ``$TMP/hyperion_lock-<uid>``, and the job runs. Before, every call (every worker, every
    ``hyperion-lock run``) failed with "cannot use the lock directory /…/hyperion_lock/… (Permission denied)"."""
    runtime = shared_tmp / "root-runtime"
    runtime.mkdir(mode=0o700)  # root's
    app = shared_tmp / "app"
    app.mkdir(mode=0o777)
    code = ("import os; from hyperion_lock import Coordinator; "
            f"os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY}); "
            "Coordinator(None, generation='g1').run_once_sync('k', print, 'ran')")
    env = clean_env(TMPDIR=str(shared_tmp), XDG_RUNTIME_DIR=str(runtime))
    result = subprocess.run([sys.executable, "-c", code], cwd=app, env=env, capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0 and result.stdout.strip() == "ran", result.stderr
    [made] = (shared_tmp / f"hyperion_lock-{NOBODY}").iterdir()
    assert os.lstat(made).st_uid == NOBODY and not list(runtime.iterdir())
