-- extend.lua: heartbeat. Push the expiry of leases this instance still holds to now + ttl.
-- XX: a lease already reaped (expired) is not resurrected: its slot may have been given away.
-- Unless Redis lost its data since this instance's last heartbeat (a restart without
-- persistence, a failover to an empty replica): then every lease named is added back, or
-- the calls still running would go uncounted until they end. The scope's hash carries the
-- data's epoch ('ep', made here when missing). An instance names the epoch it saw at its
-- previous heartbeat, and only while that heartbeat is younger than its leases' TTL (none
-- of them can have been reaped since); when the epoch is not that one any more (or is gone),
-- the data was lost and its leases with it. An instance naming none ('') only extends.
--
-- KEYS: 1 pool leases zset, 2 the scope's hash (field 'ep'), then 2+i workload leases zset
--       of group i
-- ARGV: 1 number of groups g, 2 the epoch this instance saw last ('' for none known), then
--       per group: ttl ms, workload-counted flag (0/1), lease count c, c lease ids
-- Returns {leases extended (XX) or added back (GT), the epoch now, 1 if added back else 0}.

-- ZADD <flag> CH of leases ARGV[first + 1 .. first + c] at expiry, in slices: Lua's unpack
-- takes ~8,000 values, and an instance may hold more leases than that on one pool.
local function zadd_leases(key, expiry, first, c, flag)
  local n = 0
  local x = 1
  while x <= c do
    local last = math.min(c, x + 499)
    -- CH with XX: extended ones count; without it, with GT: only those added back do.
    local args = { flag }
    if flag == 'XX' then args[2] = 'CH' end
    for y = x, last do
      args[#args + 1] = expiry
      args[#args + 1] = ARGV[first + y]
    end
    n = n + redis.call('ZADD', key, unpack(args))
    x = last + 1
  end
  return n
end

local t = redis.call('TIME')
local now = math.floor(tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000)
local plk = KEYS[1]
local known = ARGV[2]
local epoch = redis.call('HGET', KEYS[2], 'ep')
-- XX: only leases still there are extended. GT (the data was lost): missing ones are added
-- back, and none has its expiry moved earlier.
local flag = 'XX'
if not epoch then
  epoch = t[1] .. '.' .. t[2]
  redis.call('HSET', KEYS[2], 'ep', epoch)
end
if known ~= '' and known ~= epoch then flag = 'GT' end

-- A lease zset made again by GT has no TTL, and PEXPIREAT GT takes none as infinite.
local function expire_at(key, at)
  if redis.call('PTTL', key) == -1 then
    redis.call('PEXPIREAT', key, at)
  else
    redis.call('PEXPIREAT', key, at, 'GT')
  end
end
local extended = 0
local top = 0
local j = 3
for i = 1, tonumber(ARGV[1]) do
  local expn = now + tonumber(ARGV[j])
  local expiry = tostring(expn)
  local counted = ARGV[j + 1] == '1'
  local c = tonumber(ARGV[j + 2])
  if c > 0 then
    extended = extended + zadd_leases(plk, expiry, j + 2, c, flag)
    if counted then
      zadd_leases(KEYS[2 + i], expiry, j + 2, c, flag)
      expire_at(KEYS[2 + i], tostring(expn + 1000))
    end
    if expn > top then top = expn end
  end
  j = j + 3 + c
end
if top > 0 then expire_at(plk, tostring(top + 1000)) end
return { extended, epoch, flag == 'GT' and 1 or 0 }
