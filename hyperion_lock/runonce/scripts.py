"""Lua scripts: every compare-and-set on a lease, keyed on the owner token. Each runs atomically in Redis.

Every script is idempotent for its own token: when the reply to a call is lost and the caller retries it with
the same token, the retry answers as the first call would have (PROBE: "taken", FINISH: "recorded"), so a
retry continues as if the first reply had arrived. Writes that can fail come before the deletes they guard.
Replies are turned into :class:`~hyperion_lock.runonce.model.RenewResult` / ``FinishResult`` by the backend.

A stored lease or outcome that is not a JSON object (not written by this package: a corrupt value) makes a script
fail with ``HYPERION_LOCK_CORRUPT <key>`` before it changes anything (the backend raises
:class:`~hyperion_lock.errors.CorruptStateError`); ``RESET`` clears such a lease without ``--force``.

Every key and the channel a script touches is declared in KEYS and shares the job's hash tag (one slot, so a Redis
Cluster runs each script on one node). On a Cluster the scripts run as :func:`._cluster.sharded_script` rewrites
them: their wake-ups use ``SPUBLISH``, which reaches the subscribers on the node owning the slot.
"""

from __future__ import annotations

#: The error a script replies when a stored value is not a JSON object, followed by the key.
CORRUPT = "HYPERION_LOCK_CORRUPT"
#: After ``NOPERM``: a permission PROBE's preflight found missing, followed by the kind, command and target.
PREFLIGHT = "hyperion_lock-preflight"

_DECODE = """
local function decode(key, raw)
  local ok, v = pcall(cjson.decode, raw)
  if ok and type(v) == 'table' then return v end
  error(redis.error_reply('@CORRUPT@ ' .. key))
end
""".replace("@CORRUPT@", CORRUPT)

# Look at a job, and take its lease when it is free and allowed.
# KEYS[1] outcome key of this generation
# KEYS[2] lease key
# KEYS[3] fencing counter
# ARGV[1] owner token of this call
# ARGV[2] lease TTL (ms)
# ARGV[3] holder JSON without token and fence
# ARGV[4] '1' = take the lease if it is free, the generation is not done and no failure is fresher than ARGV[6]
#         (an outcome's age is its ttl_ms field minus its remaining TTL: the store's clock, not the hosts')
# ARGV[5] highest fencing token the caller has seen (the counter never restarts below it, even after data loss)
# ARGV[6] failure hold (ms): a failure recorded less than this long ago blocks taking
# ARGV[7] '1' = also return the fencing counter
# ARGV[8] optional, a call's first probe only: JSON list of [kind, command, target, args...] the call will need;
#         each is checked with redis.acl_check_cmd (Redis >= 7) before anything is read or written, and the first
#         one denied is the error reply "NOPERM hyperion_lock-preflight <kind> <command> <target>"
# returns [1] outcome JSON or false
#         [2] lease JSON or false (ours when taken)
#         [3] 1 when this token holds the lease (taken now, or by an earlier call with this token), else 0
#         [4] fencing counter or false (only with ARGV[7] = '1')
#         [5] remaining TTL of the outcome (ms; -2 when there is none)
PROBE = _DECODE + """
if ARGV[8] and ARGV[8] ~= '' and redis.acl_check_cmd then
  for _, c in ipairs(cjson.decode(ARGV[8])) do
    if not redis.acl_check_cmd(unpack(c, 2)) then
      return redis.error_reply('NOPERM @PREFLIGHT@ ' .. c[1] .. ' ' .. c[2] .. ' ' .. c[3])
    end
  end
end
local outcome = redis.call('GET', KEYS[1])
local lease = redis.call('GET', KEYS[2])
local counter = false
if ARGV[7] == '1' then counter = redis.call('GET', KEYS[3]) or '0' end
local pttl = -2
if outcome then pttl = redis.call('PTTL', KEYS[1]) end
if lease then
  if decode(KEYS[2], lease).token == ARGV[1] then return {outcome, lease, 1, counter, pttl} end
  return {outcome, lease, 0, counter, pttl}
end
if ARGV[4] ~= '1' then return {outcome, false, 0, counter, pttl} end
if outcome then
  local o = decode(KEYS[1], outcome)
  if o.status == 'done' then return {outcome, false, 0, counter, pttl} end
  local ttl = tonumber(o.ttl_ms)
  if o.status == 'failed' and ttl and ttl - pttl < tonumber(ARGV[6]) then
    return {outcome, false, 0, counter, pttl}
  end
end
if tonumber(redis.call('GET', KEYS[3]) or '0') < tonumber(ARGV[5]) then redis.call('SET', KEYS[3], ARGV[5]) end
local v = cjson.decode(ARGV[3])
v.token = ARGV[1]
v.fence = redis.call('INCR', KEYS[3])
lease = cjson.encode(v)
redis.call('SET', KEYS[2], lease, 'PX', ARGV[2])
return {outcome, lease, 1, counter, pttl}
""".replace("@PREFLIGHT@", PREFLIGHT)

# Keep the lease alive; re-create it if it vanished (Redis restart without persistence) unless a newer leader
# has been elected since (the fencing counter moved past ours): never steal it, never resurrect a stale one.
# KEYS[1] lease key
# KEYS[2] fencing counter
# KEYS[3] channel
# ARGV[1] owner token
# ARGV[2] lease TTL (ms)
# ARGV[3] our lease JSON (to re-create it)
# ARGV[4] our fencing token
# ARGV[5] heartbeat message
# returns 1 renewed, 2 re-created, 0 lost (another owner holds it, or a newer leader existed; nothing changed)
RENEW = _DECODE + """
local cur = redis.call('GET', KEYS[1])
local status = 1
if not cur then
  local fence = tonumber(redis.call('GET', KEYS[2]) or '0')
  if fence > tonumber(ARGV[4]) then return 0 end
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[2])
  if fence < tonumber(ARGV[4]) then redis.call('SET', KEYS[2], ARGV[4]) end
  status = 2
elseif decode(KEYS[1], cur).token == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
else
  return 0
end
redis.call('PUBLISH', KEYS[3], ARGV[5])
return status
"""

# Record the outcome (if any), drop our lease, wake every waiter -- unless a newer leader superseded us, in which
# case nothing is written or published: the successor's outcome is the one that counts.
# KEYS[1] lease key
# KEYS[2] outcome key of this generation
# KEYS[3] fencing counter
# KEYS[4] channel
# ARGV[1] owner token
# ARGV[2] outcome JSON, or '' to give the job up without an outcome
# ARGV[3] outcome TTL (ms)
# ARGV[4] release message (published when there is no outcome)
# ARGV[5] our fencing token
# returns 1 recorded while we held the lease (also for a retry of our own earlier call), 2 the lease had expired
#         but nobody took over (recorded anyway), 0 superseded by a newer leader (nothing changed)
FINISH = _DECODE + """
local cur = redis.call('GET', KEYS[1])
local held = cur and decode(KEYS[1], cur).token == ARGV[1]
if cur and not held then return 0 end
local prev = redis.call('GET', KEYS[2])
if not held then
  if prev and tonumber(decode(KEYS[2], prev).fencing_token) == tonumber(ARGV[5]) then return 1 end
  if tonumber(redis.call('GET', KEYS[3]) or '0') > tonumber(ARGV[5]) then return 0 end
end
if ARGV[2] ~= '' then
  if not (prev and decode(KEYS[2], prev).status == 'done' and cjson.decode(ARGV[2]).status ~= 'done') then
    redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
  end
  redis.call('PUBLISH', KEYS[4], ARGV[2])
elseif held then
  redis.call('PUBLISH', KEYS[4], ARGV[4])
end
if held then
  redis.call('DEL', KEYS[1])
  return 1
end
return 2
"""

# Clear a job's state for the CLI's reset.
# KEYS[1] lease key
# KEYS[2] outcome key
# KEYS[3] channel
# ARGV[1] '1' = also drop a live lease (a lease that is not a JSON object is dropped anyway: no holder wrote it)
# ARGV[2] release message
# returns [1] 1 if something was deleted else 0
#         [2] lease JSON or false (when a live lease blocked the reset)
RESET = """
local lease = redis.call('GET', KEYS[1])
local ok, v = true, nil
if lease then ok, v = pcall(cjson.decode, lease) end
if lease and ARGV[1] ~= '1' and ok and type(v) == 'table' then return {0, lease} end
local n = redis.call('DEL', KEYS[1], KEYS[2])
if lease then redis.call('PUBLISH', KEYS[3], ARGV[2]) end
if n > 0 then return {1, false} end
return {0, false}
"""
