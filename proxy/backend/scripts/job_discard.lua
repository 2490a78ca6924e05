-- job_discard.lua: drop dead letters for good (their records keep their error lines).
-- KEYS: dlq dlqn; ARGV: pairs of dlq_id, count_field. Returns the ids this call dropped.
-- HDEL decides, as in job_replay: of a discard and a replay of one dead letter exactly one
-- removes it, so nothing is both replayed and dropped, and the count moves once.

local dropped = {}
for i = 1, #ARGV, 2 do
  if redis.call('HDEL', KEYS[1], ARGV[i]) == 1 then
    redis.call('HINCRBY', KEYS[2], ARGV[i + 1], -1)
    dropped[#dropped + 1] = ARGV[i]
  end
end
return dropped
