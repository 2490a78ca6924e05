"""The Lua scripts of the Redis job queue; each touches the keys of one pool (one slot).

KEYS and ARGV are documented at each script; :mod:`proxy.backend.job_queue` calls them.
"""

from __future__ import annotations

_CLAIM_FN = """
local function claim(stream, att, group, consumer, lease_ms)
  local id, fields
  local p = redis.call('XPENDING', stream, group, 'IDLE', lease_ms, '-', '+', 1)
  if #p > 0 then
    local c = redis.call('XCLAIM', stream, group, consumer, lease_ms, p[1][1])
    if #c > 0 and c[1] then id = c[1][1]; fields = c[1][2]
    else redis.call('XACK', stream, group, p[1][1]) end
  end
  if not id then
    local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', 1, 'STREAMS', stream, '>')
    if r and r[1] and #r[1][2] > 0 then id = r[1][2][1][1]; fields = r[1][2][1][2] end
  end
  if not id then return false end
  return {id, fields, redis.call('HINCRBY', att, id, 1)}
end
"""

# KEYS: stream att; ARGV: group consumer lease_ms. An entry idle past the lease (its worker
# died) first, else the next new one; the attempt is counted in the same call.
CLAIM = _CLAIM_FN + "return claim(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3])"

# KEYS: stream; ARGV: group lease_ms. 1 when an entry waits after the group's last-delivered
# id or one is idle past the lease: lets idle workers look without asking admission.
HAS_WORK = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if #redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', ARGV[2], '-', '+', 1) > 0 then return 1 end
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local name, last
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1] end
    if g[i] == 'last-delivered-id' then last = g[i + 1] end
  end
  if name == ARGV[1] then
    return #redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', 1)
  end
end
return 0
"""

# KEYS: stream; ARGV: group consumer ids... Resets the idle time of the ids this consumer
# still owns (never takes one back from a worker that reclaimed it); returns those.
RENEW = """
local kept = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #p > 0 and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    kept[#kept + 1] = ARGV[i]
  end
end
return kept
"""

# KEYS: stream att batch out rate [dlq dlqn]; ARGV: group id recordId line outcome in out
# [dlq_id dlq_json count_field]. The line is written only if none exists: exactly one per record.
_FINISH_FN = """
local function finish()
local new = 0
if ARGV[5] ~= 'skip' then
  new = redis.call('HSETNX', KEYS[4], ARGV[3], ARGV[4])
  if new == 1 then
    redis.call('HINCRBY', KEYS[3], ARGV[5], 1)
    redis.call('HINCRBY', KEYS[3], 'in_tok', ARGV[6])
    redis.call('HINCRBY', KEYS[3], 'out_tok', ARGV[7])
    local b = math.floor(tonumber(redis.call('TIME')[1]) / 10)
    redis.call('HINCRBY', KEYS[5], b, 1)
    redis.call('HDEL', KEYS[5], b - 7)
    redis.call('EXPIRE', KEYS[5], 600)
    if #KEYS > 5 then
      redis.call('HSET', KEYS[6], ARGV[8], ARGV[9])
      redis.call('HINCRBY', KEYS[7], ARGV[10], 1)
    end
  end
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('HDEL', KEYS[2], ARGV[2])
return new
end
"""
FINISH = _FINISH_FN + "return finish()"

# FINISH (without a dead letter) and CLAIM of the next record in one round trip, for a worker
# that already holds the next record's admission. KEYS as FINISH; ARGV as FINISH, then
# consumer lease_ms. Returns {new, claimed or false}.
FINISH_NEXT = (
    _CLAIM_FN
    + _FINISH_FN
    + "local new = finish()\nreturn {new, claim(KEYS[1], KEYS[2], ARGV[1], ARGV[8], ARGV[9])}"
)

# KEYS: dlq dlqn out batch stream; ARGV: dlq_id recordId count_field, then XADD fields.
REPLAY = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return false end
redis.call('HINCRBY', KEYS[2], ARGV[3], -1)
if redis.call('HDEL', KEYS[3], ARGV[2]) == 1 then redis.call('HINCRBY', KEYS[4], 'err', -1) end
return redis.call('XADD', KEYS[5], '*', unpack(ARGV, 4))
"""
