-- KEYS: 1 pool hash.
-- ARGV: 1 the limit the change was computed from (-1: none set), 2 the new limit.
-- The controller's write, as a compare-and-set: a throttle reflex (or another instance)
-- that moved the limit after this instance read it wins, instead of being overwritten
-- with a value computed from the old one. The change time (lim_ms, Redis TIME) is the
-- fleet's: every instance counts outcomes from it.
-- Returns {applied 0/1, the limit now (-1 none), its change time ms (-1 unknown)}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cur = tonumber(redis.call('HGET', KEYS[1], 'lim')) or -1
if cur ~= tonumber(ARGV[1]) then
  return { 0, cur, tonumber(redis.call('HGET', KEYS[1], 'lim_ms')) or -1 }
end
redis.call('HSET', KEYS[1], 'lim', ARGV[2], 'lim_ms', now)
return { 1, tonumber(ARGV[2]), now }
