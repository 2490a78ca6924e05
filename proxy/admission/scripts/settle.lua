-- settle.lua: settle a batch of finished requests of ONE pool.
-- Mirrors model.refund: leases are dropped, (reserved - actual) tokens given back to the
-- pool and workload token buckets (negative = extra debt; never above a full bucket).
-- A grant taken ahead and never used (proxy/backend/ahead.py) gives its request back too.
--
-- Also withdraws waiters that stopped waiting, and PUBLISHes one wake-up on the pool's
-- channel when anything was released while someone waits (no waiters: no message).
--
-- KEYS: 1 pool hash, 2 pool leases zset, 3 waiters zset, 4 waiters expiry zset,
--       4+i workload leases zset of group i
-- ARGV: 1 number of groups g, 2 wake-up channel, 3 withdrawn waiters m, then m waiter ids,
--       then per group: packed params (<12d>), workload, refund tokens, refund requests,
--       lease count c, c ids
-- Returns the number of leases that were still held (the others had expired).

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local spack, sunpack = struct.pack, struct.unpack

local function refund(tat, amount, rate)
  if tat < now then tat = now end
  tat = tat - amount / rate
  if tat < now then tat = now end
  return tat
end

local pk, plk, wk, wek = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local held = 0
local groups = {}
local fields = {}
local m = tonumber(ARGV[3])
local withdrawn = 0
if m > 0 then
  local ids = { unpack(ARGV, 4, 3 + m) }
  withdrawn = redis.call('ZREM', wek, unpack(ids))
  redis.call('ZREM', wk, unpack(ids))
end
local j = 4 + m
for i = 1, tonumber(ARGV[1]) do
  local p = { sunpack('<dddddddddddd', ARGV[j]) }
  local amount = tonumber(ARGV[j + 2])
  local back = tonumber(ARGV[j + 3])
  local c = tonumber(ARGV[j + 4])
  if c > 0 then
    local ids = { unpack(ARGV, j + 5, j + 4 + c) }
    held = held + redis.call('ZREM', plk, unpack(ids))
    if p[11] >= 0 then redis.call('ZREM', KEYS[4 + i], unpack(ids)) end
  end
  if (amount ~= 0 and (p[5] > 0 or p[10] > 0)) or (back > 0 and (p[3] > 0 or p[8] > 0)) then
    groups[#groups + 1] = { p = p, field = 'w:' .. ARGV[j + 1], amount = amount, back = back }
  end
  j = j + 5 + c
end

if #groups > 0 then
  -- one read and one write of the pool hash for every refund of the batch
  fields[1] = 'p'
  for i, g in ipairs(groups) do fields[1 + i] = g.field end
  local hv = redis.call('HMGET', pk, unpack(fields))
  local prt, ptt = 0, 0
  if hv[1] then prt, ptt = sunpack('<dd', hv[1]) end
  local wv, pdirty = {}, false
  local hset = {}
  for i, g in ipairs(groups) do
    local p = g.p
    if p[5] > 0 and g.amount ~= 0 then ptt = refund(ptt, g.amount, p[4]); pdirty = true end
    if p[3] > 0 and g.back > 0 then prt = refund(prt, g.back, p[2]); pdirty = true end
    if (p[10] > 0 and g.amount ~= 0) or (p[8] > 0 and g.back > 0) then
      local w = wv[g.field]
      if not w then
        w = { 0, 0 }
        if hv[1 + i] then w[1], w[2] = sunpack('<dd', hv[1 + i]) end
        wv[g.field] = w
      end
      if p[10] > 0 and g.amount ~= 0 then w[2] = refund(w[2], g.amount, p[9]) end
      if p[8] > 0 and g.back > 0 then w[1] = refund(w[1], g.back, p[7]) end
    end
  end
  if pdirty then hset[1] = 'p'; hset[2] = spack('<dd', prt, ptt) end
  for field, w in pairs(wv) do
    hset[#hset + 1] = field
    hset[#hset + 1] = spack('<dd', w[1], w[2])
  end
  if #hset > 0 then redis.call('HSET', pk, unpack(hset)) end
end

if (held > 0 or withdrawn > 0 or #groups > 0) and redis.call('ZCARD', wek) > 0 then
  redis.call('PUBLISH', ARGV[2], tostring(held))
end
return held
