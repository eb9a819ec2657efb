"""The layout is the architecture: the import contracts of pyproject.toml ([tool.importlinter]) hold on this tree, and
they do catch a wrong import (a copy of the tree where the run-once policy imports the cache is refused)."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support import ROOT, tier_problem

LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
        "sys.exit(lint_imports_command())"]


def lint(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([*LINT, "--no-cache"], cwd=tree, env=env, capture_output=True, text=True, timeout=120,
                          check=False)


def copy_tree(dest: Path) -> Path:
    for name in ("hyperion_lock", "demo"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def test_the_contracts_hold() -> None:
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_a_product_importing_the_other_is_refused(tmp_path: Path) -> None:
    tree = copy_tree(tmp_path)
    assert lint(tree).returncode == 0  # the copy itself is fine
    policy = tree / "hyperion_lock" / "runonce" / "policy.py"
    policy.write_text(policy.read_text() + "\nfrom hyperion_lock.cache import facade  # noqa: E402\n")
    result = lint(tree)
    assert result.returncode == 1, result.stdout
    assert "hyperion_lock.runonce is not allowed to import hyperion_lock.cache" in result.stdout, result.stdout


def test_the_reference_app_reaching_into_a_private_module_is_refused(tmp_path: Path) -> None:
    tree = copy_tree(tmp_path)
    app = tree / "demo" / "app.py"
    app.write_text(app.read_text() + "\nfrom hyperion_lock.runonce.model import Status  # noqa: E402\n")
    result = lint(tree)
    assert result.returncode == 1, result.stdout
    assert "demo is not allowed to import hyperion_lock.runonce" in result.stdout, result.stdout


def test_the_library_importing_the_cli_is_refused(tmp_path: Path) -> None:
    tree = copy_tree(tmp_path)
    store = tree / "hyperion_lock" / "cache" / "store" / "redis.py"
    store.write_text(store.read_text() + "\nfrom hyperion_lock.cli import main  # noqa: E402\n")
    result = lint(tree)
    assert result.returncode == 1, result.stdout
    assert "hyperion_lock.cache is not allowed to import hyperion_lock.cli" in result.stdout, result.stdout


def test_a_test_in_the_wrong_tier_is_named() -> None:
    unit, integration, e2e = (ROOT / "tests" / tier / "test_x.py" for tier in ("unit", "integration", "e2e"))
    assert tier_problem(unit, set(), set()) is None
    assert tier_problem(unit, set(), {"tmp_path", "redis_url"}) is not None
    assert tier_problem(unit, {"integration"}, set()) is not None
    assert tier_problem(integration, {"integration"}, {"redis_url"}) is None
    assert tier_problem(integration, set(), set()) is not None
    assert tier_problem(integration, {"integration", "e2e"}, set()) is not None
    assert tier_problem(e2e, {"integration", "e2e"}, set()) is None
    assert tier_problem(e2e, {"integration"}, set()) is not None
    assert tier_problem(ROOT / "tests" / "test_x.py", set(), set()) is not None


def test_no_test_module_imports_another() -> None:
    """Shared helpers live in tests/support; a test module importing another one would run its tests twice."""
    offenders = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(m.rsplit(".", 1)[-1].startswith(("test_", "conftest")) for m in modules):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
    assert any((ROOT / "tests").rglob("test_*.py"))  # the scan saw the tests
