-- job_cancel.lua: mark a batch cancelled and start its retention (a cancelled batch is
-- finished: it expires server.jobs.retention_hours from now, its output with it).
-- KEYS: batch out; ARGV: keep_ms. Returns 1, or 0 when there is no such batch (HSET alone
-- would make a hash of one field out of a batch that just expired), or 2 when every record
-- is done (checked here, with the mark: a batch completing as the cancel arrives stays
-- completed, and its dead letters replayable).
--! include job_lib_finish
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local h = redis.call('HMGET', KEYS[1], 'status', 'records', 'ok', 'err')
local done = (tonumber(h[3]) or 0) + (tonumber(h[4]) or 0)
if h[1] ~= 'cancelled' and done >= (tonumber(h[2]) or 0) then return 2 end
redis.call('HSET', KEYS[1], 'status', 'cancelled')
retire(KEYS[1], KEYS[2], tonumber(ARGV[1]))
return 1
