"""Lua scripts: every compare-and-set on a lease, keyed on the owner token. Each runs atomically in Redis."""

from __future__ import annotations

# Look at a job, and take its lease when it is free and allowed.
# KEYS[1] outcome key of this generation, KEYS[2] lease key, KEYS[3] fence counter
# ARGV[1] owner token, ARGV[2] lease TTL (ms), ARGV[3] holder JSON (without token/fence), ARGV[4] "1" = may take,
# ARGV[5] highest fencing token the caller has seen (the counter never restarts below it, even after data loss),
# ARGV[6] "1" = also return the fence counter
# returns {outcome JSON or nil, lease JSON or nil (ours when taken), 1 if taken else 0, counter or nil}
PROBE = """
local outcome = redis.call('GET', KEYS[1])
local lease = redis.call('GET', KEYS[2])
local counter = false
if ARGV[6] == '1' then counter = redis.call('GET', KEYS[3]) or '0' end
if lease or ARGV[4] ~= '1' then return {outcome, lease, 0, counter} end
if outcome and cjson.decode(outcome).status == 'done' then return {outcome, false, 0, counter} end
if tonumber(redis.call('GET', KEYS[3]) or '0') < tonumber(ARGV[5]) then redis.call('SET', KEYS[3], ARGV[5]) end
local v = cjson.decode(ARGV[3])
v.token = ARGV[1]
v.fence = redis.call('INCR', KEYS[3])
lease = cjson.encode(v)
redis.call('SET', KEYS[2], lease, 'PX', ARGV[2])
return {outcome, lease, 1, counter}
"""

# Keep the lease alive; re-create it if it vanished (Redis restart without persistence) unless a newer leader
# has been elected since (the fencing counter moved past ours): never steal it, never resurrect a stale one.
# KEYS[1] lease key, KEYS[2] fence counter
# ARGV[1] owner token, ARGV[2] lease TTL (ms), ARGV[3] our lease JSON, ARGV[4] our fencing token,
# ARGV[5] channel, ARGV[6] heartbeat message
# returns 1 renewed, 2 re-created, 0 lost (another owner holds it, or a newer leader existed; nothing changed)
RENEW = """
local cur = redis.call('GET', KEYS[1])
local status = 1
if not cur then
  local fence = tonumber(redis.call('GET', KEYS[2]) or '0')
  if fence > tonumber(ARGV[4]) then return 0 end
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[2])
  if fence < tonumber(ARGV[4]) then redis.call('SET', KEYS[2], ARGV[4]) end
  status = 2
elseif cjson.decode(cur).token == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
else
  return 0
end
redis.call('PUBLISH', ARGV[5], ARGV[6])
return status
"""

# Record the outcome (if any), drop our lease, wake every waiter -- unless a newer leader superseded us, in which
# case nothing is written or published: the successor's outcome is the one that counts.
# KEYS[1] lease key, KEYS[2] outcome key of this generation, KEYS[3] fence counter
# ARGV[1] owner token, ARGV[2] outcome JSON or '' (give up without an outcome), ARGV[3] outcome TTL (ms),
# ARGV[4] channel, ARGV[5] release message (sent when there is no outcome), ARGV[6] our fencing token
# returns 1 we still held the lease, 2 it had expired but nobody took over (recorded anyway), 0 superseded
FINISH = """
local cur = redis.call('GET', KEYS[1])
local held = cur and cjson.decode(cur).token == ARGV[1]
if not held then
  if cur then return 0 end
  if tonumber(redis.call('GET', KEYS[3]) or '0') > tonumber(ARGV[6]) then return 0 end
end
if held then redis.call('DEL', KEYS[1]) end
if ARGV[2] ~= '' then
  local prev = redis.call('GET', KEYS[2])
  if not (prev and cjson.decode(prev).status == 'done' and cjson.decode(ARGV[2]).status ~= 'done') then
    redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
  end
  redis.call('PUBLISH', ARGV[4], ARGV[2])
elseif held then
  redis.call('PUBLISH', ARGV[4], ARGV[5])
end
if held then return 1 end
return 2
"""

# Clear a job's state for the CLI's reset.
# KEYS[1] lease key, KEYS[2] outcome key, ARGV[1] "1" = also drop a live lease, ARGV[2] channel, ARGV[3] message
# returns {1 if something was deleted else 0, lease JSON or nil (when a live lease blocked the reset)}
RESET = """
local lease = redis.call('GET', KEYS[1])
if lease and ARGV[1] ~= '1' then return {0, lease} end
local n = redis.call('DEL', KEYS[1], KEYS[2])
if lease then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
if n > 0 then return {1, false} end
return {0, false}
"""
