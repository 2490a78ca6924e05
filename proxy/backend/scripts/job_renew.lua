-- job_renew.lua: keep a worker's leases.
-- KEYS: stream; ARGV: group consumer ids... Resets the idle time of the ids this consumer
-- still owns (never takes one back from a worker that reclaimed it); returns those.

local kept = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #p > 0 and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    kept[#kept + 1] = ARGV[i]
  end
end
return kept
