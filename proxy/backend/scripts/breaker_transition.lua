-- The one way a breaker record changes: compare-and-set on gen with the server clock.
-- KEYS: 1 breaker hash. ARGV: 1 expected gen, 2 new state, 3 ttl ms.
-- Returns {1 if applied else 0, HGETALL of the record after}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local gen = tonumber(redis.call('HGET', KEYS[1], 'gen')) or 0
local applied = 0
if gen == tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'state', ARGV[2], 'gen', gen + 1, 'since', now,
             'probes', 0, 'ok', 0, 'fail', 0)
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  applied = 1
end
return { applied, redis.call('HGETALL', KEYS[1]) }
