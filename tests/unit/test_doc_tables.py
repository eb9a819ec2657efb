"""The reference tables of the docs say what the code does: README.md's extras (``pyproject.toml``),
its settings (:class:`~hyperion_lock.Settings` and ``DURATION_BOUNDS``) and its CLI exit codes
(``hyperion_lock/cli/main.py``), docs/caching.md's cache settings
(:class:`~hyperion_lock.CacheSettings` and ``CACHE_SETTING_BOUNDS``), the reference app's variables
in docs/deployment.md, and every link between the documents. Each check names the row that is wrong,
missing or extra."""

from __future__ import annotations

import argparse
import inspect
import re
import tomllib
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from hyperion_lock import Cache, CacheSettings, ConfigurationError, Settings
from hyperion_lock.cache.types import CACHE_SETTING_BOUNDS
from hyperion_lock.cli import common
from hyperion_lock.cli import main as cli
from hyperion_lock.settings import DURATION_BOUNDS, ENV_PREFIX, MAX_REPLICAS, validate_name

ROOT = Path(__file__).resolve().parents[2]
DOCS = ("README.md", *(f"docs/{path.name}" for path in sorted((ROOT / "docs").glob("*.md"))))
UNITS = {
    "": 1.0,
    "s": 1.0,
    "minute": 60.0,
    "hour": 3600.0,
    "day": 86400.0,
    "year": 365 * 86400.0,
    "bytes": 1.0,
    "MiB": float(1 << 20),
}
DASH = "\u2013"  # the en dash of "0.1 s \u2013 1 day"
QUANTITY = re.compile(
    r"(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>s|minutes?|hours?|days?|years?|bytes|MiB)?"
)


def table(doc: str, header: str) -> dict[str, list[str]]:
    """The rows of the table in ``doc`` whose header row starts with ``header``, by the text of
    their first cell (backticks and a trailing ``(...)`` note removed): the other cells."""
    lines = (ROOT / doc).read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(header)), None)
    assert start is not None, f"{doc}: no table with the header {header!r}"
    rows: dict[str, list[str]] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        first, *rest = (cell.strip() for cell in line.strip().strip("|").split(" | "))
        name = re.sub(r"\s*\(.*\)$", "", first).strip("`")
        assert name not in rows, f"{doc}: the row {name!r} appears twice"
        rows[name] = rest
    return rows


def unparenthesized(text: str) -> str:
    while re.search(r"\([^()]*\)", text):
        text = re.sub(r"\([^()]*\)", "", text)
    return text


def quantity(text: str) -> float:
    """``15 s``, ``1 day``, ``0.05 s``, ``16 MiB``, ``1000``: the number in seconds, bytes or units.
    """
    match = QUANTITY.fullmatch(text.replace("`", "").strip())
    assert match, f"not a quantity: {text!r}"
    unit = match["unit"] or ""
    return float(match["number"]) * UNITS[unit if unit in UNITS else unit.removesuffix("s")]


def same_names(what: str, documented: set[str], actual: set[str]) -> list[str]:
    problems = [f"{what}: {name} is missing from the table" for name in sorted(actual - documented)]
    return problems + [
        f"{what}: {name} is in the table but not in the code"
        for name in sorted(documented - actual)
    ]


# --- extras ---------------------------------------------------------------------------------------


def _requirement_key(text: str) -> tuple[str, tuple[str, ...], str]:
    req = Requirement(text)
    return canonicalize_name(req.name), tuple(sorted(req.extras)), str(req.specifier)


def shown(key: tuple[str, tuple[str, ...], str]) -> str:
    name, extras, specifier = key
    return name + (f"[{','.join(extras)}]" if extras else "") + specifier


def test_the_extras_table_is_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {"core": project["dependencies"], **project["optional-dependencies"]}
    rows = table("README.md", "| extra | packages |")
    problems = same_names("README extras", set(rows), set(declared))
    for extra in sorted(set(rows) & set(declared)):
        listed = {_requirement_key(text) for text in re.findall(r"`([^`]+)`", rows[extra][0])}
        wanted = {_requirement_key(text) for text in declared[extra]}
        problems += [
            f"README extras, row {extra}: pyproject.toml has {shown(key)}, the table does not"
            for key in sorted(wanted - listed)
        ]
        problems += [
            f"README extras, row {extra}: the table lists {shown(key)}, pyproject.toml does not"
            for key in sorted(listed - wanted)
        ]
    assert not problems, "\n".join(problems)


# --- run-once settings ----------------------------------------------------------------------------


def readme_range(cell: str) -> tuple[float, float | str]:
    """``0.1 s \u2013 1 day`` -> (0.1, 86400); ``> 0, ≤ 1 hour`` -> (0, 3600) (0: any value above
    0, as in DURATION_BOUNDS); ``> 0, ≤ result TTL`` -> (0, "result TTL")."""
    above_zero = re.fullmatch(r"> 0, ≤ (?P<high>.+)", cell)
    if above_zero:
        high = above_zero["high"]
        return 0.0, high if high == "result TTL" else quantity(high)
    span = re.fullmatch(rf"(?P<low>.+?) {DASH} (?P<high>.+)", cell)
    assert span, f"not a range: {cell!r}"
    return quantity(span["low"]), quantity(span["high"])


def _default_problems(name: str, default: Any, cell: str) -> list[str]:
    if default is MISSING:  # computed (generation, lock directory): described, not a literal
        if not cell or re.fullmatch(r"`[^`]*`( s)?", cell):
            return [f"{name}: the default is computed, the table gives {cell!r}"]
        return []
    if default is None:
        if cell != "unset":
            return [f"{name}: default is unset in the code, {cell!r} in the table"]
        return []
    text = unparenthesized(cell).strip()
    ok = (
        text == f"`{default}`"
        if isinstance(default, str)
        else text.startswith("`") and quantity(text) == default
    )
    return [] if ok else [f"{name}: default is {default!r} in the code, {cell!r} in the table"]


def _range_problems(name: str, field_name: str, cell: str) -> list[str]:
    if field_name in DURATION_BOUNDS:
        low, high = readme_range(cell)
        want_low, want_high = DURATION_BOUNDS[field_name]
        if (
            high == "result TTL"
        ):  # bounded by the result TTL, whose own bound must then be the tighter one
            high = (
                DURATION_BOUNDS["result_ttl"][1]
                if want_high >= DURATION_BOUNDS["result_ttl"][1]
                else -1.0
            )
        if (low, high) != (want_low, want_high):
            return [f"{name}: range {(want_low, want_high)} in the code, {cell!r} in the table"]
        return []
    if field_name == "min_replicas":
        if readme_range(cell) != (0, MAX_REPLICAS):
            return [f"{name}: range 0 {DASH} {MAX_REPLICAS} in the code, {cell!r} in the table"]
        return []
    if field_name in ("generation", "key_prefix"):
        return (
            [] if cell == "name¹" else [f"{name}: checked by validate_name, so name¹, not {cell!r}"]
        )
    return []


def test_the_settings_table_is_settings() -> None:
    rows = table("README.md", "| variable | default | allowed |")
    by_variable = {ENV_PREFIX + f.name.upper(): f for f in fields(Settings)}
    problems = same_names("README settings", set(rows), set(by_variable))
    for name in sorted(set(rows) & set(by_variable)):
        f = by_variable[name]
        default_cell, range_cell, _meaning = rows[name]
        default = f.default if f.default_factory is MISSING else MISSING
        problems += _default_problems(name, default, default_cell)
        problems += _range_problems(name, f.name, range_cell)
    assert not problems, "\n".join(problems)


def test_the_settings_footnotes_hold() -> None:
    """The footnote's 1-200 characters is the name check; the failure hold is bounded by the result
    TTL."""
    note = next(
        line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("¹")
    )
    assert f"1{DASH}200 characters from letters, digits and `_ . - : /`" in note
    assert validate_name("a-Z_0.9:/" + "x" * 191, "name")
    for bad in ("", "x" * 201, "a b", "a{b}"):
        with pytest.raises(ConfigurationError):
            validate_name(bad, "name")
    assert Settings(result_ttl=10, failure_hold=10).failure_hold == 10
    with pytest.raises(ConfigurationError):
        Settings(result_ttl=10, failure_hold=11)


# --- cache settings -------------------------------------------------------------------------------


def cache_range(cell: str) -> tuple[float, float]:
    """``> 0 to 60 s`` -> (0, 60); ``0 (off) to 10000000`` -> (0, 1e7); ``1 to 536870912 bytes (512
    MiB)``."""
    low, _, high = unparenthesized(cell).strip().partition(" to ")
    assert high, f"not a range: {cell!r}"
    return (0.0 if low.strip() == "> 0" else quantity(low)), quantity(high)


def test_the_cache_settings_table_is_cache_settings() -> None:
    rows = table("docs/caching.md", "| setting | default | range |")
    settings = {f.name.upper(): f for f in fields(CacheSettings)}
    keyword_only = {name.upper() for name in inspect.signature(Cache.__init__).parameters} - set(
        settings
    )
    problems = same_names("docs/caching.md settings", set(rows) - keyword_only, set(settings))
    for name in sorted(
        set(rows) & keyword_only
    ):  # read by Cache itself: an argument and a variable of it
        source = "".join(
            path.read_text() for path in (ROOT / "hyperion_lock" / "cache").glob("*.py")
        )
        if f'CACHE_{name}"' not in source:
            problems.append(
                f"docs/caching.md settings: {name} is not read from {ENV_PREFIX}CACHE_{name}"
            )
    for name in sorted(set(rows) & set(settings)):
        f = settings[name]
        default_cell, range_cell, _meaning = rows[name]
        if quantity(default_cell) != f.default:
            problems.append(
                f"{name}: default {f.default!r} in the code, {default_cell!r} in the table"
            )
        low, high = CACHE_SETTING_BOUNDS.get(f.name, (0.0, 86400.0))
        if f.type in ("int", int) and range_cell.startswith("> 0"):
            problems.append(f"{name}: a whole number from {low:g}, not {range_cell!r}")
        if cache_range(range_cell) != (low, high):
            problems.append(f"{name}: range {(low, high)} in the code, {range_cell!r} in the table")
    assert not problems, "\n".join(problems)


# --- CLI exit codes -------------------------------------------------------------------------------


def exit_codes(text: str) -> set[int]:
    """The exit codes a description lists: its numbers outside parentheses (``128+N`` is a note,
    not a code)."""
    return {int(number) for number in re.findall(r"(?<![\w+-])\d+(?![\w+])", unparenthesized(text))}


def help_sections() -> dict[str, str]:
    """``EXIT_CODES_HELP`` cut into its per-command paragraphs (a command's name starts its first
    line)."""
    sections: dict[str, str] = {}
    current = None
    for line in cli.EXIT_CODES_HELP.splitlines():
        head = re.match(r"(\w+)\s{2,}(.*)", line)
        if head:
            current = head[1]
            sections[current] = head[2]
        elif current and line.startswith(" "):
            sections[current] += " " + line.strip()
    return sections


def test_the_exit_codes_table_is_the_cli() -> None:
    rows = table("README.md", "| command | exit codes |")
    subparsers = next(
        a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    )
    commands = set(subparsers.choices)
    helps = help_sections()
    constants = {
        value
        for name, value in vars(common).items()
        if name.startswith("EXIT_") and isinstance(value, int)
    }
    problems = same_names("README exit codes", set(rows), commands)
    problems += same_names("hyperion-lock --help exit codes", set(helps), commands)
    for command in sorted(set(rows) & set(helps)):
        documented, printed = exit_codes(rows[command][0]), exit_codes(helps[command])
        if documented != printed:
            problems.append(
                f"{command}: the README lists exit codes {sorted(documented)}, "
                f"hyperion-lock --help {sorted(printed)}"
            )
        if documented - constants:
            problems.append(
                f"{command}: {sorted(documented - constants)} is no EXIT_* code of the CLI"
            )
    assert not problems, "\n".join(problems)


# --- the reference app's variables, and links -----------------------------------------------------


def test_every_variable_of_the_reference_app_is_in_docs_deployment() -> None:
    sources = [*ROOT.joinpath("demo").glob("*.py"), *ROOT.joinpath("migrations").rglob("*.py")]
    read = {
        name
        for path in sources
        for name in re.findall(r"[\"'](HYPERION_DEMO_[A-Z_]+|DATABASE_URL)[\"']", path.read_text())
    }
    documented = {
        name.strip(" `")
        for row in table("docs/deployment.md", "| variable | default | meaning |")
        for name in row.split(",")
    }
    assert read, "no variable found: the scan is broken"
    assert read <= documented, (
        f"read by the reference app, not in docs/deployment.md: {sorted(read - documented)}"
    )


def slugs(doc: Path) -> set[str]:
    """GitHub's anchors of the headings of ``doc`` (outside code blocks)."""
    text = re.sub(r"^[ \t]*```.*?^[ \t]*```", "", doc.read_text(), flags=re.MULTILINE | re.DOTALL)
    return {
        re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        for heading in re.findall(r"^#+ (.+)$", text, re.MULTILINE)
    }


def test_links_between_the_docs_resolve() -> None:
    problems = []
    for doc in DOCS:
        path = ROOT / doc
        text = re.sub(
            r"^[ \t]*```.*?^[ \t]*```", "", path.read_text(), flags=re.MULTILINE | re.DOTALL
        )
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            if not linked.exists():
                problems.append(f"{doc}: link to {target}: no such file")
            elif anchor and (linked.suffix != ".md" or anchor not in slugs(linked)):
                problems.append(f"{doc}: link to {target}: no such heading")
    assert not problems, "\n".join(problems)


def test_the_tests_the_docs_name_exist() -> None:
    """A doc that names ``tests/...py`` (or ``...py::test_name``) names a file and test that exist:
    moving or renaming a test updates the sentence that cites it."""
    problems = []
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        for path, name in set(re.findall(r"\b(tests/[\w/]+\.py)(?:::(\w+))?", text)):
            source = ROOT / path
            if not source.is_file():
                problems.append(f"{doc} names {path}, which does not exist")
            elif name and not re.search(rf"^(async )?def {name}\(", source.read_text(), re.M):
                problems.append(f"{doc} names {path}::{name}, which is not defined there")
    assert not problems, "\n".join(sorted(problems))

