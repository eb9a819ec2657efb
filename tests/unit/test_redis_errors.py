"""Redis failures that retrying cannot fix are named at once; the rest give up within the startup budget.

Every case talks to a real server or socket: a private redis-server (ACL users, database count), a TLS-only
redis-server with a self-signed certificate made by the openssl CLI, a listener that accepts and never answers,
and a closed port. Wall-clock asserts use generous bounds (3x the budget); "at once" means well under the budget.
"""


from __future__ import annotations

import pytest
from redis import exceptions as rexc

from hyperion_lock.connection.clients import (
    is_transient,
    redis_error,
)
from hyperion_lock.errors import (
    RedisAuthError,
    RedisDatabaseIndexError,
    RedisPermissionError,
)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (rexc.ResponseError("ERR invalid DB index"), RedisDatabaseIndexError),
        (rexc.ResponseError("DB index is out of range"), RedisDatabaseIndexError),
        (rexc.ResponseError("NOPERM this user has no permissions to access one of the channels used as arguments"),
         RedisPermissionError),
        (rexc.NoPermissionError("NOPERM User app has no permissions to run the 'script|load' command"),
         RedisPermissionError),
        (rexc.ResponseError("WRONGPASS invalid username-password pair or user is disabled."), RedisAuthError),
        (rexc.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused."), type(None)),
        (rexc.TimeoutError("Timeout reading from socket"), type(None)),
        (rexc.ResponseError("ERR unknown command 'FOO'"), type(None)),
    ],
)
def test_classification_of_server_wordings(exc: BaseException, kind: type) -> None:
    """Wordings of other Redis versions (and proxies) than the one installed here."""
    err = redis_error(exc, where="redis://h:6379/3", key="k", generation="g")
    assert isinstance(err, kind)
    if err is not None:
        assert (err.key, err.generation) == ("k", "g")
    assert is_transient(exc) == isinstance(exc, rexc.ConnectionError | rexc.TimeoutError)

