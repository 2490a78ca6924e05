-- policy_apply.lua: write a policy version and make it current in one step.
-- KEYS: seq current version-prefix; ARGV: text sha author at note only_if_none.
-- With ARGV[6] == "1" (an instance publishing its start-up file) it writes nothing when a
-- version is already current (and returns minus that version's number).
local cur = redis.call('GET', KEYS[2])
if ARGV[6] == '1' and cur then return -tonumber(cur) end
local n = redis.call('INCR', KEYS[1])
redis.call('HSET', KEYS[3] .. n, 'text', ARGV[1], 'sha', ARGV[2], 'author', ARGV[3],
  'at', ARGV[4], 'note', ARGV[5], 'from', cur or '0')
redis.call('SET', KEYS[2], n)
return n
