-- job_cancel.lua: mark a batch cancelled and start its retention (a cancelled batch is
-- finished: it expires server.jobs.retention_hours from now, its output with it).
-- KEYS: batch out; ARGV: keep_ms. Returns 1, or 0 when there is no such batch (HSET alone
-- would make a hash of one field out of a batch that just expired).
--! include job_lib_finish
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'status', 'cancelled')
retire(KEYS[1], KEYS[2], tonumber(ARGV[1]))
return 1
