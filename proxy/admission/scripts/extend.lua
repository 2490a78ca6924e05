-- extend.lua: heartbeat. Push the expiry of leases this instance still holds to now + ttl.
-- XX: a lease already reaped (expired) is not resurrected: its slot may have been given away.
--
-- KEYS: 1 pool leases zset, then 1+i workload leases zset of group i
-- ARGV: 1 number of groups g, then per group: ttl ms, workload-counted flag (0/1),
--       lease count c, c lease ids
-- Returns the number of leases extended.

local t = redis.call('TIME')
local now = math.floor(tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000)
local plk = KEYS[1]
local extended = 0
local top = 0
local j = 2
for i = 1, tonumber(ARGV[1]) do
  local expn = now + tonumber(ARGV[j])
  local expiry = tostring(expn)
  local counted = ARGV[j + 1] == '1'
  local c = tonumber(ARGV[j + 2])
  if c > 0 then
    local args = { 'XX', 'CH' }
    for x = 1, c do
      args[2 * x + 1] = expiry
      args[2 * x + 2] = ARGV[j + 2 + x]
    end
    extended = extended + redis.call('ZADD', plk, unpack(args))
    if counted then
      redis.call('ZADD', KEYS[1 + i], unpack(args))
      redis.call('PEXPIREAT', KEYS[1 + i], tostring(expn + 1000), 'GT')
    end
    if expn > top then top = expn end
  end
  j = j + 3 + c
end
if top > 0 then redis.call('PEXPIREAT', plk, tostring(top + 1000), 'GT') end
return extended
