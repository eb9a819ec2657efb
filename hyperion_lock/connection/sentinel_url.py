"""``redis+sentinel://`` URLs: one parser, used both to build the client and to describe the URL without secrets.

Form (redis-py has no URL parser for Sentinel, so this is ours)::

    redis+sentinel://[[user]:password@]host:port[,host:port...]/service_name[/db][?query]
    rediss+sentinel://...                       (or ?ssl=true): TLS to the data nodes

The userinfo is for the data nodes (the primary and its replicas); the Sentinels get credentials only from the
query, ``sentinel_username`` / ``sentinel_password``. A Sentinel without a port listens on 26379. Query parameters:
``db``, ``ssl``, ``sentinel_username``, ``sentinel_password`` and, with TLS, ``ssl_ca_certs``, ``ssl_certfile``,
``ssl_keyfile``, ``ssl_cert_reqs`` (none/optional/required), ``ssl_check_hostname``; anything else is refused.

Every ``ValueError`` raised here has a message that quotes nothing from the URL (a piece of a badly encoded password
can end up anywhere in it), so callers may show it as it is.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from urllib.parse import SplitResult, parse_qsl, quote, unquote, urlsplit

SENTINEL_SCHEMES = frozenset({"redis+sentinel", "rediss+sentinel"})
DEFAULT_SENTINEL_PORT = 26379
#: TLS options passed on to redis-py for the data nodes (rediss:// takes the same, read by redis-py itself).
TLS_QUERY = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname")
SENTINEL_QUERY = ("db", "ssl", "sentinel_username", "sentinel_password", *TLS_QUERY)
CERT_REQS = ("none", "optional", "required")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
ENCODE_HINT = "a '/', '?', '#' or '@' in the password must be percent-encoded (%2F, %3F, %23, %40)"
#: The highest database index a server can have: Redis reads ``databases`` as a C int (1 .. 2147483647).
MAX_DB_INDEX = 2**31 - 2
DB_RANGE = ("a database index is a whole number from 0 to the server's 'databases' setting minus 1 (16 by default, "
            "so 0-15)")
SENTINEL_FORM = (
    "redis+sentinel://[[user]:password@]host:port[,host:port...]/service_name[/db] (rediss+sentinel:// or "
    f"?ssl=true for TLS to the data nodes; query parameters: {', '.join(SENTINEL_QUERY)})"
)


class AmbiguousURLError(ValueError):
    """The URL cannot be split unambiguously: a badly encoded password may be anywhere in it, so nothing of the URL
    but its scheme may be shown (not even the parts a parser found)."""


class DatabaseIndexError(ValueError):
    """The URL names a database index no server can have (negative, or beyond what Redis can configure)."""


def db_index(text: str, where: str) -> int:
    """The database index written as ``text`` (in the URL's ``where``: ``path``, ``?db=``); ValueError when it is
    not a whole number (``abc``, ``1/2``, `` 1``, ``+1``), :class:`DatabaseIndexError` when it is out of range."""
    if text.startswith("-") and text[1:].isascii() and text[1:].isdigit():
        raise DatabaseIndexError(f"the database index in the {where} is negative; {DB_RANGE}")
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"the database in the {where} is not a number; {DB_RANGE}")
    if int(text) > MAX_DB_INDEX:
        raise DatabaseIndexError(f"the database index {int(text)} in the {where} is out of range; {DB_RANGE}")
    return int(text)


@dataclass(frozen=True)
class SentinelURL:
    """What a ``redis+sentinel://`` URL asks for. Secrets are kept out of ``repr``."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    tls: bool = False
    tls_options: tuple[tuple[str, Any], ...] = ()

    def data_kwargs(self) -> dict[str, Any]:
        """Connection options for the primary, for ``Sentinel.master_for``."""
        kwargs: dict[str, Any] = {"db": self.db, "username": self.username, "password": self.password}
        if self.tls:
            kwargs["ssl"] = True
            kwargs.update(self.tls_options)
        return kwargs

    def sentinel_auth(self) -> dict[str, Any]:
        """Credentials for the Sentinels themselves (none unless the query names them)."""
        return {"username": self.sentinel_username, "password": self.sentinel_password}

    def addresses(self) -> str:
        return ",".join(f"{host_text(host)}:{port}" for host, port in self.sentinels)

    def describe(self) -> str:
        """``rediss+sentinel://user:***@h1:26379,h2:26379/mymaster/0?sentinel_password=***``: safe to print."""
        scheme = "rediss+sentinel" if self.tls else "redis+sentinel"
        auth = auth_marker(self.username, self.password)
        query = []
        if self.sentinel_username:
            query.append(f"sentinel_username={quote(self.sentinel_username, safe='')}")
        if self.sentinel_password:
            query.append("sentinel_password=***")
        suffix = f"?{'&'.join(query)}" if query else ""
        return f"{scheme}://{auth}{self.addresses()}/{quote(self.service, safe='')}/{self.db}{suffix}"


def host_text(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def auth_marker(username: str | None, password: str | None) -> str:
    """``user:***@`` / ``:***@`` / ``***@`` (a lone userinfo is often a password) / nothing."""
    if username and password:
        return f"{quote(username, safe='')}:***@"
    if password:
        return ":***@"
    return "***@" if username else ""


def _split(url: str) -> SplitResult:
    try:
        parts = urlsplit(url)
    except ValueError:
        raise AmbiguousURLError("unbalanced '[' or ']' (only an IPv6 host may use brackets)") from None
    if parts.fragment or "#" in url or any("@" in piece for piece in (parts.path, parts.query)):
        raise AmbiguousURLError(ENCODE_HINT)
    return parts


def _userinfo(netloc: str) -> tuple[str | None, str | None, str]:
    """(username, password, hosts) of the authority; like redis-py, a lone userinfo is a user name."""
    userinfo, at, hosts = netloc.rpartition("@")
    if not at:
        return None, None, netloc
    user, colon, password = userinfo.partition(":")
    return unquote(user) or None, (unquote(password) or None) if colon else None, hosts


def _address(text: str, noun: str, default_port: int) -> tuple[str, int]:
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise AmbiguousURLError(f"a {noun} address is not host:port or [ipv6]:port")
        port_text = rest[1:]
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise AmbiguousURLError(f"a {noun} address has no host, or {ENCODE_HINT}")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise AmbiguousURLError(f"a {noun} port is not a number from 1 to 65535, or {ENCODE_HINT}")
    return host, int(port_text)


class NodesURL(NamedTuple):
    """What ``redis+sentinel://`` and ``redis+cluster://`` URLs share: the scheme, the userinfo and the node list."""

    scheme: str
    parts: SplitResult
    username: str | None
    password: str | None
    nodes: tuple[tuple[str, int], ...]


def split_nodes_url(url: str, kind: str, noun: str, default_port: int) -> NodesURL:
    """Split a ``redis+<kind>://`` / ``rediss+<kind>://`` URL into its shared parts; the ``noun`` of a node
    (``Sentinel``, ``cluster node``) names it in errors, and a node without a port gets ``default_port``."""
    scheme = url.partition("://")[0].lower()
    if scheme not in (f"redis+{kind}", f"rediss+{kind}"):
        raise ValueError(f"the scheme must be redis+{kind}:// or rediss+{kind}://")
    parts = _split(url)
    username, password, hosts = _userinfo(parts.netloc)
    if not hosts:
        raise ValueError(f"no {noun} address: give host:port[,host:port...]")
    nodes = tuple(_address(text, noun, default_port) for text in hosts.split(","))
    return NodesURL(scheme, parts, username, password, nodes)


def _service_and_db(path: str) -> tuple[str, int | None]:
    pieces = path.strip("/").split("/") if path.strip("/") else []
    if not 1 <= len(pieces) <= 2 or not pieces[0]:
        raise ValueError("the path must be /service_name or /service_name/db (the name Sentinel monitors)")
    return unquote(pieces[0]), db_index(unquote(pieces[1]), "path /service_name/db") if len(pieces) == 2 else None


def parse_bool(value: str, name: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE or lowered in _FALSE:
        return lowered in _TRUE
    raise ValueError(f"the query parameter {name!r} must be true or false")


def check_tls_value(name: str, value: str) -> Any:
    """The value redis-py gets for a TLS query parameter; ValueError for one it would refuse later."""
    if name == "ssl_cert_reqs":
        if value not in CERT_REQS:
            raise ValueError(f"ssl_cert_reqs must be one of {', '.join(CERT_REQS)}")
        return value
    if name == "ssl_check_hostname":
        return parse_bool(value, name)
    return value


def known_query(text: str, allowed: Iterable[str], form: str) -> dict[str, str]:
    """The query parameters of a ``form`` URL (e.g. ``redis+sentinel``); ValueError naming the unknown ones."""
    query = dict(parse_qsl(text, keep_blank_values=True))
    unknown = sorted(set(query) - set(allowed))
    if unknown:
        raise ValueError(f"unknown query parameter(s) {', '.join(map(repr, unknown))} for {form}://")
    return query


def _db(path_db: int | None, query: dict[str, str]) -> int:
    if "db" not in query:
        return path_db or 0
    if path_db is not None:
        raise ValueError("give the database once: /service_name/db or ?db=")
    return db_index(query["db"], "query parameter 'db'")


def tls_of(scheme: str, form: str, query: dict[str, str]) -> tuple[bool, tuple[tuple[str, Any], ...]]:
    """Whether a ``form`` URL (``redis+sentinel``, ``redis+cluster``) asks for TLS (``rediss+...`` or ``ssl=true``),
    and its checked ``ssl_*`` options; ValueError for ``ssl_*`` options without TLS."""
    tls = scheme == form.replace("redis+", "rediss+", 1) or parse_bool(query.get("ssl", "false"), "ssl")
    options = tuple((name, check_tls_value(name, query[name])) for name in TLS_QUERY if name in query)
    if options and not tls:
        raise ValueError(f"ssl_* parameters need TLS: use {form.replace('redis+', 'rediss+', 1)}:// or add ssl=true")
    return tls, options


def parse_sentinel_url(url: str) -> SentinelURL:
    """Parse a ``redis+sentinel://`` / ``rediss+sentinel://`` URL; ValueError (quoting nothing of it) if invalid."""
    scheme, parts, username, password, sentinels = split_nodes_url(url, "sentinel", "Sentinel",
                                                                   DEFAULT_SENTINEL_PORT)
    service, path_db = _service_and_db(parts.path)
    query = known_query(parts.query, SENTINEL_QUERY, "redis+sentinel")
    tls, tls_options = tls_of(scheme, "redis+sentinel", query)
    return SentinelURL(
        sentinels=sentinels, service=service, db=_db(path_db, query), username=username, password=password,
        sentinel_username=query.get("sentinel_username") or None,
        sentinel_password=query.get("sentinel_password") or None, tls=tls, tls_options=tls_options,
    )
