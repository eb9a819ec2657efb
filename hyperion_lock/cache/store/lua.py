"""The Lua scripts of the Redis store: every Redis step of the cache is one of them, keyed on the owner token of the
call (:mod:`.redis` runs them; ``tests/support/model/cache_model.py`` transcribes them for the model checker)."""

# Every script touches the keys of one namespace only (one hash tag, one Cluster slot). The tag-invalidation
# script builds entry and lease names from the namespace's own prefix (ARGV), so they are in that slot too.

# A tag index (ZSET: entry id -> when it may last matter, in Redis ms) registers live entries and taken compute
# leases, so that tag invalidation can drop the one and fence the other. The index key lives as long as its
# latest member: a shorter life (an earlier entry's) would let it expire, registration and all, while a
# computation of an entry of that tag still runs, and that computation's value would then be stored after an
# invalidation of the tag had returned.
# keep(index, id, expiry, now): register id until expiry (never earlier than it already was), and stretch(index,
# now): keep the key as long as its latest member.
# index(key): the key, after dropping it if it holds another Redis type (nothing this cache wrote: dropped like an
# unreadable entry, so that one foreign key cannot fail every script that touches the index, and with them the
# whole worker's cache, through the breaker).
KEEP = """
local function index(key)
  local probe = redis.pcall('ZCOUNT', key, 0, 0)  -- not TYPE: the documented ACL lists the cache's commands
  if type(probe) == 'table' and probe.err and string.find(probe.err, 'WRONGTYPE', 1, true) then
    redis.call('DEL', key)
  end
  return key
end
local function stretch(key, now)
  local top = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  local want = math.ceil(tonumber(top[2]) - now)
  local left = redis.call('PTTL', key)
  if want > 0 and left < want then redis.call('PEXPIRE', key, want) end
end
local function keep(key, id, expiry, now)
  redis.call('ZADD', index(key), 'GT', expiry, id)
  stretch(key, now)
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# Read an entry; take its compute lease when there is no valid entry (or always, for a forced refresh).
# KEYS[1] entry (HASH h = header JSON, v = payload, n = namespace version it was written under; a key of another
#         type is deleted: nothing this cache wrote)
# KEYS[2] namespace version
# KEYS[3] compute lease
# KEYS[4..] tag indexes of this entry (a taken lease is registered there, so tag invalidation can fence it)
# ARGV[1] owner token of this call
# ARGV[2] lease TTL (ms)
# ARGV[3] '0' never take, '1' take when there is no valid entry, '2' take even over a valid entry
# ARGV[4] the entry's id (member of the indexes)
# returns [1] header JSON or false (no entry, or one written under an older namespace version: deleted now)
#         [2] payload or false
#         [3] remaining life of the entry (ms; -2 when there is none)
#         [4] lease: 1 held by this token (taken now, or by an earlier call with it), 0 by another, -1 free
#         [5] remaining life of the lease (ms; -2 when there is none)
#         [6] namespace version now (the fence a later PUT is checked against)
#         [7] why the entry's key was deleted as unreadable (another Redis type), or false
READ = KEEP + """
local version = redis.call('GET', KEYS[2]) or '0'
local e = redis.pcall('HMGET', KEYS[1], 'h', 'v', 'n')
local wrong = false
if e.err then  -- not a hash (WRONGTYPE): not an entry this cache can read; dropped like an outdated one
  redis.call('DEL', KEYS[1])
  wrong, e = e.err, {false, false, false}
end
local header, payload, left = e[1], e[2], -2
if header then
  if e[3] ~= version then
    redis.call('DEL', KEYS[1])
    header, payload = false, false
  else
    left = redis.call('PTTL', KEYS[1])
  end
end
local holder = redis.call('GET', KEYS[3])
local state = -1
if holder == ARGV[1] then state = 1 elseif holder then state = 0 end
if state == -1 and (ARGV[3] == '2' or (ARGV[3] == '1' and not header)) then
  redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[2])
  state = 1
  local now = now_ms()
  for i = 4, #KEYS do keep(KEYS[i], ARGV[4], now + tonumber(ARGV[2]), now) end
end
return {header, payload, left, state, redis.call('PTTL', KEYS[3]), tonumber(version), wrong}
"""

# Take the lease to refresh a stale (or soon stale) entry in the background.
# KEYS[1] compute lease
# KEYS[2..] tag indexes of this entry
# ARGV[1] owner token
# ARGV[2] lease TTL (ms)
# ARGV[3] the entry's id
# returns 1 held by this token (taken now, or by an earlier call with it), 0 held by another
TAKE = KEEP + """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then return 1 end
if holder then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local now = now_ms()
for i = 2, #KEYS do keep(KEYS[i], ARGV[3], now + tonumber(ARGV[2]), now) end
return 1
"""

# Keep the lease while the computation runs, and its registration in the entry's tag indexes with it (a
# registration that ran out with the first TTL was trimmed by the next PUT of the tag, and a tag invalidation then
# missed this computation). It is never re-created: an invalidation deletes it on purpose.
# KEYS[1] compute lease
# KEYS[2..] tag indexes of this entry
# ARGV[1] owner token
# ARGV[2] lease TTL (ms)
# ARGV[3] the entry's id
# returns 1 renewed, 0 lost (invalidated, or expired and taken by another worker; nothing changed)
RENEW = KEEP + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local now = now_ms()
for i = 2, #KEYS do keep(KEYS[i], ARGV[3], now + tonumber(ARGV[2]), now) end
return 1
"""

# Store a computed value: only while this token holds the lease, and only if the namespace was not invalidated
# since the lease was taken (key and tag invalidations delete the lease itself).
# KEYS[1] entry
# KEYS[2] namespace version
# KEYS[3] compute lease
# KEYS[4] namespace index
# KEYS[5..] tag indexes of this entry
# ARGV[1] owner token (also stored in the header as "o", so a retried call can tell it already stored)
# ARGV[2] header JSON
# ARGV[3] payload
# ARGV[4] entry life (ms): ttl + stale period
# ARGV[5] namespace version seen when the lease was taken
# ARGV[6] channel
# ARGV[7] message "stored"
# ARGV[8] message "nothing stored, read again"
# ARGV[9] the entry's id
# returns 1 stored, waiters woken (also for a retry of this token's own earlier call)
#         0 fenced: the namespace was invalidated meanwhile; nothing stored, lease dropped, waiters told to read again
#         2 lease lost: invalidated by key or tag, or expired and taken by another worker; nothing stored or
#           published (the invalidation told the waiters, or the new holder will)
PUT = KEEP + """
local holder = redis.call('GET', KEYS[3])
if holder ~= ARGV[1] then
  local h = redis.pcall('HGET', KEYS[1], 'h')
  if type(h) == 'string' then
    local ok, d = pcall(cjson.decode, h)
    if ok and type(d) == 'table' and d.o == ARGV[1] then return 1 end
  end
  return 2
end
redis.call('DEL', KEYS[3])
if tonumber(redis.call('GET', KEYS[2]) or '0') ~= tonumber(ARGV[5]) then
  redis.call('PUBLISH', ARGV[6], ARGV[8])
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'h', ARGV[2], 'v', ARGV[3], 'n', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
local now = now_ms()
local life = tonumber(ARGV[4])
redis.call('ZADD', index(KEYS[4]), now + life, ARGV[9])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
for i = 5, #KEYS do
  redis.call('ZREMRANGEBYSCORE', index(KEYS[i]), '-inf', now)
  redis.call('ZADD', KEYS[i], now + life, ARGV[9])
  stretch(KEYS[i], now)
end
redis.call('PUBLISH', ARGV[6], ARGV[7])
return 1
"""

# Give the lease up without a value (the computation raised, or was interrupted) and tell the waiters why.
# KEYS[1] compute lease
# ARGV[1] owner token
# ARGV[2] channel
# ARGV[3] message (the error, or "read again")
# returns 1 released and published, 0 not held by this token (nothing changed)
RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"""

# Drop one entry, and fence a computation of it that is in flight (its lease is deleted). The message goes out
# whether or not there was anything: waiters of a fenced computation read again, and every worker drops the
# entry from its near cache.
# KEYS[1] entry
# KEYS[2] compute lease
# KEYS[3] namespace index
# ARGV[1] channel
# ARGV[2] message "read again"
# ARGV[3] the entry's id
# returns 1 an entry was dropped, 0 there was none
INVALIDATE_KEY = KEEP + """
local n = redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[2])
redis.call('PUBLISH', ARGV[1], ARGV[2])
redis.call('ZREM', index(KEYS[3]), ARGV[3])
return n
"""

# Drop every entry carrying a tag, and fence the computations of such entries in flight. O(entries of the tag);
# one message per entry (waiters read again, near caches drop it).
# KEYS[1] tag index
# KEYS[2] namespace index
# ARGV[1] entry name prefix of the namespace
# ARGV[2] lease name prefix of the namespace
# ARGV[3] channel
# returns the number of entries dropped
INVALIDATE_TAG = KEEP + """
local n = 0
index(KEYS[2])
for _, id in ipairs(redis.call('ZRANGE', index(KEYS[1]), 0, -1)) do
  n = n + redis.call('DEL', ARGV[1] .. id)
  redis.call('DEL', ARGV[2] .. id)
  redis.call('PUBLISH', ARGV[3], cjson.encode({k = id, o = 'retry'}))
  redis.call('ZREM', KEYS[2], id)
end
redis.call('DEL', KEYS[1])
return n
"""

# Drop a whole namespace in O(1): entries written under the old version are ignored (and deleted when read), and
# computations in flight are fenced by PUT's version check.
# KEYS[1] namespace version
# KEYS[2] namespace index
# ARGV[1] channel
# ARGV[2] message about the whole namespace (entry id ""): every near cache drops the namespace's entries
# returns the number of live entries dropped
INVALIDATE_NAMESPACE = KEEP + """
local now = now_ms()
local n = redis.call('ZCOUNT', index(KEYS[2]), '(' .. now, '+inf')
redis.call('INCR', KEYS[1])
redis.call('DEL', KEYS[2])
redis.call('PUBLISH', ARGV[1], ARGV[2])
return n
"""


# The namespace's key for keyed hashes in key names: the first caller's random one, kept (no TTL).
# KEYS[1] secret   ARGV[1] a new random key, used only if there is none   returns the key
SECRET = """
local k = redis.call('GET', KEYS[1])
if not k then
  redis.call('SET', KEYS[1], ARGV[1])
  k = ARGV[1]
end
return k
"""

SCRIPTS = (READ, TAKE, RENEW, PUT, RELEASE, INVALIDATE_KEY, INVALIDATE_TAG, INVALIDATE_NAMESPACE, SECRET)
