"""The environment variables the isolation fixture of hyperion_lock.testing must keep per test."""

from __future__ import annotations

GEN, PREFIX, LOCK_DIR = "HYPERION_LOCK_GENERATION", "HYPERION_LOCK_KEY_PREFIX", "HYPERION_LOCK_LOCK_DIR"

