"""The docs are executable: every Python and shell block of README.md and docs/*.md runs here, or
says why not.

A block that does not run carries a marker, a one-line HTML comment on the line right before its
fence (GitHub does not render it; it is there for whoever edits the block)::

    <!-- illustrative: why it does not run here, and the test that covers what it shows -->

Rules, each checked by :func:`test_every_block_runs_or_is_marked`: every fence names its language
(``text`` for output); a ``python`` or ``bash`` block runs unless it is marked; a block in another
code language (``sh``, ``console``, ...) must be marked, since nothing here runs it; a marker stands
right before a block, says why, and every ``tests/...py::name`` it names exists (so a renamed
covering test cannot leave a stale marker behind).

How they run (:func:`test_the_blocks_of_a_document_run`): Sybil parses each document; its blocks run
in order, in one namespace per document (a later snippet uses the app an earlier one made) and one
event loop (top-level ``await`` is allowed, as in the asyncio REPL). ``HYPERION_LOCK_REDIS_URL``
points at a private ``redis-server`` (the ``redis_server`` fixture), and ``hyperion_lock_isolated``
gives the document its own generation, prefix and lock directory. Shell blocks run under ``bash -euo
pipefail`` from the repository root, with ``hyperion-lock`` running this tree's code (the console
script of ``pyproject.toml``) and ``redis-cli`` talking to that server; ``$G`` is the generation. A
snippet that leans on names from its surroundings (the model its endpoint returns, the engine its
job takes) finds them in :data:`CONTEXT`; :data:`HOOKS` prepare for a block and check what it did or
defined (an app's lifespan runs and its endpoint answers), so a block that only defines things still
has to work.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import logging
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import tomllib
from collections.abc import Callable, Coroutine, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aredis
from fastapi import Depends, FastAPI
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from sybil import Document, Example, Sybil
from sybil.evaluators.python import pad
from sybil.parsers.markdown import CodeBlockParser
from sybil.parsers.markdown.lexers import RawFencedCodeBlockLexer

from hyperion_lock import Coordinator, gunicorn_child_exit
from hyperion_lock.connection.clients import aclose
from hyperion_lock.testing import Isolation, RedisServer

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DOCS = ("README.md", *(f"docs/{path.name}" for path in sorted((ROOT / "docs").glob("*.md"))))
RUN = ("python", "bash")  # the languages run here
#: Code languages: a block in one of them runs here (RUN) or is marked illustrative.
CODE = frozenset({*RUN, "py", "python3", "pycon", "sh", "shell", "console", "zsh"})
MARKER = re.compile(r"^[ \t]*<!--[ \t]*illustrative:(?P<why>.*?)-->[ \t]*$", re.MULTILINE)
NAMED_TEST = re.compile(r"\b(tests/[\w/]+\.py)(?:::(\w+))?")
INFO = re.compile(r"(?P<info>[^\n]*)$\n", re.MULTILINE)


@dataclass(frozen=True)
class Block:
    doc: str
    line: int
    language: str  # "" when the fence names none
    source: str
    marker: str | None  # the marker's reason, when the block is illustrative
    start: int

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def runs(self) -> bool:
        return self.language in RUN and self.marker is None


def _marker_before(text: str, start: int) -> str | None:
    """The reason of the marker on the line right before the fence at ``start``, or None."""
    line_start = text.rfind("\n", 0, max(start - 1, 0)) + 1
    previous = text[line_start:start].rstrip("\n")
    match = MARKER.fullmatch(previous)
    return match.group("why").strip() if match else None


def blocks(doc: str) -> list[Block]:
    """Every fenced block of ``doc`` (Sybil's Markdown lexer), with its language and marker."""
    document = Document((ROOT / doc).read_text(), str(ROOT / doc))
    found = []
    for region in RawFencedCodeBlockLexer(info_pattern=INFO)(document):
        info = str(region.lexemes["info"]).strip()
        found.append(
            Block(
                doc=doc,
                line=document.text.count("\n", 0, region.start) + 1,
                language=info.split()[0] if info else "",
                source=str(region.lexemes["source"]),
                marker=_marker_before(document.text, region.start),
                start=region.start,
            )
        )
    return found


# --- what the snippets lean on, and what is checked around them -----------------------------------


@dataclass
class DocRun:
    """One document's run: its server, namespace, event loop and shell environment."""

    server: RedisServer
    isolation: Isolation
    tmp: Path
    runner: asyncio.Runner
    capsys: pytest.CaptureFixture[str]
    monkeypatch: pytest.MonkeyPatch
    namespace: dict[str, Any] = field(default_factory=dict)
    shell_env: dict[str, str] = field(default_factory=dict)
    closers: list[Callable[[], Coroutine[Any, Any, Any]]] = field(default_factory=list)

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self.runner.run(coro)


class Quote(BaseModel):
    symbol: str
    range: str
    price: Decimal


class Rate(BaseModel):
    pair: str
    rate: Decimal


class Watchlist(BaseModel):
    symbols: list[str]


class Session:
    """Stands for a database session, as a dependency of a cached endpoint."""


class Calls:
    """A callable that records its calls and returns what ``answer`` makes of them."""

    def __init__(self, answer: Callable[..., Any]) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.answer = answer

    def __call__(self, *args: Any) -> Any:
        self.calls.append(args)
        return self.answer(*args)


def _readme_context(run: DocRun) -> dict[str, Any]:
    async def fetch_quote(symbol: str, range: str) -> Quote:
        return Quote(symbol=symbol, range=range, price=Decimal("101.5"))

    client = aredis.Redis.from_url(run.server.url)
    run.closers.append(lambda: aclose(client))  # redis-py 4.6 has no Redis.aclose()
    return {
        "Quote": Quote,
        "fetch_quote": Calls(fetch_quote),
        "init_db": Calls(lambda engine: None),
        "redis_client": client,
        "number_of_workers": 4,
        "logger": logging.getLogger("docs.readme"),
        "engine": "the engine",
    }


def _caching_context(run: DocRun) -> dict[str, Any]:
    async def fetch() -> Rate:
        return Rate(pair="EURUSD", rate=Decimal("1.08"))

    def session() -> Session:
        return Session()

    return {
        "app": FastAPI(),
        "Quote": Quote,
        "Session": Session,
        "session": session,
        "Depends": Depends,
        "Decimal": Decimal,
        "Rate": Rate,
        "fetch": fetch,
        "fetch_sync": lambda: Rate(pair="EURUSD", rate=Decimal(1)),
        "Watchlist": Watchlist,
        "HTTPBearer": HTTPBearer,
        "HTTPAuthorizationCredentials": HTTPAuthorizationCredentials,
    }


#: Names a document's snippets take from their surroundings, by document.
CONTEXT: dict[str, Callable[[DocRun], dict[str, Any]]] = {
    "README.md": _readme_context,
    "docs/caching.md": _caching_context,
    "docs/metrics.md": lambda run: {"app": FastAPI()},
}


async def _get(app: Any, *paths: str, lifespan: bool = False) -> list[httpx.Response]:
    """GET each path from ``app`` in turn through its ASGI interface (in its lifespan if asked)."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://docs.test") as client:
        if not lifespan:
            return [await client.get(path) for path in paths]
        async with app.router.lifespan_context(app):
            return [await client.get(path) for path in paths]


def _usage_starts(run: DocRun) -> None:
    app = run.namespace["app"]
    run.capsys.readouterr()

    async def start_and_stop() -> None:
        async with app.router.lifespan_context(app):
            pass

    run.run(start_and_stop())
    out = run.capsys.readouterr().out
    assert "migrating sqlite:///app.db with fencing token 1" in out, out
    assert "migrate: ran here=True" in out, out


def _dropin_ran_the_job_once(run: DocRun) -> None:
    assert run.namespace["init_db"].calls == [("the engine",)]


def _cached_endpoint_serves(run: DocRun) -> None:
    app, cache, fetch_quote = (
        run.namespace["app"],
        run.namespace["cache"],
        run.namespace["fetch_quote"],
    )

    async def three_requests() -> tuple[list[httpx.Response], int]:
        first, second = await _get(app, "/quotes/AAPL", "/quotes/AAPL")
        dropped = await cache.invalidate_tag("quotes", "symbol:AAPL")
        (third,) = await _get(app, "/quotes/AAPL")
        return [first, second, third], dropped

    responses, dropped = run.run(three_requests())
    assert [r.status_code for r in responses] == [200, 200, 200], [r.text for r in responses]
    assert [r.headers["X-Cache"] for r in responses] == ["MISS", "HIT", "MISS"]
    assert responses[0].json() == {"symbol": "AAPL", "range": "1d", "price": "101.5"}
    assert dropped == 1
    assert fetch_quote.calls == [("AAPL", "1d"), ("AAPL", "1d")]


def _gunicorn_accepts_the_settings(run: DocRun) -> None:
    from gunicorn.config import Config

    config = Config()
    names = (
        "wsgi_app",
        "worker_class",
        "workers",
        "on_starting",
        "post_fork",
        "control_socket_disable",
        "logconfig_dict",
    )
    for name in names:
        config.set(name, run.namespace[name])  # AttributeError for a name gunicorn does not know
    assert config.worker_class_str == "uvicorn_worker.UvicornWorker"
    assert config.settings["control_socket_disable"].get() is True


def _jobs_done_for_the_cli(run: DocRun) -> None:
    async def seed() -> None:
        await Coordinator(run.server.url).run_once("seed", lambda: None)

    run.run(seed())  # migrate is done too: the usage example's lifespan ran it in this generation
    run.shell_env["G"] = run.isolation.generation
    run.shell_env["DATABASE_URL"] = f"sqlite:///{run.tmp / 'cli.sqlite3'}"


def _cli_migrated(run: DocRun) -> None:
    # closing(): a sqlite3 connection's own context manager commits but does not close (Python 3.13
    # reports the unclosed connection as an unraisable ResourceWarning, which fails the run).
    with closing(sqlite3.connect(run.tmp / "cli.sqlite3")) as db:
        revisions = db.execute("SELECT version_num FROM alembic_version").fetchall()
    assert len(revisions) == 1, revisions  # `run ... -- alembic upgrade head` really ran


def _optional_redis_answers(run: DocRun) -> None:
    (response,) = run.run(_get(run.namespace["app"], "/greeting", lifespan=True))
    assert response.json() == {"greeting": "hello", "cached": "hello"}


def _the_acl_user_runs_a_job(run: DocRun) -> None:
    url = f"redis://app:pw@127.0.0.1:{run.server.port}/0"
    outcome = run.run(Coordinator(url, key_prefix="hyperion_lock").run_once("acl", lambda: None))
    assert outcome.ran_here


def _cache_examples_returned(run: DocRun) -> None:
    assert run.namespace["value"] == Rate(
        pair="EURUSD", rate=Decimal(1)
    )  # get_or_compute_sync's, the last


def _metrics_served(run: DocRun) -> None:
    (response,) = run.run(_get(run.namespace["app"], "/metrics"))
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain"), response.headers


def _no_metrics_dir_yet(run: DocRun) -> None:
    run.monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "")  # restored after the test, as it was
    run.monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")


def _metrics_dir_made(run: DocRun) -> None:
    made = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    try:
        assert made.is_dir() and not any(made.iterdir()), made
        assert run.namespace["child_exit"] is gunicorn_child_exit
    finally:
        shutil.rmtree(made, ignore_errors=True)


@dataclass(frozen=True)
class Hook:
    doc: str
    text: str  # occurs in exactly one runnable block of ``doc``: the block this hook belongs to
    before: Callable[[DocRun], None] | None = None
    after: Callable[[DocRun], None] | None = None


HOOKS = (
    Hook("README.md", "def migrate(database_url", after=_usage_starts),
    Hook("README.md", "await use_lock_for_workers(", after=_dropin_ran_the_job_once),
    Hook("README.md", "@cache.endpoint(", after=_cached_endpoint_serves),
    Hook("README.md", "control_socket_disable", after=_gunicorn_accepts_the_settings),
    Hook(
        "README.md",
        "hyperion-lock status --json",
        before=_jobs_done_for_the_cli,
        after=_cli_migrated,
    ),
    Hook("docs/caching.md", "get_or_compute_sync", after=_cache_examples_returned),
    Hook("docs/deployment.md", "ACL SETUSER app", after=_the_acl_user_runs_a_job),
    Hook("docs/metrics.md", "def metrics()", after=_metrics_served),
    Hook(
        "docs/metrics.md",
        "gunicorn_metrics_dir()",
        before=_no_metrics_dir_yet,
        after=_metrics_dir_made,
    ),
    Hook("docs/optional-redis.md", "/greeting", after=_optional_redis_answers),
)


# --- evaluators -----------------------------------------------------------------------------------


class PythonBlock:
    """Runs a Python block in the document's namespace; a block with top-level ``await`` runs in
    the document's event loop."""

    def __init__(self, run: DocRun) -> None:
        self.doc_run = run

    def __call__(self, example: Example) -> None:
        source = pad(example.parsed, example.line + example.parsed.line_offset)
        code = compile(
            source, example.path, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True
        )
        if code.co_flags & inspect.CO_COROUTINE:
            self.doc_run.run(eval(code, example.namespace))
        else:
            exec(code, example.namespace)
        example.namespace.pop("__builtins__", None)


class ShellBlock:
    """Runs a shell block with ``bash -euo pipefail`` from the repository root; its failure is the
    output."""

    def __init__(self, run: DocRun) -> None:
        self.doc_run = run

    def __call__(self, example: Example) -> str | None:
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", example.parsed],
            cwd=ROOT,
            check=False,
            capture_output=True,
            text=True,
            env=self.doc_run.shell_env,
            stdin=subprocess.DEVNULL,
        )
        if done.returncode != 0:
            output = f"--- stdout:\n{done.stdout}--- stderr:\n{done.stderr}"
            return f"exit status {done.returncode}\n{output}"
        return None


def _console_script() -> tuple[str, str]:
    """``hyperion-lock``'s module and function, from ``[project.scripts]`` of pyproject.toml."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, function = scripts["hyperion-lock"].split(":")
    return module, function


def _shims(bindir: Path, server: RedisServer) -> None:
    """``hyperion-lock`` running this tree's code, and ``redis-cli`` talking to ``server``."""
    bindir.mkdir()
    module, function = _console_script()
    call = f"import sys; from {module} import {function}; sys.exit({function}())"
    real_cli = shutil.which("redis-cli")
    assert real_cli, "redis-cli not found (it comes with redis-server)"
    for name, command in (
        ("hyperion-lock", f'exec {shlex.quote(sys.executable)} -c {shlex.quote(call)} "$@"'),
        ("redis-cli", f'exec {shlex.quote(real_cli)} -p {server.port} "$@"'),
    ):
        path = bindir / name
        path.write_text(f"#!/bin/sh\n{command}\n")
        path.chmod(0o755)


# --- the tests ------------------------------------------------------------------------------------


def _hook_block(hook: Hook) -> list[Block]:
    return [b for b in blocks(hook.doc) if b.runs and hook.text in b.source]


def test_every_block_runs_or_is_marked() -> None:
    problems = []
    counts = {"run": 0, "illustrative": 0}
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        found = blocks(doc)
        for block in found:
            if not block.language:
                problems.append(f"{block.where}: a fence without a language (use text for output)")
            elif block.language in CODE and block.language not in RUN and block.marker is None:
                problems.append(
                    f"{block.where}: a {block.language} block is not run here: use one of {RUN} "
                    "or mark it <!-- illustrative: why -->"
                )
            if block.marker is not None:
                counts["illustrative"] += 1
                problems += _marker_problems(block)
            elif block.language in RUN:
                counts["run"] += 1
        fences = {b.start for b in found}
        for match in MARKER.finditer(text):
            after = text.find("\n", match.end()) + 1
            if after not in fences:
                line = text.count("\n", 0, match.start()) + 1
                problems.append(
                    f"{doc}:{line}: an illustrative marker that is not right before a block"
                )
    for hook in HOOKS:
        matching = _hook_block(hook)
        if len(matching) != 1:
            problems.append(
                f"hook {hook.text!r} of {hook.doc} matches {len(matching)} runnable blocks, not one"
            )
    assert not problems, "\n".join(problems)
    print(f"doc blocks: {counts['run']} run, {counts['illustrative']} illustrative")
    assert (
        counts["run"] >= 10
    )  # the count is a floor: losing runnable blocks unnoticed is what this prevents


def _marker_problems(block: Block) -> list[str]:
    reason = block.marker or ""
    problems = (
        [] if len(reason) >= 10 else [f"{block.where}: the illustrative marker does not say why"]
    )
    for path, name in NAMED_TEST.findall(reason):
        source = ROOT / path
        if not source.is_file():
            problems.append(f"{block.where}: the marker names {path}, which does not exist")
        elif name and not re.search(rf"^(async )?def {name}\(", source.read_text(), re.MULTILINE):
            problems.append(
                f"{block.where}: the marker names {path}::{name}, which is not defined there"
            )
    return problems


@pytest.fixture
def doc_run(
    redis_server: RedisServer,
    hyperion_lock_isolated: Isolation,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[DocRun]:
    monkeypatch.setenv("HYPERION_LOCK_REDIS_URL", redis_server.url)
    bindir = tmp_path / "bin"
    _shims(bindir, redis_server)
    with asyncio.Runner() as runner:
        run = DocRun(
            server=redis_server,
            isolation=hyperion_lock_isolated,
            tmp=tmp_path,
            runner=runner,
            capsys=capsys,
            monkeypatch=monkeypatch,
        )
        python_bin = str(
            Path(sys.executable).parent
        )  # alembic and the other console scripts of this Python
        run.shell_env = {
            **os.environ,
            "PATH": os.pathsep.join((str(bindir), python_bin, os.environ["PATH"])),
            "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))),
        }
        try:
            yield run
        finally:
            for value in list(run.namespace.values()):
                if hasattr(value, "aclose") and type(value).__module__.startswith("hyperion_lock"):
                    runner.run(value.aclose())
            for close in run.closers:
                runner.run(close())


@pytest.mark.parametrize("doc", [doc for doc in DOCS if any(block.runs for block in blocks(doc))])
def test_the_blocks_of_a_document_run(doc: str, doc_run: DocRun) -> None:
    hooks = {id(hook): hook for hook in HOOKS if hook.doc == doc}
    by_start = {block.start: block for block in blocks(doc)}
    parsers = [
        CodeBlockParser("python", PythonBlock(doc_run)),
        CodeBlockParser("bash", ShellBlock(doc_run)),
    ]
    document = Sybil(parsers=parsers).parse(ROOT / doc)
    document.namespace.update(CONTEXT[doc](doc_run) if doc in CONTEXT else {})
    doc_run.namespace = document.namespace
    ran = 0
    for example in document.examples():
        block = by_start[
            example.region.start
        ]  # the parser's region starts at the fence, as the lexer's
        if block.marker is not None:
            continue
        mine = [hook for hook in hooks.values() if hook.text in block.source]
        for hook in mine:
            if hook.before:
                hook.before(doc_run)
        try:
            example.evaluate()
            for hook in mine:
                if hook.after:
                    hook.after(doc_run)
        except Exception as exc:
            raise AssertionError(
                f"the block at {block.where} failed: {type(exc).__name__}: {exc}"
            ) from exc
        ran += 1
    assert ran == sum(block.runs for block in by_start.values())
