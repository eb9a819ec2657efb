"""Redis URLs, every form in one parser: what a client is built from, checked before it is built,
and described without ever echoing a secret (:func:`redact_url`).

Forms::

    redis://[[user]:password@]host[:port][/db][?query]      rediss://... (TLS)
    unix:///path/to/socket[?db=N]
    redis+sentinel://[[user]:password@]host:port[,host:port...]/service_name[/db][?query]
    rediss+sentinel://...                       (or ?ssl=true): TLS to the data nodes
    redis+cluster://[[user]:password@]host:port[,host:port...][/0][?query]
    rediss+cluster://...                        (or ?ssl=true): TLS to every node

``redis://``, ``rediss://`` and ``unix://`` are parsed by redis-py's own parser, after the checks it
lacks (an ambiguous split, unknown query parameters, a database that is not a number). redis-py has
no parser for the other two, so these are ours:

- Sentinel: the userinfo is for the data nodes (the primary and its replicas); the Sentinels get
  credentials only from the query, ``sentinel_username`` / ``sentinel_password``. A Sentinel
  without a port listens on 26379. Query parameters: ``db``, ``ssl``, ``sentinel_username``,
  ``sentinel_password`` and, with TLS, ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``,
  ``ssl_cert_reqs`` (none/optional/required), ``ssl_check_hostname``.
- Cluster: the addresses are startup nodes: the client asks the first that answers for the
  cluster's slot map and then talks to whichever node owns a slot. A node without a port listens on
  6379. A cluster has only database 0, so the path is empty, ``/`` or ``/0``. Query parameters:
  ``ssl`` and the TLS ones above.

Anything else in the query is refused. Every ``ValueError`` raised here has a message that quotes
nothing from the URL (a piece of a badly encoded password can end up anywhere in it), so callers may
show it as it is.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from urllib.parse import ParseResult, parse_qsl, quote, unquote, urlparse

from redis import connection as _redis_connection

from hyperion_lock.errors import ConfigurationError, RedisDatabaseIndexError

SENTINEL_SCHEMES = frozenset({"redis+sentinel", "rediss+sentinel"})
CLUSTER_SCHEMES = frozenset({"redis+cluster", "rediss+cluster"})
_REDIS_SCHEMES = frozenset({"redis", "rediss", "unix"})
_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]{0,31})://")
DEFAULT_SENTINEL_PORT = 26379
DEFAULT_CLUSTER_PORT = 6379
#: redis-py's own URL parser (the asyncio client's is the same code), typed here.
_redis_parse_url: Callable[[str], Mapping[str, Any]] = _redis_connection.parse_url

#: TLS options passed on to redis-py for the data nodes (rediss:// takes the same, read by redis-py itself).
TLS_QUERY = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname")
SENTINEL_QUERY = ("db", "ssl", "sentinel_username", "sentinel_password", *TLS_QUERY)
CLUSTER_QUERY = ("ssl", *TLS_QUERY)
#: Query parameters of redis://, rediss:// and unix:// URLs: those redis-py's URL parser converts itself, plus the
#: credentials and client name it passes on; rediss:// adds the TLS options. Anything else is a typo, refused
#: before redis-py would hand it to a connection (which fails at the first connect, far from the cause).
_PLAIN_QUERY = frozenset({"db", "username", "password", "client_name"}) | {
    name for name in getattr(_redis_connection, "URL_QUERY_ARGUMENT_PARSERS", {}) if not name.startswith("ssl_")
}
_TLS_QUERY = frozenset(TLS_QUERY) | {"ssl_ca_path", "ssl_password"}
_SECRET_QUERY_RE = re.compile(r"pass|pwd|secret|token|key|auth|credential", re.IGNORECASE)
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
CLUSTER_FORM = (
    "redis+cluster://[[user]:password@]host:port[,host:port...] (startup nodes of a Redis Cluster; "
    f"rediss+cluster:// or ?ssl=true for TLS; query parameters: {', '.join(CLUSTER_QUERY)})"
)
URL_FORMS = (
    "Expected redis://[[user]:password@]host[:port][/db], rediss://... (TLS; query parameters ssl_ca_certs, "
    f"ssl_certfile, ssl_keyfile, ssl_cert_reqs={'|'.join(CERT_REQS)}), unix:///path/to/socket, {SENTINEL_FORM}, "
    f"or {CLUSTER_FORM}"
)
UNPARSEABLE_URL = "<unparseable URL: percent-encode special characters in the password>"


class AmbiguousURLError(ValueError):
    """The URL cannot be split unambiguously: a badly encoded password may be anywhere in it, so nothing of the URL
    but its scheme may be shown (not even the parts a parser found)."""


class DatabaseIndexError(ValueError):
    """The URL names a database index no server can have (negative, or beyond what Redis can configure)."""


# --- what every form shares -----------------------------------------------------------------------
def _scheme_of(url: str) -> str | None:
    """The scheme, only when the text really starts with ``scheme://`` (``secret:pw@host`` has none)."""
    match = _SCHEME_RE.match(url)
    return match.group(1).lower() if match else None


def is_sentinel_url(url: str) -> bool:
    return _scheme_of(url) in SENTINEL_SCHEMES


def is_cluster_url(url: str) -> bool:
    return _scheme_of(url) in CLUSTER_SCHEMES


def split_url(url: str, *, nodes: bool = False) -> ParseResult:
    """``urlparse(url)``, refusing splits in which the userinfo leaked past the authority (the one
    splitter of every URL form).

    A password with an unencoded ``/``, ``?`` or ``#`` ends the authority early:
    ``redis://:a/b@host`` becomes host ``""``, port ``a`` and path ``/b@host``, so host, port, path,
    query or fragment may all be pieces of the secret. An ``@`` after the authority, or any
    fragment, is the sign; such URLs are refused whole (:class:`AmbiguousURLError`, with a message
    that quotes nothing from the URL). A URL of one host must have a port urllib can read; a URL of
    a node list (``nodes``: Sentinel, Cluster), whose addresses are split by
    :func:`split_nodes_url`, is refused for any ``#`` at all.
    """
    try:
        parts = urlparse(url)
    except ValueError:
        raise AmbiguousURLError("unbalanced '[' or ']' (only an IPv6 host may use brackets)") from None
    if parts.fragment or any("@" in piece for piece in (parts.path, parts.params, parts.query)):
        raise AmbiguousURLError(ENCODE_HINT)
    if nodes:
        if "#" in url:
            raise AmbiguousURLError(ENCODE_HINT)
        return parts
    try:
        _ = parts.port
    except ValueError:  # urllib's message quotes the "port", which may be a piece of the password
        raise AmbiguousURLError(f"the port is not a number from 0 to 65535, or {ENCODE_HINT}") from None
    return parts


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


def host_text(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def auth_marker(username: str | None, password: str | None) -> str:
    """``user:***@`` / ``:***@`` / ``***@`` (a lone userinfo is often a password) / nothing."""
    if username and password:
        return f"{quote(username, safe='')}:***@"
    if password:
        return ":***@"
    return "***@" if username else ""


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


def tls_of(scheme: str, form: str, query: dict[str, str]) -> tuple[bool, tuple[tuple[str, Any], ...]]:
    """Whether a ``form`` URL (``redis+sentinel``, ``redis+cluster``) asks for TLS (``rediss+...`` or ``ssl=true``),
    and its checked ``ssl_*`` options; ValueError for ``ssl_*`` options without TLS."""
    tls = scheme == form.replace("redis+", "rediss+", 1) or parse_bool(query.get("ssl", "false"), "ssl")
    options = tuple((name, check_tls_value(name, query[name])) for name in TLS_QUERY if name in query)
    if options and not tls:
        raise ValueError(f"ssl_* parameters need TLS: use {form.replace('redis+', 'rediss+', 1)}:// or add ssl=true")
    return tls, options


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
    parts: ParseResult
    username: str | None
    password: str | None
    nodes: tuple[tuple[str, int], ...]


def split_nodes_url(url: str, kind: str, noun: str, default_port: int) -> NodesURL:
    """Split a ``redis+<kind>://`` / ``rediss+<kind>://`` URL into its shared parts; the ``noun`` of a node
    (``Sentinel``, ``cluster node``) names it in errors, and a node without a port gets ``default_port``."""
    scheme = url.partition("://")[0].lower()
    if scheme not in (f"redis+{kind}", f"rediss+{kind}"):
        raise ValueError(f"the scheme must be redis+{kind}:// or rediss+{kind}://")
    parts = split_url(url, nodes=True)
    username, password, hosts = _userinfo(parts.netloc)
    if not hosts:
        raise ValueError(f"no {noun} address: give host:port[,host:port...]")
    nodes = tuple(_address(text, noun, default_port) for text in hosts.split(","))
    return NodesURL(scheme, parts, username, password, nodes)


# --- redis://, rediss://, unix:// -----------------------------------------------------------------
def parse_redis_url(url: str) -> dict[str, Any]:
    """What redis-py will connect to for ``url``, parsed by redis-py's own parser.

    Raises ValueError with a message that never quotes the URL when redis-py rejects it, or when the split is
    ambiguous (see :func:`split_url`), and :class:`DatabaseIndexError` for a database index out of
    range.
    """
    scheme = _scheme_of(url)
    if scheme not in _REDIS_SCHEMES:
        raise ValueError("the scheme must be redis://, rediss://, unix://, redis+sentinel://, rediss+sentinel://, "
                         "redis+cluster:// or rediss+cluster://")
    parts = split_url(url)
    _check_query(scheme, parts.query)
    _check_db(scheme, parts)
    try:
        return dict(_redis_parse_url(url))
    except (ValueError, TypeError) as exc:
        named = re.match(r"Invalid value for '(\w+)'", str(exc))
        raise ValueError(
            f"invalid value for the query parameter {named.group(1)!r}" if named else "redis-py cannot parse it"
        ) from None


def _check_query(scheme: str, query: str) -> None:
    """Refuse query parameters redis-py would not understand for ``scheme`` (and a bad ``ssl_cert_reqs``)."""
    allowed = _PLAIN_QUERY | (_TLS_QUERY if scheme == "rediss" else frozenset())
    names = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(names) - allowed)
    if unknown:
        tls = " (ssl_* parameters need rediss://)" if any(n in _TLS_QUERY for n in unknown) else ""
        raise ValueError(f"unknown query parameter(s) {', '.join(map(repr, unknown))} for {scheme}://{tls}")
    for name in ("ssl_cert_reqs", "ssl_check_hostname"):
        if name in names:
            check_tls_value(name, names[name])


def _check_db(scheme: str, parts: ParseResult) -> None:
    """Refuse a database index redis-py would misread: it ignores a path that is not a number (``/abc``: database 0,
    silently), joins ``/1/2`` into 12, and passes a negative or huge index on to ``SELECT`` (refused at the first
    connect, far from the cause)."""
    path_db = None
    if scheme != "unix" and parts.path not in ("", "/"):
        path_db = db_index(unquote(parts.path[1:]), "path /db")
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    if "db" in query:
        query_db = db_index(query["db"], "query parameter 'db'")
        if path_db is not None and path_db != query_db:
            raise ValueError("two different databases: give it once, as /db or ?db=")


def _describe_redis(scheme: str, kwargs: Mapping[str, Any]) -> str:
    auth = auth_marker(kwargs.get("username"), kwargs.get("password"))
    db = kwargs.get("db", 0)
    if scheme == "unix":
        return f"unix://{auth}{kwargs.get('path', '')}?db={db}"
    host = host_text(str(kwargs.get("host") or "localhost"))
    return f"{scheme}://{auth}{host}:{kwargs.get('port', 6379)}/{db}"


# --- redis+sentinel:// ----------------------------------------------------------------------------
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


def _service_and_db(path: str) -> tuple[str, int | None]:
    pieces = path.strip("/").split("/") if path.strip("/") else []
    if not 1 <= len(pieces) <= 2 or not pieces[0]:
        raise ValueError("the path must be /service_name or /service_name/db (the name Sentinel monitors)")
    return unquote(pieces[0]), db_index(unquote(pieces[1]), "path /service_name/db") if len(pieces) == 2 else None


def _db(path_db: int | None, query: dict[str, str]) -> int:
    if "db" not in query:
        return path_db or 0
    if path_db is not None:
        raise ValueError("give the database once: /service_name/db or ?db=")
    return db_index(query["db"], "query parameter 'db'")


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


# --- redis+cluster:// -----------------------------------------------------------------------------
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


# --- any URL: checked, and described without ever echoing a secret --------------------------------
def _parse_any_url(url: str) -> None:
    """Parse ``url`` with the parser its client is built from; ValueError (text naming no secret) if it is bad."""
    if is_sentinel_url(url):
        parse_sentinel_url(url)
    elif is_cluster_url(url):
        parse_cluster_url(url)
    else:
        parse_redis_url(url)


def redis_url_problem(url: str) -> str | None:
    """Why ``url`` is not a usable Redis URL (text safe to print: nothing from the URL), or None. Sentinel URLs
    (``redis+sentinel://``, ``rediss+sentinel://``) and Cluster URLs (``redis+cluster://``, ``rediss+cluster://``)
    are checked by the parser their client is built from."""
    try:
        _parse_any_url(url)
    except ValueError as exc:
        return str(exc)
    return None


def check_redis_url(url: str) -> None:
    """Refuse a Redis URL its client could not use: :class:`RedisDatabaseIndexError` for a database index no server
    can have, :class:`ConfigurationError` for anything else; the message shows no secret."""
    try:
        _parse_any_url(url)
    except DatabaseIndexError as exc:
        raise RedisDatabaseIndexError(f"invalid Redis URL: {exc}; fix it in HYPERION_LOCK_REDIS_URL") from None
    except ValueError as exc:
        scheme = _scheme_of(url)
        shown = f" ({scheme}://...)" if scheme else ""
        raise ConfigurationError(f"invalid Redis URL{shown}: {exc}. {URL_FORMS}") from None


def _redacted_query(query: str) -> str:
    pairs = parse_qsl(query, keep_blank_values=True)
    shown = [(name, "***" if _SECRET_QUERY_RE.search(name) else value) for name, value in pairs]
    return "&".join(f"{quote(name, safe='')}={value if value == '***' else quote(value, safe='/:')}"
                    for name, value in shown)


def _describe_other(scheme: str, url: str) -> str:
    """Any other URL (``postgresql://``, ``sqlite:///``): host, port, path, and the query with secrets masked."""
    parts = split_url(url)
    auth = auth_marker(unquote(parts.username) if parts.username else None, parts.password)
    host = host_text(parts.hostname) if parts.hostname else ""
    port = f":{parts.port}" if parts.port is not None else ""
    query = _redacted_query(parts.query)
    return f"{scheme}://{auth}{host}{port}{quote(parts.path, safe='/:.-_~%')}" + (f"?{query}" if query else "")


def redact_url(url: str | None) -> str | None:
    """A description of ``url`` that is safe for logs, reprs, errors and status output.

    Redis URLs are parsed by redis-py's own parser (Sentinel URLs by the one their client is built from, see
    :func:`parse_sentinel_url`, shown with both passwords as ``***``; Cluster URLs by
    :func:`parse_cluster_url`) and
    rebuilt from what it found: scheme, ``user:***@`` (``:***@`` when there is only a password, from the userinfo or
    a ``?password=`` parameter), host, port and database, or the socket path for ``unix://``. Nothing of the raw
    text is echoed, so query parameters never appear. Other URLs
    keep their host, port, path and query, with the password and any password-like query value masked. A URL that
    cannot be split unambiguously (a password with an unencoded ``/ ? # @``) or that the parser rejects yields
    ``scheme://<unparseable URL: ...>`` -- the scheme is the only part that can never be the secret.
    """
    if not url:
        return url
    scheme = _scheme_of(url)
    if scheme is None:
        return "<unparseable URL: expected scheme://...>"
    try:
        if scheme in SENTINEL_SCHEMES:
            return parse_sentinel_url(url).describe()
        if scheme in CLUSTER_SCHEMES:
            return parse_cluster_url(url).describe()
        if scheme in _REDIS_SCHEMES:
            return _describe_redis(scheme, parse_redis_url(url))
        return _describe_other(scheme, url)
    except AmbiguousURLError:
        return f"{scheme}://{UNPARSEABLE_URL}"
    except ValueError as exc:  # well split, so the message (which quotes nothing but parameter names) is the cause
        return f"{scheme}://<invalid URL: {exc}>"
