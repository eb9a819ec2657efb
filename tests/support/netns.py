"""Several "hosts" on one machine: network namespaces joined by veth pairs to a bridge.

Layout (every namespace named ``hl-<pid>-<x>``, so parallel runs never collide)::

    hl-<pid>-s  "server" namespace: bridge br0 10.213.0.1/24, redis-server and PostgreSQL listen there
       ├── port pa ── veth ── eth0 10.213.0.11/24  in hl-<pid>-a  (gunicorn, 4 workers)
       ├── port pb ── veth ── eth0 10.213.0.12/24  in hl-<pid>-b
       └── port pc ── veth ── eth0 10.213.0.13/24  in hl-<pid>-c

No namespace has a default route, and nothing in the root namespace has an address of this network: a packet
for 10.213.0.x can only reach one of these namespaces or be dropped, never leave the machine (see the field
notes: a cut link once sent test traffic from the root namespace out through its default route). The test
itself talks to Redis, PostgreSQL and the hosts from threads that entered the server namespace (``setns`` is
per thread), so it never connects to these addresses from the root namespace either.

Cutting a host off is ``ip link set pX down`` on its bridge port: the host's eth0 loses carrier, its packets
are dropped (a silent partition, like a pulled cable or a dead switch port), the bridge and the other hosts
keep working.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psycopg
import redis

from hyperion_lock.testing import PostgresServer, RedisServer, SentinelSet, _redis_call
from tests.support.deploy import ROOT, Gunicorn, pg_query

T = TypeVar("T")
SUBNET = "10.213.0"
SERVER_ADDR = f"{SUBNET}.1"
HTTP_PORT = 8000
REDIS_PORT = 6379
PG_PORT = 5432
_CLONE_NEWNET = 0x40000000


def netns_unavailable() -> str | None:
    """Why these tests cannot run here (None if they can). The caller fails the test with it: never a skip."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add); run the e2e tests as root"
    if shutil.which("ip") is None:
        return "no `ip` command: install iproute2"
    if not Path("/proc/self/ns/net").exists():
        return "this kernel has no network namespaces (/proc/self/ns/net missing)"
    for tool in ("redis-server", "setpriv"):
        if shutil.which(tool) is None:
            return f"no `{tool}` on PATH"
    return None


def ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise AssertionError(f"`ip {' '.join(args)}` failed ({done.returncode}): {done.stderr.strip()}")


def _enter(netns: str) -> None:
    """Move the calling thread (only it) into the named network namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({netns}): {os.strerror(err)}")
    finally:
        os.close(fd)


class Network:
    """The namespaces, the bridge and the veth pairs; ``run(fn, ...)`` calls ``fn`` inside the server namespace."""

    def __init__(self, hosts: tuple[str, ...] = ("a", "b", "c")) -> None:
        prefix = f"hl-{os.getpid()}"
        self.server = f"{prefix}-s"
        self.hosts = {h: f"{prefix}-{h}" for h in hosts}
        self.addresses = {h: f"{SUBNET}.{11 + i}" for i, h in enumerate(hosts)}
        self.created: list[str] = []
        self._pool: ThreadPoolExecutor | None = None

    def setup(self) -> Network:
        for ns in (self.server, *self.hosts.values()):
            ip("netns", "add", ns)
            self.created.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        s = self.server
        ip("-n", s, "link", "add", "br0", "type", "bridge")
        ip("-n", s, "addr", "add", f"{SERVER_ADDR}/24", "dev", "br0")
        ip("-n", s, "link", "set", "br0", "up")
        for h, ns in self.hosts.items():
            # Created directly inside the two namespaces: the root namespace never sees these interfaces.
            ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"p{h}", "netns", s)
            ip("-n", s, "link", "set", f"p{h}", "master", "br0")
            ip("-n", s, "link", "set", f"p{h}", "up")
            ip("-n", ns, "addr", "add", f"{self.addresses[h]}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
        for ns in (self.server, *self.hosts.values()):
            routes = subprocess.run(["ip", "-n", ns, "route", "show", "default"], capture_output=True, text=True,
                                    timeout=30, check=True).stdout
            assert not routes.strip(), f"{ns} has a default route: {routes}"
        self._pool = ThreadPoolExecutor(8, thread_name_prefix="netns", initializer=_enter, initargs=(s,))
        return self

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` in a thread of the server namespace (its sockets are made there)."""
        assert self._pool is not None
        return self._pool.submit(fn, *args, **kwargs).result()

    def cut(self, host: str) -> None:
        ip("-n", self.server, "link", "set", f"p{host}", "down")

    def restore(self, host: str) -> None:
        ip("-n", self.server, "link", "set", f"p{host}", "up")

    def teardown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        for ns in reversed(self.created):
            with contextlib.suppress(AssertionError):
                ip("netns", "del", ns)  # takes its interfaces (and their veth peers) with it
        self.created.clear()


def _wait(condition: Callable[[], bool], what: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"{what}: the server exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.1)


def _stop(proc: subprocess.Popen[bytes] | None, sig: int) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


class NetnsRedis:
    """redis-server in the server namespace, on the bridge address (no persistence)."""

    def __init__(self, net: Network) -> None:
        self.net = net
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"redis://{SERVER_ADDR}:{REDIS_PORT}/0"

    def _ping(self) -> bool:
        client = redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def start(self) -> NetnsRedis:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.net.server, shutil.which("redis-server") or "redis-server",
             "--port", str(REDIS_PORT), "--bind", SERVER_ADDR, "--save", "", "--appendonly", "no",
             "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        _wait(lambda: self.net.run(self._ping), "redis-server answers PING on the bridge", self.proc)
        return self

    def call(self, fn: Callable[[redis.Redis], T]) -> T:
        def one() -> T:
            client = redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=5)
            try:
                return fn(client)
            finally:
                client.close()
        return self.net.run(one)

    def stop(self) -> None:
        _stop(self.proc, signal.SIGTERM)


class NetnsSentinelSet(SentinelSet):
    """:class:`~hyperion_lock.testing.SentinelSet` (a primary, a replica, three Sentinels) in the
    server namespace: every server listens on the bridge address (for the hosts) and on the
    namespace's own loopback (for the set's own checks), and names itself by the bridge address,
    so a Sentinel hands the hosts an address they reach.

    Every method that starts a server or talks to one runs in a thread of the server namespace
    (``net.run``): a process started from there is born in that namespace, and 127.0.0.1 there is
    the namespace's loopback. After :meth:`start` the replica's ``--replicaof`` is dropped from its
    arguments: a node restarted later comes back as an empty primary, and the Sentinels turn it
    into a replica if another node is the primary by then.
    """

    def __init__(self, net: Network, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.net = net
        addresses = ("--bind", SERVER_ADDR, "127.0.0.1", "--replica-announce-ip", SERVER_ADDR)
        self.primary.extra_args += addresses
        self.replica.extra_args = tuple(
            SERVER_ADDR if a == "127.0.0.1" else a for a in self.replica.extra_args)
        self.replica.extra_args += addresses

    def url(self, *, scheme: str = "redis+sentinel", db: int = 0, password: str | None = None,
            sentinel_password: str | None = None) -> str:
        loopback = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        bridge = ",".join(f"{SERVER_ADDR}:{port}" for port in self.sentinel_ports)
        return super().url(scheme=scheme, db=db, password=password,
                           sentinel_password=sentinel_password).replace(loopback, bridge)

    def _sentinel_conf(self, port: int) -> str:
        path = Path(super()._sentinel_conf(port))
        text = path.read_text().replace("bind 127.0.0.1", f"bind {SERVER_ADDR} 127.0.0.1")
        text = text.replace(f"monitor {self.service} 127.0.0.1 ",
                            f"monitor {self.service} {SERVER_ADDR} ")
        path.write_text(text + f"sentinel announce-ip {SERVER_ADDR}\n")
        return str(path)

    def start(self, timeout: float = 30.0) -> NetnsSentinelSet:
        self.net.run(super().start, timeout)
        replicaof = self.replica.extra_args.index("--replicaof")
        args = self.replica.extra_args
        self.replica.extra_args = args[:replicaof] + args[replicaof + 3:]
        return self

    def stop(self) -> None:
        self.net.run(super().stop)

    def call(self, port: int, *args: str) -> Any:
        """One command to the server or Sentinel on ``port``."""
        return self.net.run(_redis_call, port, *args, password=self.password)

    def primary_port(self) -> int:
        return self.net.run(self.primary_address)[1]

    def kill_primary(self) -> RedisServer:
        return self.net.run(super().kill_primary)

    def start_node(self, node: RedisServer, *, replica_of: int | None = None) -> None:
        """Start a node again, empty (nothing is persisted): as a primary, or as a replica of the
        node on port ``replica_of`` (what an operator does with a failed-over primary; the
        Sentinels alone take ~10 s)."""
        base = node.extra_args
        if replica_of is not None:
            node.extra_args = (*base, "--replicaof", SERVER_ADDR, str(replica_of))
        try:
            self.net.run(node.start)
        finally:
            node.extra_args = base

    def wait_failover(self, old_port: int, timeout: float = 60.0) -> int:
        return self.net.run(super().wait_failover, old_port, timeout)

    def healthy(self) -> bool:
        """Every Sentinel names one primary, which says it is one, and the other node replicates it
        (link up)."""
        def check() -> bool:
            ports = {self.primary_address(i)[1] for i in range(len(self.sentinel_ports))}
            if len(ports) != 1:
                return False
            (primary,) = ports
            replica = next(n.port for n in self.nodes if n.port != primary)
            role = _redis_call(primary, "ROLE", password=self.password)
            info = _redis_call(replica, "INFO", "replication", password=self.password)
            return bool(role[0] == b"master" and info.get("role") == "slave"
                        and info.get("master_port") == primary
                        and info.get("master_link_status") == "up"
                        and all(self._sees_everyone(i) for i in range(len(self.sentinel_ports))))
        try:
            return self.net.run(check)
        except (redis.RedisError, OSError, KeyError, ValueError):
            return False


class NetnsPostgres(PostgresServer):
    """PostgreSQL 15 in the server namespace, listening on the bridge address, run as ``postgres`` (``setpriv``
    changes the user and execs, so the process we hold is the postmaster itself)."""

    def __init__(self, net: Network) -> None:
        super().__init__()
        self.net = net
        self.port = PG_PORT

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://{self.user}:{self.password}@{SERVER_ADDR}:{self.port}/{self.database}"

    def start(self) -> NetnsPostgres:
        os.makedirs(self.data)
        owner: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
            shutil.chown(self.data, "postgres")
            owner = ["setpriv", "--reuid=postgres", "--regid=postgres", "--clear-groups", "--"]
        pwfile = os.path.join(self.root, "pw")
        Path(pwfile).write_text(self.password + "\n")
        os.chmod(pwfile, 0o644)
        subprocess.run(
            [*owner, os.path.join(self.bindir, "initdb"), "-D", self.data, "-U", self.user, "--pwfile", pwfile,
             "-A", "scram-sha-256", "-E", "UTF8", "--no-sync"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=self.root,
            env={**os.environ, "HOME": self.root}, timeout=120,
        )
        with open(os.path.join(self.data, "pg_hba.conf"), "a") as hba:  # initdb only lets in loopback clients
            hba.write(f"host all all {SUBNET}.0/24 scram-sha-256\n")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.net.server, *owner, os.path.join(self.bindir, "postgres"), "-D", self.data,
             "-p", str(self.port), "-c", f"listen_addresses={SERVER_ADDR}", "-c",
             f"unix_socket_directories={self.root}", "-c", "fsync=off", "-c", "max_connections=200"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.root, env={**os.environ, "HOME": self.root},
        )

        errors: list[str] = []

        def create() -> bool:
            try:
                with psycopg.connect(host=SERVER_ADDR, port=self.port, user=self.user, password=self.password,
                                     dbname="postgres", autocommit=True, connect_timeout=2) as conn:
                    conn.execute(f'CREATE DATABASE "{self.database}"')
                return True
            except psycopg.OperationalError as exc:
                errors[:] = [str(exc)]
                return False

        _wait(lambda: self.net.run(create), f"PostgreSQL accepts connections on the bridge ({errors})", self.proc,
              timeout=60)
        return self

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        return self.net.run(pg_query, self.url, sql)

    def stop(self) -> None:
        _stop(self.proc, signal.SIGINT)  # fast shutdown
        shutil.rmtree(self.root, ignore_errors=True)


class HostGunicorn(Gunicorn):
    """``gunicorn -c gunicorn.conf.py`` inside one host's namespace, bound to that host's address; the test's
    HTTP requests go through the server namespace (over the bridge), like a load balancer's would."""

    def __init__(self, net: Network, host: str, tmp_path: Path, workers: int = 4, /,
                 **env: str) -> None:
        directory = tmp_path / f"host-{host}"
        directory.mkdir()
        super().__init__(directory, workers=workers, **env)
        self.net = net
        self.host = host
        self.address = net.addresses[host]
        self.port = HTTP_PORT
        # The workers import this working tree's package, whatever the interpreter's install points at.
        self.env.update(HOST=self.address, PORT=str(HTTP_PORT),
                        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), self.env.get("PYTHONPATH", "")) if p))
        self.log_path = directory / "gunicorn.log"

    @property
    def base(self) -> str:
        return f"http://{self.address}:{self.port}"

    def command(self) -> list[str]:
        return ["ip", "netns", "exec", self.net.hosts[self.host], *super().command()]

    def get(self, path: str, timeout: float = 5.0) -> httpx.Response:
        return self.net.run(Gunicorn.get, self, path, timeout)


@contextlib.contextmanager
def several_hosts(tmp_path: Path, hosts: tuple[str, ...] = ("a", "b", "c")) -> Iterator[tuple[Network, NetnsRedis,
                                                                                               NetnsPostgres]]:
    """The network, one Redis and one PostgreSQL in the server namespace; everything removed on exit."""
    reason = netns_unavailable()
    if reason:
        raise AssertionError(f"cannot simulate several hosts: {reason}")
    net = Network(hosts)
    store: NetnsRedis | None = None
    database: NetnsPostgres | None = None
    try:
        try:
            net.setup()
        except AssertionError as exc:
            raise AssertionError(f"cannot simulate several hosts: {exc}") from None
        store = NetnsRedis(net).start()
        database = NetnsPostgres(net).start()
        yield net, store, database
    finally:
        if database is not None:
            database.stop()
        if store is not None:
            store.stop()
        net.teardown()
