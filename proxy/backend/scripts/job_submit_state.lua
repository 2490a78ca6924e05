-- job_submit_state.lua: take a batch out of 'submitting', only if it is still in it.
-- KEYS: batch; ARGV: the new status, or '' to delete the batch (a submit taken for dead).
-- The submit's final flip to 'running' and a worker abandoning a dead submit both go
-- through here, so exactly one wins: a batch never runs with only part of its records.

-- Returns 1 when it changed the batch, 0 when the batch is in another state (the flip won,
-- or a worker abandoned it), -1 when there is no such batch (abandoned, or never written).
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return -1 end
if status ~= 'submitting' then return 0 end
if ARGV[1] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('HSET', KEYS[1], 'status', ARGV[1])
end
return 1
