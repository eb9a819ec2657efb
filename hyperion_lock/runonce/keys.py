"""Every Redis key and channel name, built in one place.

All names of one job share the hash tag ``{key}`` so the Lua scripts touch a single slot (Redis Cluster safe).

====================================  =====================================================================
``<prefix>:{<key>}:lease``            the lease: JSON holder record + owner token, ``PX`` = lease TTL
``<prefix>:{<key>}:fence``            fencing counter, ``INCR`` on every new leadership (no expiry)
``<prefix>:{<key>}:outcome:<gen>``    outcome of generation ``<gen>`` (done/failed), expires after result TTL
``<prefix>:{<key>}:events``           pub/sub channel: heartbeats, outcomes and releases of the job
====================================  =====================================================================
"""

from __future__ import annotations

from dataclasses import dataclass

from hyperion_lock.settings import validate_name


@dataclass(frozen=True)
class JobKeys:
    prefix: str
    key: str

    def __post_init__(self) -> None:
        validate_name(self.prefix, "key prefix")
        validate_name(self.key, "job key")

    @property
    def base(self) -> str:
        return f"{self.prefix}:{{{self.key}}}"

    @property
    def lease(self) -> str:
        return f"{self.base}:lease"

    @property
    def fence(self) -> str:
        return f"{self.base}:fence"

    @property
    def channel(self) -> str:
        return f"{self.base}:events"

    def outcome(self, generation: str) -> str:
        return f"{self.base}:outcome:{generation}"

    @staticmethod
    def scan_pattern(prefix: str) -> str:
        """Glob matching every lease and outcome key under ``prefix`` (for the CLI)."""
        return f"{prefix}:{{*}}:*"

    @staticmethod
    def parse(prefix: str, name: str) -> tuple[str, str, str | None] | None:
        """Split a key name into (job key, kind, generation) or ``None`` if it is not one of ours."""
        head = f"{prefix}:{{"
        if not name.startswith(head) or "}:" not in name:
            return None
        job, _, rest = name[len(head) :].partition("}:")
        kind, _, gen = rest.partition(":")
        return job, kind, gen or None
