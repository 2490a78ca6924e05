-- job_replay.lua: put a dead-lettered record back on its stream.
-- KEYS: dlq dlqn out batch stream; ARGV: dlq_id recordId count_field, then XADD fields.

if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return false end
redis.call('HINCRBY', KEYS[2], ARGV[3], -1)
if redis.call('HDEL', KEYS[3], ARGV[2]) == 1 then redis.call('HINCRBY', KEYS[4], 'err', -1) end
return redis.call('XADD', KEYS[5], '*', unpack(ARGV, 4))
