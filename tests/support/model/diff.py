"""What the two differential tests (``tests/integration/test_model_diff.py``, run-once;
``tests/integration/test_cache_model_diff.py``, the cache) share: holding a model of Lua scripts to the real scripts on
a real redis-server, step by step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, TypeVar

D = TypeVar("D")  # a model's frozen database

#: Time passes in Redis as it does in the model (``Db.elapse``): every key's TTL, and every ZSET score (an expiry
#: counted from the model's now), moves back by ``ARGV[1]`` ms; a key whose TTL runs out is gone.
AGE = """
local a = tonumber(ARGV[1])
for _, k in ipairs(KEYS) do
  if redis.call('TYPE', k)['ok'] == 'zset' then
    local m = redis.call('ZRANGE', k, 0, -1, 'WITHSCORES')
    for i = 1, #m, 2 do redis.call('ZADD', k, tonumber(m[i + 1]) - a, m[i]) end
  end
  local t = redis.call('PTTL', k)
  if t > 0 then
    if t - a <= 0 then redis.call('DEL', k) else redis.call('PEXPIRE', k, t - a) end
  end
end
return 0
"""


class ScriptFailed(Exception):
    """A script raised on both sides alike (the library would report it as an error)."""


class Model(Protocol[D]):
    def run(self, db: D, script: str, keys: Sequence[str], args: Sequence[Any]) -> tuple[D, Any, list[tuple[str, str]]]:
        ...


def model_reply(model: Model[D], db: D, script: str, keys: Sequence[str], args: Sequence[Any], real: Any, what: str,
                errors: tuple[type[Exception], ...]) -> tuple[D, Any, list[str]]:
    """The model's run of a script Redis answered (``real``): its database after, its reply and the messages it
    published. The model raising one of ``errors`` (its own script error, or a bug of the transcription) fails the
    test."""
    try:
        db, reply, published = model.run(db, script, keys, args)
    except errors as exc:
        raise AssertionError(f"{what}: the model raised {exc!r}, Redis replied {real!r}") from exc
    return db, reply, [message for _, message in published]
