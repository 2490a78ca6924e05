-- job_forget.lua: remove dead letters of deleted batches, keeping the per-reason counts
-- right when another remover (a replay, another instance's sweep) races for the same one.
-- KEYS: dlq dlqn; ARGV: pairs of dlq_id and its count field. Returns how many it removed.
local n = 0
for i = 1, #ARGV, 2 do
  if redis.call('HDEL', KEYS[1], ARGV[i]) == 1 then
    redis.call('HINCRBY', KEYS[2], ARGV[i + 1], -1)
    n = n + 1
  end
end
return n
