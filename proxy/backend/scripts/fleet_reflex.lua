-- KEYS: 1 pool hash, 2 pool leases zset.
-- ARGV: 1 the lowest limit the reflex may set, 2 the refused call's lease ('' none),
--       3.. leases of other calls Bedrock refused moments ago (not at Bedrock, even while
--       their lease still counts: their release or requeue has not landed yet).
-- Bedrock just throttled a call of this pool: lower the fleet's dynamic limit to the calls
-- in flight now minus the one refused (never below ARGV[1], never raising it, and only
-- where a dynamic limit is set), in the same step as the count it is read from. The
-- refused call is counted whether or not its lease is still there (its release may have
-- run first), so the reading is what Bedrock held, not one less; the other refused calls
-- still holding a lease are not counted, so a burst Bedrock refused all at once is read
-- as what it held, not as what was sent.
-- Returns {what Bedrock held (the reading), limit before (-1 none), limit after (-1 none),
--          now ms, slots held now (the leases counted, as admission counts them)}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local live = redis.call('ZCOUNT', KEYS[2], '(' .. now, '+inf')
local held = live
if ARGV[2] ~= '' then
  local expiry = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[2]))
  if not expiry or expiry <= now then live = live + 1 end  -- released (or expired): uncounted
end
for i = 3, #ARGV do
  local expiry = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[i]))
  if expiry and expiry > now then live = live - 1 end
end
local lim = tonumber(redis.call('HGET', KEYS[1], 'lim')) or -1
local new = lim
if lim >= 0 then
  local target = math.max(tonumber(ARGV[1]), live - 1)
  if target < lim then
    redis.call('HSET', KEYS[1], 'lim', target, 'lim_ms', now)
    new = target
  end
end
return { live, lim, new, now, held }
