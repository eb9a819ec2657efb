"""``redis+cluster://`` URLs: one parser, used both to build the client and to describe the URL without secrets.

Form (redis-py's ``RedisCluster.from_url`` takes a single node and no ``+cluster`` scheme, so this is ours)::

    redis+cluster://[[user]:password@]host:port[,host:port...][/0][?query]
    rediss+cluster://...                       (or ?ssl=true): TLS to every node

The addresses are startup nodes: the client asks the first that answers for the cluster's slot map and then talks
to whichever node owns a slot. A node without a port listens on 6379. A cluster has only database 0, so the path
is empty, ``/`` or ``/0``. Query parameters: ``ssl`` and, with TLS, ``ssl_ca_certs``, ``ssl_certfile``,
``ssl_keyfile``, ``ssl_cert_reqs`` (none/optional/required), ``ssl_check_hostname``; anything else is refused.

Every ``ValueError`` raised here has a message that quotes nothing from the URL (a piece of a badly encoded password
can end up anywhere in it), so callers may show it as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hyperion_lock.connection.sentinel_url import (
    TLS_QUERY,
    auth_marker,
    host_text,
    known_query,
    split_nodes_url,
    tls_of,
)

CLUSTER_SCHEMES = frozenset({"redis+cluster", "rediss+cluster"})
DEFAULT_CLUSTER_PORT = 6379
CLUSTER_QUERY = ("ssl", *TLS_QUERY)
CLUSTER_FORM = (
    "redis+cluster://[[user]:password@]host:port[,host:port...] (startup nodes of a Redis Cluster; "
    f"rediss+cluster:// or ?ssl=true for TLS; query parameters: {', '.join(CLUSTER_QUERY)})"
)


@dataclass(frozen=True)
class ClusterURL:
    """What a ``redis+cluster://`` URL asks for. Secrets are kept out of ``repr``."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    tls_options: tuple[tuple[str, Any], ...] = ()

    def node_kwargs(self) -> dict[str, Any]:
        """Connection options for every node, for ``RedisCluster``."""
        kwargs: dict[str, Any] = {"username": self.username, "password": self.password}
        if self.tls:
            kwargs["ssl"] = True
            kwargs.update(self.tls_options)
        return kwargs

    def addresses(self) -> str:
        return ",".join(f"{host_text(host)}:{port}" for host, port in self.nodes)

    def describe(self) -> str:
        """``rediss+cluster://user:***@h1:7000,h2:7001``: safe to print."""
        scheme = "rediss+cluster" if self.tls else "redis+cluster"
        return f"{scheme}://{auth_marker(self.username, self.password)}{self.addresses()}"


def parse_cluster_url(url: str) -> ClusterURL:
    """Parse a ``redis+cluster://`` / ``rediss+cluster://`` URL; ValueError (quoting nothing of it) if invalid."""
    scheme, parts, username, password, nodes = split_nodes_url(url, "cluster", "cluster node",
                                                               DEFAULT_CLUSTER_PORT)
    if parts.path not in ("", "/", "/0"):
        raise ValueError("a Redis Cluster has only database 0: leave the path empty (or /0)")
    query = known_query(parts.query, CLUSTER_QUERY, "redis+cluster")
    tls, tls_options = tls_of(scheme, "redis+cluster", query)
    return ClusterURL(nodes=nodes, username=username, password=password, tls=tls, tls_options=tls_options)
