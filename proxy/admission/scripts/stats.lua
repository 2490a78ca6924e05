-- stats.lua: read-only view of a pool for tests, metrics and the adaptive controller.
-- KEYS: 1 pool hash, 2 pool leases zset
-- Returns: now ms, live leases, dynamic limit (-1 = none).

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local live = redis.call('ZCOUNT', KEYS[2], '(' .. now, '+inf')
local dyn = tonumber(redis.call('HGET', KEYS[1], 'lim')) or -1
return { math.floor(now), live, dyn }
