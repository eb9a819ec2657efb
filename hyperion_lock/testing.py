"""Real servers for tests: Redis and PostgreSQL, from the environment, testcontainers, or local binaries.

An opt-in pytest plugin: nothing is registered just because ``hyperion_lock`` is installed. Enable it in your
top-level ``conftest.py``::

    pytest_plugins = ["hyperion_lock.testing"]

to get the fixtures ``redis_url`` (session), ``redis_server`` (a private server the test may kill, pause or
restart) and ``postgres_url`` (session). Install the ``test`` extra (``pip install "hyperion_lock[test]"``) for
what they use. Resolution order:

1. an external URL: ``HYPERION_LOCK_TEST_REDIS_URL`` / ``HYPERION_LOCK_TEST_DATABASE_URL``;
2. a throwaway container through testcontainers, when a Docker engine answers;
3. a ``redis-server`` / ``initdb`` + ``postgres`` binary started on a free loopback port.

When none works the fixture *fails* (it never skips), so a CI run cannot pass without the real servers.
``redis_server`` always starts a private binary server, for tests that kill, pause or restart it.
:class:`RedisServer`, :class:`PostgresServer` and :func:`free_port` can be used without pytest fixtures too.
Importing this module imports neither testcontainers nor psycopg: they are loaded when a server is needed.

Isolating run-once state per test
---------------------------------

Outside a test, "done" belongs to the deployment generation, and by default a generation is the identity of the
parent process (see ``hyperion_lock.Settings``). In a test run that is the same for every test of one pytest
process, and under pytest-xdist the same for every xdist worker (they share the controller as their parent), and
all of them share the default key prefix and lock directory. So a job that ran in one test counts as done for
every later test, and a failure recorded by one test is held against the others. Give each test its own
generation, key prefix and file-lock directory instead:

* the fixture ``hyperion_lock_isolated`` (from this plugin), opt-in per module::

      pytestmark = pytest.mark.usefixtures("hyperion_lock_isolated")

  or for a whole project, in its ``conftest.py``::

      @pytest.fixture(autouse=True)
      def _run_once_isolation(hyperion_lock_isolated): ...

* the context manager :func:`isolated_run_once`, anywhere (also without pytest)::

      with isolated_run_once() as isolation:   # isolation.generation, .key_prefix, .lock_dir
          await use_lock_for_workers(drop_db, "drop_db", redis_client, 2, logger)

It sets ``HYPERION_LOCK_GENERATION``, ``HYPERION_LOCK_KEY_PREFIX`` and ``HYPERION_LOCK_LOCK_DIR`` for its
duration and restores the environment afterwards. Every coordinator created meanwhile (``use_lock_for_workers``
makes one per call) reads them, so it must be created inside the block. Tests that run the job directly
(``number_of_workers <= 1``) coordinate nothing and need no isolation.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import pytest

from hyperion_lock.settings import name_part, validate_name

__all__ = [
    "ClusterSet",
    "Isolation",
    "PostgresServer",
    "RedisServer",
    "SentinelSet",
    "TlsFiles",
    "docker_available",
    "free_port",
    "hyperion_lock_isolated",
    "isolated_run_once",
    "postgres_url",
    "redis_server",
    "redis_url",
]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before listening on port {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout} s")


def docker_available() -> bool:
    """True when a Docker engine answers (not merely when the client binary exists)."""
    if not (os.environ.get("DOCKER_HOST") or Path("/var/run/docker.sock").exists()):
        return False
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


class _Server:
    """A server (or set of servers) a test starts: ``with X(...) as x`` starts it, and stops whatever did start if
    starting fails."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RedisServer(_Server):
    """A ``redis-server`` process on a free loopback port, without persistence, that tests may kill/restart."""

    def __init__(
        self, *, password: str | None = None, port: int | None = None, binary: str | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.extra_args = extra_args
        self.binary = binary or shutil.which("redis-server") or ""
        if not self.binary:
            raise RuntimeError(
                "redis-server not found: install it (Debian: apt-get install -y redis-server) or set "
                "HYPERION_LOCK_TEST_REDIS_URL"
            )
        self.password = password
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="hyperion-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        """Whether the server process was started and has not exited (or been killed) since."""
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> RedisServer:
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", self.dir, "--maxclients", "10000", "--protected-mode", "no",
        ]
        if self.password:
            args += ["--requirepass", self.password]
        args += list(self.extra_args)
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port, 10, self.proc)
        return self

    def kill(self) -> None:
        """SIGKILL: every key is lost (no persistence), clients see their connections drop."""
        if self.running:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> None:
        self.kill()
        self.start()

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass(frozen=True)
class TlsFiles:
    """A test CA, a server certificate for 127.0.0.1 and a client certificate, both signed by the CA (PEM files)."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str

    @classmethod
    def make(cls, directory: str) -> TlsFiles:
        """Create them with the ``openssl`` CLI (valid for one day)."""
        path = Path(directory)

        def run(*args: str) -> None:
            subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

        # The extensions Python >= 3.13's strict verification (VERIFY_X509_STRICT) requires of a CA and a leaf.
        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
            "-subj", "/CN=hyperion-lock test CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        (path / "san.ext").write_text(
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
            "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
        )
        for name in ("server", "client"):
            run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={'127.0.0.1' if name == 'server' else 'hyperion-lock client'}")
            run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "1", "-extfile", "san.ext")
        return cls(*(str(path / name) for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")))

    def server_args(self, port: int, *, auth_clients: str = "yes") -> tuple[str, ...]:
        """``redis-server`` arguments for TLS only on ``port`` (the plain port is closed), replication over TLS."""
        return ("--port", "0", "--tls-port", str(port), "--tls-cert-file", self.server_cert, "--tls-key-file",
                self.server_key, "--tls-ca-cert-file", self.ca, "--tls-auth-clients", auth_clients,
                "--tls-replication", "yes")

    def client_kwargs(self) -> dict[str, Any]:
        return {"ssl": True, "ssl_ca_certs": self.ca, "ssl_certfile": self.client_cert,
                "ssl_keyfile": self.client_key}

    def query(self) -> str:
        """The URL query that makes a client trust the CA and present the client certificate."""
        return f"ssl_ca_certs={self.ca}&ssl_certfile={self.client_cert}&ssl_keyfile={self.client_key}"


def _redis_call(port: int, *args: str, password: str | None = None, tls: TlsFiles | None = None) -> Any:
    """One command to the server (or Sentinel) on a loopback port; short timeouts, a fresh connection."""
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=2, socket_connect_timeout=2,
                         **(tls.client_kwargs() if tls else {}))
    try:
        return client.execute_command(*args)  # type: ignore[no-untyped-call]
    finally:
        client.close()


def _poll(condition: Any, what: str, timeout: float) -> Any:
    """``condition()`` until it returns something truthy (connection errors count as "not yet"), bounded."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = condition()
        except Exception as exc:  # a server still starting, or one that just died
            last = exc
        else:
            if last:
                return last
        time.sleep(0.05)
    raise TimeoutError(f"{what}: not reached within {timeout} s (last: {last!r})")


class SentinelSet(_Server):
    """A Sentinel-managed Redis on free loopback ports: one primary, one replica (``--replicaof``) and three
    Sentinels (``redis-server <conf> --sentinel``, quorum 2), all without persistence, for tests that fail over.

    ``down_after_ms`` and ``failover_timeout_ms`` are small so that a killed primary is replaced within seconds.
    :meth:`start` returns once the replica is in sync and every Sentinel sees the replica and both other Sentinels,
    so a failover can happen; every wait is bounded. ``password`` protects the data nodes (the Sentinels get it as
    ``auth-pass``), ``sentinel_password`` the Sentinels (``requirepass`` and ``sentinel-pass``).
    """

    def __init__(
        self, *, service: str = "mymaster", password: str | None = None, sentinel_password: str | None = None,
        down_after_ms: int = 1000, failover_timeout_ms: int = 2000, binary: str | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        self.service = service
        self.tls = tls
        self.password = password
        self.sentinel_password = sentinel_password
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.binary = binary or shutil.which("redis-server") or ""
        self.dir = tempfile.mkdtemp(prefix="hyperion-sentinel-")
        # A replica syncs at once (no 5 s diskless-sync delay), and may be promoted.
        auth = ("--repl-diskless-sync-delay", "0", *(("--masterauth", password) if password else ()))
        self.primary = RedisServer(password=password, binary=self.binary, extra_args=auth)
        self.replica = RedisServer(password=password, binary=self.binary, extra_args=(
            *auth, "--replicaof", "127.0.0.1", str(self.primary.port)))
        for node in self.nodes:
            node.extra_args += tls.server_args(node.port) if tls else ()
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinel_procs: list[subprocess.Popen[bytes]] = []

    @property
    def nodes(self) -> list[RedisServer]:
        return [self.primary, self.replica]

    def url(self, *, scheme: str = "redis+sentinel", db: int = 0, password: str | None = None,
            sentinel_password: str | None = None) -> str:
        """The client URL; ``password`` / ``sentinel_password`` default to the set's own."""
        pw = password if password is not None else self.password
        spw = sentinel_password if sentinel_password is not None else self.sentinel_password
        auth = f":{pw}@" if pw else ""
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        params = ([f"sentinel_password={spw}"] if spw else []) + ([self.tls.query()] if self.tls else [])
        if self.tls and scheme == "redis+sentinel":
            scheme = "rediss+sentinel"
        query = f"?{'&'.join(params)}" if params else ""
        return f"{scheme}://{auth}{hosts}/{self.service}/{db}{query}"

    def _sentinel_conf(self, port: int) -> str:
        lines = [
            f"port {port}", "bind 127.0.0.1", "protected-mode no", f"dir {self.dir}",
            f"sentinel monitor {self.service} 127.0.0.1 {self.primary.port} 2",
            f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}",
            f"sentinel failover-timeout {self.service} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {self.service} 1",
        ]
        if self.password:
            lines.append(f"sentinel auth-pass {self.service} {self.password}")
        if self.sentinel_password:
            lines += [f"requirepass {self.sentinel_password}", f"sentinel sentinel-pass {self.sentinel_password}"]
        if self.tls:
            lines += [f"tls-cert-file {self.tls.client_cert}", f"tls-key-file {self.tls.client_key}",
                      f"tls-ca-cert-file {self.tls.ca}", "tls-replication yes"]
        path = os.path.join(self.dir, f"sentinel-{port}.conf")
        Path(path).write_text("\n".join(lines) + "\n")
        return path

    def sentinel(self, index: int, *args: str) -> Any:
        return _redis_call(self.sentinel_ports[index], *args, password=self.sentinel_password)

    def start(self, timeout: float = 30.0) -> SentinelSet:
        self.primary.start()
        self.replica.start()
        _poll(lambda: _redis_call(self.replica.port, "INFO", "replication", password=self.password, tls=self.tls)
              .get("master_link_status") == "up", "replica in sync with the primary", timeout)
        for port in self.sentinel_ports:
            proc = subprocess.Popen([self.binary, self._sentinel_conf(port), "--sentinel"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.sentinel_procs.append(proc)
            _wait_port(port, 10, proc)
        for index in range(len(self.sentinel_ports)):
            _poll(lambda i=index: self._sees_everyone(i), f"Sentinel {index} sees the replica and its peers", timeout)
        return self

    def _sees_everyone(self, index: int) -> bool:
        raw = self.sentinel(index, "SENTINEL", "MASTER", self.service)  # a dict in redis-py 8, a flat list in 4.6
        pairs = raw.items() if isinstance(raw, dict) else zip(raw[::2], raw[1::2], strict=True)
        state = {k.decode() if isinstance(k, bytes) else str(k): v for k, v in pairs}
        return int(state["num-slaves"]) >= 1 and int(state["num-other-sentinels"]) >= 2

    def primary_address(self, index: int = 0) -> tuple[str, int]:
        """The primary as Sentinel ``index`` names it."""
        host, port = self.sentinel(index, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
        return host.decode(), int(port)

    def node_at(self, port: int) -> RedisServer:
        return next(node for node in self.nodes if node.port == port)

    def kill_primary(self) -> RedisServer:
        """SIGKILL the node the Sentinels name as primary (its unreplicated writes are lost); return it."""
        node = self.node_at(self.primary_address()[1])
        node.kill()
        return node

    def wait_failover(self, old_port: int, timeout: float = 60.0) -> int:
        """Wait until every Sentinel names a primary other than ``old_port`` and that node says it is a master;
        return its port."""

        def promoted() -> int | None:
            ports = {self.primary_address(i)[1] for i in range(len(self.sentinel_ports))}
            if len(ports) != 1 or old_port in ports:
                return None
            (port,) = ports
            role = _redis_call(port, "ROLE", password=self.password, tls=self.tls)
            return port if role[0] == b"master" else None

        return int(_poll(promoted, f"failover away from port {old_port}", timeout))

    def stop(self) -> None:
        for proc in self.sentinel_procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is a valid port and free too."""
    for _ in range(200):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair (port, port + 10000) for a cluster node")


class ClusterSet(_Server):
    """A Redis Cluster on free loopback ports: ``masters`` masters with one replica each (6 ``redis-server`` nodes
    by default, ``--cluster-enabled yes``, node config files in a temp dir, no persistence), created with
    ``redis-cli --cluster create --cluster-replicas 1 --cluster-yes``.

    ``node_timeout_ms`` (``cluster-node-timeout``) is small so that a killed master is replaced within seconds.
    :meth:`start` returns once every node says ``cluster_state:ok`` and knows every other node, and every replica
    is in sync; every wait is bounded. ``password`` protects every node (``requirepass`` and ``masterauth``).
    """

    def __init__(self, *, masters: int = 3, password: str | None = None, node_timeout_ms: int = 1000,
                 binary: str | None = None) -> None:
        self.password = password
        self.node_timeout_ms = node_timeout_ms
        self.binary = binary or shutil.which("redis-server") or ""
        self.cli = shutil.which("redis-cli") or os.path.join(os.path.dirname(self.binary), "redis-cli")
        self.dir = tempfile.mkdtemp(prefix="hyperion-cluster-")
        auth = ("--masterauth", password) if password else ()
        self.nodes: list[RedisServer] = []
        for _ in range(masters * 2):
            port = _cluster_port()
            self.nodes.append(RedisServer(password=password, port=port, binary=self.binary, extra_args=(
                "--cluster-enabled", "yes", "--cluster-config-file", os.path.join(self.dir, f"nodes-{port}.conf"),
                "--cluster-node-timeout", str(node_timeout_ms), "--repl-diskless-sync-delay", "0", *auth)))

    def url(self, *, scheme: str = "redis+cluster", password: str | None = None, count: int | None = None) -> str:
        """The client URL naming the first ``count`` nodes (default: all) as startup nodes."""
        pw = password if password is not None else self.password
        auth = f":{pw}@" if pw else ""
        hosts = ",".join(f"127.0.0.1:{node.port}" for node in self.nodes[:count])
        return f"{scheme}://{auth}{hosts}"

    def call(self, port: int, *args: str) -> Any:
        return _redis_call(port, *args, password=self.password)

    def start(self, timeout: float = 60.0) -> ClusterSet:
        for node in self.nodes:
            node.start()
        auth = ("-a", self.password, "--no-auth-warning") if self.password else ()
        subprocess.run([self.cli, *auth, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                        "--cluster-replicas", "1", "--cluster-yes"], check=True, capture_output=True, timeout=timeout)
        self.wait_healthy(timeout)
        return self

    def _healthy(self, port: int) -> bool:
        info = self.call(port, "CLUSTER", "INFO")
        text = info.decode() if isinstance(info, bytes) else str(info)
        fields = dict(line.split(":", 1) for line in text.split() if ":" in line)
        if fields.get("cluster_state") != "ok" or int(fields.get("cluster_known_nodes", 0)) < self.alive():
            return False
        replication = self.call(port, "INFO", "replication")
        return bool(replication.get("role") == "master" or replication.get("master_link_status") == "up")

    def alive(self) -> int:
        return sum(1 for node in self.nodes if node.running)

    def wait_healthy(self, timeout: float = 60.0) -> None:
        """Until every running node says ``cluster_state:ok`` and every running replica is in sync (bounded)."""
        for node in self.nodes:
            if node.running:
                _poll(lambda n=node: self._healthy(n.port), f"cluster node {node.port} healthy", timeout)

    def node_at(self, port: int) -> RedisServer:
        return next(node for node in self.nodes if node.port == port)

    def slot_of(self, key: str) -> int:
        return int(self.call(self.nodes[0].port, "CLUSTER", "KEYSLOT", key))

    def owner(self, slot: int, via: int | None = None) -> int:
        """The port of the master that owns ``slot``, as the node ``via`` (default: a running node) sees it."""
        port = via if via is not None else next(n.port for n in self.nodes if n.running)
        for start, end, master, *_ in self.call(port, "CLUSTER", "SLOTS"):
            if int(start) <= slot <= int(end):
                return int(master[1])
        raise LookupError(f"no node owns slot {slot}")

    def node_id(self, port: int) -> str:
        raw = self.call(port, "CLUSTER", "MYID")
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    def replica_of(self, master_port: int) -> int:
        for node in self.nodes:
            if node.port == master_port or not node.running:
                continue
            info = self.call(node.port, "INFO", "replication")
            if info.get("role") == "slave" and int(info.get("master_port", 0)) == master_port:
                return node.port
        raise LookupError(f"no replica of {master_port}")

    def wait_failover(self, slot: int, old_port: int, timeout: float = 60.0) -> int:
        """Until every running node names a master other than ``old_port`` for ``slot``; return its port."""

        def moved() -> int | None:
            owners = {self.owner(slot, via=n.port) for n in self.nodes if n.running}
            return owners.pop() if len(owners) == 1 and old_port not in owners else None

        port = int(_poll(moved, f"slot {slot} failed over away from {old_port}", timeout))
        self.wait_healthy(timeout)
        return port

    def migrate_slot(self, slot: int, target_port: int) -> None:
        """Move ``slot`` and its keys to the master on ``target_port`` by hand (CLUSTER SETSLOT IMPORTING/MIGRATING,
        MIGRATE, SETSLOT NODE on both and on every other master), as ``redis-cli --cluster reshard`` does."""
        source_port = self.owner(slot)
        source_id, target_id = self.node_id(source_port), self.node_id(target_port)
        self.call(target_port, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", source_id)
        self.call(source_port, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", target_id)
        while keys := self.call(source_port, "CLUSTER", "GETKEYSINSLOT", str(slot), "100"):
            auth = ("AUTH", self.password) if self.password else ()
            self.call(source_port, "MIGRATE", "127.0.0.1", str(target_port), "", "0", "5000", *auth, "KEYS",
                      *(k.decode() for k in keys))
        for port in (target_port, source_port):
            self.call(port, "CLUSTER", "SETSLOT", str(slot), "NODE", target_id)
        for node in self.nodes:
            with contextlib.suppress(Exception):
                if self.call(node.port, "INFO", "replication").get("role") == "master":
                    self.call(node.port, "CLUSTER", "SETSLOT", str(slot), "NODE", target_id)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class PostgresServer(_Server):
    """A throwaway PostgreSQL cluster (``initdb`` + ``postgres``) on a free loopback port.

    PostgreSQL refuses to run as root: when we are root, every server command runs as the ``postgres`` user
    (``Popen(user="postgres")``), and the data directory is made owned by it inside a world-traversable temp dir.
    """

    def __init__(self, *, bindir: str | None = None) -> None:
        self.bindir = bindir or _postgres_bindir()
        self.port = free_port()
        self.root = tempfile.mkdtemp(prefix="hyperion-pg-")
        os.chmod(self.root, 0o755)
        self.data = os.path.join(self.root, "data")
        self.proc: subprocess.Popen[bytes] | None = None
        self.user = "hyperion"
        self.password = "hyperion-test-pw"
        self.database = "hyperion"

    def _owner(self) -> dict[str, Any]:
        """Popen arguments that run a server command as ``postgres`` when we are root (signals then reach it
        directly, unlike through ``runuser``)."""
        if os.geteuid() != 0:
            return {}
        return {"user": "postgres", "group": "postgres", "extra_groups": [], "env": {**os.environ, "HOME": self.root}}

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.database}"

    def start(self) -> PostgresServer:
        os.makedirs(self.data)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
            shutil.chown(self.data, "postgres")
        pwfile = os.path.join(self.root, "pw")
        Path(pwfile).write_text(self.password + "\n")
        os.chmod(pwfile, 0o644)
        subprocess.run(
            [
                os.path.join(self.bindir, "initdb"), "-D", self.data, "-U", self.user, "--pwfile", pwfile,
                "-A", "scram-sha-256", "-E", "UTF8", "--no-sync",
            ],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=self.root, **self._owner(),
        )
        self.proc = subprocess.Popen(
            [
                os.path.join(self.bindir, "postgres"), "-D", self.data, "-p", str(self.port),
                "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.root}",
                "-c", "fsync=off", "-c", "max_connections=200",
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.root, **self._owner(),
        )
        _wait_port(self.port, 30, self.proc)
        self._create_database()
        return self

    def _create_database(self) -> None:
        import psycopg

        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(
                    host="127.0.0.1", port=self.port, user=self.user, password=self.password, dbname="postgres",
                    autocommit=True, connect_timeout=5,
                ) as conn:
                    conn.execute(f'CREATE DATABASE "{self.database}"')
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)


def _postgres_bindir() -> str:
    found = shutil.which("postgres") or shutil.which("initdb")
    if found:
        return os.path.dirname(os.path.realpath(found))
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), reverse=True)
    if candidates:
        return str(candidates[0].parent)
    raise RuntimeError(
        "PostgreSQL binaries (initdb, postgres) not found: install them (Debian: apt-get install -y postgresql) "
        "or set HYPERION_LOCK_TEST_DATABASE_URL"
    )


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a real Redis for the whole test session (see the module docstring for where it comes from)."""
    external = os.environ.get("HYPERION_LOCK_TEST_REDIS_URL")
    if external:
        yield external
        return
    if docker_available():
        from testcontainers.redis import RedisContainer

        with RedisContainer("redis:7-alpine") as container:
            yield f"redis://{container.get_container_host_ip()}:{container.get_exposed_port(6379)}/0"
        return
    with RedisServer() as server:
        yield server.url


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private ``redis-server`` for this test only, which the test may kill, pause or restart."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """SQLAlchemy URL (``postgresql+psycopg://``) of a real PostgreSQL for the whole test session."""
    external = os.environ.get("HYPERION_LOCK_TEST_DATABASE_URL")
    if external:
        yield external
        return
    if docker_available():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver="psycopg") as container:
            yield container.get_connection_url()
        return
    with PostgresServer() as server:
        yield server.url


# --- run-once isolation per test --------------------------------------------------------------------------------

GENERATION_ENV = "HYPERION_LOCK_GENERATION"
KEY_PREFIX_ENV = "HYPERION_LOCK_KEY_PREFIX"
LOCK_DIR_ENV = "HYPERION_LOCK_LOCK_DIR"
_ISOLATED_ENV = (GENERATION_ENV, KEY_PREFIX_ENV, LOCK_DIR_ENV)


@dataclass(frozen=True)
class Isolation:
    """What :func:`isolated_run_once` put in the environment for its block."""

    generation: str
    key_prefix: str
    lock_dir: str


def _xdist_worker() -> str:
    """``gw0``, ``gw1``, ... under pytest-xdist (``PYTEST_XDIST_WORKER``), else ``main``; as a valid name part."""
    worker = name_part(os.environ.get("PYTEST_XDIST_WORKER", ""), 40)
    return worker or "main"


@contextlib.contextmanager
def isolated_run_once(prefix: str | None = None, generation: str | None = None) -> Iterator[Isolation]:
    """Give the code inside the block its own run-once state: generation, key prefix and file-lock directory.

    For the block's duration it sets

    * ``HYPERION_LOCK_GENERATION`` to ``generation``, or a fresh ``test-<xdist worker>-<random>``;
    * ``HYPERION_LOCK_KEY_PREFIX`` to ``prefix``, or a fresh ``hyperion_lock_test:<xdist worker>:<random>``;
    * ``HYPERION_LOCK_LOCK_DIR`` to a new temporary directory, deleted afterwards;

    and then restores each variable to what it was (or unsets it), also when the block raises. The xdist worker
    is ``PYTEST_XDIST_WORKER`` (``main`` without xdist); the random part makes two blocks of one process differ.
    A ``prefix`` or ``generation`` passed in is used as it is (it is checked like every name: 1-200 letters,
    digits and ``_ . - : /``, else :class:`~hyperion_lock.ConfigurationError`); keeping it unique is then up to
    the caller. The environment is per process: do not use overlapping blocks from several threads.
    """
    worker = _xdist_worker()
    isolation = Isolation(
        generation=validate_name(generation, "generation") if generation is not None
        else f"test-{worker}-{secrets.token_hex(6)}",
        key_prefix=validate_name(prefix, "key prefix") if prefix is not None
        else f"hyperion_lock_test:{worker}:{secrets.token_hex(6)}",
        lock_dir=tempfile.mkdtemp(prefix=f"hyperion-lock-test-{worker}-"),
    )
    saved = {name: os.environ.get(name) for name in _ISOLATED_ENV}
    os.environ[GENERATION_ENV] = isolation.generation
    os.environ[KEY_PREFIX_ENV] = isolation.key_prefix
    os.environ[LOCK_DIR_ENV] = isolation.lock_dir
    try:
        yield isolation
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(isolation.lock_dir, ignore_errors=True)


@pytest.fixture
def hyperion_lock_isolated() -> Iterator[Isolation]:
    """This test's own generation, key prefix and file-lock directory (see :func:`isolated_run_once`).

    Opt in per module with ``pytestmark = pytest.mark.usefixtures("hyperion_lock_isolated")``, per test by naming
    the fixture, or for every test with an autouse fixture in ``conftest.py`` that requests it.
    """
    with isolated_run_once() as isolation:
        yield isolation
