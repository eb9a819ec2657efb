"""The benchmarks run the repository's apps from its root: ``ROOT`` must be the repository, not a
folder above it (gunicorn then cannot import ``benchmarks.cache_app`` and every worker fails to
boot, so the cache hit guard of ``.ci/run`` fails)."""

from __future__ import annotations

from pathlib import Path

from benchmarks import cache_bench, run

REPOSITORY = Path(__file__).resolve().parents[2]


def test_the_benchmarks_find_their_apps_from_the_repository_root() -> None:
    for module in (cache_bench, run):
        assert module.ROOT == REPOSITORY, module.__name__
    assert (cache_bench.ROOT / "benchmarks" / "cache_app.py").is_file()
    assert (run.ROOT / "benchmarks" / "worker.py").is_file()
