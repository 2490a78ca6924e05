-- admit.lua: decide a batch of admissions for ONE pool, in arrival order, each all-or-nothing.
-- Mirrors proxy/admission/model.py (evaluate, snapshot); keep the two in step.
--
-- Also the wait queue (mirrors proxy/admission/waitqueue.py): a request whose limits have
-- room is still refused (code 10, pool.queue) while a waiter is ahead of it in the queue.
--
-- KEYS: 1 pool hash   (p = packed <dd> pool rpm/tpm TATs in ms; w:<workload> = packed <dd>
--                      workload rpm/tpm TATs; lim = dynamic concurrency limit)
--       2 pool leases zset (lease id -> expiry ms)
--       3 waiters zset (waiter id -> rank * 2^42 + arrival), 4 waiters expiry zset
--       4+i workload leases zset of plan i
-- ARGV: 1 number of plans k, 2 wake-up channel; then per plan: packed params (model.Params
--       as <12d>), workload, rank; then per request: plan index, tokens, lease id, wait spec
--       ('' = not a waiter, else "<remaining ms> <arrival or 0> <waiter id>"; arrival is
--       the pool's waiter sequence number, field wseq of the pool hash, drawn once)
-- Returns per request 11 integers (levels rounded to the nearest milli-unit):
--   code (0 = admitted, else model.LIMIT_NAMES index),
--   retry ms, pool rpm level*1000, pool tpm level*1000, pool in-flight, effective pool limit,
--   workload rpm level*1000, workload tpm level*1000, workload in-flight,
--   wait verdict (model.WAIT_*), arrival of the waiter (0 = none).
-- PUBLISHes on the channel once when capacity may have come back for waiters (leases
-- reaped, the queue's head moved) with some of it left after the batch.
--
-- Time comes only from the server's TIME, never from ARGV: proxies' clocks cannot matter.
-- A refused request writes nothing. State is read once, updated in Lua, written once; TATs
-- are stored as packed doubles because number formatting is the dearest thing in Redis Lua.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local nows = tostring(math.floor(now))
local EPS = 1e-6
local CMIN, CMAX, RCAP = 50, 1000, 86400000
local SPAN, GRACE, QRETRY, REAPMAX = 4398046511104, 1000, 200, 64
local spack, sunpack = struct.pack, struct.unpack
local floor, ceil = math.floor, math.ceil
local fnow = floor(now)

local function level(tat, rate, burst)
  local d = tat - now
  if d < 0 then d = 0 end
  return burst - d * rate
end
local function needed(cost, burst, share)
  local allowance = share * burst
  if cost > allowance + EPS then return burst end
  return cost + (burst - allowance)
end
local function verdict(lvl, cost, burst, share)
  if lvl >= needed(cost, burst, share) - EPS then return 0 end
  if lvl < needed(cost, burst, 1.0) - EPS then return 2 end
  return 1
end
local function take(tat, cost, rate)
  if tat < now then tat = now end
  return tat + cost / rate
end
local function earliest(zkey)
  local e = redis.call('ZRANGE', zkey, 0, 0, 'WITHSCORES')
  local w = CMAX
  if e[2] then w = tonumber(e[2]) - now end
  if w < CMIN then w = CMIN end
  if w > CMAX then w = CMAX end
  return w
end
local function unpack2(v)
  if not v then return 0, 0 end
  local a, b = sunpack('<dd', v)
  return a, b
end

local pk, plk, wk, wek = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local preaped = redis.call('ZREMRANGEBYSCORE', plk, '-inf', nows)
local pin = redis.call('ZCARD', plk)
local pin0 = pin
local k = tonumber(ARGV[1])
-- one HMGET for the pool and every workload of the batch
local fields = { 'p', 'lim' }
for i = 1, k do fields[2 + i] = 'w:' .. ARGV[3 * i + 1] end
local hv = redis.call('HMGET', pk, unpack(fields))
local prt, ptt = unpack2(hv[1])
local dyn = tonumber(hv[2])
local pwait = nil

-- p: 1 share, 2 p_rrate, 3 p_rburst, 4 p_trate, 5 p_tburst, 6 p_conc,
--    7 w_rrate, 8 w_rburst, 9 w_trate, 10 w_tburst, 11 w_conc, 12 ttl_ms
local plans, wstate = {}, {}
for i = 1, k do
  local p = { sunpack('<dddddddddddd', ARGV[3 * i]) }
  p.rank = tonumber(ARGV[3 * i + 2])
  local field = fields[2 + i]
  local w = wstate[field]
  if not w then
    local rt, tt = unpack2(hv[2 + i])
    w = { field = field, lkey = KEYS[4 + i], rt = rt, tt = tt, n = 0, n0 = 0,
          counted = false, add = {}, max = 0, wait = nil, dirty = false }
    wstate[field] = w
  end
  if p[11] >= 0 and not w.counted then
    redis.call('ZREMRANGEBYSCORE', w.lkey, '-inf', nows)
    w.n = redis.call('ZCARD', w.lkey)
    w.n0 = w.n
    w.counted = true
  end
  p.w = w
  p.plim = p[6]
  if dyn and (p.plim < 0 or dyn < p.plim) then p.plim = dyn end
  p.climit = ceil(p[1] * p.plim - 1e-9)
  p.expn = floor(now) + p[12]
  p.expiry = tostring(p.expn)
  plans[i] = p
end

local out, padd, pdirty, pmax = {}, {}, false, 0
local n = 0
-- The wait queue: reaped once per batch, its head read only when a decision needs it.
local wchanged, reaped, hloaded, hs, hm = 0, false, false, nil, nil
local function reapw()
  reaped = true
  local dead = redis.call('ZRANGEBYSCORE', wek, '-inf', nows, 'LIMIT', 0, REAPMAX)
  if #dead > 0 then
    redis.call('ZREM', wk, unpack(dead))
    redis.call('ZREM', wek, unpack(dead))
    wchanged = wchanged + #dead
  end
end
local function blocks(own, wid)
  if not hloaded then
    local h = redis.call('ZRANGE', wk, 0, 0, 'WITHSCORES')
    hm, hs, hloaded = h[1], tonumber(h[2]), true
  end
  return hm ~= nil and hm ~= wid and hs < own
end
local function unqueue(wid)
  if redis.call('ZREM', wk, wid) > 0 then wchanged = wchanged + 1; hloaded = false; return 1 end
  return 0
end
local function wverdict(code, retry, rem)
  if code == 0 or rem <= 0 then return 0 end
  if (code == 1 or code == 2 or code == 4 or code == 5 or code == 7 or code == 8)
    and retry > rem then return 0 end
  if code == 7 or code == 8 or code == 9 then return 2 end
  return 1
end
local wtop = 0

for j = 3 * k + 3, #ARGV, 4 do
  local p = plans[tonumber(ARGV[j])]
  local tokens = tonumber(ARGV[j + 1])
  local rem, arr, wid
  if ARGV[j + 3] ~= '' then
    local a, b, c = string.match(ARGV[j + 3], '^(%d+) (%d+) (.+)$')
    rem, arr, wid = tonumber(a), tonumber(b), c
  end
  local w, share, plim = p.w, p[1], p.plim
  local worst, wait = 0, -1
  if p[3] > 0 then
    local lvl = level(prt, p[2], p[3])
    local v = verdict(lvl, 1, p[3], share)
    if v > 0 then
      local ms = (needed(1, p[3], share) - lvl) / p[2]
      if ms > wait then worst, wait = (v == 2 and 1 or 4), ms end
    end
  end
  if p[5] > 0 then
    local lvl = level(ptt, p[4], p[5])
    local v = verdict(lvl, tokens, p[5], share)
    if v > 0 then
      local ms = (needed(tokens, p[5], share) - lvl) / p[4]
      if ms > wait then worst, wait = (v == 2 and 2 or 5), ms end
    end
  end
  if plim >= 0 and pin + 1 > p.climit then
    if not pwait then pwait = earliest(plk) end
    if pwait > wait then worst, wait = (pin + 1 > plim and 3 or 6), pwait end
  end
  if p[8] > 0 then
    local lvl = level(w.rt, p[7], p[8])
    if verdict(lvl, 1, p[8], 1.0) > 0 then
      local ms = (needed(1, p[8], 1.0) - lvl) / p[7]
      if ms > wait then worst, wait = 7, ms end
    end
  end
  if p[10] > 0 then
    local lvl = level(w.tt, p[9], p[10])
    if verdict(lvl, tokens, p[10], 1.0) > 0 then
      local ms = (needed(tokens, p[10], 1.0) - lvl) / p[9]
      if ms > wait then worst, wait = 8, ms end
    end
  end
  if p[11] >= 0 and w.n + 1 > p[11] then
    if not w.wait then w.wait = earliest(w.lkey) end
    if w.wait > wait then worst, wait = 9, w.wait end
  end

  if (worst == 0 or wid) and not reaped then reapw() end
  if worst == 0 then
    -- no arrival yet: behind every waiter of its rank (newcomers never overtake)
    local own = p.rank * SPAN + ((arr and arr > 0) and arr or SPAN - 1)
    if blocks(own, wid) then worst, wait = 10, QRETRY end
  end

  local retry, verdict = 0, 0
  if worst == 0 then
    if p[3] > 0 then prt = take(prt, 1, p[2]); pdirty = true end
    if p[5] > 0 then ptt = take(ptt, tokens, p[4]); pdirty = true end
    if p[8] > 0 then w.rt = take(w.rt, 1, p[7]); w.dirty = true end
    if p[10] > 0 then w.tt = take(w.tt, tokens, p[9]); w.dirty = true end
    pin = pin + 1
    if p.expn > pmax then pmax = p.expn end
    padd[#padd + 1] = p.expiry
    padd[#padd + 1] = ARGV[j + 2]
    if p[11] >= 0 then
      w.n = w.n + 1
      if p.expn > w.max then w.max = p.expn end
      w.add[#w.add + 1] = p.expiry
      w.add[#w.add + 1] = ARGV[j + 2]
    end
    if wid then
      unqueue(wid)
      redis.call('ZREM', wek, wid)
    end
  else
    retry = ceil(wait)
    if retry < 1 then retry = 1 end
    if retry > RCAP then retry = RCAP end
    if wid then
      verdict = wverdict(worst, retry, rem)
      if verdict == 0 then
        unqueue(wid)
        redis.call('ZREM', wek, wid)
      else
        if arr == 0 then arr = redis.call('HINCRBY', pk, 'wseq', 1) end
        local exp = fnow + rem + GRACE
        if exp > wtop then wtop = exp end
        if verdict == 1 then
          redis.call('ZADD', wk, string.format('%.0f', p.rank * SPAN + arr), wid)
          hloaded = false
        else
          unqueue(wid)
        end
        redis.call('ZADD', wek, string.format('%.0f', exp), wid)
      end
    end
  end
  out[n + 1] = worst
  out[n + 2] = retry
  out[n + 3] = p[3] > 0 and floor(level(prt, p[2], p[3]) * 1000 + 0.5) or 0
  out[n + 4] = p[5] > 0 and floor(level(ptt, p[4], p[5]) * 1000 + 0.5) or 0
  out[n + 5] = pin
  out[n + 6] = plim
  out[n + 7] = p[8] > 0 and floor(level(w.rt, p[7], p[8]) * 1000 + 0.5) or 0
  out[n + 8] = p[10] > 0 and floor(level(w.tt, p[9], p[10]) * 1000 + 0.5) or 0
  out[n + 9] = w.n
  out[n + 10] = verdict
  out[n + 11] = (verdict ~= 0) and arr or 0
  n = n + 11
end

-- Write back once. A lease zset expires when its last lease would have: on a zset that
-- existed before (it already has an expiry) only ever push it later (GT); a fresh one
-- (everything reaped, so ZADD created it) gets its first expiry.
local function push(zkey, add, existed, top)
  if #add == 0 then return end
  redis.call('ZADD', zkey, unpack(add))
  local at = tostring(top + 1000)
  if existed then
    redis.call('PEXPIREAT', zkey, at, 'GT')
  else
    redis.call('PEXPIREAT', zkey, at)
  end
end
local hset = {}
if pdirty then hset[1] = 'p'; hset[2] = spack('<dd', prt, ptt) end
for field, w in pairs(wstate) do
  if w.dirty then
    hset[#hset + 1] = field
    hset[#hset + 1] = spack('<dd', w.rt, w.tt)
  end
end
if #hset > 0 then redis.call('HSET', pk, unpack(hset)) end
push(plk, padd, pin0 > 0, pmax)
for _, w in pairs(wstate) do push(w.lkey, w.add, w.n0 > 0, w.max) end
-- Wait sets expire when their last waiter would have been reaped (never earlier).
if wtop > 0 then
  local at = wtop + 1000
  for _, key in ipairs({ wk, wek }) do
    if redis.call('PEXPIRETIME', key) < at then
      redis.call('PEXPIREAT', key, string.format('%.0f', at))
    end
  end
end
if wchanged + preaped > 0 then
  local plim = plans[1].plim
  if (plim < 0 or pin < plim) and redis.call('ZCARD', wek) > 0 then
    redis.call('PUBLISH', ARGV[2], 'admit')
  end
end
return out
