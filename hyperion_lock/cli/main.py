"""``hyperion-lock``: look at, reset and use run-once jobs from a shell, with the same keys as the app.

    hyperion-lock status [--json] [--generation G] [--key K ...]
    hyperion-lock reset KEY [--generation G] [--force]
    hyperion-lock run --key K [--generation G] -- CMD [ARG ...]
    hyperion-lock wait --key K [--generation G] [--timeout S]

Where the state lives: ``--url`` or ``HYPERION_LOCK_REDIS_URL``; without either, the file locks of this host in
``HYPERION_LOCK_LOCK_DIR``. ``--prefix`` / ``HYPERION_LOCK_KEY_PREFIX`` select the key prefix.

Exit codes (usable by a health check) and what ``status`` judges: :data:`EXIT_CODES_HELP`, printed at the end of
``hyperion-lock --help``.

This module is the console entry point (the parser and the exit code of a bad configuration); each
command lives in its own module: :mod:`.status`, :mod:`.reset`, :mod:`.run` (``run`` and ``wait``),
sharing :mod:`.common`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from hyperion_lock.cli.common import EXIT_OK, EXIT_USAGE
from hyperion_lock.cli.reset import cmd_reset
from hyperion_lock.cli.run import cmd_run, cmd_wait
from hyperion_lock.cli.status import cmd_status
from hyperion_lock.errors import HyperionLockError

#: The epilog of ``--help``: exit codes per command, and which generation ``status`` judges.
EXIT_CODES_HELP = """\
exit codes (usable by a health check):

status  0 every job done · 1 a job failed (its outcome failed and nothing runs it now), or its lease in
        Redis is corrupt (reset clears it) · 2 a job is running, or a job named with --key has no outcome
        yet · 3 Redis unreachable or refusing us
        (credentials, ACL, TLS, DB index), or the lock directory unreadable or refused (not private to this
        user) · 64 bad usage.
        It judges one generation: --generation G, else the current one, the generation of the newest lease
        or outcome among all jobs of the prefix (a failure of an older deployment no longer counts). Jobs
        with no outcome in it (not run yet, reset, expired after the result TTL, or only run by older
        generations) show as idle and count as fine unless named with --key: a health check should name
        its jobs, e.g. status --key migrate --key seed --generation "$G".
reset   0 cleared (or nothing to clear) · 1 refused: a live lease exists (--force drops it) · 3 (as for
        status) · 64
run     where the command ran: its exit code (128+N when killed by signal N; SIGTERM/SIGINT are passed on to
        the command's process group, whose exit is recorded as the outcome); elsewhere: 0 once it succeeded
        somewhere, its exit code when it failed there · 1 this run lost its lease to another worker · 3 Redis
        unreachable or refusing us · 64 bad usage (e.g. no generation), or a lock directory refused · 130
        interrupted while waiting
wait    0 the job is done for the generation · 1 it failed (now, or within the failure hold) · 2 timed out
        (--timeout) · 3 Redis unreachable or refusing us · 64 bad usage · 130 interrupted. It never runs the
        job, and does not replace a runner that died: pair it with run (a Kubernetes Job)
"""


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=None, help="Redis URL (default: $HYPERION_LOCK_REDIS_URL; none: file locks)")
    common.add_argument("--prefix", default=None,
                        help="key prefix (default: $HYPERION_LOCK_KEY_PREFIX or hyperion_lock)")
    common.add_argument("-v", "--verbose", action="store_true", help="log the coordinator's steps to stderr")
    parser = argparse.ArgumentParser(prog="hyperion-lock", description=(__doc__ or "").split("\n\n")[0],
                                     epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command_name", required=True)
    tail: dict[str, Any] = {"epilog": EXIT_CODES_HELP, "formatter_class": argparse.RawDescriptionHelpFormatter}
    status = sub.add_parser("status", parents=[common], help="state of every run-once job (exit 0/1/2/3)", **tail)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--generation", default=None,
                        help="judge this generation (default: the newest lease or outcome's, see below)")
    status.add_argument("--key", action="append", help="only these jobs; a missing one counts as pending")
    status.set_defaults(func=cmd_status)
    reset = sub.add_parser("reset", parents=[common], help="clear a job's recorded outcome(s)", **tail)
    reset.add_argument("job_key", metavar="KEY")
    reset.add_argument("--generation", default=None, help="only this generation's outcome (default: all)")
    reset.add_argument("--force", action="store_true", help="also drop a live lease (its holder must be gone)")
    reset.set_defaults(func=cmd_reset)
    run = sub.add_parser("run", parents=[common], help="run a command once across all workers and hosts",
                         **tail)
    run.add_argument("--key", required=True, help="job key shared by every caller (e.g. migrate)")
    run.add_argument("--generation", default=None, help="default: $HYPERION_LOCK_GENERATION (required)")
    run.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARG ...]")
    run.set_defaults(func=cmd_run)
    wait = sub.add_parser("wait", parents=[common],
                          help="wait until a job is done elsewhere, never running it (init containers)", **tail)
    wait.add_argument("--key", required=True, help="job key (e.g. migrate)")
    wait.add_argument("--generation", default=None, help="default: $HYPERION_LOCK_GENERATION (required)")
    wait.add_argument("--timeout", type=float, default=None, help="give up after this many seconds (exit 2)")
    wait.set_defaults(func=cmd_wait)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return EXIT_OK if exc.code == 0 else EXIT_USAGE
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s")
    try:
        code: int = args.func(args)
    except HyperionLockError as exc:  # bad configuration (URL, key, generation, ...)
        print(f"hyperion-lock: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return code


if __name__ == "__main__":
    sys.exit(main())
