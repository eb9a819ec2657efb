"""No password reaches an error, a repr, a status line or the log, however the URL spells it.

Passwords with ``/ ? # @ :`` (base64 secrets have ``/`` and ``=``) end a URL's authority early, so a naive
``urlsplit`` puts pieces of the secret in the host, port, path or query; redis-py also reads ``?password=``.
Each secret below is built from distinctive chunks so that a leaked *piece* is caught, not only the whole.
"""


from __future__ import annotations

import logging
from collections.abc import Iterator
from urllib.parse import quote

import pytest

from hyperion_lock import (
    Coordinator,
    HyperionLockError,
    RedisAuthError,
    redact_url,
)
from hyperion_lock.testing import RedisServer, free_port
from tests.support import noop
from tests.support.secrets import (
    CASES,
    SENTINEL_CASES,
    _sentinel_url,
    _url,
    assert_no_secret,
)


@pytest.mark.integration
@pytest.mark.parametrize(("template", "secret"), CASES)
def test_unreachable_server_error_and_log_hide_the_secret(
    template: str, secret: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = _url(template, secret, free_port())  # nothing listens there
    caplog.set_level(logging.DEBUG)
    with pytest.raises(HyperionLockError) as info:
        Coordinator(url, connect_timeout=0.5, generation="x").run_once_sync("migrate", noop)
    assert_no_secret(str(info.value), secret)
    assert_no_secret(repr(info.value), secret)
    assert_no_secret(caplog.text, secret)


@pytest.fixture(scope="module")
def protected_redis() -> Iterator[RedisServer]:
    with RedisServer(password="Right8/Pw?Ok#Zz") as server:
        yield server


@pytest.mark.integration
@pytest.mark.parametrize(("template", "secret"), CASES)
def test_wrong_password_error_and_log_hide_both_passwords(
    template: str, secret: str, protected_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    url = _url(template, secret, protected_redis.port)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(HyperionLockError) as info:
        Coordinator(url, connect_timeout=0.5, generation="x").run_once_sync("migrate", noop)
    if "<unparseable URL" not in str(redact_url(url)) and not url.startswith("rediss://"):
        assert isinstance(info.value, RedisAuthError)
    for text in (str(info.value), repr(info.value), caplog.text):
        assert_no_secret(text, secret, protected_redis.password or "")


@pytest.mark.integration
def test_right_password_with_special_characters_works_percent_encoded(protected_redis: RedisServer) -> None:
    url = f"redis://:{quote(protected_redis.password or '', safe='')}@127.0.0.1:{protected_redis.port}/0"
    assert Coordinator(url, generation="special").run_once_sync("migrate", noop).ran_here
    assert redact_url(url) == f"redis://:***@127.0.0.1:{protected_redis.port}/0"






@pytest.mark.integration
@pytest.mark.parametrize(("template", "secret", "sentinel_secret"), SENTINEL_CASES[:3])
def test_unreachable_sentinel_error_and_log_hide_both_secrets(
    template: str, secret: str, sentinel_secret: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = _sentinel_url(template, secret, sentinel_secret, free_port())  # nothing listens there
    caplog.set_level(logging.DEBUG)
    with pytest.raises(HyperionLockError) as info:
        Coordinator(url, connect_timeout=0.5, generation="x").run_once_sync("migrate", noop)
    assert "no Sentinel at" in str(info.value)
    for text in (str(info.value), repr(info.value), caplog.text):
        assert_no_secret(text, secret, sentinel_secret)

