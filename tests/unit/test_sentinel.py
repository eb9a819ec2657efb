"""redis+sentinel:// URLs: parsing, validation, redaction (no server), then real Sentinels (SentinelSet)."""


from __future__ import annotations

from urllib.parse import quote

import pytest
import redis
from redis import exceptions as rexc

from hyperion_lock import (
    ConfigurationError,
    Coordinator,
    Settings,
    redact_url,
)
from hyperion_lock.connection.clients import (
    describe_client,
    is_transient,
    sync_client_from_url,
)
from hyperion_lock.connection.sentinel import master_not_found
from hyperion_lock.connection.urls import parse_sentinel_url
from hyperion_lock.runonce.redis_backend import replicas_short
from hyperion_lock.settings import replica_wait_ms
from tests.support import refusals
from tests.support.secrets import AT_COLON, SLASHY, assert_no_secret


def test_full_sentinel_url_is_parsed() -> None:
    url = (f"rediss+sentinel://app:{quote(SLASHY, safe='')}@10.0.0.1:26379,[::1]:26380,s3/my%20service/4"
           f"?sentinel_username=sen&sentinel_password={quote(AT_COLON, safe='')}&ssl_ca_certs=/ca.pem"
           "&ssl_certfile=/c.pem&ssl_keyfile=/k.pem&ssl_cert_reqs=optional&ssl_check_hostname=false")
    target = parse_sentinel_url(url)
    assert target.sentinels == (("10.0.0.1", 26379), ("::1", 26380), ("s3", 26379))
    assert (target.service, target.db, target.username, target.password) == ("my service", 4, "app", SLASHY)
    assert (target.sentinel_username, target.sentinel_password) == ("sen", AT_COLON)
    assert target.data_kwargs() == {
        "db": 4, "username": "app", "password": SLASHY, "ssl": True, "ssl_ca_certs": "/ca.pem",
        "ssl_certfile": "/c.pem", "ssl_keyfile": "/k.pem", "ssl_cert_reqs": "optional", "ssl_check_hostname": False,
    }
    assert target.sentinel_auth() == {"username": "sen", "password": AT_COLON}
    assert_no_secret(repr(target), SLASHY, AT_COLON)


@pytest.mark.parametrize(
    ("url", "tls", "db", "password"),
    [
        ("redis+sentinel://h:26379/mymaster", False, 0, None),
        ("redis+sentinel://:pw@h1:1,h2:2/mymaster/3", False, 3, "pw"),
        ("redis+sentinel://h/mymaster?db=2&ssl=true", True, 2, None),
        ("REDIS+SENTINEL://h/mymaster?ssl=no", False, 0, None),
    ],
)
def test_sentinel_url_forms(url: str, tls: bool, db: int, password: str | None) -> None:
    target = parse_sentinel_url(url)
    assert (target.tls, target.db, target.password) == (tls, db, password)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+sentinel://h:26379", "/service_name"),
        ("redis+sentinel://h:26379/", "/service_name"),
        ("redis+sentinel://h:26379/m/x", "is not a number"),
        ("redis+sentinel://h:26379/m/1/2", "/service_name"),
        ("redis+sentinel://h:0/m", "port"),
        ("redis+sentinel://h:99999/m", "port"),
        ("redis+sentinel://h:1,,h:2/m", "no host"),
        ("redis+sentinel:///m", "no Sentinel address"),
        ("redis+sentinel://h/m?sentinel_pasword=x", "unknown query parameter(s) 'sentinel_pasword'"),
        ("redis+sentinel://h/m?password=x", "unknown query parameter(s) 'password'"),
        ("redis+sentinel://h/m?ssl_ca_certs=/ca.pem", "need TLS"),
        ("rediss+sentinel://h/m?ssl_cert_reqs=maybe", "none, optional, required"),
        ("redis+sentinel://h/m?ssl=perhaps", "true or false"),
        ("redis+sentinel://h/m/1?db=2", "database once"),
        ("redis+sentinel://:Ab1/Cd2@h/m", "percent-encoded"),
        ("redis+sentinel://h/m#frag", "percent-encoded"),
        ("sentinel://h/m", "the scheme must be"),
        ("redis+clustr://h/m", "the scheme must be"),
    ],
)
def test_bad_urls_are_configuration_errors_naming_the_forms(url: str, says: str) -> None:
    for text in refusals(url):
        assert says in text, text
        assert "redis+sentinel://[[user]:password@]host:port[,host:port...]/service_name[/db]" in text
        assert "Ab1" not in text and "Cd2" not in text  # no piece of a badly encoded password


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis://h/0?sockettimeout=1", "'sockettimeout' for redis://"),
        ("redis://h/0?ssl_ca_certs=/ca.pem", "ssl_* parameters need rediss://"),
        ("unix:///run/redis.sock?ssl_certfile=/c", "ssl_* parameters need rediss://"),
        ("rediss://h/0?ssl_cert_reqs=sometimes", "none, optional, required"),
        ("rediss://h/0?ssl_check_hostname=perhaps", "true or false"),
    ],
)
def test_unknown_query_parameters_of_plain_urls_are_refused(url: str, says: str) -> None:
    for text in refusals(url):
        assert says in text and "rediss+sentinel://" in text, text


def test_known_query_parameters_of_plain_urls_still_work() -> None:
    url = ("rediss://h/0?ssl_ca_certs=/ca.pem&ssl_certfile=/c.pem&ssl_keyfile=/k.pem&ssl_cert_reqs=none"
           "&socket_timeout=2&client_name=app&health_check_interval=10")
    client = sync_client_from_url(url, connect_timeout=1, socket_timeout=1)
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["ssl_ca_certs"], kwargs["ssl_certfile"], kwargs["ssl_keyfile"]) == ("/ca.pem", "/c.pem", "/k.pem")
    assert kwargs["ssl_cert_reqs"] == "none"
    client.close()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (f"redis+sentinel://:{quote(SLASHY, safe='')}@h1:1,h2:2/mymaster/3"
         f"?sentinel_password={quote(AT_COLON, safe='')}",
         "redis+sentinel://:***@h1:1,h2:2/mymaster/3?sentinel_password=***"),
        (f"rediss+sentinel://app:{quote(AT_COLON, safe='')}@[::1]/m?sentinel_username=sen&sentinel_password=x1y2z3",
         "rediss+sentinel://app:***@[::1]:26379/m/0?sentinel_username=sen&sentinel_password=***"),
        ("redis+sentinel://h/m?ssl=true", "rediss+sentinel://h:26379/m/0"),
        (f"redis+sentinel://:{SLASHY}@h1:1/m",
         "redis+sentinel://<unparseable URL: percent-encode special characters in the password>"),
    ],
)
def test_both_passwords_are_redacted_everywhere(url: str, expected: str) -> None:
    assert redact_url(url) == expected
    if "unparseable" in expected:  # refused when the setting is made, without the secret
        with pytest.raises(ConfigurationError, match="must be percent-encoded") as info:
            Settings(redis_url=url, generation="g")
        assert_no_secret(str(info.value), SLASHY, AT_COLON, "x1y2z3")
        return
    settings = Settings(redis_url=url, generation="g")
    for text in (repr(settings), settings.describe_target()):
        assert_no_secret(text, SLASHY, AT_COLON, "x1y2z3")
    if "unparseable" not in expected:
        assert repr(Coordinator(url, generation="g")) == f"Coordinator({expected!r}, generation='g')"


def test_describe_client_of_a_sentinel_client_names_no_secret() -> None:
    url = f"rediss+sentinel://:{quote(SLASHY, safe='')}@h1:1,h2:2/m/5?sentinel_password=x1y2z3"
    client = sync_client_from_url(url, connect_timeout=1, socket_timeout=1)
    assert describe_client(client) == "rediss+sentinel://h1:1,h2:2/m/5"
    client.close()


def test_master_not_found_wordings() -> None:
    one, two = redis.Redis(host="10.0.0.1", port=1), redis.Redis(host="10.0.0.2", port=2)
    refused = f"No master found for 'm' : {one} - ConnectionError('refused'), {two} - TimeoutError('t')"
    assert str(master_not_found("m", [one, two], refused, False)) == (
        "no Sentinel at 10.0.0.1:1, 10.0.0.2:2 answered (connection refused, reset or timed out)")
    unknown = master_not_found("m", [one, two], f"No master found for 'm' : {two} - ConnectionError('x')", False)
    assert str(unknown).startswith("Sentinel at 10.0.0.1:1 does not know service 'm'")
    assert str(unknown).endswith("; no answer from 10.0.0.2:2")
    down = master_not_found("m", [one, two], "No master found for 'm'", True)
    assert "knows service 'm' but reports no healthy primary" in str(down)
    auth = master_not_found("m", [one], f"No master found for 'm' : {one} - AuthenticationError('NOAUTH')", False)
    assert isinstance(auth, rexc.AuthenticationError) and "sentinel_password" in str(auth)
    for err in (unknown, down):
        assert is_transient(err)
    one.close()
    two.close()


def test_read_only_reply_is_transient() -> None:
    assert is_transient(rexc.ReadOnlyError("You can't write against a read only replica."))


def test_min_replicas_setting() -> None:
    assert Settings(generation="g").min_replicas == 0
    assert Settings.from_env({"HYPERION_LOCK_MIN_REPLICAS": "2"}, generation="g").min_replicas == 2
    for bad in ("-1", "101", "two", "1.5"):
        with pytest.raises(ConfigurationError, match="min_replicas"):
            Settings.from_env({"HYPERION_LOCK_MIN_REPLICAS": bad}, generation="g")
    assert (replica_wait_ms(15), replica_wait_ms(1), replica_wait_ms(0.1)) == (1000, 100, 10)


@pytest.mark.parametrize(
    ("wanted", "acked", "wrote", "short"),
    [(0, None, True, False), (1, 1, True, False), (2, 1, True, True), (2, 0, False, False), (1, None, True, False)],
)
def test_replicas_short_decision(wanted: int, acked: int | None, wrote: bool, short: bool) -> None:
    assert replicas_short(wanted, acked, wrote) is short

