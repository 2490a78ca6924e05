-- KEYS: 1..R ring hashes, R+1 pool hash, R+2 pool leases, R+3 breaker hash, R+4 leader.
-- ARGV: 1 bucket ms, 2 instance id, 3 leader px (0: no claim), 4 probe op (1 claim,
-- -1 release), 5 breaker gen, 6 probe cap, 7 probes ok, 8 probes failed, 9.. field, delta
-- (field q: a level, kept as the bucket's lowest, not added).
-- Returns {now ms, live leases, dynamic limit (-1 none), leader 0/1, probe granted 0/1,
-- breaker HGETALL, ring HGETALLs of the last R-1 buckets, the limit's change time ms (-1)}.
local R = #KEYS - 4
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local bms = tonumber(ARGV[1])
local cur = math.floor(now / bms)
local key = KEYS[(cur % R) + 1]
if tonumber(redis.call('HGET', key, 'b')) ~= cur then
  redis.call('DEL', key)
  redis.call('HSET', key, 'b', cur)
end
redis.call('PEXPIRE', key, R * bms)
local live = redis.call('ZCOUNT', KEYS[R + 2], '(' .. now, '+inf')
if live > (tonumber(redis.call('HGET', key, 'p')) or 0) then redis.call('HSET', key, 'p', live) end
for i = 9, #ARGV, 2 do
  if ARGV[i] == 'q' then
    -- In flight when Bedrock throttled (read by a reflex; the refused calls may still be
    -- counted, so each read is an upper bound): the bucket keeps the lowest.
    local q = tonumber(redis.call('HGET', key, 'q'))
    if not q or tonumber(ARGV[i + 1]) < q then redis.call('HSET', key, 'q', ARGV[i + 1]) end
  else
    redis.call('HINCRBY', key, ARGV[i], ARGV[i + 1])
  end
end
local lim = tonumber(redis.call('HGET', KEYS[R + 1], 'lim')) or -1
local leader = 0
if tonumber(ARGV[3]) > 0 and redis.call('SET', KEYS[R + 4], ARGV[2], 'NX', 'PX', ARGV[3]) then
  leader = 1
end
local bk, granted = KEYS[R + 3], 0
local st = redis.call('HMGET', bk, 'state', 'gen')
if st[1] == '1' and tonumber(st[2]) == tonumber(ARGV[5]) then
  local op = tonumber(ARGV[4])
  if op == 1 then
    if redis.call('HINCRBY', bk, 'probes', 1) <= tonumber(ARGV[6]) then
      granted = 1
    else
      redis.call('HINCRBY', bk, 'probes', -1)
    end
  elseif op == -1 then
    redis.call('HINCRBY', bk, 'probes', -1)
  end
  if ARGV[7] ~= '0' then redis.call('HINCRBY', bk, 'ok', ARGV[7]) end
  if ARGV[8] ~= '0' then redis.call('HINCRBY', bk, 'fail', ARGV[8]) end
end
local rows = {}
for i = 1, R do
  local b = tonumber(redis.call('HGET', KEYS[i], 'b'))
  if b and b > cur - R + 1 and b <= cur then rows[#rows + 1] = redis.call('HGETALL', KEYS[i]) end
end
local lim_ms = tonumber(redis.call('HGET', KEYS[R + 1], 'lim_ms')) or -1
return { now, live, lim, leader, granted, redis.call('HGETALL', bk), rows, lim_ms }
