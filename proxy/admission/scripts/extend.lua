-- extend.lua: heartbeat. Push the expiry of leases this instance still holds to now + ttl.
-- XX: a lease already reaped (expired) is not resurrected: its slot may have been given away.
--
-- KEYS: 1 pool leases zset, then 1+i workload leases zset of group i
-- ARGV: 1 number of groups g, then per group: ttl ms, workload-counted flag (0/1),
--       lease count c, c lease ids
-- Returns the number of leases extended.

-- ZADD XX CH of leases ARGV[first + 1 .. first + c] at expiry, in slices: Lua's unpack takes
-- ~8,000 values, and an instance may hold more leases than that on one pool.
local function zadd_xx(key, expiry, first, c)
  local n = 0
  local x = 1
  while x <= c do
    local last = math.min(c, x + 499)
    local args = { 'XX', 'CH' }
    for y = x, last do
      args[#args + 1] = expiry
      args[#args + 1] = ARGV[first + y]
    end
    n = n + redis.call('ZADD', key, unpack(args))
    x = last + 1
  end
  return n
end

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
    extended = extended + zadd_xx(plk, expiry, j + 2, c)
    if counted then
      zadd_xx(KEYS[1 + i], expiry, j + 2, c)
      redis.call('PEXPIREAT', KEYS[1 + i], tostring(expn + 1000), 'GT')
    end
    if expn > top then top = expn end
  end
  j = j + 3 + c
end
if top > 0 then redis.call('PEXPIREAT', plk, tostring(top + 1000), 'GT') end
return extended
