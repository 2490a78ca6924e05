-- job_replay.lua: put a dead-lettered record back on its stream.
-- KEYS: dlq dlqn out batch stream; ARGV: dlq_id recordId count_field, then XADD fields.
-- Returns what happened (proxy.jobs.queue.ReplayOutcome). A cancelled batch's dead letter
-- stays put: a worker drops every record of a cancelled batch without a line, so replaying
-- it would delete the record's error line and dead letter and then lose the record.

local status = redis.call('HGET', KEYS[4], 'status')
if not status then return 'batch_gone' end
if status == 'cancelled' then return 'batch_cancelled' end
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 'already_replayed' end
redis.call('HINCRBY', KEYS[2], ARGV[3], -1)
if redis.call('HDEL', KEYS[3], ARGV[2]) == 1 then redis.call('HINCRBY', KEYS[4], 'err', -1) end
redis.call('XADD', KEYS[5], '*', unpack(ARGV, 4))
-- Running again: a completed batch must not expire under it (it expires again once done).
redis.call('PERSIST', KEYS[4])
redis.call('PERSIST', KEYS[3])
return 'replayed'
