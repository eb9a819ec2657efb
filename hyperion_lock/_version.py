"""The version of hyperion_lock, its one source: pyproject.toml reads it and ``hyperion_lock`` re-exports it."""

__version__ = "0.1.0"
