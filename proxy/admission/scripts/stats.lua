-- stats.lua: read-only view of a pool for tests, metrics and the adaptive controller.
-- KEYS: 1 pool hash, 2 pool leases zset, 3 stats hash; ARGV: 1 window seconds (<= 15)
-- Returns: now ms, live leases, dynamic limit (-1 = none), requests, throttled,
--          latency sum ms * 1000 over the last `window` whole seconds including this one.

local t = redis.call('TIME')
local sec = tonumber(t[1])
local now = sec * 1000 + tonumber(t[2]) / 1000
local live = redis.call('ZCOUNT', KEYS[2], '(' .. now, '+inf')
local dyn = tonumber(redis.call('HGET', KEYS[1], 'lim')) or -1
local window = tonumber(ARGV[1])
local n, th, lat = 0, 0, 0
local h = redis.call('HGETALL', KEYS[3])
local f = {}
for i = 1, #h, 2 do f[h[i]] = h[i + 1] end
for slot = 0, 15 do
  local s = tonumber(f['s' .. slot])
  if s and s > sec - window and s <= sec then
    n = n + (tonumber(f['n' .. slot]) or 0)
    th = th + (tonumber(f['t' .. slot]) or 0)
    lat = lat + (tonumber(f['l' .. slot]) or 0)
  end
end
return { math.floor(now), live, dyn, n, th, math.floor(lat * 1000) }
