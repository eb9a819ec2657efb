"""What the package costs its users: a plain install needs only redis (+ hiredis), importing it loads no web
framework or database library, and the reference app uses nothing but the public API."""

from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis

import hyperion_lock
from hyperion_lock import JobKeys
from hyperion_lock import errors as _errors
from tests.support.venv import make_venv, package_source, venv_env

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "demo"
# Top-level modules that belong to the extras, never to `import hyperion_lock`.
HEAVY = ("fastapi", "starlette", "pydantic", "sqlalchemy", "alembic", "psycopg", "gunicorn", "uvicorn",
         "uvicorn_worker", "testcontainers", "docker")

pytestmark = pytest.mark.integration


def heavy_modules_after(code: str, python: str = sys.executable, cwd: Path = ROOT) -> list[str]:
    """Run ``code`` in a fresh interpreter; return the HEAVY modules it loaded."""
    probe = f"{code}\nimport sys, json\nprint(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY})))"
    out = subprocess.run([python, "-c", probe], cwd=cwd, check=True, capture_output=True, text=True, timeout=60)
    found: list[str] = json.loads(out.stdout.splitlines()[-1])
    return found


def test_importing_the_package_loads_no_framework() -> None:
    assert heavy_modules_after("import hyperion_lock, hyperion_lock.runonce.coordinator, hyperion_lock.testing") == []
    # The probe does see an import when one happens: asking for the FastAPI dependency loads FastAPI.
    assert "fastapi" in heavy_modules_after("import hyperion_lock; hyperion_lock.OptionalRedis")


def test_the_installed_version_is_the_package_version() -> None:
    """One version source: pyproject.toml takes it from hyperion_lock.__version__."""
    from importlib.metadata import version

    assert version("hyperion_lock") == hyperion_lock.__version__


def test_optional_redis_without_fastapi_names_the_extra() -> None:
    """Without FastAPI, asking for OptionalRedis says which extra to install (before: a bare ModuleNotFoundError)."""
    probe = ("import sys; sys.modules['fastapi'] = None\n"  # what an install without the extra looks like
             "import hyperion_lock\n"
             "try:\n    from hyperion_lock import OptionalRedis\n"
             "except ImportError as exc:\n    print(type(exc).__name__, exc)\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, check=True, capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.strip() == ("ImportError hyperion_lock.OptionalRedis needs FastAPI: "
                                  "pip install 'hyperion_lock[fastapi]'")


PUBLIC_MODULES = frozenset({"fastapi", "gunicorn", "metrics", "testing"})


def private_imports(path: Path) -> list[str]:
    """Internal modules of hyperion_lock (anything but the package itself and its public modules), or names not in
    ``__all__``, imported by one module of the reference app (``demo/``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = "demo"
    bad: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
            imported: list[str] = []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            modules = [module]
            imported = [alias.name for alias in node.names]
        else:
            continue
        for module in modules:
            parts = module.split(".")
            if parts[0] != "hyperion_lock":
                continue
            if parts[1:] and ".".join(parts[1:]) not in PUBLIC_MODULES:
                bad.append(f"{path.name}:{node.lineno}: import of private module {module}")
            elif module == "hyperion_lock":
                bad += [f"{path.name}:{node.lineno}: hyperion_lock.{name} is not in __all__"
                        for name in imported if name not in hyperion_lock.__all__]
    return bad


def test_demo_imports_only_the_public_api() -> None:
    modules = sorted(DEMO.glob("*.py"))
    assert {p.name for p in modules} >= {"app.py", "db.py", "jobs.py"}
    assert [line for path in modules for line in private_imports(path)] == []
    # The scan does see the demo's imports of the library (it is not vacuous).
    assert any(line.startswith("from hyperion_lock import") for p in modules for line in p.read_text().splitlines())


def test_private_import_detection(tmp_path: Path) -> None:
    sample = tmp_path / "app.py"
    sample.write_text("from hyperion_lock.runonce.coordinator import Coordinator\n"
                      "from hyperion_lock.runonce import signals\nimport hyperion_lock.settings\n"
                      "from hyperion_lock import Coordinator, WORKERS_ENV\nfrom . import jobs\n"
                      "from hyperion_lock.gunicorn import gunicorn_bind\nimport hyperion_lock.testing\n")
    assert private_imports(sample) == [
        "app.py:1: import of private module hyperion_lock.runonce.coordinator",
        "app.py:2: import of private module hyperion_lock.runonce",
        "app.py:3: import of private module hyperion_lock.settings",
        "app.py:4: hyperion_lock.WORKERS_ENV is not in __all__",
    ]


def test_public_api_is_complete() -> None:
    """Every name in ``__all__`` exists, and every public exception class of the package is exported."""
    for name in hyperion_lock.__all__:
        assert getattr(hyperion_lock, name) is not None, name
    errors = {name for name, obj in inspect.getmembers(_errors, inspect.isclass)
              if obj.__module__ == _errors.__name__ and not name.startswith("_")}
    assert "HyperionLockError" in errors
    assert errors <= set(hyperion_lock.__all__), errors - set(hyperion_lock.__all__)


_RUN_ONCE = """
import json, os, sys
from hyperion_lock import Coordinator

calls = []

def job() -> None:
    calls.append(os.getpid())

url, generation, prefix = sys.argv[1:4]
outcome = Coordinator(url, generation=generation, key_prefix=prefix, lease_ttl=2).run_once_sync("k", job)
print(json.dumps({"calls": len(calls), "ran_here": outcome.ran_here, "status": str(outcome.status),
                  "runner_pid": outcome.runner_pid, "pid": os.getpid()}))
"""


@pytest.mark.timeout(600)
def test_plain_install_needs_only_redis(tmp_path: Path, redis_url: str) -> None:
    """``pip install`` without extras into a fresh venv brings redis + hiredis and nothing of the extras, and the
    Coordinator runs a job once against a real Redis from there."""
    # Build from a copy of what the package is made of (as the Dockerfile does): building in the repository
    # would leave build/ and *.egg-info in a working tree others use at the same time.
    src = package_source(tmp_path / "src")
    env = venv_env()
    python = str(make_venv(tmp_path / "venv"))
    subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", str(src)], check=True,
                   env=env, cwd=tmp_path, timeout=540)

    listed = subprocess.run([python, "-m", "pip", "list", "--format", "json", "--disable-pip-version-check"],
                            check=True, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    installed = {row["name"].lower().replace("_", "-") for row in json.loads(listed.stdout)}
    assert {"hyperion-lock", "redis", "hiredis"} <= installed, installed
    extras = {"fastapi", "starlette", "sqlalchemy", "alembic", "psycopg", "psycopg-binary", "gunicorn", "uvicorn",
              "uvicorn-worker", "testcontainers", "pytest", "httpx"}
    assert installed & extras == set(), installed
    find = ("import importlib.util, json, hyperion_lock; print(json.dumps({'file': hyperion_lock.__file__, "
            f"'found': [m for m in {HEAVY!r} + ('hiredis',) if importlib.util.find_spec(m)]}}))")
    out = subprocess.run([python, "-c", find], check=True, capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=60)
    seen = json.loads(out.stdout)
    assert seen["file"].startswith(str(tmp_path / "venv")), seen  # the installed copy, not the repository's
    assert seen["found"] == ["hiredis"], seen
    assert heavy_modules_after("import hyperion_lock, hyperion_lock.runonce.coordinator", python, tmp_path) == []

    generation, prefix = f"pkg-{uuid.uuid4().hex[:12]}", f"test-package-{uuid.uuid4().hex[:12]}"

    def run_once() -> dict[str, object]:
        done = subprocess.run([python, "-c", _RUN_ONCE, redis_url, generation, prefix], check=True,
                              capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
        result: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
        return result

    first = run_once()
    assert first["calls"] == 1 and first["ran_here"] is True and first["status"] == "done", first
    assert first["runner_pid"] == first["pid"], first
    # The outcome is in the real Redis under this generation, so a second process of it skips the job.
    with redis.Redis.from_url(redis_url) as client:
        assert client.exists(JobKeys(prefix, "k").outcome(generation))
    second = run_once()
    assert second["calls"] == 0 and second["ran_here"] is False and second["runner_pid"] == first["pid"], second
