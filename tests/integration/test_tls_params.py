"""The TLS query parameters of rediss:// and rediss+sentinel:// URLs against real TLS-only servers that require a
client certificate: ssl_ca_certs, ssl_certfile, ssl_keyfile and ssl_cert_reqs each change what happens."""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Iterator

import pytest

from hyperion_lock import Coordinator, RedisTLSError, RedisUnavailableError
from hyperion_lock.testing import RedisServer, SentinelSet, TlsFiles, free_port
from tests.support import Workers, noop

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tls_files() -> Iterator[TlsFiles]:
    with tempfile.TemporaryDirectory(prefix="hyperion-tls-") as directory:
        yield TlsFiles.make(directory)


@pytest.fixture(scope="module")
def tls_server(tls_files: TlsFiles) -> Iterator[RedisServer]:
    port = free_port()
    with RedisServer(port=port, extra_args=tls_files.server_args(port)) as server:
        yield server


def _run(url: str) -> bool:
    return Coordinator(url, connect_timeout=2, generation=f"tls-{time.time_ns()}").run_once_sync("m", noop).ran_here


def test_ca_and_client_certificate_from_the_url(tls_server: RedisServer, tls_files: TlsFiles) -> None:
    base = f"rediss://127.0.0.1:{tls_server.port}/0"
    assert _run(f"{base}?{tls_files.query()}")
    assert _run(f"{base}?{tls_files.query()}&ssl_cert_reqs=required")


def test_without_the_client_certificate_the_server_refuses(tls_server: RedisServer, tls_files: TlsFiles) -> None:
    """Both are retried as connection errors until connect_timeout, then named RedisUnavailableError: without a
    certificate the server ends the handshake with its "certificate required" alert; a key alone is refused by
    the ssl module before any handshake. The last error's wording depends on the redis-py and Python versions
    (redis-py 4.6 reports the second as "Error UNKNOWN while writing to socket"), so only the URL is matched."""
    base = re.escape(f"rediss://127.0.0.1:{tls_server.port}/0")
    with pytest.raises(RedisUnavailableError, match=rf"{base} did not answer .*last error"):
        _run(f"rediss://127.0.0.1:{tls_server.port}/0?ssl_ca_certs={tls_files.ca}")
    with pytest.raises(RedisUnavailableError, match=rf"{base} did not answer .*last error"):  # a key alone: no better
        _run(f"rediss://127.0.0.1:{tls_server.port}/0?ssl_ca_certs={tls_files.ca}&ssl_keyfile={tls_files.client_key}")


def test_ssl_cert_reqs_decides_whether_an_unknown_ca_is_refused(tls_server: RedisServer, tls_files: TlsFiles) -> None:
    client_cert = f"ssl_certfile={tls_files.client_cert}&ssl_keyfile={tls_files.client_key}"
    base = f"rediss://127.0.0.1:{tls_server.port}/0?{client_cert}"
    with pytest.raises(RedisTLSError, match="certificate was not accepted"):
        _run(base)  # the test CA is not trusted by the system
    with pytest.raises(RedisTLSError):
        _run(f"{base}&ssl_cert_reqs=required")
    assert _run(f"{base}&ssl_cert_reqs=none")  # not verified: works, and is what "none" means


@pytest.fixture(scope="module")
def tls_sentinels(tls_files: TlsFiles) -> Iterator[SentinelSet]:
    with SentinelSet(tls=tls_files, password="tls-data-pw") as sset:
        yield sset


def test_rediss_sentinel_reaches_a_tls_primary(tls_sentinels: SentinelSet, workers: Workers) -> None:
    url = tls_sentinels.url()
    assert url.startswith("rediss+sentinel://")
    workers.spawn(4, url=url, ttl=10, job="sleep:0.3", generation=f"tls-sentinel-{time.time_ns()}")
    assert workers.join() == [0] * 4, workers.outputs
    assert len(workers.events("ran")) == 1 and len(workers.events("returned")) == 4
    assert _run(tls_sentinels.url(scheme="redis+sentinel").replace("rediss+", "redis+") + "&ssl=true")


def test_sentinel_url_without_tls_cannot_reach_a_tls_primary(tls_sentinels: SentinelSet) -> None:
    port, service = tls_sentinels.sentinel_ports[0], tls_sentinels.service
    plain = f"redis+sentinel://:tls-data-pw@127.0.0.1:{port}/{service}"
    # The Sentinels answer in plain text; the TLS-only primary they name drops the plain connection.
    redacted = re.escape(f"redis+sentinel://:***@127.0.0.1:{port}/{service}/0")  # the password not shown
    with pytest.raises(RedisUnavailableError, match=rf"{redacted} did not answer .*last error ConnectionError"):
        _run(plain)
