"""Fresh virtual environments for the packaging tests, built from a copy of the package.

Building in the repository would leave ``build/`` and ``*.egg-info`` in the working tree, so the package is
copied first (what the Dockerfile copies too).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SKIP = shutil.ignore_patterns("__pycache__", ".pytest_cache", "*.pyc")


def venv_env() -> dict[str, str]:
    """This environment without what would make the venv's Python see ours."""
    return {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}}


def package_source(dest: Path) -> Path:
    """Copy what ``pip install`` needs (pyproject.toml, README.md, hyperion_lock/) into ``dest``; return it."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dest / name)
    shutil.copytree(ROOT / "hyperion_lock", dest / "hyperion_lock", ignore=SKIP)
    return dest


def make_venv(path: Path) -> Path:
    """A fresh venv at ``path``; returns its Python."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, env=venv_env(), timeout=120)
    return path / "bin" / "python"
