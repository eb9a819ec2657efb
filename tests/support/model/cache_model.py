"""A model of what the response cache's Lua scripts (``hyperion_lock/cache/store.py``) do to Redis, in plain Python.

:class:`Db` is an immutable, hashable picture of the keys of one cache namespace: strings (namespace version, compute
leases), hashes (entries: ``h`` header JSON, ``v`` payload, ``n`` namespace version) and sorted sets (the namespace
index and the tag indexes: entry id -> expiry), each with a remaining time to live in milliseconds.

Time is relative: the model's clock always reads 0 (:meth:`CacheScripts.now_ms`, the scripts' ``now_ms()`` and
``TIME``), and :meth:`Db.elapse` moves every key's TTL *and every ZSET score* back by the time that passed. So a score
is "when it may last matter, counted from now", and equal situations at different times are one state. Redis sees the
same thing through ``score - TIME``.

:class:`CacheScripts` holds one Python transcription per Lua script, line by line, on a :class:`Redis` scratch copy of
a ``Db``: the same commands in the same order, Lua's ``false``/``nil`` as ``None``, 0-based ``keys``/``argv``
(``KEYS[1]`` is ``keys[0]``). A reply has the shape redis-py hands over (a Lua ``false`` in a table is a nil bulk
reply, a Lua number an integer). ``tests/integration/test_cache_model_diff.py`` holds it to the real scripts.

Subclasses break one rule each (:data:`BROKEN`); the model checker (``cache_checker.py``) must catch every one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from hyperion_lock.cache import store as _store

from .keyspace import KeySpace, pttl_in, run_script, value_in

WRONGTYPE = "WRONGTYPE Operation against a key holding the wrong kind of value"


class Hash(NamedTuple):
    fields: tuple[tuple[str, str], ...]  # sorted by field name

    def get(self, name: str) -> str | None:
        return dict(self.fields).get(name)


class ZSet(NamedTuple):
    members: tuple[tuple[str, int], ...]  # sorted by member; scores in ms from now

    def ranked(self) -> list[tuple[str, int]]:
        """By score, then member (Redis's order; members are ASCII here, so byte order is string order)."""
        return sorted(self.members, key=lambda m: (m[1], m[0]))


Value = str | Hash | ZSet


class Db(NamedTuple):
    """The keys of one namespace, as a sorted tuple of ``(name, value, pttl_ms or None)``."""

    keys: tuple[tuple[str, Value, int | None], ...] = ()

    def value(self, key: str) -> Value | None:
        return value_in(self.keys, key)

    def get(self, key: str) -> str | None:
        value = self.value(key)
        return value if isinstance(value, str) else None

    def pttl(self, key: str) -> int:
        return pttl_in(self.keys, key)

    def elapse(self, ms: int, floor: int | None = None) -> Db:
        """``ms`` pass: every TTL shrinks by ``ms`` (a key whose TTL reaches 0 is gone, as Redis expires it), and so
        does every ZSET score (scores are expiries counted from now). ``floor``: raise lower scores to it (the
        checker's abstraction: every script treats all scores at or below now alike, see ``cache_checker``)."""
        kept: list[tuple[str, Value, int | None]] = []
        for name, value, ttl in self.keys:
            if ttl is not None and ttl <= ms:
                continue
            if isinstance(value, ZSet):
                scores = ((m, s - ms) for m, s in value.members)
                aged: Value = ZSet(tuple((m, s if floor is None else max(floor, s)) for m, s in scores))
            else:
                aged = value
            kept.append((name, aged, None if ttl is None else ttl - ms))
        return Db(tuple(kept))


EMPTY = Db()


class ScriptError(Exception):
    """A command inside a script failed (``redis.call`` raised): the script ends with an error reply."""


class Redis(KeySpace[Value]):
    """A mutable scratch copy of a :class:`Db` that one script runs on; ``published`` collects its messages."""

    @classmethod
    def of(cls, db: Db) -> Redis:
        return cls({name: (value, ttl) for name, value, ttl in db.keys})

    def freeze(self) -> Db:
        return Db(self.rows())

    def _typed(self, key: str, kind: type) -> Any:
        entry = self.data.get(key)
        if entry is None:
            return None
        if not isinstance(entry[0], kind):
            raise ScriptError(WRONGTYPE)
        return entry[0]

    # strings
    def get(self, key: str) -> str | None:
        value: str | None = self._typed(key, str)
        return value

    def set(self, key: str, value: str, px: int) -> None:
        self.data[key] = (value, px)

    def incr(self, key: str) -> int:
        value = self._typed(key, str)
        new = int(value or "0") + 1
        self.data[key] = (str(new), self.data[key][1] if key in self.data else None)  # INCR keeps the TTL
        return new

    # hashes
    def hmget(self, key: str, *names: str) -> list[str | None]:
        h: Hash | None = self._typed(key, Hash)
        return [None if h is None else h.get(n) for n in names]

    def hget(self, key: str, name: str) -> str | None:
        return self.hmget(key, name)[0]

    def hset(self, key: str, *pairs: str) -> None:
        h: Hash | None = self._typed(key, Hash)
        fields = dict(h.fields if h is not None else ())
        fields.update(zip(pairs[::2], pairs[1::2], strict=True))
        ttl = self.data[key][1] if key in self.data else None
        self.data[key] = (Hash(tuple(sorted(fields.items()))), ttl)

    # sorted sets
    def _zset(self, key: str) -> dict[str, int]:
        z: ZSet | None = self._typed(key, ZSet)
        return dict(z.members if z is not None else ())

    def _zstore(self, key: str, members: dict[str, int]) -> None:
        if not members:
            self.data.pop(key, None)  # an empty sorted set is no key at all
            return
        ttl = self.data[key][1] if key in self.data else None
        self.data[key] = (ZSet(tuple(sorted(members.items()))), ttl)

    def zadd(self, key: str, score: int, member: str, gt: bool = False) -> None:
        members = self._zset(key)
        if not gt or member not in members or score > members[member]:
            members[member] = score
        self._zstore(key, members)

    def zrange(self, key: str) -> list[str]:
        """``ZRANGE key 0 -1``."""
        return [m for m, _ in ZSet(tuple(self._zset(key).items())).ranked()]

    def zrange_top(self, key: str) -> list[str]:
        """``ZRANGE key -1 -1 WITHSCORES``: the member with the highest score, and its score as Redis spells it."""
        ranked = ZSet(tuple(self._zset(key).items())).ranked()
        return [ranked[-1][0], str(ranked[-1][1])] if ranked else []

    def zrem(self, key: str, member: str) -> None:
        members = self._zset(key)
        members.pop(member, None)
        self._zstore(key, members)

    def zremrangebyscore(self, key: str, upto: int) -> None:
        """``ZREMRANGEBYSCORE key -inf upto`` (inclusive)."""
        self._zstore(key, {m: s for m, s in self._zset(key).items() if s > upto})

    def zcount_above(self, key: str, above: int) -> int:
        """``ZCOUNT key (above +inf``."""
        return sum(1 for s in self._zset(key).values() if s > above)



Reply = Any
Script = Callable[[Redis, Sequence[str], Sequence[str]], Reply]


def tonumber(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


class CacheScripts:
    """One method per Lua script of ``hyperion_lock.cache.store``, and ``index``/``keep``/``now_ms`` of its ``KEEP``
    prelude.

    A broken variant overrides one of the small hooks (``read_holder``, ``put_holder``, ``put_fenced``,
    ``put_stamp``, ``invalidate_key_lease``) or the index handling (``register``, ``renew``, ``put_indexes``), so
    that the rest stays the transcription."""

    name = "intact"

    # -- KEEP ---------------------------------------------------------------------------------------------------
    def now_ms(self) -> int:
        return 0  # the model's clock: every TTL and score is counted from now

    def index(self, r: Redis, key: str) -> str:
        """``index(key)``: a key of another type than a sorted set is dropped first."""
        entry = r.data.get(key)
        if entry is not None and not isinstance(entry[0], ZSet):
            r.delete(key)
        return key

    def stretch(self, r: Redis, index: str, now: int) -> None:
        top = r.zrange_top(index)
        want = math.ceil(float(top[1]) - now)
        left = r.pttl(index)
        if want > 0 and left < want:
            r.pexpire(index, want)

    def keep(self, r: Redis, index: str, ident: str, expiry: int, now: int) -> None:
        r.zadd(self.index(r, index), expiry, ident, gt=True)
        self.stretch(r, index, now)

    def register(self, r: Redis, index: str, ident: str, expiry: int, now: int) -> None:
        """How READ and TAKE register a taken lease in a tag index (``keep``)."""
        self.keep(r, index, ident, expiry, now)

    def read_holder(self, r: Redis, lease: str) -> str | None:
        """READ's ``GET`` of the lease."""
        return r.get(lease)

    # -- the scripts --------------------------------------------------------------------------------------------
    def read(self, r: Redis, keys: Sequence[str], argv: Sequence[str]) -> Reply:
        version = r.get(keys[1]) or "0"
        wrong: str | None = None
        try:
            e = r.hmget(keys[0], "h", "v", "n")
        except ScriptError as err:  # redis.pcall: not a hash
            r.delete(keys[0])
            wrong, e = str(err), [None, None, None]
        header, payload, left = e[0], e[1], -2
        if header is not None:
            if e[2] != version:
                r.delete(keys[0])
                header, payload = None, None
            else:
                left = r.pttl(keys[0])
        holder = self.read_holder(r, keys[2])
        state = -1
        if holder == argv[0]:
            state = 1
        elif holder is not None:
            state = 0
        if state == -1 and (argv[2] == "2" or (argv[2] == "1" and header is None)):
            r.set(keys[2], argv[0], px=int(argv[1]))
            state = 1
            now = self.now_ms()
            for index in keys[3:]:
                self.register(r, index, argv[3], now + int(argv[1]), now)
        return [header, payload, left, state, r.pttl(keys[2]), int(float(version)), wrong]

    def take(self, r: Redis, keys: Sequence[str], argv: Sequence[str]) -> Reply:
        holder = r.get(keys[0])
        if holder == argv[0]:
            return 1
        if holder is not None:
            return 0
        r.set(keys[0], argv[0], px=int(argv[1]))
        now = self.now_ms()
        for index in keys[1:]:
            self.register(r, index, argv[2], now + int(argv[1]), now)
        return 1

    def renew(self, r: Redis, keys: Sequence[str], argv: Sequence[str]) -> Reply:
        if r.get(keys[0]) != argv[0]:
            return 0
        r.pexpire(keys[0], int(argv[1]))
        now = self.now_ms()
        for index in keys[1:]:
            self.keep(r, index, argv[2], now + int(argv[1]), now)
        return 1

    def put_holder(self, r: Redis, keys: Sequence[str], argv: Sequence[str]) -> int | None:
        """PUT's first block: the lease is not this token's -> 1 (this token's own earlier call stored) or 2."""
        holder = r.get(keys[2])
        if holder != argv[0]:
            try:
                h = r.hget(keys[0], "h")
            except ScriptError:  # redis.pcall: an error table, not a string
                h = None
            if isinstance(h, str):
                try:
                    d = json.loads(h)
                except ValueError:
                    d = None
                if isinstance(d, dict) and d.get("o") == argv[0]:
                    return 1
            return 2
        return None

    def put_fenced(self, r: Redis, keys: Sequence[str], argv: Sequence[str]) -> bool:
        """PUT's version check: the namespace was invalidated since the lease was taken."""
        return tonumber(r.get(keys[1]) or "0") != tonumber(argv[4])

    def put_stamp(self, r: Redis, keys: Sequence[str], argv: Sequence[str]) -> str:
        """The namespace version the entry is written under (``'n', ARGV[5]``)."""
        return argv[4]

    def put_indexes(self, r: Redis, keys: Sequence[str], argv: Sequence[str], now: int, life: int) -> None:
        r.zadd(self.index(r, keys[3]), now + life, argv[8])
        r.zremrangebyscore(keys[3], now)
        for index in keys[4:]:
            r.zremrangebyscore(self.index(r, index), now)
            r.zadd(index, now + life, argv[8])
            self.stretch(r, index, now)

    def put(self, r: Redis, keys: Sequence[str], argv: Sequence[str]) -> Reply:
        lost = self.put_holder(r, keys, argv)
        if lost is not None:
            return lost
        r.delete(keys[2])
        if self.put_fenced(r, keys, argv):
            r.publish(argv[5], argv[7])
            return 0
        r.delete(keys[0])
        r.hset(keys[0], "h", argv[1], "v", argv[2], "n", self.put_stamp(r, keys, argv))
        r.pexpire(keys[0], int(argv[3]))
        now = self.now_ms()
        life = int(argv[3])
        self.put_indexes(r, keys, argv, now, life)
        r.publish(argv[5], argv[6])
        return 1

    def release(self, r: Redis, keys: Sequence[str], argv: Sequence[str]) -> Reply:
        if r.get(keys[0]) != argv[0]:
            return 0
        r.delete(keys[0])
        r.publish(argv[1], argv[2])
        return 1

    def invalidate_key_lease(self, r: Redis, lease: str) -> None:
        r.delete(lease)

    def invalidate_key(self, r: Redis, keys: Sequence[str], argv: Sequence[str]) -> Reply:
        n = r.delete(keys[0])
        self.invalidate_key_lease(r, keys[1])
        r.publish(argv[0], argv[1])
        r.zrem(self.index(r, keys[2]), argv[2])
        return n

    def invalidate_tag(self, r: Redis, keys: Sequence[str], argv: Sequence[str]) -> Reply:
        n = 0
        self.index(r, keys[1])
        for ident in r.zrange(self.index(r, keys[0])):
            n += r.delete(argv[0] + ident)
            r.delete(argv[1] + ident)
            r.publish(argv[2], json.dumps({"k": ident, "o": "retry"}))
            r.zrem(keys[1], ident)
        r.delete(keys[0])
        return n

    def invalidate_namespace(self, r: Redis, keys: Sequence[str], argv: Sequence[str]) -> Reply:
        now = self.now_ms()
        n = r.zcount_above(self.index(r, keys[1]), now)
        r.incr(keys[0])
        r.delete(keys[1])
        r.publish(argv[0], argv[1])
        return n

    # -- running one ----------------------------------------------------------------------------------------------
    def by_text(self) -> dict[str, Script]:
        """The transcription of each Lua text in ``hyperion_lock.cache.store``."""
        return {_store.READ: self.read, _store.TAKE: self.take, _store.RENEW: self.renew, _store.PUT: self.put,
                _store.RELEASE: self.release, _store.INVALIDATE_KEY: self.invalidate_key,
                _store.INVALIDATE_TAG: self.invalidate_tag, _store.INVALIDATE_NAMESPACE: self.invalidate_namespace}

    def run(
        self, db: Db, script: str, keys: Sequence[str], args: Sequence[Any]
    ) -> tuple[Db, Reply, list[tuple[str, str]]]:
        """Run ``script`` (a Lua text of ``hyperion_lock.cache.store``) on ``db``. A script that raises changes
        nothing (``ScriptError`` propagates; the cache's scripts only raise on a key of a wrong type)."""
        r = Redis.of(db)
        reply = run_script(self.by_text(), r, script, keys, args)
        return r.freeze(), reply, r.published


def renew_lease_only(r: Redis, keys: Sequence[str], argv: Sequence[str]) -> Reply:
    """RENEW before commit 3feb107."""
    if r.get(keys[0]) == argv[0]:
        r.pexpire(keys[0], int(argv[1]))
        return 1
    return 0


# -- broken variants ---------------------------------------------------------------------------------------------
class PutWithoutHolderCheck(CacheScripts):
    """PUT stores whoever holds the lease, or if nobody does (no ``holder ~= ARGV[1]`` block)."""

    name = "PUT without the holder check"

    def put_holder(self, r: Redis, keys: Sequence[str], argv: Sequence[str]) -> int | None:
        return None


class PutWithoutVersionCheck(CacheScripts):
    """PUT ignores the namespace version the lease was taken under: no check, and the entry is stamped with the
    version current when it is stored (the only stamp under which a PUT without the check can be read at all)."""

    name = "PUT without the namespace-version check"

    def put_fenced(self, r: Redis, keys: Sequence[str], argv: Sequence[str]) -> bool:
        return False

    def put_stamp(self, r: Redis, keys: Sequence[str], argv: Sequence[str]) -> str:
        return r.get(keys[1]) or "0"


class PutWithoutVersionCheckKeepingStamp(CacheScripts):
    """The check alone removed: the entry is still stamped with the version seen when the lease was taken. Not a
    broken rule for freshness (READ drops an entry of an older version), which the checker confirms."""

    name = "PUT without the version check, stamp kept"

    def put_fenced(self, r: Redis, keys: Sequence[str], argv: Sequence[str]) -> bool:
        return False


class InvalidateKeyKeepsLease(CacheScripts):
    """INVALIDATE_KEY drops the entry but not the compute lease (no ``DEL KEYS[2]``)."""

    name = "INVALIDATE_KEY not deleting the lease"

    def invalidate_key_lease(self, r: Redis, lease: str) -> None:
        return None


class BeforeTagFix(CacheScripts):
    """The tag-index handling before commit 3feb107: READ/TAKE register a lease with ``ZADD GT`` and leave the index
    key's TTL alone; RENEW only ``PEXPIRE``s the lease; PUT adds, trims, then extends an index to the entry's life
    only if it has less."""

    name = "tag indexes before 3feb107"

    def register(self, r: Redis, index: str, ident: str, expiry: int, now: int) -> None:
        r.zadd(index, expiry, ident, gt=True)

    def renew(self, r: Redis, keys: Sequence[str], argv: Sequence[str]) -> Reply:
        return renew_lease_only(r, keys, argv)

    def put_indexes(self, r: Redis, keys: Sequence[str], argv: Sequence[str], now: int, life: int) -> None:
        for i, index in enumerate(keys[3:]):
            r.zadd(index, now + life, argv[8])
            r.zremrangebyscore(index, now)
            if i > 0 and r.pttl(index) < life:
                r.pexpire(index, life)


class RenewKeepsFirstRegistration(CacheScripts):
    """Half of commit 3feb107 undone: RENEW extends the lease only, not its registration in the tag indexes (the
    index keys are still kept as long as their latest member)."""

    name = "RENEW not re-registering the lease"

    def renew(self, r: Redis, keys: Sequence[str], argv: Sequence[str]) -> Reply:
        return renew_lease_only(r, keys, argv)


class ReadIgnoresHolder(CacheScripts):
    """READ takes the lease as if it were free, whoever holds it (its ``GET`` of the lease unread)."""

    name = "READ taking a held lease"

    def read_holder(self, r: Redis, lease: str) -> str | None:
        return None


#: The variants the checker must catch (``PutWithoutVersionCheckKeepingStamp`` is not one: see its docstring).
BROKEN: tuple[type[CacheScripts], ...] = (PutWithoutHolderCheck, PutWithoutVersionCheck, InvalidateKeyKeepsLease,
                                          BeforeTagFix, RenewKeepsFirstRegistration, ReadIgnoresHolder)


