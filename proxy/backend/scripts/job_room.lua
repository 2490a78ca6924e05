-- job_room.lua: a submit holds room for its records against its workload's cap.
-- KEYS: room (hash: batch id -> "<records> <expires ms>"); ARGV: batch_id records ttl_ms.
-- Returns the records other submits hold. Every submit holds its room from before it reads
-- the queue depth until its records are all in the streams, so of two concurrent submits
-- the later one to get here counts the other's records one way or the other (held here,
-- or already in a stream). A submit whose process died holds nothing once its ttl ran out.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local held = 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local n, expires = string.match(all[i + 1], '^(%d+) (%d+)$')
  if n == nil or tonumber(expires) <= now then
    redis.call('HDEL', KEYS[1], all[i])
  else
    held = held + tonumber(n)
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. (now + tonumber(ARGV[3])))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return held
