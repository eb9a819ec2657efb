"""No password reaches an error, a repr, a status line or the log, however the URL spells it.

Passwords with ``/ ? # @ :`` (base64 secrets have ``/`` and ``=``) end a URL's authority early, so a naive
``urlsplit`` puts pieces of the secret in the host, port, path or query; redis-py also reads ``?password=``.
Each secret below is built from distinctive chunks so that a leaked *piece* is caught, not only the whole.
"""


from __future__ import annotations

import re
from urllib.parse import quote

import pytest

from hyperion_lock import (
    ConfigurationError,
    Coordinator,
    HyperionLockError,
    RedisDatabaseIndexError,
    Settings,
    redact_url,
)
from tests.support.secrets import (
    AT_COLON,
    CASES,
    PLAIN,
    SENTINEL_CASES,
    SLASHY,
    _sentinel_url,
    _url,
    assert_no_secret,
)


@pytest.mark.parametrize(("template", "secret"), CASES)
def test_descriptions_never_contain_the_secret(template: str, secret: str) -> None:
    url = _url(template, secret, 6379)
    described = redact_url(url)
    assert described is not None
    assert_no_secret(described, secret)
    # Either a faithful description of what redis-py will use, or a placeholder: never a guess.
    assert described.startswith(("redis://", "rediss://"))
    assert "127.0.0.1:6379/0" in described or "<unparseable URL" in described
    if "<unparseable URL" in described:  # refused when the setting is made, by a message without the secret
        with pytest.raises(ConfigurationError, match="must be percent-encoded") as info:
            Settings(redis_url=url, generation="g")
        assert_no_secret(str(info.value), secret)
        return
    settings = Settings(redis_url=url, generation="g")
    assert_no_secret(repr(settings), secret)
    assert_no_secret(settings.describe_target(), secret)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (f"redis://:{quote(SLASHY, safe='')}@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        (f"redis://alice:{quote(AT_COLON, safe='')}@h:7000/2", "redis://alice:***@h:7000/2"),
        (f"redis://h/0?password={PLAIN}", "redis://:***@h:6379/0"),
        (f"redis://{PLAIN}@h/0", "redis://***@h:6379/0"),
        (f"redis://:{SLASHY}@127.0.0.1:6379/0",
         "redis://<unparseable URL: percent-encode special characters in the password>"),
        (f"redis://:{AT_COLON}@127.0.0.1:6379/0",
         "redis://<unparseable URL: percent-encode special characters in the password>"),
        ("redis://:Ab12/Cd34@host:6379/0",  # urlsplit: host "", port "Ab12" -> rejected
         "redis://<unparseable URL: percent-encode special characters in the password>"),
        ("redis://:1234/Cd34@host:6379/0",  # urlsplit: port 1234 (a piece of the password!), path "/Cd34@host..."
         "redis://<unparseable URL: percent-encode special characters in the password>"),
        ("redis://Ab12/Cd34@host:6379/0",  # urlsplit: host "ab12" (a piece of the password!)
         "redis://<unparseable URL: percent-encode special characters in the password>"),
    ],
)
def test_redact_url_rebuilds_from_the_parse(url: str, expected: str) -> None:
    assert redact_url(url) == expected


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        (f"redis://127.0.0.1:6379/0?pasword={PLAIN}", "unknown query parameter(s) 'pasword' for redis://"),
        (f"redis://:{PLAIN}@127.0.0.1:6379/0?sslmode=require", "unknown query parameter(s) 'sslmode' for redis://"),
        (f"rediss://:{PLAIN}@h/0?ssl_cert_reqs=maybe", "ssl_cert_reqs must be one of none, optional, required"),
        (f"redis+sentinel://:{PLAIN}@h/m?sentinel_pasword={PLAIN}",
         "unknown query parameter(s) 'sentinel_pasword' for redis+sentinel://"),
        (f"redis+cluster://:{PLAIN}@h:7000?db=1", "unknown query parameter(s) 'db' for redis+cluster://"),
    ],
)
def test_a_refused_url_is_described_by_its_real_problem(url: str, problem: str) -> None:
    """A URL that splits cleanly but names an unknown parameter is not blamed on the password's encoding."""
    described = redact_url(url)
    assert described == f"{url.partition('://')[0]}://<invalid URL: {problem}>"
    with pytest.raises(ConfigurationError) as info:
        Settings(redis_url=url, generation="g")
    assert problem in str(info.value) and "percent-encode" not in str(info.value)
    assert_no_secret(str(info.value), PLAIN)


@pytest.mark.parametrize(
    ("url", "error", "says"),
    [
        ("redis://h/abc", ConfigurationError, "the database in the path /db is not a number"),
        ("redis://h/1/2", ConfigurationError, "the database in the path /db is not a number"),
        ("redis://h/+1", ConfigurationError, "the database in the path /db is not a number"),
        ("redis://h?db=x", ConfigurationError, "the database in the query parameter 'db' is not a number"),
        ("redis://h/1?db=2", ConfigurationError, "two different databases"),
        ("unix:///run/redis.sock?db=abc", ConfigurationError, "'db' is not a number"),
        ("redis://h/-1", RedisDatabaseIndexError, "the database index in the path /db is negative"),
        ("redis://h/?db=-1", RedisDatabaseIndexError, "the database index in the query parameter 'db' is negative"),
        ("redis://h/99999999999999999999", RedisDatabaseIndexError, "index 99999999999999999999 in the path /db is "
                                                                     "out of range"),
        ("redis://h/2147483647", RedisDatabaseIndexError, "out of range"),
        ("redis+sentinel://h/m/abc", ConfigurationError, "the database in the path /service_name/db is not a number"),
        ("redis+sentinel://h/m/-1", RedisDatabaseIndexError, "path /service_name/db is negative"),
        ("redis+sentinel://h/m/99999999999999999999", RedisDatabaseIndexError, "out of range"),
        ("redis+sentinel://h/m?db=-1", RedisDatabaseIndexError, "'db' is negative"),
        ("redis+cluster://h:7000/abc", ConfigurationError, "only database 0"),
        ("redis+cluster://h:7000/-1", ConfigurationError, "only database 0"),
    ],
)
def test_a_database_index_no_server_has_is_refused_when_set(url: str, error: type[Exception], says: str) -> None:
    """``/abc`` used to mean database 0, ``/1/2`` database 12, ``/-1`` a garbled error at the first connect and a
    huge index a bare ResponseError: each is refused by Settings, saying what to fix, and never with a secret."""
    secret_url = url.replace("://", f"://:{PLAIN}@", 1)
    for candidate in (url, secret_url):
        with pytest.raises(error, match=re.escape(says)) as info:
            Settings(redis_url=candidate, generation="g")
        assert "0-15" in str(info.value) or error is ConfigurationError
        assert_no_secret(str(info.value), PLAIN)
        with pytest.raises(error):
            Coordinator(candidate, generation="g")


@pytest.mark.parametrize("url", ["redis://h", "redis://h/", "redis://h/15", "redis://h/007?db=7", "redis://h?db=3",
                                 "redis+sentinel://h/m/2147483646", "redis+cluster://h:7000/0"])
def test_a_valid_database_index_is_accepted(url: str) -> None:
    assert Settings(redis_url=url, generation="g").redis_url == url


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        (f"postgresql://app:{SLASHY}@db:5432/app", SLASHY),
        (f"postgresql://app:{quote(SLASHY, safe='')}@db:5432/app", SLASHY),
        (f"postgresql://db:5432/app?user=app&password={PLAIN}&sslmode=require", PLAIN),
        (f"mysql://{PLAIN}@db/app", PLAIN),
    ],
)
def test_other_schemes_are_redacted_too(url: str, secret: str) -> None:
    described = redact_url(url)
    assert described is not None
    assert_no_secret(described, secret)
    assert described.partition("://")[0] == url.partition("://")[0]






@pytest.mark.parametrize(("template", "secret", "sentinel_secret"), SENTINEL_CASES)
def test_sentinel_descriptions_never_contain_either_secret(template: str, secret: str, sentinel_secret: str) -> None:
    url = _sentinel_url(template, secret, sentinel_secret, 26379)
    described = redact_url(url)
    assert described is not None and described.startswith(("redis+sentinel://", "rediss+sentinel://"))
    assert_no_secret(described, secret, sentinel_secret)
    try:
        settings = Settings(redis_url=url, generation="g")
        coordinator = Coordinator(url, generation="g")
    except HyperionLockError as exc:  # refused (unencoded password, unknown parameter): the message is safe too
        assert "<unparseable URL" in described or "<invalid URL" in described
        assert_no_secret(str(exc) + repr(exc), secret, sentinel_secret)
    else:
        assert_no_secret(repr(settings) + settings.describe_target(), secret, sentinel_secret)
        assert_no_secret(repr(coordinator), secret, sentinel_secret)

