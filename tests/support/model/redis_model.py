"""A model of what the run-once Lua scripts (``hyperion_lock/runonce/scripts.py``) do to Redis, in plain Python.

:class:`Db` is an immutable, hashable picture of the handful of keys one job uses (string values with a remaining
time to live in milliseconds), so a model checker can keep millions of them in a set. :class:`Scripts` holds one
Python transcription per Lua script, line by line, on a :class:`Redis` scratch copy of a ``Db``: the same ``GET``,
``SET … PX``, ``INCR``, ``PTTL``, ``DEL`` and ``PUBLISH`` in the same order, with Lua's ``false``/``nil`` as
``None``. A reply has the shape redis-py hands to the library (a Lua ``false`` in a table is a nil bulk reply).

The transcription is held to the real scripts by ``tests/integration/test_model_diff.py``, which runs random call
sequences against a real redis-server and against this model and requires the same replies, keys and published messages.
A subclass that breaks one rule (see :class:`FinishIgnoresToken`) shows that both that test and the model checker
(``tests/model/checker.py``) notice a wrong script.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from hyperion_lock.runonce import scripts as _scripts

from .keyspace import KeySpace, pttl_in, run_script, value_in

Value = tuple[str, int | None]  # (string value, remaining TTL in ms or None for no expiry)


class Db(NamedTuple):
    """The keys of one Redis database, as a sorted tuple of ``(name, value, pttl_ms or None)`` (a tuple, so that
    hashing a model state stays in C)."""

    entries: tuple[tuple[str, str, int | None], ...] = ()

    def get(self, key: str) -> str | None:
        return value_in(self.entries, key)

    def pttl(self, key: str) -> int:
        return pttl_in(self.entries, key)

    def elapse(self, ms: int) -> Db:
        """Time passes: every TTL shrinks by ``ms``; keys whose TTL reaches 0 are gone (Redis expires them)."""
        if not any(ttl is not None for _, _, ttl in self.entries):
            return self
        kept = tuple(
            (name, value, None if ttl is None else ttl - ms)
            for name, value, ttl in self.entries
            if ttl is None or ttl > ms
        )
        return Db(kept)

    def as_dict(self) -> dict[str, Value]:
        return {name: (value, ttl) for name, value, ttl in self.entries}


EMPTY = Db()


class Redis(KeySpace[str]):
    """A mutable scratch copy of a :class:`Db` that one script runs on; ``published`` collects its messages."""

    @classmethod
    def of(cls, db: Db) -> Redis:
        return cls(db.as_dict())

    def freeze(self) -> Db:
        return Db(self.rows())

    def get(self, key: str) -> str | None:
        entry = self.data.get(key)
        return None if entry is None else entry[0]

    def set(self, key: str, value: str, px: int | None = None) -> None:
        if px is not None and px <= 0:
            raise ValueError("invalid expire time in 'set' command")
        self.data[key] = (value, px)  # SET without PX clears any TTL, as in Redis

    def incr(self, key: str) -> int:
        value, ttl = self.data.get(key, ("0", None))
        new = int(value) + 1  # INCR keeps the key's TTL
        self.data[key] = (str(new), ttl)
        return new


def tonumber(value: Any) -> float | None:
    """Lua's ``tonumber``: numbers pass, numeric strings convert, anything else is ``nil``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


class ScriptError(Exception):
    """An error reply a script gives on purpose (``redis.error_reply``); Redis answers with this text."""


def decode(text: str) -> Any:
    """``cjson.decode``: raises on text that is not JSON, as the script then does."""
    return json.loads(text)


def decode_stored(key: str, text: str) -> Any:
    """The scripts' ``decode(key, raw)``: a stored value must decode to a Lua table (a JSON object or array), else
    the script fails with ``HYPERION_LOCK_CORRUPT <key>`` before it changed anything."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict | list):
        raise ScriptError(f"{_scripts.CORRUPT} {key}")
    return value


def lua_field(value: Any, name: str) -> Any:
    """Lua's ``value.name`` on a decoded JSON value: a missing field is ``nil``; a table (object or array) or a
    string (through the string library) gives ``nil`` for an unknown name; a number, a boolean or JSON ``null``
    cannot be indexed (the script raises)."""
    if isinstance(value, dict):
        return value.get(name)
    if isinstance(value, list | str):
        return None
    raise TypeError(f"attempt to index a {type(value).__name__} value (field {name!r})")


def encode(data: dict[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"))


Reply = Any
Script = Callable[[Redis, Sequence[str], Sequence[str]], Reply]


class Scripts:
    """One method per Lua script; ``KEYS`` and ``ARGV`` are 0-based here (``KEYS[1]`` is ``keys[0]``)."""

    def allowed(self, check: Sequence[str]) -> bool:
        """``redis.acl_check_cmd``: the tests' Redis user may run every command."""
        return True

    def preflight(self, argv: Sequence[str]) -> None:
        """PROBE's ARGV[8]: the permissions the call will need, the first one denied is the error reply."""
        if len(argv) > 7 and argv[7] != "":
            for c in decode(argv[7]):
                if not self.allowed(c[1:]):
                    raise ScriptError(f"NOPERM {_scripts.PREFLIGHT} {c[0]} {c[1]} {c[2]}")

    def probe(self, r: Redis, keys: Sequence[str], argv: Sequence[str]) -> Reply:
        self.preflight(argv)
        outcome = r.get(keys[0])
        lease = r.get(keys[1])
        counter: str | None = None
        if argv[6] == "1":
            counter = r.get(keys[2]) or "0"
        pttl = -2
        if outcome is not None:
            pttl = r.pttl(keys[0])
        if lease is not None:
            if lua_field(decode_stored(keys[1], lease), "token") == argv[0]:
                return [outcome, lease, 1, counter, pttl]
            return [outcome, lease, 0, counter, pttl]
        if argv[3] != "1":
            return [outcome, None, 0, counter, pttl]
        if outcome is not None:
            o = decode_stored(keys[0], outcome)
            if lua_field(o, "status") == "done":
                return [outcome, None, 0, counter, pttl]
            ttl = tonumber(lua_field(o, "ttl_ms"))
            hold = tonumber(argv[5])
            assert hold is not None
            if lua_field(o, "status") == "failed" and ttl is not None and ttl - pttl < hold:
                return [outcome, None, 0, counter, pttl]
        if _num(r.get(keys[2]) or "0") < _num(argv[4]):
            r.set(keys[2], argv[4])
        v = decode(argv[2])
        v["token"] = argv[0]
        v["fence"] = r.incr(keys[2])
        lease = encode(v)
        r.set(keys[1], lease, px=int(argv[1]))
        return [outcome, lease, 1, counter, pttl]

    def renew(self, r: Redis, keys: Sequence[str], argv: Sequence[str]) -> Reply:
        cur = r.get(keys[0])
        status = 1
        if cur is None:
            fence = _num(r.get(keys[1]) or "0")
            if fence > _num(argv[3]):
                return 0
            r.set(keys[0], argv[2], px=int(argv[1]))
            if fence < _num(argv[3]):
                r.set(keys[1], argv[3])
            status = 2
        elif lua_field(decode_stored(keys[0], cur), "token") == argv[0]:
            r.pexpire(keys[0], int(argv[1]))
        else:
            return 0
        r.publish(keys[2], argv[4])
        return status

    def held(self, key: str, cur: str | None, token: str) -> bool:
        """FINISH's ``held``: the lease is there and carries this call's owner token."""
        return cur is not None and lua_field(decode_stored(key, cur), "token") == token

    def finish(self, r: Redis, keys: Sequence[str], argv: Sequence[str]) -> Reply:
        cur = r.get(keys[0])
        held = self.held(keys[0], cur, argv[0])
        if cur is not None and not held:
            return 0
        prev = r.get(keys[1])
        if not held:
            fencing_token = lua_field(decode_stored(keys[1], prev), "fencing_token") if prev is not None else None
            if prev is not None and tonumber(fencing_token) == tonumber(argv[4]):
                return 1
            if _num(r.get(keys[2]) or "0") > _num(argv[4]):
                return 0
        if argv[1] != "":
            kept_done = prev is not None and lua_field(decode_stored(keys[1], prev), "status") == "done"
            if not (kept_done and lua_field(decode(argv[1]), "status") != "done"):
                r.set(keys[1], argv[1], px=int(argv[2]))
            r.publish(keys[3], argv[1])
        elif held:
            r.publish(keys[3], argv[3])
        if held:
            r.delete(keys[0])
            return 1
        return 2

    def reset(self, r: Redis, keys: Sequence[str], argv: Sequence[str]) -> Reply:
        lease = r.get(keys[0])
        readable = False  # pcall(cjson.decode, lease) gave a table: a lease some holder wrote
        if lease is not None:
            try:
                readable = isinstance(decode(lease), dict | list)
            except ValueError:
                readable = False
        if lease is not None and argv[0] != "1" and readable:
            return [0, lease]
        n = r.delete(keys[0], keys[1])
        if lease is not None:
            r.publish(keys[2], argv[1])
        if n > 0:
            return [1, None]
        return [0, None]

    def by_text(self) -> dict[str, Script]:
        """The transcription of each Lua text in ``hyperion_lock.runonce.scripts``."""
        return {_scripts.PROBE: self.probe, _scripts.RENEW: self.renew, _scripts.FINISH: self.finish,
                _scripts.RESET: self.reset}

    def run(
        self, db: Db, script: str, keys: Sequence[Any], args: Sequence[Any]
    ) -> tuple[Db, Reply, list[tuple[str, str]]]:
        """Run ``script`` (a Lua text from ``_scripts``) on ``db``; arguments are stringified as redis-py does."""
        r = Redis.of(db)
        reply = run_script(self.by_text(), r, script, keys, args)
        return r.freeze(), reply, r.published


class FinishIgnoresToken(Scripts):
    """A deliberately wrong FINISH: any lease counts as the caller's own (no owner-token check)."""

    def held(self, key: str, cur: str | None, token: str) -> bool:
        return cur is not None

    #: The same mistake in Lua, for the differential test's check that a wrong script is noticed.
    LUA_FROM = next(line for line in _scripts.FINISH.splitlines() if line.startswith("local held = "))
    LUA_TO = "local held = cur and true"


def _num(value: str) -> float:
    n = tonumber(value)
    if n is None:
        raise ValueError(f"not a number: {value!r}")  # Lua would raise "attempt to compare nil with number"
    return n


