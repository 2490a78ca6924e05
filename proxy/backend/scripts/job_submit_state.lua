-- job_submit_state.lua: take a batch out of 'submitting', only if it is still in it.
-- KEYS: batch; ARGV: the new status, or '' to delete the batch (a submit taken for dead).
-- The submit's final flip to 'running' and a worker abandoning a dead submit both go
-- through here, so exactly one wins: a batch never runs with only part of its records.

if redis.call('HGET', KEYS[1], 'status') ~= 'submitting' then return 0 end
if ARGV[1] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('HSET', KEYS[1], 'status', ARGV[1])
end
return 1
