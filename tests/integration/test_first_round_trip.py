"""``connect_timeout`` bounds the whole first round trip of a call, the probe that may take the lease included.

The servers here accept connections and never answer: a loopback listener that reads nothing, and a SIGSTOPped
redis-server. The clients have no socket timeout at all, so only ``connect_timeout`` can end the call; a guard
ends the silence after :data:`GUARD` seconds (it cuts the connections, or resumes the server), and each test checks
that the call had ended on its own before the guard was needed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aredis

import hyperion_lock.runonce.coordinator as core
from hyperion_lock import Coordinator, RedisUnavailableError
from hyperion_lock.connection.clients import _handshake_kwargs, aclose, async_client_from_url
from hyperion_lock.testing import RedisServer
from tests.support import wait_until

pytestmark = pytest.mark.integration

GUARD = 60.0  # seconds of silence after which the test ends it; connect_timeout is 1 s


class SilentServer:
    """Accepts TCP connections on loopback and never reads or answers; :meth:`cut` closes them all."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.was_cut = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.conns.append(conn)

    def cut(self) -> None:
        self.was_cut = True
        for conn in self.conns:
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        for conn in self.conns:
            conn.close()


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    server = SilentServer()
    try:
        yield server
    finally:
        server.close()


async def _first_call_fails(coordinator: Coordinator, guard: Callable[[], None]) -> RedisUnavailableError:
    ran: list[int] = []
    timer = threading.Timer(GUARD, guard)
    timer.start()
    try:
        with pytest.raises(RedisUnavailableError) as info:
            await coordinator.run_once("first", lambda: ran.append(1))
    finally:
        timer.cancel()
    assert not ran
    return info.value


def _no_socket_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """URL clients without a read timeout: only ``connect_timeout`` can bound the first call."""

    def unbounded(url: str, **kwargs: Any) -> aredis.Redis:
        return async_client_from_url(url, **{**kwargs, "socket_timeout": None})

    monkeypatch.setattr(core, "async_client_from_url", unbounded)  # what the coordinator builds its client with


@pytest.mark.parametrize("client", ["url", "url-with-password", "handed-over"])
async def test_a_server_that_accepts_and_never_answers(
    silent: SilentServer, client: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without a password nothing is read before the first probe (no AUTH, no handshake): the probe that may take
    # the lease is the first request left without an answer.
    auth = ":s3cret-pw@" if client == "url-with-password" else ""
    url = f"redis://{auth}127.0.0.1:{silent.port}/0"
    if client.startswith("url"):
        _no_socket_timeout(monkeypatch)
        error = await _first_call_fails(Coordinator(url, connect_timeout=1, lease_ttl=60), silent.cut)
    else:
        handed = aredis.Redis.from_url(url, socket_timeout=None, **_handshake_kwargs())
        try:
            error = await _first_call_fails(Coordinator(handed, connect_timeout=1, lease_ttl=60), silent.cut)
        finally:
            await aclose(handed)  # redis-py 4.6 has no Redis.aclose()
    assert not silent.was_cut, "the call only ended when the guard cut the connections"
    # The client did connect (the listener thread may record it a moment after the kernel accepted it).
    wait_until(lambda: silent.conns, "the client connecting to the silent server")
    text = str(error)
    assert f"127.0.0.1:{silent.port}" in text and "did not answer" in text
    assert "s3cret-pw" not in text


async def test_a_sigstopped_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    server = RedisServer().start()
    resumed: list[bool] = []

    def resume() -> None:
        resumed.append(True)
        server.resume()

    try:
        _no_socket_timeout(monkeypatch)
        server.pause()
        error = await _first_call_fails(Coordinator(server.url, connect_timeout=1, lease_ttl=60), resume)
        assert not resumed, "the call only ended when the guard resumed the server"
        assert f"127.0.0.1:{server.port}" in str(error)
    finally:
        server.stop()


def test_the_cli_run_against_a_silent_server(silent: SilentServer, tmp_path: Path) -> None:
    """``hyperion-lock run`` goes through the same first round trip: it fails with exit status 3 and the target,
    the command never started."""
    marker = tmp_path / "ran"
    proc = subprocess.run(
        ["hyperion-lock", "run", "--key", "first", "--", "touch", str(marker)],
        env={**os.environ, "HYPERION_LOCK_REDIS_URL": f"redis://127.0.0.1:{silent.port}/0",
             "HYPERION_LOCK_CONNECT_TIMEOUT": "1", "HYPERION_LOCK_LEASE_TTL": "60", "HYPERION_LOCK_GENERATION": "g1"},
        capture_output=True, text=True, timeout=GUARD, check=False,
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert f"127.0.0.1:{silent.port}" in proc.stderr and "did not answer" in proc.stderr
    assert not marker.exists()
